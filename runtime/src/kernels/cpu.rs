//! The reference CPU backend on `candle-core`.

use super::decode::{arg_max_scalar, Rows, Simd};
use super::Kernels;
use crate::error::{Result, RuntimeError};
use candle_core::{CpuStorage, DType as CDType, Storage, Tensor, D};
use genie_scheduler::graph::{GeluApprox, KvPart, Node, OpKind, RopeScaling, WeightLayout};

/// Reference kernels on the host CPU (candle's CPU backend, f32).
///
/// Every op of [`OpKind`] except `Custom` is implemented; each output is made contiguous so
/// that results do not depend on which worker produced an input. One-row products (a decode
/// step's `[in, out]` linear layers and its attention over the KV cache) go to the matrix-vector
/// kernels of the `decode` module on CPUs with AVX2 + FMA; [`CpuKernels::candle_only`]
/// turns them off.
#[derive(Debug, Clone, Copy)]
pub struct CpuKernels {
    simd: Option<Simd>,
}

impl Default for CpuKernels {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuKernels {
    /// The backend, with the one-row kernels where the CPU has AVX2 + FMA.
    pub fn new() -> Self {
        Self {
            simd: Simd::detect(),
        }
    }

    /// The backend computing every op with candle's kernels (the results of
    /// [`CpuKernels::new`] differ from these by float rounding on one-row products).
    pub fn candle_only() -> Self {
        Self { simd: None }
    }
}

fn bad(node: &Node, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::BadInputs {
        node: node.name.clone(),
        op: node.op.name().to_string(),
        reason: reason.into(),
    }
}

/// Softmax along `axis`, numerically stable (subtract the max first).
fn softmax(x: &Tensor, axis: usize) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(axis)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(axis)?;
    e.broadcast_div(&s)
}

/// Sets element `(i, j)` of the last two axes `[.., q, k]` to −∞ where `j > i + (k − q)`.
fn causal_mask(x: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        return Err(candle_core::Error::Msg(
            "causal mask needs rank >= 2".into(),
        ));
    }
    let (q, k) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let off = k.saturating_sub(q);
    if q == 0 || k == 0 || k - 1 <= off {
        // Nothing is masked (e.g. one decode query over the whole cache).
        return Ok(x.clone());
    }
    let mask: Vec<u8> = (0..q)
        .flat_map(|i| (0..k).map(move |j| u8::from(j > i + off)))
        .collect();
    let mask = Tensor::from_vec(mask, (q, k), x.device())?.broadcast_as(dims)?;
    let neg = Tensor::full(f32::NEG_INFINITY, dims, x.device())?.to_dtype(x.dtype())?;
    mask.where_cond(&neg, x)
}

/// `softmax(causal_mask(s · scale))` along the last axis of attention scores `s` (`[.., q, k]`,
/// f32), in one pass per row instead of six intermediate tensors. Bitwise what the composition
/// of candle ops gives (`affine`, `where_cond`, `max_keepdim`, `broadcast_sub`, `exp`,
/// `sum_keepdim`, `broadcast_div`): each element goes through the same f32 operations in the same
/// order, and the row sums are candle's own (its reduction order depends on the target's SIMD
/// features).
fn scaled_softmax(s: &Tensor, scale: f32, causal: bool) -> candle_core::Result<Tensor> {
    let dims = s.dims().to_vec();
    let rank = dims.len();
    if rank < 2 || s.dtype() != CDType::F32 {
        let mut x = (s * f64::from(scale))?;
        if causal {
            x = causal_mask(&x)?;
        }
        return softmax(&x, rank.saturating_sub(1));
    }
    let (q, k) = (dims[rank - 2], dims[rank - 1]);
    if q == 0 || k == 0 {
        return Ok(s.clone());
    }
    let mut x: Vec<f32> = s.flatten_all()?.to_vec1()?;
    softmax_rows(&mut x, q, k, scale, causal, s.device())?;
    Tensor::from_vec(x, dims, s.device())
}

/// [`scaled_softmax`] on rows of `k` scores held in `x`, `q` query rows per head.
fn softmax_rows(
    x: &mut [f32],
    q: usize,
    k: usize,
    scale: f32,
    causal: bool,
    device: &candle_core::Device,
) -> candle_core::Result<()> {
    let off = k.saturating_sub(q);
    // As in `causal_mask`: nothing is masked when every query sees every key.
    let masked = causal && k - 1 > off;
    for (r, row) in x.chunks_mut(k).enumerate() {
        let i = r % q;
        for (j, v) in row.iter_mut().enumerate() {
            // `affine(scale, 0)` computes `v * mul + add`.
            *v = *v * scale + 0.0;
            if masked && j > i + off {
                *v = f32::NEG_INFINITY;
            }
        }
        // `max_keepdim`: the first element, replaced by each larger one.
        let mut m = row[0];
        for &v in row.iter() {
            if m < v {
                m = v;
            }
        }
        for v in row.iter_mut() {
            *v = (*v - m).exp();
        }
    }
    let rows = x.len() / k;
    let sums: Vec<f32> = Tensor::from_vec(x.to_vec(), (rows, k), device)?
        .sum_keepdim(1)?
        .flatten_all()?
        .to_vec1()?;
    for (row, z) in x.chunks_mut(k).zip(&sums) {
        for v in row.iter_mut() {
            *v /= *z;
        }
    }
    Ok(())
}

/// Attention of `q` (`[B, Sq, H·D]`) over `k`, `v` (`[B, Sk, H·D]`) with candle ops.
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    head_dim: usize,
    scale: f32,
    causal: bool,
) -> candle_core::Result<Tensor> {
    // `[B, S, H·D]` as `[B, H, S, D]`. With one sequence K and V stay strided views that gemm
    // reads in place (a decode step's K/V are the whole cache: no copy); gemm cannot step over
    // a batch of strided heads, so batches are copied.
    let by_head = |t: &Tensor, copy: bool| -> candle_core::Result<Tensor> {
        let (b, s, _) = t.dims3()?;
        let t = t.reshape((b, s, heads, head_dim))?.transpose(1, 2)?;
        if copy || b > 1 {
            t.contiguous()
        } else {
            Ok(t)
        }
    };
    let q = by_head(q, true)?;
    let (k, v) = (by_head(k, false)?, by_head(v, false)?);
    let kt = k.transpose(2, 3)?;
    let p = scaled_softmax(&q.matmul(&kt)?, scale, causal)?;
    let o = p.matmul(&v)?.transpose(1, 2)?;
    let (b, qn, _, _) = o.dims4()?;
    o.contiguous()?.reshape((b, qn, heads * head_dim))
}

/// Calls `f` with the rows of an f32 tensor `[1, .., 1, r, c]` stored on the CPU whose rows
/// are each contiguous, at any row stride (a view of the KV cache); `None` for other layouts
/// (a transposed view).
fn with_rows<R>(t: &Tensor, f: impl FnOnce(Rows<'_>) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return None;
    };
    let (dims, stride) = (layout.dims(), layout.stride());
    let n = dims.len();
    if n < 2 || dims[..n - 2].iter().any(|&d| d != 1) || (dims[n - 1] > 1 && stride[n - 1] != 1) {
        return None;
    }
    let (r, c) = (dims[n - 2], dims[n - 1]);
    let rs = if r == 1 { c } else { stride[n - 2] };
    let rows = Rows::new(data.get(layout.start_offset()..)?, r, c, rs)?;
    Some(f(rows))
}

/// [`one_query_attention`] when G < H key/value heads: query head `h` attends over the columns
/// of key/value head `h / (H/G)`, one head at a time (the K and V views are read in place).
fn grouped_query_attention(
    simd: Simd,
    q: &[f32],
    k: &Tensor,
    v: &Tensor,
    (heads, kv_heads): (usize, usize),
    d: usize,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    let mut out = vec![0f32; heads * d];
    let done = with_rows(k, |k| {
        with_rows(v, |v| {
            grouped_query_rows(simd, q, (k, v), (heads, kv_heads), d, scale, &mut out)
        })
    });
    if !matches!(done, Some(Some(Some(())))) {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(
        out,
        (1, 1, heads * d),
        &candle_core::Device::Cpu,
    )?))
}

/// One query `q` (`heads · d`) over the rows of `k` and `v` (`kv_heads · d` each, views of a
/// cache included), query head `h` reading key/value head `h / (heads / kv_heads)`, into `out`
/// (`heads · d`): the one-row kernels per head. `None` for mismatched shapes.
fn grouped_query_rows(
    simd: Simd,
    q: &[f32],
    (k, v): (Rows<'_>, Rows<'_>),
    (heads, kv_heads): (usize, usize),
    d: usize,
    scale: f32,
    out: &mut [f32],
) -> Option<()> {
    let rep = heads / kv_heads.max(1);
    let ekv = kv_heads * d;
    if q.len() != heads * d || out.len() != heads * d || k.cols() != ekv || v.cols() != ekv {
        return None;
    }
    let mut p = Vec::with_capacity(heads);
    for h in 0..heads {
        let kh = k.columns((h / rep) * d, d)?;
        p.push(simd.attention_weights(&q[h * d..(h + 1) * d], kh, 1, scale)?);
    }
    for (h, p) in p.iter().enumerate() {
        let vh = v.columns((h / rep) * d, d)?;
        let o = simd.attention_output(p, vh, 1)?;
        out[h * d..(h + 1) * d].copy_from_slice(&o);
    }
    Some(())
}

/// Most rows [`few_rows_product`] takes: a batched decode step's, one per sequence. More rows
/// (a prefill) go to gemm, which packs them.
const FEW_ROWS_MAX: usize = super::EXACT_BATCH_ROWS;

/// Weights of at least this many elements have their outputs split across the cores (each
/// output's sum is the same wherever it is computed).
const SPLIT_MIN_ELEMENTS: usize = 1 << 18;

/// `rows` rows `x` times `m` (`[in, out]`) or `mᵀ` (`[out, in]`) with the decode kernels:
/// `rows × n` outputs, row-major. A large `m` is cut into one slice of outputs per core (columns
/// of an `[in, out]` weight, rows of an `[out, in]` one), computed in parallel. `None` when a
/// slice cannot be made (it always can for a valid view).
fn few_rows_split(
    simd: Simd,
    x: &[f32],
    m: Rows<'_>,
    layout: WeightLayout,
    rows: usize,
) -> Option<Vec<f32>> {
    let n = match layout {
        WeightLayout::InOut => m.cols(),
        WeightLayout::OutIn => m.rows(),
    };
    let parts = if m.rows().saturating_mul(m.cols()) >= SPLIT_MIN_ELEMENTS {
        rayon::current_num_threads().clamp(1, 16)
    } else {
        1
    };
    // Whole lane vectors per slice, so that a slice's columns block as the whole would.
    let width = n.div_ceil(parts).div_ceil(8) * 8;
    let slices: Vec<(usize, usize)> = (0..n)
        .step_by(width.max(1))
        .map(|from| (from, width.min(n - from)))
        .collect();
    let one = |&(from, count): &(usize, usize)| -> Option<Vec<f32>> {
        let mut y = vec![0f32; rows * count];
        match layout {
            WeightLayout::InOut => simd.rows_times_matrix(x, m.columns(from, count)?, &mut y),
            WeightLayout::OutIn => simd.rows_times_cols(x, m.row_range(from, count)?, &mut y),
        }
        Some(y)
    };
    let parts: Vec<Option<Vec<f32>>> = if slices.len() > 1 {
        use rayon::prelude::*;
        slices.par_iter().map(one).collect()
    } else {
        slices.iter().map(one).collect()
    };
    if parts.len() == 1 {
        return parts.into_iter().next().flatten();
    }
    let mut y = vec![0f32; rows * n];
    for ((from, count), part) in slices.iter().zip(parts) {
        let part = part?;
        for r in 0..rows {
            y[r * n + from..r * n + from + count]
                .copy_from_slice(&part[r * count..(r + 1) * count]);
        }
    }
    Some(y)
}

/// `x · w` (`layout` `[in, out]`) or `x · wᵀ` (`[out, in]`), plus `bias`, for a few rows `x`
/// (`[.., k]`, at most [`FEW_ROWS_MAX`] rows of `k`) with the decode kernels
/// ([`Simd::rows_times_matrix`], [`Simd::rows_times_cols`]). Each row's result is the same bits
/// whether it comes alone or with others, so a batched decode step computes every sequence's
/// token as a step of that sequence alone does (gemm does not promise that: its one-row path
/// sums in another order than its many-row one). `None` where they do not apply (more rows,
/// other dtypes or layouts, mismatched shapes: candle then decides).
fn few_rows_product(
    simd: Simd,
    x: &Tensor,
    w: &Tensor,
    layout: WeightLayout,
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let k = x.dims().last().copied().unwrap_or(0);
    if x.dtype() != CDType::F32 || w.dtype() != CDType::F32 || x.rank() < 2 || w.rank() != 2 {
        return Ok(None);
    }
    let (wk, n) = match layout {
        WeightLayout::InOut => (w.dim(0)?, w.dim(1)?),
        WeightLayout::OutIn => (w.dim(1)?, w.dim(0)?),
    };
    let rows = x.elem_count() / k.max(1);
    if k == 0 || wk != k || n == 0 || rows == 0 || rows > FEW_ROWS_MAX {
        return Ok(None);
    }
    let bias = match bias {
        None => None,
        Some(b) if b.dims() == [n] && b.dtype() == CDType::F32 => Some(b.to_vec1::<f32>()?),
        Some(_) => return Ok(None),
    };
    let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let Some(Some(mut y)) = with_rows(w, |m| few_rows_split(simd, &xv, m, layout, rows)) else {
        return Ok(None);
    };
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(n) {
            for (y, b) in row.iter_mut().zip(&b) {
                *y += *b;
            }
        }
    }
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    Ok(Some(Tensor::from_vec(y, shape, x.device())?))
}

/// One query's attention (`q` `[1, 1, H·D]`) over `k`, `v` (`[1, L, G·D]`, views of the cache
/// included; `heads` is `(H, G)`) with the one-row kernels; `None` where they do not apply. A
/// single query is the last position, so the causal mask hides nothing.
fn one_query_attention(
    simd: Simd,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (heads, kv_heads): (usize, usize),
    head_dim: usize,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    let e = heads * head_dim;
    let ekv = kv_heads * head_dim;
    let l = match k.dims() {
        [1, l, c] if *c == ekv && *l > 0 => *l,
        _ => return Ok(None),
    };
    if q.dims() != [1, 1, e] || v.dims() != [1, l, ekv] || q.dtype() != CDType::F32 {
        return Ok(None);
    }
    if kv_heads != heads {
        let qv: Vec<f32> = q.flatten_all()?.to_vec1()?;
        return grouped_query_attention(simd, &qv, k, v, (heads, kv_heads), head_dim, scale);
    }
    // One query sees every key: a prompt of one row.
    causal_rows_attention(simd, q, k, v, heads, scale)
}

/// Causal attention of a prompt's queries (`q` `[1, Q, H·D]`, `k`, `v` `[1, K, H·D]`, `K ≥ Q`):
/// query `r` attends over keys `0..=K−Q+r` alone (the positions the mask would hide are never
/// computed, and no `[H, Q, K]` score matrix is made). Several queries (a prompt) take
/// [`Simd::causal_attention`], four at a time; one query (a decode step), or heads whose width
/// is not a multiple of 8, the one-row kernels. `None` where neither applies (a batch, other
/// shapes or layouts). K and V are read in place (they may be views of one cache).
fn causal_rows_attention(
    simd: Simd,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    let (b, sq, e) = q.dims3()?;
    let (kb, sk, ke) = k.dims3()?;
    if b != 1 || kb != 1 || ke != e || sk < sq || v.dims() != k.dims() || q.dtype() != CDType::F32 {
        return Ok(None);
    }
    let offset = sk - sq;
    let qv: Vec<f32> = q.flatten_all()?.to_vec1()?;
    if sq > 1 {
        // A prompt: four queries at a time.
        let mut out = vec![0f32; sq * e];
        let done = Rows::new(&qv, sq, e, e).and_then(|q| {
            with_rows(k, |k| {
                with_rows(v, |v| {
                    simd.causal_attention((q, k, v), heads, scale, &mut out)
                })
            })
        });
        if done == Some(Some(true)) {
            return Ok(Some(Tensor::from_vec(out, (1, sq, e), q.device())?));
        }
    }
    let weights = with_rows(k, |k| {
        qv.chunks_exact(e)
            .enumerate()
            .map(|(r, q)| simd.attention_weights(q, k.row_range(0, offset + r + 1)?, heads, scale))
            .collect::<Option<Vec<Vec<f32>>>>()
    });
    let Some(Some(weights)) = weights else {
        return Ok(None);
    };
    let mut out = vec![0f32; sq * e];
    let done = with_rows(v, |v| {
        for (r, (p, o)) in weights.iter().zip(out.chunks_exact_mut(e)).enumerate() {
            o.copy_from_slice(&simd.attention_output(p, v.row_range(0, offset + r + 1)?, heads)?);
        }
        Some(())
    });
    if !matches!(done, Some(Some(()))) {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(out, (1, sq, e), q.device())?))
}

/// Layer norm over the last axis with candle ops.
fn layer_norm_ops(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + f64::from(eps))?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// Layer norm over the last axis in one pass per row instead of nine intermediate tensors,
/// bitwise what [`layer_norm_ops`] gives: the same f32 operations in the same order per element
/// (`mean_keepdim` is a sum times `1/n`, `+ eps` is `v * 1 + eps`), and the row sums are
/// candle's (one chain of adds over the row in order, from zero: [`row_sums`]). A contiguous
/// f32 input with `[n]` weight and bias; otherwise the ops.
fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let n = x.dims().last().copied().unwrap_or(0);
    let f32s = [x, w, b].iter().all(|t| t.dtype() == CDType::F32);
    if !f32s || n == 0 || !x.is_contiguous() || w.dims() != [n] || b.dims() != [n] {
        return layer_norm_ops(x, w, b, eps);
    }
    let scale = (1f64 / n as f64) as f32;
    let mut xc: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let (w, b): (Vec<f32>, Vec<f32>) = (w.to_vec1()?, b.to_vec1()?);
    for block in xc.chunks_mut(SUM_ROWS * n) {
        let sums = row_sums(block, n, |v| v);
        for (row, s) in block.chunks_exact_mut(n).zip(sums) {
            let mean = s * scale + 0.0;
            for v in row.iter_mut() {
                *v -= mean;
            }
        }
        let var_sums = row_sums(block, n, |v| v * v);
        for (row, s) in block.chunks_exact_mut(n).zip(var_sums) {
            let var = s * scale + 0.0;
            let d = (var * 1.0 + eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&w).zip(&b) {
                *v = *v / d * *w + *b;
            }
        }
    }
    Tensor::from_vec(xc, x.dims(), x.device())
}

/// Rows [`row_sums`] sums at once.
const SUM_ROWS: usize = 8;

/// The sums of `f` over each of the rows of `n` in `block` (at most [`SUM_ROWS`] of them;
/// the rest of the result zero), each one chain of adds over its row in order from zero, as
/// candle sums a row; the rows' chains interleaved, so that each add waits for its own row's
/// last one only.
fn row_sums(block: &[f32], n: usize, f: impl Fn(f32) -> f32) -> [f32; SUM_ROWS] {
    let mut acc = [0f32; SUM_ROWS];
    let rows: Vec<&[f32]> = block.chunks_exact(n).take(SUM_ROWS).collect();
    if let Ok([r0, r1, r2, r3, r4, r5, r6, r7]) = <[&[f32]; SUM_ROWS]>::try_from(rows.as_slice()) {
        // Zipped, so that no index is checked.
        let columns = r0
            .iter()
            .zip(r1)
            .zip(r2)
            .zip(r3)
            .zip(r4)
            .zip(r5)
            .zip(r6)
            .zip(r7);
        for (((((((v0, v1), v2), v3), v4), v5), v6), v7) in columns {
            for (a, v) in acc.iter_mut().zip([v0, v1, v2, v3, v4, v5, v6, v7]) {
                *a += f(*v);
            }
        }
    } else {
        for (a, row) in acc.iter_mut().zip(rows) {
            for v in row {
                *a += f(*v);
            }
        }
    }
    acc
}

/// RMS norm over the last axis, as `transformers`' `LlamaRMSNorm` in f32:
/// `weight · (x · 1/sqrt(mean(x²) + eps))`, the mean of squares summed in f64 (in order, so
/// every worker gets the same bits).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let n = x.dims().last().copied().unwrap_or(0);
    if w.dims() != [n] || n == 0 {
        return Err(candle_core::Error::Msg(format!(
            "rms norm: weight {:?} does not fit rows of {n}",
            w.dims()
        )));
    }
    let mut v: Vec<f32> = x.to_dtype(CDType::F32)?.flatten_all()?.to_vec1()?;
    let w: Vec<f32> = w.to_dtype(CDType::F32)?.to_vec1()?;
    for row in v.chunks_mut(n) {
        let ss: f64 = row.iter().map(|&a| f64::from(a) * f64::from(a)).sum();
        let r = 1.0 / ((ss / n as f64) as f32 + eps).sqrt();
        for (a, w) in row.iter_mut().zip(&w) {
            *a = *w * (*a * r);
        }
    }
    Tensor::from_vec(v, x.dims(), x.device())
}

/// Rotary embedding of `x` (`[B, S, H·D]`) at `positions` (`[B, S]`, I64/I32), "rotate half"
/// pairing as `transformers`' `apply_rotary_pos_emb`: angles `p · f` in f32, their cos and sin
/// rounded to f32 from f64.
fn rotary(
    x: &Tensor,
    positions: &Tensor,
    head_dim: usize,
    theta: f32,
    scaling: &RopeScaling,
) -> candle_core::Result<Tensor> {
    let (b, s, e) = x.dims3()?;
    if head_dim == 0 || head_dim % 2 != 0 || e % head_dim != 0 || positions.dims() != [b, s] {
        return Err(candle_core::Error::Msg(format!(
            "rotary: x {:?}, positions {:?}, head_dim {head_dim}",
            x.dims(),
            positions.dims()
        )));
    }
    let pos: Vec<i64> = positions.to_dtype(CDType::I64)?.flatten_all()?.to_vec1()?;
    let inv = scaling.inv_freq(theta, head_dim);
    let half = head_dim / 2;
    let mut v: Vec<f32> = x.to_dtype(CDType::F32)?.flatten_all()?.to_vec1()?;
    let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
    for (row, &p) in v.chunks_mut(e).zip(&pos) {
        for (i, f) in inv.iter().enumerate() {
            let angle = f64::from(p as f32 * f);
            cos[i] = angle.cos() as f32;
            sin[i] = angle.sin() as f32;
        }
        for head in row.chunks_mut(head_dim) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] + -b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    }
    Tensor::from_vec(v, (b, s, e), x.device())
}

/// `[B, K, G·D]` keys or values with each of the G heads repeated `rep` times in place:
/// `[B, K, G·rep·D]`, the layout `transformers`' `repeat_kv` gives.
fn repeat_kv(t: &Tensor, kv_heads: usize, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(t.clone());
    }
    let (b, k, e) = t.dims3()?;
    let d = e / kv_heads.max(1);
    t.reshape((b, k, kv_heads, 1, d))?
        .broadcast_as((b, k, kv_heads, rep, d))?
        .contiguous()?
        .reshape((b, k, kv_heads * rep * d))
}

/// Pads H and W (axes 2, 3) with `value`.
fn pad_hw(x: &Tensor, ph: usize, pw: usize, value: f32) -> candle_core::Result<Tensor> {
    if ph == 0 && pw == 0 {
        return Ok(x.clone());
    }
    let (n, c, h, w) = x.dims4()?;
    let dev = x.device();
    let dt = x.dtype();
    let side = |rows: usize, cols: usize| -> candle_core::Result<Tensor> {
        Tensor::full(value, (n, c, rows, cols), dev)?.to_dtype(dt)
    };
    let mut t = x.clone();
    if pw > 0 {
        t = Tensor::cat(&[&side(h, pw)?, &t, &side(h, pw)?], 3)?;
    }
    if ph > 0 {
        let w2 = w + 2 * pw;
        t = Tensor::cat(&[&side(ph, w2)?, &t, &side(ph, w2)?], 2)?;
    }
    Ok(t)
}

fn compute(node: &Node, ins: &[Tensor], simd: Option<Simd>) -> candle_core::Result<Vec<Tensor>> {
    let one = |t: Tensor| -> candle_core::Result<Vec<Tensor>> { Ok(vec![t.contiguous()?]) };
    match &node.op {
        OpKind::KvCacheAppend => {
            if ins.len() == 2 {
                one(Tensor::stack(&[&ins[0], &ins[1]], 0)?)
            } else {
                let new = Tensor::stack(&[&ins[1], &ins[2]], 0)?;
                one(Tensor::cat(&[&ins[0], &new], 2)?)
            }
        }
        OpKind::KvCacheRead { part } => {
            let i = match part {
                KvPart::Key => 0,
                KvPart::Value => 1,
            };
            one(ins[0].get(i)?)
        }
        OpKind::Embedding => one(embedding(&ins[0], &ins[1])?),
        OpKind::Linear { bias, layout } => one(linear(ins, *bias, *layout, simd)?),
        OpKind::MatMul { transpose_b } => one(matmul(&ins[0], &ins[1], *transpose_b, simd)?),
        OpKind::Conv2d {
            stride,
            padding,
            dilation,
            groups,
            bias,
        } => one(conv2d(ins, (*stride, *padding, *dilation), *groups, *bias)?),
        OpKind::BatchNorm { eps } => one(batch_norm(ins, eps.0)?),
        OpKind::LayerNorm { eps } => one(layer_norm(&ins[0], &ins[1], &ins[2], eps.0)?),
        OpKind::Softmax { axis, causal } => {
            let x = if *causal {
                causal_mask(&ins[0])?
            } else {
                ins[0].clone()
            };
            one(softmax(&x, *axis)?)
        }
        OpKind::Attention {
            heads,
            kv_heads,
            head_dim,
            causal,
            scale,
        } => {
            let heads = (*heads, kv_heads.unwrap_or(*heads));
            one(any_attention(
                ins, heads, *head_dim, scale.0, *causal, simd,
            )?)
        }
        OpKind::RmsNorm { eps } => one(rms_norm(&ins[0], &ins[1], eps.0)?),
        OpKind::Rotary {
            head_dim,
            theta,
            scaling,
        } => one(rotary(&ins[0], &ins[1], *head_dim, theta.0, scaling)?),
        OpKind::Silu => one(ins[0].silu()?),
        OpKind::Add => one(ins[0].broadcast_add(&ins[1])?),
        OpKind::Mul => one(ins[0].broadcast_mul(&ins[1])?),
        OpKind::Gelu {
            approximate: GeluApprox::Tanh,
        } if simd.is_some() && ins[0].dtype() == CDType::F32 => {
            let mut x: Vec<f32> = ins[0].flatten_all()?.to_vec1()?;
            if let Some(simd) = simd {
                simd.gelu_tanh(&mut x);
            }
            one(Tensor::from_vec(x, ins[0].dims(), ins[0].device())?)
        }
        OpKind::Gelu { approximate } => one(match approximate {
            GeluApprox::Tanh => ins[0].gelu()?,
            GeluApprox::Erf => ins[0].gelu_erf()?,
        }),
        OpKind::Relu => one(ins[0].relu()?),
        OpKind::Tanh => one(ins[0].tanh()?),
        OpKind::MaxPool2d {
            kernel,
            stride,
            padding,
        } => {
            let x = pad_hw(&ins[0], padding[0], padding[1], f32::NEG_INFINITY)?;
            one(x.max_pool2d_with_stride((kernel[0], kernel[1]), (stride[0], stride[1]))?)
        }
        OpKind::AvgPool2d {
            kernel,
            stride,
            padding,
        } => {
            let x = pad_hw(&ins[0], padding[0], padding[1], 0.0)?;
            one(x.avg_pool2d_with_stride((kernel[0], kernel[1]), (stride[0], stride[1]))?)
        }
        OpKind::GlobalAvgPool2d => one(ins[0].mean_keepdim(3)?.mean_keepdim(2)?),
        OpKind::Reshape { shape } => one(ins[0].contiguous()?.reshape(shape.clone())?),
        OpKind::Transpose { perm } => one(ins[0].permute(perm.clone())?),
        OpKind::Concat { axis } => {
            let refs: Vec<&Tensor> = ins.iter().collect();
            one(Tensor::cat(&refs, *axis)?)
        }
        OpKind::Split { axis, sizes } => {
            let mut out = Vec::with_capacity(sizes.len());
            let mut start = 0;
            for &len in sizes {
                out.push(ins[0].narrow(*axis, start, len)?.contiguous()?);
                start += len;
            }
            Ok(out)
        }
        OpKind::Slice { axis, start, end } => {
            one(ins[0].narrow(*axis, *start, end.saturating_sub(*start))?)
        }
        OpKind::Input | OpKind::Parameter { .. } | OpKind::KvCache { .. } | OpKind::Custom(_) => {
            Err(candle_core::Error::Msg(format!(
                "op `{}` has no CPU kernel",
                node.op.name()
            )))
        }
        OpKind::ArgMax => one(arg_max(&ins[0], simd)?),
        // It needs the worker's caches: the executor appends, then calls `cached_attention`.
        OpKind::CachedAttention { .. } => Err(candle_core::Error::Msg(
            "cached_attention runs through Kernels::cached_attention, with the KV caches".into(),
        )),
    }
}

/// The index of the largest value of each row along the last axis, I64 `[...]`: ties to the
/// lowest index, and a value replaces the best so far only when greater (a later NaN is never
/// chosen, a first one never replaced), as [`crate::models::argmax_last`] picks a token.
fn arg_max(x: &Tensor, simd: Option<Simd>) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let (Some(&v), Some(lead)) = (dims.last(), dims.get(..dims.len().saturating_sub(1))) else {
        return Err(candle_core::Error::Msg("arg_max of a scalar".into()));
    };
    if v == 0 {
        return Err(candle_core::Error::Msg("arg_max over an empty axis".into()));
    }
    let pick = |data: &[f32]| -> Vec<i64> {
        data.chunks_exact(v)
            .map(|row| match simd {
                Some(simd) => simd.arg_max(row) as i64,
                None => arg_max_scalar(row) as i64,
            })
            .collect()
    };
    let x = x.to_dtype(CDType::F32)?.contiguous()?;
    let ids = {
        let (storage, layout) = x.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(data)), Some((from, to))) => {
                data.get(from..to).map(&pick)
            }
            _ => None,
        }
    };
    let ids = match ids {
        Some(ids) => ids,
        None => pick(&x.flatten_all()?.to_vec1::<f32>()?),
    };
    Tensor::from_vec(ids, lead, x.device())
}

/// [`cached_attention`] with the one-row kernels of [`one_query_attention`] (the same calls on
/// the same values, so the same bits) straight over each cache's K and V rows, the query read
/// once and the rows written into one output (grouped-query attention as
/// [`grouped_query_attention`] does it); `None` where they do not apply (other dtypes or
/// layouts: the caller then goes row by row).
fn cached_attention_rows(
    simd: Simd,
    q: &Tensor,
    caches: &[Tensor],
    (heads, kv_heads): (usize, usize),
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    let e = q.dims3()?.2;
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || e % heads != 0 {
        return Ok(None);
    }
    if q.dtype() != CDType::F32 {
        return Ok(None);
    }
    let d = e / heads;
    let qv: Vec<f32> = q.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; qv.len()];
    for ((cache, q), o) in caches
        .iter()
        .zip(qv.chunks_exact(e))
        .zip(out.chunks_exact_mut(e))
    {
        let done = with_kv_rows(cache, |k, v| {
            if heads != kv_heads {
                // Grouped-query attention: as a one-sequence step's (the same kernels per head).
                return grouped_query_rows(simd, q, (k, v), (heads, kv_heads), d, scale, o);
            }
            if k.cols() != e {
                return None;
            }
            let p = simd.attention_weights(q, k, heads, scale)?;
            o.copy_from_slice(&simd.attention_output(&p, v, heads)?);
            Some(())
        });
        if !matches!(done, Some(Some(()))) {
            return Ok(None);
        }
    }
    Ok(Some(Tensor::from_vec(out, q.dims(), q.device())?))
}

/// Calls `f` with the K rows and the V rows of a cache `[2, 1, L, E]` stored on the CPU (a view
/// of a worker's pages: each row contiguous, any row stride), under one read of its storage;
/// `None` for other layouts.
fn with_kv_rows<R>(cache: &Tensor, f: impl FnOnce(Rows<'_>, Rows<'_>) -> R) -> Option<R> {
    let (storage, layout) = cache.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return None;
    };
    let (dims, stride) = (layout.dims(), layout.stride());
    let &[2, 1, l, e] = dims else {
        return None;
    };
    if e > 1 && stride[3] != 1 {
        return None;
    }
    let rs = if l == 1 { e } else { stride[2] };
    let part = |at: usize| Rows::new(data.get(at..)?, l, e, rs);
    let k = part(layout.start_offset())?;
    let v = part(layout.start_offset().checked_add(stride[0])?)?;
    Some(f(k, v))
}

/// Row `i` of `q` (`[N, 1, H·D]`) attending over `caches[i]` (`[2, 1, L, G·D]`) as
/// [`OpKind::Attention`] does for a one-sequence decode step (same kernels, same views: the
/// cache's K and V halves read in place), the rows concatenated back.
fn cached_attention(
    q: &Tensor,
    caches: &[Tensor],
    heads: (usize, usize),
    head_dim: usize,
    scale: f32,
    simd: Option<Simd>,
) -> candle_core::Result<Tensor> {
    let (n, one, _) = q.dims3()?;
    if n != caches.len() || one != 1 {
        return Err(candle_core::Error::Msg(format!(
            "{n} query rows of {one} tokens for {} caches",
            caches.len()
        )));
    }
    if let Some(simd) = simd {
        if let Some(out) = cached_attention_rows(simd, q, caches, heads, scale)? {
            return Ok(out);
        }
    }
    let mut outs = Vec::with_capacity(n);
    for (i, cache) in caches.iter().enumerate() {
        let row = q.narrow(0, i, 1)?.contiguous()?;
        let ins = [row, cache.get(0)?, cache.get(1)?];
        outs.push(any_attention(&ins, heads, head_dim, scale, true, simd)?);
    }
    Tensor::cat(&outs, 0)
}

/// A lookup of `ids` (i32 or i64, any shape) in the rows of `table`: `[.., d]`.
fn embedding(ids: &Tensor, table: &Tensor) -> candle_core::Result<Tensor> {
    let mut shape = ids.dims().to_vec();
    let flat = ids.flatten_all()?;
    let flat = if flat.dtype() == CDType::I32 {
        flat.to_dtype(CDType::I64)?
    } else {
        flat
    };
    let rows = table.index_select(&flat, 0)?;
    shape.push(table.dim(1)?);
    rows.reshape(shape)
}

/// `x · W` (+ bias) with the weight in either layout: the decode kernels for a few rows
/// ([`few_rows_product`]), candle's gemm otherwise.
fn linear(
    ins: &[Tensor],
    bias: bool,
    layout: WeightLayout,
    simd: Option<Simd>,
) -> candle_core::Result<Tensor> {
    if let Some(simd) = simd {
        let b = bias.then(|| &ins[2]);
        if let Some(y) = few_rows_product(simd, &ins[0], &ins[1], layout, b)? {
            return Ok(y);
        }
    }
    let x = &ins[0];
    let mut shape = x.dims().to_vec();
    let k = shape.last().copied().unwrap_or(1);
    let x2 = x.reshape(((), k))?;
    let w = match layout {
        WeightLayout::InOut => ins[1].clone(),
        // A transposed view: gemm reads it strided, no copy of the weight.
        WeightLayout::OutIn => ins[1].t()?,
    };
    let mut y = x2.matmul(&w)?;
    // The bias added in place to the product gemm just made (candle's broadcast add indexes
    // every element and makes a new tensor: most of the time of the product itself at a
    // 128-wide model's sizes); the same sums, so the same bits.
    if bias && y.inplace_op2(&ins[2], &AddBiasRows).is_err() {
        y = y.broadcast_add(&ins[2])?;
    }
    if let Some(last) = shape.last_mut() {
        *last = w.dim(1)?;
    }
    y.reshape(shape)
}

/// `y[r][j] += b[j]` for every row `r` of a contiguous f32 `y` (`[rows, n]`) and an f32 `b` of
/// `n`, in place; an error (and `y` untouched) for any other dtype, shape or layout.
struct AddBiasRows;

impl candle_core::InplaceOp2 for AddBiasRows {
    fn name(&self) -> &'static str {
        "add-bias-rows"
    }

    fn cpu_fwd(
        &self,
        y: &mut CpuStorage,
        yl: &candle_core::Layout,
        b: &CpuStorage,
        bl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let unfit = || {
            candle_core::Error::Msg("add-bias-rows: not a contiguous f32 [rows, n] and [n]".into())
        };
        let (CpuStorage::F32(y), CpuStorage::F32(b)) = (y, b) else {
            return Err(unfit());
        };
        let (Some((y0, y1)), Some((b0, b1))) = (yl.contiguous_offsets(), bl.contiguous_offsets())
        else {
            return Err(unfit());
        };
        let n = b1 - b0;
        let (Some(y), Some(b)) = (y.get_mut(y0..y1), b.get(b0..b1)) else {
            return Err(unfit());
        };
        if n == 0 || yl.dims().last() != Some(&n) || bl.dims() != [n] || y.len() % n != 0 {
            return Err(unfit());
        }
        for row in y.chunks_exact_mut(n) {
            for (y, b) in row.iter_mut().zip(b) {
                *y += *b;
            }
        }
        Ok(())
    }
}

/// `a · b` (or `a · bᵀ`), a 2-D `b` broadcast over `a`'s leading axes.
fn matmul(
    a: &Tensor,
    b: &Tensor,
    transpose_b: bool,
    simd: Option<Simd>,
) -> candle_core::Result<Tensor> {
    if let Some(simd) = simd {
        let layout = if transpose_b {
            WeightLayout::OutIn
        } else {
            WeightLayout::InOut
        };
        if let Some(y) = few_rows_product(simd, a, b, layout, None)? {
            return Ok(y);
        }
    }
    let b = if transpose_b { b.t()? } else { b.clone() };
    let a = a.contiguous()?;
    if b.rank() == 2 && a.rank() > 2 {
        let mut shape = a.dims().to_vec();
        let k = shape.last().copied().unwrap_or(1);
        let y = a.reshape(((), k))?.matmul(&b)?;
        if let Some(last) = shape.last_mut() {
            *last = b.dim(1)?;
        }
        y.reshape(shape)
    } else {
        a.broadcast_matmul(&b)
    }
}

/// A 2-D convolution with square stride, padding and dilation (`(stride, padding, dilation)`).
fn conv2d(
    ins: &[Tensor],
    (stride, padding, dilation): ([usize; 2], [usize; 2], [usize; 2]),
    groups: usize,
    bias: bool,
) -> candle_core::Result<Tensor> {
    // candle's conv2d takes one value per attribute; the builders use square ones.
    if stride[0] != stride[1] || padding[0] != padding[1] || dilation[0] != dilation[1] {
        return Err(candle_core::Error::Msg(
            "non-square stride/padding/dilation are not supported".into(),
        ));
    }
    let mut y = ins[0].conv2d(&ins[1], padding[0], stride[0], dilation[0], groups)?;
    if bias {
        let o = ins[2].dim(0)?;
        y = y.broadcast_add(&ins[2].reshape((1, o, 1, 1))?)?;
    }
    Ok(y)
}

/// Batch normalisation over axis 1 with running statistics (`ins`: x, weight, bias, mean, var).
fn batch_norm(ins: &[Tensor], eps: f32) -> candle_core::Result<Tensor> {
    let x = &ins[0];
    let c = x.dim(1)?;
    let mut bshape = vec![1usize; x.rank()];
    bshape[1] = c;
    let r = |t: &Tensor| t.reshape(bshape.clone());
    let inv = (r(&ins[4])? + f64::from(eps))?.sqrt()?;
    let y = x
        .broadcast_sub(&r(&ins[3])?)?
        .broadcast_div(&inv)?
        .broadcast_mul(&r(&ins[1])?)?
        .broadcast_add(&r(&ins[2])?)?;
    Ok(y)
}

/// Attention of `ins` (q, k, v) with `heads` = (query heads, key/value heads): the one-query
/// kernels for a decode step, candle's ops otherwise (key/value heads repeated to the query's).
fn any_attention(
    ins: &[Tensor],
    (heads, g): (usize, usize),
    head_dim: usize,
    scale: f32,
    causal: bool,
    simd: Option<Simd>,
) -> candle_core::Result<Tensor> {
    if g == 0 || heads % g != 0 {
        return Err(candle_core::Error::Msg(format!(
            "kv_heads {g} does not divide heads {heads}"
        )));
    }
    if let Some(simd) = simd {
        let (q, k, v) = (&ins[0], &ins[1], &ins[2]);
        if let Some(o) = one_query_attention(simd, q, k, v, (heads, g), head_dim, scale)? {
            return Ok(o);
        }
        if causal && g == heads {
            if let Some(o) = causal_rows_attention(simd, q, k, v, heads, scale)? {
                return Ok(o);
            }
        }
    }
    let k = repeat_kv(&ins[1], g, heads / g)?;
    let v = repeat_kv(&ins[2], g, heads / g)?;
    attention(&ins[0], &k, &v, heads, head_dim, scale, causal)
}

/// Inputs each op needs at least (so a malformed call is an error, not an index panic).
fn min_inputs(op: &OpKind) -> usize {
    match op {
        OpKind::Input | OpKind::Parameter { .. } | OpKind::KvCache { .. } | OpKind::Custom(_) => 0,
        OpKind::KvCacheAppend | OpKind::Embedding | OpKind::MatMul { .. } => 2,
        OpKind::Add | OpKind::Mul | OpKind::RmsNorm { .. } | OpKind::Rotary { .. } => 2,
        OpKind::Linear { bias, .. } | OpKind::Conv2d { bias, .. } => 2 + usize::from(*bias),
        OpKind::LayerNorm { .. } | OpKind::Attention { .. } => 3,
        OpKind::BatchNorm { .. } => 5,
        _ => 1,
    }
}

impl Kernels for CpuKernels {
    fn name(&self) -> &str {
        "cpu (candle)"
    }

    fn run(&self, node: &Node, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let need = min_inputs(&node.op);
        if inputs.len() < need {
            return Err(bad(
                node,
                format!("needs {need} inputs, got {}", inputs.len()),
            ));
        }
        let out = compute(node, inputs, self.simd).map_err(|source| RuntimeError::Kernel {
            node: node.name.clone(),
            source,
        })?;
        if out.len() != node.outputs.len() {
            return Err(bad(
                node,
                format!(
                    "kernel produced {} outputs, graph declares {}",
                    out.len(),
                    node.outputs.len()
                ),
            ));
        }
        for (i, (t, meta)) in out.iter().zip(&node.outputs).enumerate() {
            if t.dims() != meta.shape.as_slice() {
                return Err(bad(
                    node,
                    format!(
                        "output {i} has shape {:?}, graph declares {:?}",
                        t.dims(),
                        meta.shape
                    ),
                ));
            }
        }
        Ok(out)
    }

    fn cached_attention(&self, node: &Node, q: &Tensor, caches: &[Tensor]) -> Result<Tensor> {
        let OpKind::CachedAttention {
            heads,
            kv_heads,
            head_dim,
            scale,
        } = &node.op
        else {
            return Err(bad(node, "not a cached_attention node"));
        };
        let heads = (*heads, kv_heads.unwrap_or(*heads));
        let out = cached_attention(q, caches, heads, *head_dim, scale.0, self.simd).map_err(
            |source| RuntimeError::Kernel {
                node: node.name.clone(),
                source,
            },
        )?;
        match node.outputs.first() {
            Some(meta) if out.dims() == meta.shape.as_slice() => Ok(out),
            _ => Err(bad(
                node,
                format!(
                    "output has shape {:?}, graph declares {:?}",
                    out.dims(),
                    node.outputs
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use genie_scheduler::graph::{DType, NodeId, Scalar, Semantics, TensorMeta};

    /// Attention over strided K/V views gives bitwise the result of contiguous copies of them
    /// (decode: one query over a long cache; prefill: as many queries as keys).
    #[test]
    fn attention_strided_kv_equals_contiguous() {
        let d = Device::Cpu;
        for (qn, kn) in [(1, 1000), (37, 37)] {
            let q = Tensor::randn(0f32, 1., (1, qn, 128), &d).unwrap();
            let k = Tensor::randn(0f32, 1., (1, kn, 128), &d).unwrap();
            let v = Tensor::randn(0f32, 1., (1, kn, 128), &d).unwrap();
            let split = |t: &Tensor| {
                let s = t.dim(1).unwrap();
                t.reshape((1, s, 4, 32)).unwrap().transpose(1, 2).unwrap()
            };
            let q = split(&q).contiguous().unwrap();
            let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let run = |k: &Tensor, v: &Tensor| {
                let s = q.matmul(&k.transpose(2, 3).unwrap()).unwrap();
                let p = softmax(&causal_mask(&s).unwrap(), 3).unwrap();
                (flat(s), flat(p.matmul(v).unwrap()))
            };
            let strided = run(&split(&k), &split(&v));
            let copied = run(
                &split(&k).contiguous().unwrap(),
                &split(&v).contiguous().unwrap(),
            );
            assert_eq!(strided, copied, "q {qn} × k {kn}");
        }
    }

    /// The fused scaled softmax is bitwise the composition of candle ops it replaces.
    #[test]
    fn scaled_softmax_equals_the_op_composition() {
        let d = Device::Cpu;
        for (qn, kn, causal) in [(1, 1000, true), (37, 37, true), (5, 9, true), (3, 3, false)] {
            let s = (Tensor::randn(0f32, 4., (1, 4, qn, kn), &d).unwrap() * 3.0).unwrap();
            let scale = 0.176_776_7_f32;
            let mut reference = (&s * f64::from(scale)).unwrap();
            if causal {
                reference = causal_mask(&reference).unwrap();
            }
            let reference = softmax(&reference, 3).unwrap();
            let fused = scaled_softmax(&s, scale, causal).unwrap();
            assert_eq!(
                vals(&fused).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                vals(&reference)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "q {qn} × k {kn}, causal {causal}"
            );
        }
    }

    /// The fused layer norm is bitwise the composition of candle ops it replaces.
    #[test]
    fn layer_norm_equals_the_op_composition() {
        let d = Device::Cpu;
        let bits = |t: &Tensor| vals(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for shape in [
            vec![1, 1, 128],
            vec![2, 7, 37],
            vec![5, 768],
            vec![1, 320, 128],
            vec![3, 9],
        ] {
            let n = *shape.last().unwrap();
            let x = (Tensor::randn(0f32, 3., shape.as_slice(), &d).unwrap() + 0.7).unwrap();
            let w = Tensor::randn(1f32, 0.5, n, &d).unwrap();
            let b = Tensor::randn(0f32, 0.5, n, &d).unwrap();
            let fused = layer_norm(&x, &w, &b, 1e-5).unwrap();
            let reference = layer_norm_ops(&x, &w, &b, 1e-5).unwrap();
            assert_eq!(bits(&fused), bits(&reference), "{shape:?}");
            assert_eq!(fused.dims(), reference.dims());
        }
    }

    /// The one-row kernels agree with candle's to float rounding on a decode step's products
    /// (linear layers in both weight layouts, with and without bias, the tied LM head, attention
    /// over views of a cache), give the same bits on a view and on a contiguous copy of it, and
    /// leave several-row products to candle (bitwise candle's).
    #[test]
    fn one_row_kernels_agree_with_candle() {
        let d = Device::Cpu;
        let (fast, reference) = (CpuKernels::new(), CpuKernels::candle_only());
        if fast.simd.is_none() {
            return;
        }
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            assert_eq!(a.dims(), b.dims(), "{what}");
            for (x, y) in vals(a).iter().zip(vals(b)) {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "{what}: {x} vs {y}"
                );
            }
        };
        let r = |s: &[usize]| Tensor::randn(0f32, 1., s, &d).unwrap();
        for (layout, bias) in [
            (WeightLayout::InOut, true),
            (WeightLayout::OutIn, true),
            (WeightLayout::InOut, false),
        ] {
            let n = node(OpKind::Linear { bias, layout }, &[1, 1, 200]);
            let w = match layout {
                WeightLayout::InOut => r(&[131, 200]),
                WeightLayout::OutIn => r(&[200, 131]),
            };
            let mut ins = vec![r(&[1, 1, 131]), w];
            if bias {
                ins.push(r(&[200]));
            }
            let (a, b) = (
                fast.run(&n, &ins).unwrap(),
                reference.run(&n, &ins).unwrap(),
            );
            close(&a[0], &b[0], &format!("linear {layout:?} bias {bias}"));
            // A few rows (a batched decode step): the same kernels, each row's bits as alone.
            let n = node(OpKind::Linear { bias, layout }, &[1, 3, 200]);
            ins[0] = r(&[1, 3, 131]);
            let (a, b) = (
                fast.run(&n, &ins).unwrap(),
                reference.run(&n, &ins).unwrap(),
            );
            close(&a[0], &b[0], &format!("linear rows {layout:?} bias {bias}"));
            let n1 = node(OpKind::Linear { bias, layout }, &[1, 1, 200]);
            let mut alone = ins.clone();
            alone[0] = ins[0].narrow(1, 1, 1).unwrap();
            let one = fast.run(&n1, &alone).unwrap();
            assert_eq!(vals(&one[0]), vals(&a[0].narrow(1, 1, 1).unwrap()));
            // Many rows (a prefill): candle's kernels, bitwise.
            let rows = FEW_ROWS_MAX + 1;
            let n = node(OpKind::Linear { bias, layout }, &[1, rows, 200]);
            ins[0] = r(&[1, rows, 131]);
            let (a, b) = (
                fast.run(&n, &ins).unwrap(),
                reference.run(&n, &ins).unwrap(),
            );
            assert_eq!(vals(&a[0]), vals(&b[0]));
        }
        let n = node(OpKind::MatMul { transpose_b: false }, &[1, 1, 300]);
        let ins = [r(&[1, 1, 128]), r(&[128, 300])];
        let (a, b) = (
            fast.run(&n, &ins).unwrap(),
            reference.run(&n, &ins).unwrap(),
        );
        close(&a[0], &b[0], "matmul");
        for (heads, hd, l, cap) in [(4, 32, 1000, 1024), (3, 36, 5, 16), (2, 64, 1, 1)] {
            let e = heads * hd;
            let store = (Tensor::randn(0f32, 1., (2, 1, cap, e), &d).unwrap() * 2.0).unwrap();
            let view = store.narrow(2, 0, l).unwrap();
            let (k, v) = (view.get(0).unwrap(), view.get(1).unwrap());
            let q = r(&[1, 1, e]);
            let n = causal_mha(heads, hd, 1.0 / (hd as f32).sqrt(), &[1, 1, e]);
            let on_view = fast.run(&n, &[q.clone(), k.clone(), v.clone()]).unwrap();
            let copies = [q.clone(), k.contiguous().unwrap(), v.contiguous().unwrap()];
            let on_copy = fast.run(&n, &copies).unwrap();
            assert_eq!(
                vals(&on_view[0]),
                vals(&on_copy[0]),
                "{heads}×{hd}, {l} of {cap}"
            );
            let b = reference.run(&n, &[q, k, v]).unwrap();
            close(
                &on_view[0],
                &b[0],
                &format!("attention {heads}×{hd}, {l} of {cap}"),
            );
        }
    }

    /// Grouped-query attention: the one-query kernel agrees with candle's path over repeated
    /// K/V heads (float rounding), and both equal multi-head attention over explicitly repeated
    /// heads; a prefill (several queries) is candle's, bitwise the repeated-heads answer.
    #[test]
    fn grouped_query_attention_equals_repeated_heads() {
        let d = Device::Cpu;
        let (heads, g, hd) = (6, 2, 16);
        let r = |s: &[usize]| Tensor::randn(0f32, 1., s, &d).unwrap();
        let gqa = |q: usize| {
            node(
                OpKind::Attention {
                    heads,
                    kv_heads: Some(g),
                    head_dim: hd,
                    causal: true,
                    scale: Scalar(0.25),
                },
                &[1, q, heads * hd],
            )
        };
        let mha = |q: usize| causal_mha(heads, hd, 0.25, &[1, q, heads * hd]);
        for (qn, kn) in [(1usize, 40usize), (7, 7)] {
            let store = r(&[2, 1, 64, g * hd]);
            let view = store.narrow(2, 0, kn).unwrap();
            let (k, v) = (view.get(0).unwrap(), view.get(1).unwrap());
            let q = r(&[1, qn, heads * hd]);
            let rep = |t: &Tensor| repeat_kv(t, g, heads / g).unwrap();
            let full = CpuKernels::candle_only()
                .run(&mha(qn), &[q.clone(), rep(&k), rep(&v)])
                .unwrap();
            let slow = CpuKernels::candle_only()
                .run(&gqa(qn), &[q.clone(), k.clone(), v.clone()])
                .unwrap();
            assert_eq!(vals(&slow[0]), vals(&full[0]), "q {qn}");
            let fast = CpuKernels::new().run(&gqa(qn), &[q, k, v]).unwrap();
            for (a, b) in vals(&fast[0]).iter().zip(vals(&full[0])) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "q {qn}: {a} vs {b}"
                );
            }
        }
        let bad = node(
            OpKind::Attention {
                heads: 6,
                kv_heads: Some(4),
                head_dim: hd,
                causal: true,
                scale: Scalar(0.25),
            },
            &[1, 1, 96],
        );
        let ins = [r(&[1, 1, 96]), r(&[1, 3, 64]), r(&[1, 3, 64])];
        assert!(CpuKernels::new().run(&bad, &ins).is_err());
    }

    /// RMS norm and rotary embeddings on values worked by hand: position 0 leaves a head as it
    /// is, position p rotates pair (i, i + D/2) by p·θ^(−2i/D), which keeps its length.
    #[test]
    fn rms_norm_and_rotary_by_hand() {
        let k = CpuKernels::new();
        let n = node(OpKind::RmsNorm { eps: Scalar(0.0) }, &[1, 2]);
        let y = k
            .run(&n, &[t(&[3.0, 4.0], &[1, 2]), t(&[1.0, 2.0], &[2])])
            .unwrap();
        let want = [3.0 / 12.5f32.sqrt(), 8.0 / 12.5f32.sqrt()];
        for (a, b) in vals(&y[0]).iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let rope = node(
            OpKind::Rotary {
                head_dim: 4,
                theta: Scalar(100.0),
                scaling: RopeScaling::None,
            },
            &[1, 2, 8],
        );
        let x: Vec<f32> = (1..=16).map(|i| i as f32).collect();
        let pos = Tensor::from_vec(vec![0i64, 3], (1, 2), &Device::Cpu).unwrap();
        let y = vals(&k.run(&rope, &[t(&x, &[1, 2, 8]), pos]).unwrap()[0]);
        assert_eq!(&y[..8], &x[..8]);
        // Position 3, pair (0, 2) of the first head: angle 3, frequency 1.
        let (a, b) = (x[8], x[10]);
        let (c, s) = (3f64.cos() as f32, 3f64.sin() as f32);
        assert!((y[8] - (a * c - b * s)).abs() < 1e-5);
        assert!((y[10] - (b * c + a * s)).abs() < 1e-5);
        // Pair (1, 3): frequency 100^(-1/2) = 0.1.
        let (a, b) = (x[9], x[11]);
        let norm = |p: f32, q: f32| (p * p + q * q).sqrt();
        assert!((norm(y[9], y[11]) - norm(a, b)).abs() < 1e-4);
        let silu = node(OpKind::Silu, &[2]);
        let y = vals(&k.run(&silu, &[t(&[0.0, 2.0], &[2])]).unwrap()[0]);
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 2.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
    }

    /// A causal multi-head `Attention` node of `heads` heads of `hd`, its output `out`.
    fn causal_mha(heads: usize, hd: usize, scale: f32, out: &[usize]) -> Node {
        let op = OpKind::Attention {
            heads,
            kv_heads: None,
            head_dim: hd,
            causal: true,
            scale: Scalar(scale),
        };
        node(op, out)
    }

    fn node(op: OpKind, out: &[usize]) -> Node {
        Node {
            id: NodeId(0),
            name: "t".into(),
            op,
            inputs: vec![],
            outputs: vec![TensorMeta::new(out.to_vec(), DType::F32)],
            semantics: Semantics::default(),
        }
    }

    fn t(v: &[f32], s: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), s.to_vec(), &Device::Cpu).unwrap()
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn linear_layouts_agree() {
        let k = CpuKernels::new();
        let x = t(&[1.0, 2.0], &[1, 2]);
        let w_io = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        let b = t(&[0.5, 0.5, 0.5], &[3]);
        let n = node(
            OpKind::Linear {
                bias: true,
                layout: WeightLayout::InOut,
            },
            &[1, 3],
        );
        let y = k.run(&n, &[x.clone(), w_io.clone(), b.clone()]).unwrap();
        assert_eq!(vals(&y[0]), vec![9.5, 12.5, 15.5]);
        let n2 = node(
            OpKind::Linear {
                bias: true,
                layout: WeightLayout::OutIn,
            },
            &[1, 3],
        );
        let w_oi = w_io.t().unwrap().contiguous().unwrap();
        let y2 = k.run(&n2, &[x, w_oi, b]).unwrap();
        assert_eq!(vals(&y2[0]), vals(&y[0]));
        assert!(k.run(&n2, &[t(&[1.0], &[1])]).is_err());
    }

    /// Past the decode kernels' rows (gemm's path) the bias goes in place: the bits of
    /// candle's broadcast add, in both layouts; a bias that does not fit is refused with the
    /// product untouched.
    #[test]
    fn a_prefill_linear_adds_its_bias_as_candle_does() {
        let k = CpuKernels::new();
        let d = candle_core::Device::Cpu;
        let (rows, kin, n) = (100, 24, 40);
        let x = Tensor::randn(0f32, 1., (1, rows, kin), &d).unwrap();
        let w = Tensor::randn(0f32, 1., (kin, n), &d).unwrap();
        let b = Tensor::randn(0f32, 1., n, &d).unwrap();
        let want = x
            .reshape((rows, kin))
            .unwrap()
            .matmul(&w)
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let wl = match layout {
                WeightLayout::InOut => w.clone(),
                WeightLayout::OutIn => w.t().unwrap().contiguous().unwrap(),
            };
            let op = OpKind::Linear { bias: true, layout };
            let y = k.run(&node(op, &[1, rows, n]), &[x.clone(), wl, b.clone()]);
            let y = y.unwrap().remove(0).reshape((rows, n)).unwrap();
            assert_eq!(vals(&y), vals(&want), "{layout:?}");
        }
        let y = Tensor::zeros((3, 4), CDType::F32, &d).unwrap();
        for bad in [t(&[1.0, 2.0, 3.0], &[3]), t(&[1.0; 4], &[1, 4])] {
            assert!(y.inplace_op2(&bad, &AddBiasRows).is_err());
        }
        assert!(vals(&y).iter().all(|&v| v == 0.0));
        let fine = t(&[1.0, 2.0, 3.0, 4.0], &[4]);
        y.inplace_op2(&fine, &AddBiasRows).unwrap();
        assert_eq!(vals(&y)[4..8], [1.0, 2.0, 3.0, 4.0]);
    }

    /// The worker's greedy pick is the engine's: the first of equal maxima, a later NaN never
    /// chosen and a first one kept, one id per row; the same with the lane-wise pick of the
    /// decode kernels and without.
    #[test]
    fn arg_max_picks_as_argmax_last_does() {
        // Both picks, which must agree.
        let pick = |x: &Tensor| -> Vec<i64> {
            let plain: Vec<i64> = arg_max(x, None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            if let Some(simd) = Simd::detect() {
                let lanes = arg_max(x, Some(simd)).unwrap();
                assert_eq!(lanes.dims(), arg_max(x, None).unwrap().dims());
                assert_eq!(
                    lanes.flatten_all().unwrap().to_vec1::<i64>().unwrap(),
                    plain
                );
            }
            plain
        };
        let nan = f32::NAN;
        let rows: [[f32; 4]; 5] = [
            [0.5, 2.0, 2.0, 1.0],
            [nan, 1.0, 3.0, 3.0],
            [1.0, nan, 0.5, 1.0],
            [-1.0, -2.0, f32::NEG_INFINITY, -0.5],
            [nan, nan, nan, nan],
        ];
        let x = Tensor::from_vec(rows.concat(), (5, 1, 4), &Device::Cpu).unwrap();
        let got = pick(&x);
        let want: Vec<i64> = rows
            .iter()
            .map(|r| {
                let t = Tensor::from_vec(r.to_vec(), (1, 1, 4), &Device::Cpu).unwrap();
                crate::models::argmax_last(&t).unwrap()
            })
            .collect();
        assert_eq!(got, want);
        assert_eq!(got, vec![1, 0, 0, 3, 0]);
        assert_eq!(arg_max(&x, None).unwrap().dims(), &[5, 1]);
        let empty = Tensor::zeros((2, 0), CDType::F32, &Device::Cpu).unwrap();
        assert!(arg_max(&empty, None).is_err());
        assert!(arg_max(&empty, Simd::detect()).is_err());
        // Rows of 11 and of 37 (lane vectors and a tail) drawn from values that tie, signed
        // zeros, infinities and NaNs: the same pick as argmax_last, row by row.
        let values = [
            nan,
            f32::NEG_INFINITY,
            f32::INFINITY,
            -0.0,
            0.0,
            1.0,
            -1.0,
            2.0,
        ];
        let mut state = 7u64;
        let mut draw = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            values[(state >> 61) as usize]
        };
        for width in [11, 37] {
            let rows: Vec<Vec<f32>> = (0..300)
                .map(|_| (0..width).map(|_| draw()).collect())
                .collect();
            let x = Tensor::from_vec(rows.concat(), (300, width), &Device::Cpu).unwrap();
            for (row, got) in rows.iter().zip(pick(&x)) {
                let t = Tensor::from_vec(row.clone(), (1, width), &Device::Cpu).unwrap();
                assert_eq!(got, crate::models::argmax_last(&t).unwrap(), "{row:?}");
            }
        }
    }

    #[test]
    fn causal_attention_first_row_sees_only_itself() {
        let k = CpuKernels::new();
        let n = causal_mha(1, 2, 1.0, &[1, 2, 2]);
        let q = t(&[1.0, 0.0, 0.0, 1.0], &[1, 2, 2]);
        let v = t(&[1.0, 2.0, 3.0, 4.0], &[1, 2, 2]);
        let y = k.run(&n, &[q.clone(), q, v]).unwrap();
        let y = vals(&y[0]);
        assert_eq!(&y[..2], &[1.0, 2.0]);
        assert!(y[2] > 1.0 && y[2] < 3.0);
    }

    /// A prompt's causal attention with the one-row kernels (each query over its own prefix)
    /// agrees with candle's masked attention, with as many keys as queries and with more (a
    /// cache before them), heads of 32 and of an odd size.
    #[test]
    fn causal_rows_attention_matches_the_masked_one() {
        let d = Device::Cpu;
        for (heads, hd, sq, sk) in [
            (4, 32, 37, 37),
            (4, 32, 5, 12),
            (3, 12, 9, 9),
            (2, 64, 19, 40),
            (1, 8, 2, 2),
            (3, 24, 6, 6),
        ] {
            let e = heads * hd;
            let n = causal_mha(heads, hd, 0.2, &[1, sq, e]);
            let q = Tensor::randn(0f32, 1., (1, sq, e), &d).unwrap();
            let k = Tensor::randn(0f32, 1., (1, sk, e), &d).unwrap();
            let v = Tensor::randn(0f32, 1., (1, sk, e), &d).unwrap();
            let ins = [q, k, v];
            let fast = vals(&CpuKernels::new().run(&n, &ins).unwrap()[0]);
            let reference = vals(&CpuKernels::candle_only().run(&n, &ins).unwrap()[0]);
            assert_eq!(fast.len(), sq * e);
            for (a, b) in fast.iter().zip(&reference) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn pooling_softmax_and_norms() {
        let k = CpuKernels::new();
        let x = t(
            &(0..16).map(|i| i as f32).collect::<Vec<_>>(),
            &[1, 1, 4, 4],
        );
        let n = node(
            OpKind::MaxPool2d {
                kernel: [3, 3],
                stride: [2, 2],
                padding: [1, 1],
            },
            &[1, 1, 2, 2],
        );
        assert_eq!(
            vals(&k.run(&n, std::slice::from_ref(&x)).unwrap()[0]),
            vec![5.0, 7.0, 13.0, 15.0]
        );
        let n = node(OpKind::GlobalAvgPool2d, &[1, 1, 1, 1]);
        assert_eq!(vals(&k.run(&n, &[x]).unwrap()[0]), vec![7.5]);
        let n = node(
            OpKind::Softmax {
                axis: 1,
                causal: false,
            },
            &[1, 2],
        );
        let y = vals(&k.run(&n, &[t(&[0.0, 0.0], &[1, 2])]).unwrap()[0]);
        assert_eq!(y, vec![0.5, 0.5]);
        let n = node(OpKind::LayerNorm { eps: Scalar(0.0) }, &[1, 2]);
        let y = k
            .run(
                &n,
                &[
                    t(&[1.0, 3.0], &[1, 2]),
                    t(&[1.0, 1.0], &[2]),
                    t(&[0.0, 0.0], &[2]),
                ],
            )
            .unwrap();
        assert_eq!(vals(&y[0]), vec![-1.0, 1.0]);
    }
}
