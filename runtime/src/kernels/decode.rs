//! Matrix-vector kernels for a decode step's products (its linear layers, one row per sequence
//! of a batched step, and its attention over the KV cache), and the GELU of every step.
//!
//! A decode step multiplies one activation row per sequence by each weight matrix and attends one
//! query over each cache. candle sends these through gemm's general kernels, whose per-call
//! set-up and strided head-by-head reads cost several times the arithmetic at small sizes (a
//! 128-wide model: 10-30 µs per linear layer, 130 µs per attention over 1000 positions), and
//! whose one-row path sums in another order than its many-row path, so a sequence would not get
//! the same bits in a batch as alone. These kernels read each matrix once for all the rows, with
//! AVX2 + FMA through `pulp`'s safe runtime dispatch (the several-row products with AVX-512
//! where the CPU has it, giving the same bits), and keep partial sums in registers; each
//! output row's sum is the same whatever rows come with it. At GPT-2 124M's sizes they are
//! 0.7-1.1x candle on one row and 1.0-1.35x on eight, attention 2x (`cargo run --release -p
//! genie-runtime --example decode_kernels`). GELU, elementwise, calls libm's `tanh` per element
//! in candle (28 ns each); here it is a vectorised polynomial.
//!
//! Arithmetic: f32 with fused multiply-adds, summed in a fixed order that depends only on the
//! shapes (never on the row stride of a view, on the thread or on the worker), so every worker
//! computes the same bits from the same inputs. The order differs from gemm's: results agree
//! with candle's to float rounding (tested against it), not bitwise. Where AVX2 + FMA are
//! missing the callers use candle.

/// `rows` rows of `cols` floats each, row `i` at `data[i * stride..]`: a matrix or a strided
/// view of one (a head's slice of the KV cache).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<'a> Rows<'a> {
    /// The view, or `None` when its rows do not lie in `data` or overlap.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Option<Self> {
        if rows > 0 && (stride < cols || data.len() < (rows - 1).checked_mul(stride)? + cols) {
            return None;
        }
        Some(Self {
            data,
            rows,
            cols,
            stride,
        })
    }

    /// Rows `from..from + count`.
    pub(crate) fn row_range(&self, from: usize, count: usize) -> Option<Self> {
        if from.checked_add(count)? > self.rows {
            return None;
        }
        let start = from.checked_mul(self.stride)?.min(self.data.len());
        Self::new(&self.data[start..], count, self.cols, self.stride)
    }

    /// Rows of the view.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the view.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Columns `from..from + width` of every row: a view of one head's slice.
    pub(crate) fn columns(&self, from: usize, width: usize) -> Option<Self> {
        if from.checked_add(width)? > self.cols {
            return None;
        }
        Self::new(self.data.get(from..)?, self.rows, width, self.stride)
    }

    fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.stride..i * self.stride + self.cols]
    }
}

/// The SIMD level these kernels need: AVX2 + FMA, detected once (by [`Simd::detect`]), and
/// AVX-512 where the CPU has it (x86-64): the products of several rows by a weight
/// ([`Simd::rows_times_matrix`], [`Simd::rows_times_cols`]), a prompt's causal attention (heads
/// a multiple of 16 wide) and GELU then take 16-lane vectors, with the very operations per
/// output of the 8-lane kernels, so the bits are the same on either.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Simd(
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))] pulp::x86::V3,
    #[cfg(target_arch = "x86_64")] Option<pulp::x86::V4>,
);

/// Set to `avx2` (`GENIE_SIMD=avx2`), the decode kernels leave AVX-512 aside: the same bits,
/// for comparing the two on one machine.
pub(crate) const SIMD_ENV: &str = "GENIE_SIMD";

impl Simd {
    /// The CPU's, or `None` without AVX2 + FMA.
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            let wide = std::env::var(SIMD_ENV).map_or(true, |v| v != "avx2");
            let v4 = pulp::x86::V4::try_new().filter(|_| wide);
            pulp::x86::V3::try_new().map(|v3| Simd(v3, v4))
        }
        #[cfg(target_arch = "x86")]
        {
            pulp::x86::V3::try_new().map(Simd)
        }
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        {
            None
        }
    }

    /// The same kernels without AVX-512 (for tests that compare the two).
    #[cfg(test)]
    pub(crate) fn avx2_only(self) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            Simd(self.0, None)
        }
        #[cfg(not(target_arch = "x86_64"))]
        self
    }

    /// Whether the products use AVX-512.
    #[cfg(test)]
    pub(crate) fn wide(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.1.is_some()
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// `y[j] = Σ_i x[i] · m[i][j]` (a row times a matrix: `x.len() == m.rows`,
    /// `y.len() == m.cols`).
    #[cfg(test)]
    pub(crate) fn row_times(self, x: &[f32], m: Rows<'_>, y: &mut [f32]) {
        self.rows_times(x, m, 1, y);
    }

    /// [`Simd::row_times`] on `parts` side-by-side matrices at once (`m`'s columns split into
    /// `parts` equal parts, one row `x[p·rows..(p+1)·rows]` for each): `y[c] = Σ_i x[p·rows + i]
    /// · m[i][c]` where `p` is the part of column `c`. One pass over `m`'s rows. Every output
    /// sums over `i` in order with fused multiply-adds, whatever the parts, views or blocking.
    pub(crate) fn rows_times(self, x: &[f32], m: Rows<'_>, parts: usize, y: &mut [f32]) {
        debug_assert!(parts > 0 && m.cols % parts == 0);
        debug_assert!(x.len() == parts * m.rows && y.len() == m.cols);
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        self.0.vectorize(x86::RowTimes {
            simd: self.0,
            x,
            m,
            part: m.cols / parts.max(1),
            y,
        });
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        let _ = (x, m, parts, y);
    }

    /// Matrices times columns, for `parts` side-by-side matrices (`m`'s columns split into
    /// `parts` equal parts of `w`): `y[p·rows + j] = m[j][p·w..(p+1)·w] · x[p·w..(p+1)·w]`. One
    /// pass over `m`'s rows. Every output is the same sum (two chains of 8-lane fused
    /// multiply-adds in column order, added, the lanes added pairwise, then the columns past the
    /// last whole lane vector in order) whatever the parts, views or blocking.
    pub(crate) fn times_cols(self, m: Rows<'_>, x: &[f32], parts: usize, y: &mut [f32]) {
        debug_assert!(parts > 0 && m.cols % parts == 0);
        debug_assert!(x.len() == m.cols && y.len() == parts * m.rows);
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        self.0.vectorize(x86::TimesCol {
            simd: self.0,
            m,
            x,
            part: m.cols / parts.max(1),
            y,
        });
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        let _ = (x, m, parts, y);
    }

    /// `y[r] = x[r] · m` for each of the `x.len() / m.rows` rows of `x` (`y` holds as many rows
    /// of `m.cols`): a few rows (a batched decode step's, one per sequence) times an `[in, out]`
    /// weight. Every output is the same sum as [`Simd::row_times`] gives for its row alone (over
    /// `i` in order with fused multiply-adds, from zero), however many rows come together; `m`
    /// is read from memory once, each block of its columns serving every row while it is in
    /// cache.
    pub(crate) fn rows_times_matrix(self, x: &[f32], m: Rows<'_>, y: &mut [f32]) {
        debug_assert!(m.rows > 0 && x.len() % m.rows == 0);
        debug_assert!(y.len() == x.len() / m.rows * m.cols);
        #[cfg(target_arch = "x86_64")]
        if let Some(v4) = self.1 {
            return v4.vectorize(x86::ManyRowTimes {
                simd: v4,
                x,
                m,
                y,
                from: 0,
            });
        }
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        self.0.vectorize(x86::ManyRowTimes {
            simd: self.0,
            x,
            m,
            y,
            from: 0,
        });
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        let _ = (x, m, y);
    }

    /// `y[r][j] = x[r] · m[j]` for each of the `x.len() / m.cols` rows of `x`: a few rows times
    /// an `[out, in]` weight (`x · mᵀ`). Every output is the same sum as [`Simd::times_cols`]
    /// with one part gives for its row alone (two chains of 8-lane fused multiply-adds, added,
    /// the lanes added pairwise, then the columns past the last whole lane vector in order),
    /// however many rows come together; each row of `m` is read once for all of them.
    pub(crate) fn rows_times_cols(self, x: &[f32], m: Rows<'_>, y: &mut [f32]) {
        debug_assert!(m.cols > 0 && x.len() % m.cols == 0);
        debug_assert!(y.len() == x.len() / m.cols * m.rows);
        #[cfg(target_arch = "x86_64")]
        if let Some(v4) = self.1 {
            return v4.vectorize(x86_v4::ManyTimesCols { simd: v4, x, m, y });
        }
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        self.0.vectorize(x86::ManyTimesCols {
            simd: self.0,
            x,
            m,
            y,
            from: 0,
        });
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        let _ = (x, m, y);
    }

    /// The attention weights of one query over `l` cached positions: `q` is `[heads · d]`, `k`
    /// is `l` rows of `heads · d`; the result is `heads` rows of `l` weights, per head
    /// `softmax(q_h · k_j · scale)` over `j` (max subtracted). `None` for mismatched shapes.
    pub(crate) fn attention_weights(
        self,
        q: &[f32],
        k: Rows<'_>,
        heads: usize,
        scale: f32,
    ) -> Option<Vec<f32>> {
        let e = q.len();
        if heads == 0 || e % heads != 0 || k.cols != e {
            return None;
        }
        let l = k.rows;
        let mut p = vec![0f32; heads * l];
        self.times_cols(k, q, heads, &mut p);
        for scores in p.chunks_exact_mut(l.max(1)) {
            self.softmax(scores, scale);
        }
        Some(p)
    }

    /// The attention output for weights `p` (`heads` rows of `l`, from
    /// [`Simd::attention_weights`]) over `v` (`l` rows of `heads · d`): per head
    /// `Σ_j p_h[j] · v_j`, as `[heads · d]`.
    pub(crate) fn attention_output(self, p: &[f32], v: Rows<'_>, heads: usize) -> Option<Vec<f32>> {
        let (e, l) = (v.cols, v.rows);
        if heads == 0 || e % heads != 0 || p.len() != heads * l {
            return None;
        }
        let mut out = vec![0f32; e];
        self.rows_times(p, v, heads, &mut out);
        Some(out)
    }

    /// Causal attention of a prompt's queries `q` (`sq` rows of `heads · d`) over `k`, `v`
    /// (`sk ≥ sq` rows of `heads · d`, views of a cache included): query `r` attends over keys
    /// `0..=sk − sq + r` alone, `softmax(q_h · k_j · scale) · v` per head, into `out` (`sq` rows
    /// of `heads · d`). Four queries at a time (eight with AVX-512 and `d` a multiple of 16:
    /// the same bits) share each load of a key or a value, and each head's keys are transposed
    /// once so that sixteen scores come from fused multiply-adds over `d` with no horizontal
    /// sum; the softmax is [`Simd::softmax`]. Within f32 rounding of the
    /// one-row kernels, not bitwise. `false` where it does not apply (`d` not a multiple of 8,
    /// mismatched shapes): `out` then holds nothing to use.
    pub(crate) fn causal_attention(
        self,
        (q, k, v): (Rows<'_>, Rows<'_>, Rows<'_>),
        heads: usize,
        scale: f32,
        out: &mut [f32],
    ) -> bool {
        let e = q.cols;
        let fits = heads > 0
            && e % heads == 0
            && (e / heads) % 8 == 0
            && k.cols == e
            && v.cols == e
            && v.rows == k.rows
            && k.rows >= q.rows
            && out.len() == q.rows * e;
        if !fits {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(v4) = self.1.filter(|_| (e / heads) % 16 == 0) {
            return v4.vectorize(x86_v4::CausalAttention {
                simd: v4,
                q,
                k,
                v,
                heads,
                scale,
                out,
            });
        }
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            self.0.vectorize(x86::CausalAttention {
                simd: self.0,
                q,
                k,
                v,
                heads,
                scale,
                out,
            })
        }
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        {
            let _ = (scale, out);
            false
        }
    }

    /// `x ← gelu(x)` with the tanh approximation, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`
    /// (candle's `gelu`), `tanh(u)` as `sign(u)·(1 − e^(−2|u|))/(1 + e^(−2|u|))` with the
    /// vectorised `exp` of [`Simd::softmax`]: within a few units of f32 rounding of candle's
    /// (the absolute error of `tanh` near zero is about 1e-7, scaled by `x/2`); NaN and
    /// infinities as candle.
    pub(crate) fn gelu_tanh(self, x: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(v4) = self.1 {
            return v4.vectorize(x86_v4::GeluTanh { simd: v4, x });
        }
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        self.0.vectorize(x86::GeluTanh { simd: self.0, x });
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        let _ = x;
    }

    /// `x ← softmax(x · scale)`, the max subtracted first, `exp` by a vectorised polynomial
    /// (Cephes' `expf`: relative error about 2e-7 on the range used, `e^t` for `t ≤ 0`, flushed
    /// to zero below `-87.3` where f32 results turn subnormal). A row with a NaN or an infinity
    /// takes [`softmax_scalar`].
    pub(crate) fn softmax(self, x: &mut [f32], scale: f32) {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        if !self.0.vectorize(x86::Softmax {
            simd: self.0,
            x,
            scale,
        }) {
            // `x` is scaled already.
            softmax_scalar(x, 1.0);
        }
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        softmax_scalar(x, scale);
    }

    /// The index a sequential pick over `row` chooses (the first value, replaced by each later
    /// one that is greater: ties to the lowest index, a later NaN never chosen, a first NaN
    /// never replaced), eight lanes at a time: each lane keeps the greatest of its values the
    /// same way (`max(v, lane)` takes `v` only when `v > lane`), then the first position holding
    /// the greatest of the lanes. 0 for an empty row.
    pub(crate) fn arg_max(self, row: &[f32]) -> usize {
        if row.first().map_or(true, |v| v.is_nan()) {
            return 0;
        }
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            self.0.vectorize(x86::ArgMax { simd: self.0, row })
        }
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        arg_max_scalar(row)
    }
}

/// [`Simd::arg_max`]'s pick without the SIMD kernels: the sequential pick (replace the best only
/// when greater) is the first value equal to the largest number, unless the first value is a
/// NaN: the largest found lane-wise, then its first position. 0 for an empty row.
pub(crate) fn arg_max_scalar(row: &[f32]) -> usize {
    if row.first().map_or(true, |v| v.is_nan()) {
        return 0;
    }
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    let top = chunks.remainder().iter().fold(
        lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        |m, &x| m.max(x),
    );
    row.iter().position(|&x| x == top).unwrap_or(0)
}

/// `x ← softmax(x · scale)` with `exp` from the standard library: the path for rows holding
/// a NaN or an infinity.
fn softmax_scalar(x: &mut [f32], scale: f32) {
    let mut m = f32::NEG_INFINITY;
    for v in x.iter_mut() {
        *v *= scale;
        m = m.max(*v);
    }
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod x86 {
    use super::Rows;
    #[cfg(target_arch = "x86")]
    use core::arch::x86::{__m256, _CMP_EQ_OQ, _CMP_GE_OQ};
    #[cfg(target_arch = "x86_64")]
    use core::arch::x86_64::{__m256, _CMP_EQ_OQ, _CMP_GE_OQ};
    use pulp::x86::V3;
    use pulp::{cast, f32x8, NullaryFnOnce};

    const LANES: usize = 8;

    #[inline(always)]
    pub(super) fn load(x: &[f32], at: usize) -> f32x8 {
        let mut a = [0f32; LANES];
        a.copy_from_slice(&x[at..at + LANES]);
        cast(a)
    }

    pub(super) struct RowTimes<'a, 'b> {
        pub simd: V3,
        pub x: &'a [f32],
        pub m: Rows<'b>,
        /// Columns per part: column `c` is weighted by `x[(c / part) · rows..]`.
        pub part: usize,
        pub y: &'a mut [f32],
    }

    impl RowTimes<'_, '_> {
        /// Columns `c..c + A·8` of the product, `A` accumulators held over all rows.
        #[inline(always)]
        fn block<const A: usize>(&mut self, c: usize) {
            let simd = self.simd;
            let rows = self.m.rows;
            let mut acc = [simd.splat_f32x8(0.0); A];
            let (first, last) = (c / self.part, (c + A * LANES - 1) / self.part);
            if first == last {
                let x = &self.x[first * rows..(first + 1) * rows];
                for (i, &xi) in x.iter().enumerate() {
                    let row = &self.m.row(i)[c..c + A * LANES];
                    let xi = simd.splat_f32x8(xi);
                    for (a, acc) in acc.iter_mut().enumerate() {
                        *acc = simd.mul_add_f32x8(load(row, a * LANES), xi, *acc);
                    }
                }
            } else {
                // Parts are whole lane vectors here (the caller checked).
                let mut parts = [0usize; A];
                for (a, p) in parts.iter_mut().enumerate() {
                    *p = (c + a * LANES) / self.part * rows;
                }
                for i in 0..rows {
                    let row = &self.m.row(i)[c..c + A * LANES];
                    for (a, acc) in acc.iter_mut().enumerate() {
                        let xi = simd.splat_f32x8(self.x[parts[a] + i]);
                        *acc = simd.mul_add_f32x8(load(row, a * LANES), xi, *acc);
                    }
                }
            }
            for (a, acc) in acc.iter().enumerate() {
                let at = c + a * LANES;
                self.y[at..at + LANES].copy_from_slice(&cast::<f32x8, [f32; LANES]>(*acc));
            }
        }

        /// Column `j` alone, the same operations per element.
        fn column(&mut self, j: usize) {
            let rows = self.m.rows;
            let p = j / self.part * rows;
            let mut s = 0f32;
            for i in 0..rows {
                s = self.m.row(i)[j].mul_add(self.x[p + i], s);
            }
            self.y[j] = s;
        }
    }

    impl NullaryFnOnce for RowTimes<'_, '_> {
        type Output = ();

        #[inline(always)]
        fn call(mut self) {
            let n = self.m.cols;
            let mut c = 0;
            if self.part < n && self.part % LANES == 0 && self.part <= 8 * LANES {
                // Narrow parts (an attention's heads): one block per part, so that each row of
                // `m` takes one weight per block instead of one per lane vector.
                while c + self.part <= n {
                    match self.part / LANES {
                        1 => self.block::<1>(c),
                        2 => self.block::<2>(c),
                        3 => self.block::<3>(c),
                        4 => self.block::<4>(c),
                        5 => self.block::<5>(c),
                        6 => self.block::<6>(c),
                        7 => self.block::<7>(c),
                        _ => self.block::<8>(c),
                    }
                    c += self.part;
                }
            }
            // Lane vectors may hold several parts only when every part is whole vectors.
            if self.part == n || self.part % LANES == 0 {
                while c + 8 * LANES <= n {
                    self.block::<8>(c);
                    c += 8 * LANES;
                }
                if c + 4 * LANES <= n {
                    self.block::<4>(c);
                    c += 4 * LANES;
                }
                if c + 2 * LANES <= n {
                    self.block::<2>(c);
                    c += 2 * LANES;
                }
                if c + LANES <= n {
                    self.block::<1>(c);
                    c += LANES;
                }
            }
            for j in c..n {
                self.column(j);
            }
        }
    }

    pub(super) struct TimesCol<'a, 'b> {
        pub simd: V3,
        pub m: Rows<'b>,
        pub x: &'a [f32],
        /// Columns per part.
        pub part: usize,
        pub y: &'a mut [f32],
    }

    /// Lane-wise products of rows `a` and `b` with `x` over columns `from..to` (whole lane
    /// vectors), each summed in two chains (even and odd vectors), then added. A row alone goes
    /// in as both, so that every row's sum has the same operations.
    #[inline(always)]
    fn partial2(
        simd: V3,
        x: &[f32],
        (a, b): (&[f32], &[f32]),
        from: usize,
        to: usize,
    ) -> (f32x8, f32x8) {
        let zero = simd.splat_f32x8(0.0);
        let (mut ae, mut ao, mut be, mut bo) = (zero, zero, zero, zero);
        let mut c = from;
        while c + 2 * LANES <= to {
            let (x0, x1) = (load(x, c), load(x, c + LANES));
            ae = simd.mul_add_f32x8(load(a, c), x0, ae);
            ao = simd.mul_add_f32x8(load(a, c + LANES), x1, ao);
            be = simd.mul_add_f32x8(load(b, c), x0, be);
            bo = simd.mul_add_f32x8(load(b, c + LANES), x1, bo);
            c += 2 * LANES;
        }
        if c < to {
            let x0 = load(x, c);
            ae = simd.mul_add_f32x8(load(a, c), x0, ae);
            be = simd.mul_add_f32x8(load(b, c), x0, be);
        }
        (simd.add_f32x8(ae, ao), simd.add_f32x8(be, bo))
    }

    /// [`partial2`] of rows `a` and `b` against two vectors `x0` and `x1` at once, over columns
    /// `0..to` (whole lane vectors): `[a·x0, b·x0, a·x1, b·x1]`, each the very chains and sum
    /// `partial2` gives it (the four dot products share each load of `a` and `b`).
    #[inline(always)]
    fn partial2x2(
        simd: V3,
        (x0, x1): (&[f32], &[f32]),
        (a, b): (&[f32], &[f32]),
        to: usize,
    ) -> [f32x8; 4] {
        let zero = simd.splat_f32x8(0.0);
        let mut e = [zero; 4];
        let mut o = [zero; 4];
        // Pairs of lane vectors, as exact chunks of all four rows (no index to check), then
        // the last single vector.
        let pairs = to / (2 * LANES) * (2 * LANES);
        let (ca, cb) = (
            a[..pairs].chunks_exact(2 * LANES),
            b[..pairs].chunks_exact(2 * LANES),
        );
        let (cp, cq) = (
            x0[..pairs].chunks_exact(2 * LANES),
            x1[..pairs].chunks_exact(2 * LANES),
        );
        for (((a, b), p), q) in ca.zip(cb).zip(cp).zip(cq) {
            let (a0, a1, b0, b1) = (load(a, 0), load(a, LANES), load(b, 0), load(b, LANES));
            let (p0, p1, q0, q1) = (load(p, 0), load(p, LANES), load(q, 0), load(q, LANES));
            e[0] = simd.mul_add_f32x8(a0, p0, e[0]);
            o[0] = simd.mul_add_f32x8(a1, p1, o[0]);
            e[1] = simd.mul_add_f32x8(b0, p0, e[1]);
            o[1] = simd.mul_add_f32x8(b1, p1, o[1]);
            e[2] = simd.mul_add_f32x8(a0, q0, e[2]);
            o[2] = simd.mul_add_f32x8(a1, q1, o[2]);
            e[3] = simd.mul_add_f32x8(b0, q0, e[3]);
            o[3] = simd.mul_add_f32x8(b1, q1, o[3]);
        }
        let c = pairs;
        if c < to {
            let (a0, b0) = (load(a, c), load(b, c));
            let (p0, q0) = (load(x0, c), load(x1, c));
            e[0] = simd.mul_add_f32x8(a0, p0, e[0]);
            e[1] = simd.mul_add_f32x8(b0, p0, e[1]);
            e[2] = simd.mul_add_f32x8(a0, q0, e[2]);
            e[3] = simd.mul_add_f32x8(b0, q0, e[3]);
        }
        [
            simd.add_f32x8(e[0], o[0]),
            simd.add_f32x8(e[1], o[1]),
            simd.add_f32x8(e[2], o[2]),
            simd.add_f32x8(e[3], o[3]),
        ]
    }

    /// The eight sums of rows `m8` with `xr` from their partial sums `acc`: reduced, then the
    /// columns past `full` added in order, into `y` (eight outputs).
    #[inline(always)]
    pub(super) fn finish8(
        simd: V3,
        m8: &[&[f32]; 8],
        full: usize,
        xr: &[f32],
        y: &mut [f32],
        acc: [f32x8; 8],
    ) {
        for (r, s) in reduce8(simd, acc).into_iter().enumerate() {
            let mut s = s;
            for (m, x) in m8[r][full..].iter().zip(&xr[full..]) {
                s = m.mul_add(*x, s);
            }
            y[r] = s;
        }
    }

    /// Eight rows' partial sums (from [`partial2`]) reduced to one vector of eight results with
    /// three rounds of horizontal adds and one swap of 128-bit halves: lane `r` is
    /// [`pairwise`] of `acc[r]`, bit for bit.
    #[inline(always)]
    fn reduce8(simd: V3, acc: [f32x8; 8]) -> [f32; LANES] {
        let avx = simd.avx;
        let acc: [__m256; 8] = cast(acc);
        let h01 = avx._mm256_hadd_ps(acc[0], acc[1]);
        let h23 = avx._mm256_hadd_ps(acc[2], acc[3]);
        let h45 = avx._mm256_hadd_ps(acc[4], acc[5]);
        let h67 = avx._mm256_hadd_ps(acc[6], acc[7]);
        let h0123 = avx._mm256_hadd_ps(h01, h23);
        let h4567 = avx._mm256_hadd_ps(h45, h67);
        let lo = avx._mm256_permute2f128_ps::<0x20>(h0123, h4567);
        let hi = avx._mm256_permute2f128_ps::<0x31>(h0123, h4567);
        cast(avx._mm256_add_ps(lo, hi))
    }

    impl TimesCol<'_, '_> {
        #[inline(always)]
        fn partial2(&self, a: &[f32], b: &[f32], from: usize, to: usize) -> (f32x8, f32x8) {
            partial2(self.simd, self.x, (a, b), from, to)
        }

        /// The columns of part `p` past its last whole lane vector, added to `s` in order.
        #[inline(always)]
        fn tail(&self, j: usize, p: usize, mut s: f32) -> f32 {
            let row = self.m.row(j);
            let full = self.part / LANES * LANES;
            let cols = p * self.part + full..(p + 1) * self.part;
            for (m, x) in row[cols.clone()].iter().zip(&self.x[cols]) {
                s = m.mul_add(*x, s);
            }
            s
        }
    }

    /// A lane width the several-row `[in, out]` product runs at: 8 floats (AVX2, [`V3`]) or 16
    /// (AVX-512, `V4`). An output's sum does not depend on it (one chain of fused multiply-adds
    /// over the weight's rows in order), so both give the same bits.
    pub(super) trait Width: Copy {
        /// A vector of [`Width::LANES`] floats.
        type V: Copy;
        /// Floats per vector.
        const LANES: usize;
        fn splat(self, x: f32) -> Self::V;
        /// `a · b + c`, fused, lane by lane.
        fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        fn load(self, x: &[f32], at: usize) -> Self::V;
        fn store(self, y: &mut [f32], at: usize, v: Self::V);
        /// Columns `c..c + W·LANES` of every row over `m`'s rows `k0..k1`: the width's
        /// [`ManyRowTimes::groups`].
        fn blocks<const W: usize>(
            t: &mut ManyRowTimes<'_, '_, Self>,
            c: usize,
            k0: usize,
            k1: usize,
        );
        /// The columns from `c` on, fewer than [`Width::LANES`].
        fn rest(t: ManyRowTimes<'_, '_, Self>, c: usize);
    }

    impl Width for V3 {
        type V = f32x8;
        const LANES: usize = LANES;

        #[inline(always)]
        fn splat(self, x: f32) -> f32x8 {
            self.splat_f32x8(x)
        }

        #[inline(always)]
        fn mul_add(self, a: f32x8, b: f32x8, c: f32x8) -> f32x8 {
            self.mul_add_f32x8(a, b, c)
        }

        #[inline(always)]
        fn load(self, x: &[f32], at: usize) -> f32x8 {
            load(x, at)
        }

        #[inline(always)]
        fn store(self, y: &mut [f32], at: usize, v: f32x8) {
            y[at..at + LANES].copy_from_slice(&cast::<f32x8, [f32; LANES]>(v));
        }

        /// Sixteen registers: four rows with three vectors each, then three with two, two with
        /// four, one with eight.
        #[inline(always)]
        fn blocks<const W: usize>(
            t: &mut ManyRowTimes<'_, '_, V3>,
            c: usize,
            k0: usize,
            k1: usize,
        ) {
            t.groups::<W, 3, 2, 4, 8>(c, k0, k1);
        }

        #[inline(always)]
        fn rest(t: ManyRowTimes<'_, '_, V3>, c: usize) {
            let (k, n) = (t.m.rows, t.m.cols);
            let rows = t.x.len() / k.max(1);
            for j in c..n {
                for r in 0..rows {
                    let mut s = 0f32;
                    for i in 0..k {
                        s = t.m.row(i)[j].mul_add(t.x[r * k + i], s);
                    }
                    t.y[r * n + j] = s;
                }
            }
        }
    }

    /// Rows of `x` (each `m.rows` long) times `m`; see [`super::Simd::rows_times_matrix`], at
    /// the lane width `S`.
    pub(super) struct ManyRowTimes<'a, 'b, S> {
        pub simd: S,
        pub x: &'a [f32],
        pub m: Rows<'b>,
        pub y: &'a mut [f32],
        /// The first column to compute (those before it are another kernel's).
        pub from: usize,
    }

    /// Rows of `x` taken together: at most this many share one pass over a block of `m`.
    pub(super) const ROW_GROUP: usize = 4;

    impl<S: Width> ManyRowTimes<'_, '_, S> {
        /// Columns `c..c + A·LANES` of rows `r0..r0 + R`: `R·A` accumulators over `m`'s rows
        /// `k0..k1`, starting from zero when `k0` is 0 and otherwise from the sums stored in `y`
        /// by the previous range (each output's chain of multiply-adds goes on in order: the
        /// same operations, so the same bits, as one pass over all rows).
        #[inline(always)]
        fn block<const R: usize, const A: usize>(
            &mut self,
            r0: usize,
            c: usize,
            k0: usize,
            k1: usize,
        ) {
            let simd = self.simd;
            let lanes = S::LANES;
            let (k, n) = (self.m.rows, self.m.cols);
            let mut acc = [[simd.splat(0.0); A]; R];
            if k0 > 0 {
                for (r, acc) in acc.iter_mut().enumerate() {
                    for (a, acc) in acc.iter_mut().enumerate() {
                        *acc = simd.load(self.y, (r0 + r) * n + c + a * lanes);
                    }
                }
            }
            for i in k0..k1 {
                let row = &self.m.row(i)[c..c + A * lanes];
                let mut w = [simd.splat(0.0); A];
                for (a, w) in w.iter_mut().enumerate() {
                    *w = simd.load(row, a * lanes);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xi = simd.splat(self.x[(r0 + r) * k + i]);
                    for (a, acc) in acc.iter_mut().enumerate() {
                        *acc = simd.mul_add(w[a], xi, *acc);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (a, acc) in acc.iter().enumerate() {
                    simd.store(self.y, (r0 + r) * n + c + a * lanes, *acc);
                }
            }
        }

        /// Columns `c..c + W·LANES` of every row over `m`'s rows `k0..k1`: [`ROW_GROUP`] rows at
        /// a time with `A4` lane vectors each, then the last three, two or one rows with `A3`,
        /// `A2` or `A1` (as many accumulators as the width's registers hold: a row alone takes
        /// the whole width at once).
        #[inline(always)]
        pub(super) fn groups<
            const W: usize,
            const A4: usize,
            const A3: usize,
            const A2: usize,
            const A1: usize,
        >(
            &mut self,
            c: usize,
            k0: usize,
            k1: usize,
        ) {
            let rows = self.x.len() / self.m.rows;
            let mut r = 0;
            while r + ROW_GROUP <= rows {
                self.across::<ROW_GROUP, A4, W>(r, c, k0, k1);
                r += ROW_GROUP;
            }
            match rows - r {
                3 => self.across::<3, A3, W>(r, c, k0, k1),
                2 => self.across::<2, A2, W>(r, c, k0, k1),
                1 => self.across::<1, A1, W>(r, c, k0, k1),
                _ => {}
            }
        }

        /// Columns `c..c + W·LANES` of rows `r0..r0 + R`, `A` lane vectors at a time. The
        /// blocking changes which columns share a pass over `m`'s rows, never an output's sum.
        #[inline(always)]
        fn across<const R: usize, const A: usize, const W: usize>(
            &mut self,
            r0: usize,
            c: usize,
            k0: usize,
            k1: usize,
        ) {
            let lanes = S::LANES;
            let mut v = 0;
            while v + A <= W {
                self.block::<R, A>(r0, c + v * lanes, k0, k1);
                v += A;
            }
            if A > 2 && v + 2 <= W {
                self.block::<R, 2>(r0, c + v * lanes, k0, k1);
                v += 2;
            }
            while v < W {
                self.block::<R, 1>(r0, c + v * lanes, k0, k1);
                v += 1;
            }
        }

        /// Columns `c..c + W·LANES` of every row: over all of `m`'s rows at once for one row of
        /// `x` (its accumulators span the whole width), in ranges of [`K_BLOCK`] rows for
        /// several (each range's tile of `m` stays in the first-level cache while every group of
        /// rows and every lane vector passes over it, instead of each pass reading a column
        /// strip of all of `m` again, one cache line per row).
        #[inline(always)]
        fn strip<const W: usize>(&mut self, c: usize) {
            let (k, rows) = (self.m.rows, self.x.len() / self.m.rows);
            if rows == 1 || k * self.m.cols < K_BLOCK_MIN_ELEMENTS {
                return S::blocks::<W>(self, c, 0, k);
            }
            let mut k0 = 0;
            while k0 < k {
                let k1 = (k0 + K_BLOCK).min(k);
                S::blocks::<W>(self, c, k0, k1);
                k0 = k1;
            }
        }
    }

    /// Rows of `m` in one range of a several-row product (see [`ManyRowTimes::strip`]): a tile
    /// of 64 of them by 64 columns is 16 KiB.
    const K_BLOCK: usize = 64;

    /// Weights smaller than this (elements; 1 MiB of f32) stay in the caches between passes:
    /// one pass over all of their rows costs less than storing and reloading partial sums.
    const K_BLOCK_MIN_ELEMENTS: usize = 1 << 18;

    impl<S: Width> NullaryFnOnce for ManyRowTimes<'_, '_, S> {
        type Output = ();

        #[inline(always)]
        fn call(mut self) {
            let (n, lanes) = (self.m.cols, S::LANES);
            let mut c = self.from;
            while c + 8 * lanes <= n {
                self.strip::<8>(c);
                c += 8 * lanes;
            }
            while c + lanes <= n {
                self.strip::<1>(c);
                c += lanes;
            }
            S::rest(self, c);
        }
    }

    /// Rows of `x` (each `m.cols` long) times `mᵀ`; see [`super::Simd::rows_times_cols`].
    pub(super) struct ManyTimesCols<'a, 'b> {
        pub simd: V3,
        pub x: &'a [f32],
        pub m: Rows<'b>,
        pub y: &'a mut [f32],
        /// The first row of `m` to compute (those before it are another kernel's).
        pub from: usize,
    }

    impl ManyTimesCols<'_, '_> {
        /// Row `j` of `m` against rows `r0..r0 + R` of `x`, each sum as [`TimesCol`]'s.
        #[inline(always)]
        fn dots<const R: usize>(&mut self, j: usize, r0: usize) {
            let simd = self.simd;
            let (n, k) = (self.m.rows, self.m.cols);
            let full = k / LANES * LANES;
            let a = self.m.row(j);
            let zero = simd.splat_f32x8(0.0);
            let (mut even, mut odd) = ([zero; R], [zero; R]);
            let mut c = 0;
            while c + 2 * LANES <= full {
                let (a0, a1) = (load(a, c), load(a, c + LANES));
                for r in 0..R {
                    let x = &self.x[(r0 + r) * k..];
                    even[r] = simd.mul_add_f32x8(a0, load(x, c), even[r]);
                    odd[r] = simd.mul_add_f32x8(a1, load(x, c + LANES), odd[r]);
                }
                c += 2 * LANES;
            }
            if c < full {
                let a0 = load(a, c);
                for (r, even) in even.iter_mut().enumerate() {
                    let x = &self.x[(r0 + r) * k..];
                    *even = simd.mul_add_f32x8(a0, load(x, c), *even);
                }
            }
            for r in 0..R {
                let x = &self.x[(r0 + r) * k..(r0 + r + 1) * k];
                let mut s = pairwise(simd.add_f32x8(even[r], odd[r]));
                for (m, x) in a[full..].iter().zip(&x[full..]) {
                    s = m.mul_add(*x, s);
                }
                self.y[(r0 + r) * n + j] = s;
            }
        }
    }

    impl ManyTimesCols<'_, '_> {
        /// Rows `j..j + 8` of `m` against every row of `x`, as [`TimesCol`] sums an eight-row
        /// block (the eight rows stay in cache while each row of `x` passes).
        #[inline(always)]
        fn eight(&mut self, j: usize) {
            let simd = self.simd;
            let (n, k) = (self.m.rows, self.m.cols);
            let full = k / LANES * LANES;
            let mut m8: [&[f32]; 8] = [&[]; 8];
            for (r, row) in m8.iter_mut().enumerate() {
                *row = self.m.row(j + r);
            }
            let zero = simd.splat_f32x8(0.0);
            // Two rows of `x` at a time: each load of `m` serves both (the same chains per
            // output as one row alone gives it).
            let mut xs = self.x.chunks_exact(k).zip(self.y.chunks_exact_mut(n));
            loop {
                match (xs.next(), xs.next()) {
                    (Some((x0, y0)), Some((x1, y1))) => {
                        let (mut acc0, mut acc1) = ([zero; 8], [zero; 8]);
                        for r in (0..8).step_by(2) {
                            let [a0, b0, a1, b1] =
                                partial2x2(simd, (x0, x1), (m8[r], m8[r + 1]), full);
                            (acc0[r], acc0[r + 1], acc1[r], acc1[r + 1]) = (a0, b0, a1, b1);
                        }
                        finish8(simd, &m8, full, x0, &mut y0[j..j + 8], acc0);
                        finish8(simd, &m8, full, x1, &mut y1[j..j + 8], acc1);
                    }
                    (Some((xr, y)), None) => {
                        let mut acc = [zero; 8];
                        for r in (0..8).step_by(2) {
                            (acc[r], acc[r + 1]) = partial2(simd, xr, (m8[r], m8[r + 1]), 0, full);
                        }
                        finish8(simd, &m8, full, xr, &mut y[j..j + 8], acc);
                    }
                    _ => break,
                }
            }
        }
    }

    impl NullaryFnOnce for ManyTimesCols<'_, '_> {
        type Output = ();

        #[inline(always)]
        fn call(mut self) {
            let rows = self.x.len() / self.m.cols.max(1);
            let mut j = self.from;
            while j + 8 <= self.m.rows {
                self.eight(j);
                j += 8;
            }
            for j in j..self.m.rows {
                let mut r = 0;
                while r + ROW_GROUP <= rows {
                    self.dots::<ROW_GROUP>(j, r);
                    r += ROW_GROUP;
                }
                match rows - r {
                    3 => self.dots::<3>(j, r),
                    2 => self.dots::<2>(j, r),
                    1 => self.dots::<1>(j, r),
                    _ => {}
                }
            }
        }
    }

    /// `((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))`: the order the eight-row reduction
    /// of [`TimesCol`] adds one row's lanes in.
    #[inline(always)]
    pub(super) fn pairwise(a: f32x8) -> f32 {
        let a: [f32; LANES] = cast(a);
        ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
    }

    impl NullaryFnOnce for TimesCol<'_, '_> {
        type Output = ();

        #[inline(always)]
        fn call(self) {
            let simd = self.simd;
            let (rows, part) = (self.m.rows, self.part);
            let parts = self.m.cols / part.max(1);
            let full = part / LANES * LANES;
            let zero = simd.splat_f32x8(0.0);
            let mut j = 0;
            // Eight rows at a time, every part of them before the next eight: eight partial
            // sums reduced to one vector of eight results with three rounds of horizontal adds
            // and one swap of 128-bit halves.
            while j + 8 <= rows {
                let mut rows8: [&[f32]; 8] = [&[]; 8];
                for (r, row) in rows8.iter_mut().enumerate() {
                    *row = self.m.row(j + r);
                }
                for p in 0..parts {
                    let mut acc = [zero; 8];
                    // Two rows at a time: the block is read nearly in address order, with four
                    // independent chains of multiply-adds.
                    for r in (0..8).step_by(2) {
                        let (a, b) = (rows8[r], rows8[r + 1]);
                        (acc[r], acc[r + 1]) = self.partial2(a, b, p * part, p * part + full);
                    }
                    let sums = reduce8(simd, acc);
                    for (r, s) in sums.iter().enumerate() {
                        self.y[p * rows + j + r] = self.tail(j + r, p, *s);
                    }
                }
                j += 8;
            }
            for j in j..rows {
                let row = self.m.row(j);
                for p in 0..parts {
                    let (acc, _) = self.partial2(row, row, p * part, p * part + full);
                    self.y[p * rows + j] = self.tail(j, p, pairwise(acc));
                }
            }
        }
    }

    /// See [`super::Simd::arg_max`].
    pub(super) struct ArgMax<'a> {
        pub simd: V3,
        pub row: &'a [f32],
    }

    impl NullaryFnOnce for ArgMax<'_> {
        type Output = usize;

        #[inline(always)]
        fn call(self) -> usize {
            let (avx, row) = (self.simd.avx, self.row);
            let chunks = row.chunks_exact(LANES);
            let rest = chunks.remainder();
            // `vmaxps(v, m)` is `v > m ? v : m`: a NaN `v` leaves `m`.
            let mut m = avx._mm256_set1_ps(f32::NEG_INFINITY);
            for c in chunks.clone() {
                m = avx._mm256_max_ps(ld(c, 0), m);
            }
            let mut top = f32::NEG_INFINITY;
            for &v in cast::<__m256, [f32; LANES]>(m).iter().chain(rest) {
                if v > top {
                    top = v;
                }
            }
            // The first lane vector holding `top`, then its first lane that does.
            let t = avx._mm256_set1_ps(top);
            for (i, c) in chunks.enumerate() {
                let hit = avx._mm256_movemask_ps(avx._mm256_cmp_ps::<_CMP_EQ_OQ>(ld(c, 0), t));
                if hit != 0 {
                    return i * LANES + hit.trailing_zeros() as usize;
                }
            }
            let at = rest.iter().position(|&v| v == top).unwrap_or(0);
            row.len() - rest.len() + at
        }
    }

    /// See [`super::Simd::softmax`]; `false` (and `x` scaled) when the row holds a NaN or an
    /// infinity.
    pub(super) struct Softmax<'a> {
        pub simd: V3,
        pub x: &'a mut [f32],
        pub scale: f32,
    }

    #[inline(always)]
    fn ld(x: &[f32], at: usize) -> __m256 {
        cast(load(x, at))
    }

    #[inline(always)]
    fn st(x: &mut [f32], at: usize, v: __m256) {
        x[at..at + LANES].copy_from_slice(&cast::<__m256, [f32; LANES]>(v));
    }

    /// `e^(v - m)` lane-wise: Cephes' `expf` polynomial, zero where `v - m < -87.3`.
    #[inline(always)]
    fn exp_minus(simd: V3, v: __m256, m: __m256) -> __m256 {
        let (avx, avx2, fma) = (simd.avx, simd.avx2, simd.fma);
        let t = avx._mm256_sub_ps(v, m);
        let floor = avx._mm256_set1_ps(-87.3);
        let live = avx._mm256_cmp_ps::<_CMP_GE_OQ>(t, floor);
        let t = avx._mm256_max_ps(t, floor);
        // t = k·ln 2 + r, |r| ≤ ln 2 / 2 (ln 2 in two parts).
        let k = avx._mm256_round_ps::<0x08>(
            avx._mm256_mul_ps(t, avx._mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = fma._mm256_fnmadd_ps(k, avx._mm256_set1_ps(0.693_359_4), t);
        let r = fma._mm256_fnmadd_ps(k, avx._mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = avx._mm256_set1_ps(1.987_569_1e-4);
        p = fma._mm256_fmadd_ps(p, r, avx._mm256_set1_ps(1.398_199_9e-3));
        p = fma._mm256_fmadd_ps(p, r, avx._mm256_set1_ps(8.333_452e-3));
        p = fma._mm256_fmadd_ps(p, r, avx._mm256_set1_ps(4.166_579_6e-2));
        p = fma._mm256_fmadd_ps(p, r, avx._mm256_set1_ps(0.166_666_65));
        p = fma._mm256_fmadd_ps(p, r, avx._mm256_set1_ps(0.5));
        let r2 = avx._mm256_mul_ps(r, r);
        let p = fma._mm256_fmadd_ps(p, r2, avx._mm256_add_ps(r, avx._mm256_set1_ps(1.0)));
        let two_k = avx2._mm256_slli_epi32::<23>(
            avx2._mm256_add_epi32(avx._mm256_cvtps_epi32(k), avx._mm256_set1_epi32(127)),
        );
        let e = avx._mm256_mul_ps(p, avx._mm256_castsi256_ps(two_k));
        avx._mm256_and_ps(e, live)
    }

    /// See [`super::Simd::gelu_tanh`].
    pub(super) struct GeluTanh<'a> {
        pub simd: V3,
        pub x: &'a mut [f32],
    }

    /// GELU (tanh approximation) of eight values.
    #[inline(always)]
    fn gelu8(simd: V3, v: __m256) -> __m256 {
        let (avx, fma) = (simd.avx, simd.fma);
        let one = avx._mm256_set1_ps(1.0);
        let v2 = avx._mm256_mul_ps(v, v);
        let inner = fma._mm256_fmadd_ps(avx._mm256_set1_ps(0.044715), v2, one);
        let u = avx._mm256_mul_ps(avx._mm256_mul_ps(avx._mm256_set1_ps(0.797_884_6), v), inner);
        let sign = avx._mm256_set1_ps(-0.0);
        let neg_abs2 = avx._mm256_mul_ps(avx._mm256_or_ps(u, sign), avx._mm256_set1_ps(2.0));
        let e = exp_minus(simd, neg_abs2, avx._mm256_setzero_ps());
        let t = avx._mm256_div_ps(avx._mm256_sub_ps(one, e), avx._mm256_add_ps(one, e));
        // tanh(u) carries u's sign.
        let tanh = avx._mm256_or_ps(t, avx._mm256_and_ps(u, sign));
        avx._mm256_mul_ps(
            avx._mm256_mul_ps(avx._mm256_set1_ps(0.5), v),
            avx._mm256_add_ps(one, tanh),
        )
    }

    impl NullaryFnOnce for GeluTanh<'_> {
        type Output = ();

        #[inline(always)]
        fn call(self) {
            let (simd, x) = (self.simd, self.x);
            let n = x.len();
            let full = n / LANES * LANES;
            let mut c = 0;
            while c < full {
                st(x, c, gelu8(simd, ld(x, c)));
                c += LANES;
            }
            if full < n {
                let mut pad = [0f32; LANES];
                pad[..n - full].copy_from_slice(&x[full..]);
                let y: [f32; LANES] = cast(gelu8(simd, cast(pad)));
                x[full..].copy_from_slice(&y[..n - full]);
            }
        }
    }

    impl NullaryFnOnce for Softmax<'_> {
        type Output = bool;

        #[inline(always)]
        fn call(self) -> bool {
            let (simd, x) = (self.simd, self.x);
            let avx = simd.avx;
            let n = x.len();
            let full = n / LANES * LANES;
            // Scale, and the max; `v · 0` summed is NaN once any value is a NaN or an infinity.
            let scale = avx._mm256_set1_ps(self.scale);
            let zero = avx._mm256_setzero_ps();
            let mut m = avx._mm256_set1_ps(f32::NEG_INFINITY);
            let mut bad = zero;
            let mut c = 0;
            while c < full {
                let v = avx._mm256_mul_ps(ld(x, c), scale);
                st(x, c, v);
                m = avx._mm256_max_ps(m, v);
                bad = simd.fma._mm256_fmadd_ps(v, zero, bad);
                c += LANES;
            }
            let mut max = f32::NEG_INFINITY;
            for v in cast::<__m256, [f32; LANES]>(m) {
                max = max.max(v);
            }
            for v in &mut x[full..] {
                *v *= self.scale;
                max = max.max(*v);
            }
            if !finite(bad) || !max.is_finite() || x[full..].iter().any(|v| !v.is_finite()) {
                return false;
            }
            let sum = exp_sum_from(simd, x, 0, max, zero);
            scale_from(simd, x, 0, 1.0 / pairwise(cast(sum)));
            true
        }
    }

    /// Whether no lane of `bad` (a sum of values times zero) is a NaN.
    #[inline(always)]
    pub(super) fn finite(bad: __m256) -> bool {
        cast::<__m256, [f32; LANES]>(bad)
            .iter()
            .all(|v| !v.is_nan())
    }

    /// The rest of [`Softmax`] from `x[from..]` (`from` a multiple of [`LANES`]): `e^(v - max)`
    /// in place, added lane by lane to `sum` (what the 8-lane vectors before `from` gave), the
    /// values past the last whole vector padded with `-inf` in one more; the new `sum`.
    #[inline(always)]
    pub(super) fn exp_sum_from(
        simd: V3,
        x: &mut [f32],
        from: usize,
        max: f32,
        mut sum: __m256,
    ) -> __m256 {
        let avx = simd.avx;
        let n = x.len();
        let full = n / LANES * LANES;
        let m = avx._mm256_set1_ps(max);
        let mut c = from;
        while c < full {
            let e = exp_minus(simd, ld(x, c), m);
            st(x, c, e);
            sum = avx._mm256_add_ps(sum, e);
            c += LANES;
        }
        if full < n {
            // The tail in one vector, padded with -inf (e^-inf = 0).
            let mut pad = [f32::NEG_INFINITY; LANES];
            pad[..n - full].copy_from_slice(&x[full..]);
            let e = exp_minus(simd, cast(pad), m);
            x[full..].copy_from_slice(&cast::<__m256, [f32; LANES]>(e)[..n - full]);
            sum = avx._mm256_add_ps(sum, e);
        }
        sum
    }

    /// `x[from..] ← x[from..] · inv` (`from` a multiple of [`LANES`]).
    #[inline(always)]
    pub(super) fn scale_from(simd: V3, x: &mut [f32], from: usize, inv: f32) {
        let avx = simd.avx;
        let full = x.len() / LANES * LANES;
        let invv = avx._mm256_set1_ps(inv);
        let mut c = from;
        while c < full {
            st(x, c, avx._mm256_mul_ps(ld(x, c), invv));
            c += LANES;
        }
        for v in &mut x[full.max(from)..] {
            *v *= inv;
        }
    }

    /// Query rows that share each load of a key or a value in [`CausalAttention`].
    const QB: usize = 4;

    /// Causal attention of a prompt: see [`super::Simd::causal_attention`].
    pub(super) struct CausalAttention<'a, 'b> {
        pub simd: V3,
        pub q: Rows<'b>,
        pub k: Rows<'b>,
        pub v: Rows<'b>,
        pub heads: usize,
        pub scale: f32,
        pub out: &'a mut [f32],
    }

    /// Scores of the `QB` queries `q` (one head's slices) against keys `0..n` of `kt` (that
    /// head's keys transposed: row `c` holds column `c` of every key, rows of `w` floats, `w` a
    /// multiple of 16 at least `n`), into rows of `w` in `s`. Sixteen keys at a time, each score
    /// one chain of fused multiply-adds over the head's columns in order.
    #[inline(always)]
    fn block_scores(simd: V3, (kt, w): (&[f32], usize), q: [&[f32]; QB], n: usize, s: &mut [f32]) {
        let d = q[0].len();
        let zero = simd.splat_f32x8(0.0);
        let mut j = 0;
        while j < n {
            let mut acc = [[zero; 2]; QB];
            for c in 0..d {
                let row = &kt[c * w + j..c * w + j + 2 * LANES];
                let (k0, k1) = (load(row, 0), load(row, LANES));
                for r in 0..QB {
                    let qr = simd.splat_f32x8(q[r][c]);
                    acc[r][0] = simd.mul_add_f32x8(k0, qr, acc[r][0]);
                    acc[r][1] = simd.mul_add_f32x8(k1, qr, acc[r][1]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let at = r * w + j;
                s[at..at + LANES].copy_from_slice(&cast::<f32x8, [f32; LANES]>(acc[0]));
                s[at + LANES..at + 2 * LANES].copy_from_slice(&cast::<f32x8, [f32; LANES]>(acc[1]));
            }
            j += 2 * LANES;
        }
    }

    /// Columns `c..c + A·8` of the outputs of the first `rn` queries: `Σ_j p_r[j] · v_j` over
    /// `j < lens[r]`, `p_r` row `r` of `s` (rows of `w`), into `out[r]`. The keys every query
    /// sees (`0..lens[0]`) serve all of them at once; the few after, each query that sees them.
    #[inline(always)]
    fn block_output<const A: usize>(
        simd: V3,
        v: Rows<'_>,
        (s, w): (&[f32], usize),
        (lens, rn): ([usize; QB], usize),
        c: usize,
        out: &mut [&mut [f32]; QB],
    ) {
        let zero = simd.splat_f32x8(0.0);
        let mut acc = [[zero; A]; QB];
        for j in 0..lens[0] {
            let row = &v.row(j)[c..c + A * LANES];
            let mut vv = [zero; A];
            for (a, vv) in vv.iter_mut().enumerate() {
                *vv = load(row, a * LANES);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let p = simd.splat_f32x8(s[r * w + j]);
                for (acc, vv) in acc.iter_mut().zip(&vv) {
                    *acc = simd.mul_add_f32x8(*vv, p, *acc);
                }
            }
        }
        for j in lens[0]..lens[rn - 1] {
            let row = &v.row(j)[c..c + A * LANES];
            for (r, acc) in acc.iter_mut().enumerate().take(rn).skip(1) {
                if j < lens[r] {
                    let p = simd.splat_f32x8(s[r * w + j]);
                    for (a, acc) in acc.iter_mut().enumerate() {
                        *acc = simd.mul_add_f32x8(load(row, a * LANES), p, *acc);
                    }
                }
            }
        }
        for (acc, o) in acc.iter().zip(out.iter_mut()).take(rn) {
            for (a, acc) in acc.iter().enumerate() {
                let at = c + a * LANES;
                o[at..at + LANES].copy_from_slice(&cast::<f32x8, [f32; LANES]>(*acc));
            }
        }
    }

    impl NullaryFnOnce for CausalAttention<'_, '_> {
        /// Whether every output was written (the views did not fit otherwise).
        type Output = bool;

        #[inline(always)]
        fn call(self) -> bool {
            let simd = self.simd;
            let (sq, sk, e) = (self.q.rows, self.k.rows, self.q.cols);
            let d = e / self.heads;
            let offset = sk - sq;
            let w = sk.div_ceil(2 * LANES) * 2 * LANES;
            let mut kt = vec![0f32; d * w];
            let mut s = vec![0f32; QB * w];
            for h in 0..self.heads {
                let hc = h * d;
                for j in 0..sk {
                    for (c, &x) in self.k.row(j)[hc..hc + d].iter().enumerate() {
                        kt[c * w + j] = x;
                    }
                }
                let Some(v) = self.v.columns(hc, d) else {
                    return false;
                };
                let mut r0 = 0;
                while r0 < sq {
                    let rn = (sq - r0).min(QB);
                    // Rows past the prompt repeat its last; their results are dropped.
                    let mut lens = [0usize; QB];
                    let mut q: [&[f32]; QB] = [&[]; QB];
                    for r in 0..QB {
                        let row = r0 + r.min(rn - 1);
                        lens[r] = offset + row + 1;
                        q[r] = &self.q.row(row)[hc..hc + d];
                    }
                    block_scores(simd, (&kt, w), q, lens[QB - 1], &mut s);
                    for (r, &len) in lens.iter().enumerate().take(rn) {
                        let p = &mut s[r * w..r * w + len];
                        let x = Softmax {
                            simd,
                            x: &mut *p,
                            scale: self.scale,
                        };
                        if !x.call() {
                            // Scaled already.
                            super::softmax_scalar(p, 1.0);
                        }
                    }
                    let mut rows = self.out[r0 * e..(r0 + rn) * e].chunks_exact_mut(e);
                    let mut out: [&mut [f32]; QB] = Default::default();
                    for o in out.iter_mut().take(rn) {
                        *o = match rows.next() {
                            Some(row) => &mut row[hc..hc + d],
                            None => return false,
                        };
                    }
                    let mut c = 0;
                    while c + 2 * LANES <= d {
                        block_output::<2>(simd, v, (&s, w), (lens, rn), c, &mut out);
                        c += 2 * LANES;
                    }
                    if c < d {
                        block_output::<1>(simd, v, (&s, w), (lens, rn), c, &mut out);
                    }
                    r0 += QB;
                }
            }
            true
        }
    }
}

/// The 16-lane (AVX-512) forms of the several-row products: [`x86::ManyRowTimes`] at the
/// [`x86::Width`] of `V4`, and a `ManyTimesCols` of its own. Each output
/// gets the very operations the 8-lane kernel gives it (the same chains of fused multiply-adds
/// in the same order, the same reductions), so the same bits; what changes is how many lanes
/// one instruction takes and how many accumulators the 32 registers hold. Columns (or rows of
/// `m`) past the last whole block go to the 8-lane kernel.
#[cfg(target_arch = "x86_64")]
mod x86_v4 {
    use super::x86::{self, finish8, ManyRowTimes, Width, ROW_GROUP};
    use super::Rows;
    use core::arch::x86_64::{__m256, __m512, _CMP_GE_OQ};
    use pulp::x86::{V3, V4};
    use pulp::{cast, f32x16, f32x8, NullaryFnOnce};

    const LANES: usize = 16;

    #[inline(always)]
    fn load(x: &[f32], at: usize) -> f32x16 {
        let mut a = [0f32; LANES];
        a.copy_from_slice(&x[at..at + LANES]);
        cast(a)
    }

    /// Lanes `0..8` and `8..16` of `v`.
    #[inline(always)]
    fn halves(simd: V4, v: f32x16) -> (f32x8, f32x8) {
        let v: __m512 = cast(v);
        let lo = simd.avx512f._mm512_castps512_ps256(v);
        let hi = simd.avx512dq._mm512_extractf32x8_ps::<1>(v);
        (cast(lo), cast(hi))
    }

    impl Width for V4 {
        type V = f32x16;
        const LANES: usize = LANES;

        #[inline(always)]
        fn splat(self, x: f32) -> f32x16 {
            self.splat_f32x16(x)
        }

        #[inline(always)]
        fn mul_add(self, a: f32x16, b: f32x16, c: f32x16) -> f32x16 {
            self.mul_add_f32x16(a, b, c)
        }

        #[inline(always)]
        fn load(self, x: &[f32], at: usize) -> f32x16 {
            load(x, at)
        }

        #[inline(always)]
        fn store(self, y: &mut [f32], at: usize, v: f32x16) {
            y[at..at + LANES].copy_from_slice(&cast::<f32x16, [f32; LANES]>(v));
        }

        /// Thirty-two registers: four or three rows with four vectors each, two rows or one with
        /// eight.
        #[inline(always)]
        fn blocks<const W: usize>(
            t: &mut ManyRowTimes<'_, '_, V4>,
            c: usize,
            k0: usize,
            k1: usize,
        ) {
            t.groups::<W, 4, 4, 8, 8>(c, k0, k1);
        }

        /// The 8-lane kernel's blocks, then its single columns.
        #[inline(always)]
        fn rest(t: ManyRowTimes<'_, '_, V4>, c: usize) {
            let simd: V3 = *t.simd;
            ManyRowTimes {
                simd,
                x: t.x,
                m: t.m,
                y: t.y,
                from: c,
            }
            .call();
        }
    }

    /// Rows of `x` (each `m.cols` long) times `mᵀ`; see [`super::Simd::rows_times_cols`]. Each
    /// output's two chains of 8-lane multiply-adds (even and odd lane vectors, as
    /// [`x86::ManyTimesCols`] keeps them) are the two halves of one 16-lane accumulator.
    pub(super) struct ManyTimesCols<'a, 'b> {
        pub simd: V4,
        pub x: &'a [f32],
        pub m: Rows<'b>,
        pub y: &'a mut [f32],
    }

    impl ManyTimesCols<'_, '_> {
        /// Rows `m4` of `m` against rows `r0..r0 + G` of `x` over columns `0..full` (whole
        /// 8-lane vectors): per output the even chain (the last single vector included) plus
        /// the odd one, as [`x86::ManyTimesCols`] has them before the lanes are added.
        #[inline(always)]
        fn four<const G: usize>(&self, m4: [&[f32]; 4], r0: usize, full: usize) -> [[f32x8; 4]; G] {
            let simd = self.simd;
            let k = self.m.cols;
            let pairs = full / LANES * LANES;
            let mut xs: [&[f32]; G] = [&[]; G];
            for (g, xr) in xs.iter_mut().enumerate() {
                *xr = &self.x[(r0 + g) * k..(r0 + g + 1) * k];
            }
            let mut acc = [[simd.splat_f32x16(0.0); 4]; G];
            let mut c = 0;
            while c < pairs {
                let w = [
                    load(m4[0], c),
                    load(m4[1], c),
                    load(m4[2], c),
                    load(m4[3], c),
                ];
                for (acc, xr) in acc.iter_mut().zip(&xs) {
                    let xv = load(xr, c);
                    for (acc, w) in acc.iter_mut().zip(&w) {
                        *acc = simd.mul_add_f32x16(*w, xv, *acc);
                    }
                }
                c += LANES;
            }
            let v3: V3 = *simd;
            let mut out = [[v3.splat_f32x8(0.0); 4]; G];
            for ((out, acc), xr) in out.iter_mut().zip(&acc).zip(&xs) {
                for ((out, acc), m) in out.iter_mut().zip(acc).zip(&m4) {
                    let (mut even, odd) = halves(simd, *acc);
                    if pairs < full {
                        even = v3.mul_add_f32x8(x86::load(m, pairs), x86::load(xr, pairs), even);
                    }
                    *out = v3.add_f32x8(even, odd);
                }
            }
            out
        }

        /// Rows `m8` of `m` (starting at `j`) against rows `r0..r0 + G` of `x`.
        #[inline(always)]
        fn group<const G: usize>(&mut self, m8: &[&[f32]; 8], j: usize, r0: usize) {
            let (n, k) = (self.m.rows, self.m.cols);
            let full = k / 8 * 8;
            let lo = self.four::<G>([m8[0], m8[1], m8[2], m8[3]], r0, full);
            let hi = self.four::<G>([m8[4], m8[5], m8[6], m8[7]], r0, full);
            for (g, (lo, hi)) in lo.iter().zip(&hi).enumerate() {
                let acc = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
                let r = r0 + g;
                let xr = &self.x[r * k..(r + 1) * k];
                finish8(
                    *self.simd,
                    m8,
                    full,
                    xr,
                    &mut self.y[r * n + j..r * n + j + 8],
                    acc,
                );
            }
        }

        /// Rows `j..j + 8` of `m` against every row of `x`, [`ROW_GROUP`] rows at a time.
        #[inline(always)]
        fn eight(&mut self, j: usize) {
            let mut m8: [&[f32]; 8] = [&[]; 8];
            for (r, row) in m8.iter_mut().enumerate() {
                *row = self.m.row(j + r);
            }
            let rows = self.x.len() / self.m.cols;
            let mut r = 0;
            while r + ROW_GROUP <= rows {
                self.group::<ROW_GROUP>(&m8, j, r);
                r += ROW_GROUP;
            }
            match rows - r {
                3 => self.group::<3>(&m8, j, r),
                2 => self.group::<2>(&m8, j, r),
                1 => self.group::<1>(&m8, j, r),
                _ => {}
            }
        }
    }

    impl NullaryFnOnce for ManyTimesCols<'_, '_> {
        type Output = ();

        #[inline(always)]
        fn call(mut self) {
            let mut j = 0;
            if self.m.cols > 0 {
                while j + 8 <= self.m.rows {
                    self.eight(j);
                    j += 8;
                }
            }
            let simd: V3 = *self.simd;
            x86::ManyTimesCols {
                simd,
                x: self.x,
                m: self.m,
                y: self.y,
                from: j,
            }
            .call();
        }
    }

    /// [`x86::GeluTanh`] sixteen values at a time, operation for operation (so the same bits);
    /// the values past the last whole vector go to it.
    pub(super) struct GeluTanh<'a> {
        pub simd: V4,
        pub x: &'a mut [f32],
    }

    impl NullaryFnOnce for GeluTanh<'_> {
        type Output = ();

        #[inline(always)]
        fn call(self) {
            let (simd, x) = (self.simd, self.x);
            let (f, dq) = (simd.avx512f, simd.avx512dq);
            let full = x.len() / LANES * LANES;
            let one = f._mm512_set1_ps(1.0);
            let sign = f._mm512_set1_ps(-0.0);
            let mut c = 0;
            while c < full {
                let v: __m512 = cast(load(x, c));
                let v2 = f._mm512_mul_ps(v, v);
                let inner = f._mm512_fmadd_ps(f._mm512_set1_ps(0.044715), v2, one);
                let u = f._mm512_mul_ps(f._mm512_mul_ps(f._mm512_set1_ps(0.797_884_6), v), inner);
                let neg_abs2 = f._mm512_mul_ps(dq._mm512_or_ps(u, sign), f._mm512_set1_ps(2.0));
                let e = exp_minus(simd, neg_abs2, f._mm512_setzero_ps());
                let t = f._mm512_div_ps(f._mm512_sub_ps(one, e), f._mm512_add_ps(one, e));
                let tanh = dq._mm512_or_ps(t, dq._mm512_and_ps(u, sign));
                let y = f._mm512_mul_ps(
                    f._mm512_mul_ps(f._mm512_set1_ps(0.5), v),
                    f._mm512_add_ps(one, tanh),
                );
                x[c..c + LANES].copy_from_slice(&cast::<__m512, [f32; LANES]>(y));
                c += LANES;
            }
            x86::GeluTanh {
                simd: *simd,
                x: &mut x[full..],
            }
            .call();
        }
    }

    /// Query rows that share each load of a key or a value in [`CausalAttention`]: twice the
    /// 8-lane kernel's, as thirty-two registers hold their sums.
    const QB: usize = 8;

    /// [`x86::CausalAttention`] with 16-lane vectors, for heads whose width is a multiple of
    /// 16. Every score, weight and output goes through the very operations the 8-lane kernel
    /// gives it (a score is one chain of fused multiply-adds over the head's columns in order,
    /// the softmax is [`x86::Softmax`]'s, an output one chain over the keys in order), so the
    /// bits are the same; eight queries share each load.
    pub(super) struct CausalAttention<'a, 'b> {
        pub simd: V4,
        pub q: Rows<'b>,
        pub k: Rows<'b>,
        pub v: Rows<'b>,
        pub heads: usize,
        pub scale: f32,
        pub out: &'a mut [f32],
    }

    /// Scores of `B` vectors of 16 keys from key `j` of `kt` (one head's keys transposed, rows
    /// of `w`) against the [`QB`] queries whose columns `qc` holds (`qc[c][r]`: column `c` of
    /// query `r`), into rows of `w` in `s`.
    #[inline(always)]
    fn scores<const B: usize>(
        simd: V4,
        (kt, w): (&[f32], usize),
        qc: &[[f32; QB]],
        j: usize,
        s: &mut [f32],
    ) {
        let zero = simd.splat_f32x16(0.0);
        let mut acc = [[zero; B]; QB];
        for (c, qc) in qc.iter().enumerate() {
            let row = &kt[c * w + j..c * w + j + B * LANES];
            let mut kv = [zero; B];
            for (b, kv) in kv.iter_mut().enumerate() {
                *kv = load(row, b * LANES);
            }
            for (acc, &q) in acc.iter_mut().zip(qc) {
                let q = simd.splat_f32x16(q);
                for (acc, kv) in acc.iter_mut().zip(&kv) {
                    *acc = simd.mul_add_f32x16(*kv, q, *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (b, acc) in acc.iter().enumerate() {
                let at = r * w + j + b * LANES;
                s[at..at + LANES].copy_from_slice(&cast::<f32x16, [f32; LANES]>(*acc));
            }
        }
    }

    /// `e^(v - m)` lane-wise: [`x86`]'s `exp_minus`, operation for operation.
    #[inline(always)]
    fn exp_minus(simd: V4, v: __m512, m: __m512) -> __m512 {
        let f = simd.avx512f;
        let t = f._mm512_sub_ps(v, m);
        let floor = f._mm512_set1_ps(-87.3);
        let live = f._mm512_cmp_ps_mask::<_CMP_GE_OQ>(t, floor);
        let t = f._mm512_max_ps(t, floor);
        let k = f._mm512_roundscale_ps::<0x08>(
            f._mm512_mul_ps(t, f._mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = f._mm512_fnmadd_ps(k, f._mm512_set1_ps(0.693_359_4), t);
        let r = f._mm512_fnmadd_ps(k, f._mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = f._mm512_set1_ps(1.987_569_1e-4);
        p = f._mm512_fmadd_ps(p, r, f._mm512_set1_ps(1.398_199_9e-3));
        p = f._mm512_fmadd_ps(p, r, f._mm512_set1_ps(8.333_452e-3));
        p = f._mm512_fmadd_ps(p, r, f._mm512_set1_ps(4.166_579_6e-2));
        p = f._mm512_fmadd_ps(p, r, f._mm512_set1_ps(0.166_666_65));
        p = f._mm512_fmadd_ps(p, r, f._mm512_set1_ps(0.5));
        let r2 = f._mm512_mul_ps(r, r);
        let p = f._mm512_fmadd_ps(p, r2, f._mm512_add_ps(r, f._mm512_set1_ps(1.0)));
        let two_k = f._mm512_slli_epi32::<23>(
            f._mm512_add_epi32(f._mm512_cvtps_epi32(k), f._mm512_set1_epi32(127)),
        );
        let e = f._mm512_mul_ps(p, f._mm512_castsi512_ps(two_k));
        f._mm512_maskz_mov_ps(live, e)
    }

    /// [`x86::Softmax`] of one row with 16-lane vectors, to the same bits: the same scaled
    /// values and max, the same `e^(v - max)`, added to the 8-lane sums in the 8-lane kernel's
    /// order (the lower half of each vector, then the upper), the same division. `false` (and
    /// `x` scaled) when the row holds a NaN or an infinity.
    #[inline(always)]
    fn softmax(simd: V4, x: &mut [f32], scale: f32) -> bool {
        let f = simd.avx512f;
        let v3: V3 = *simd;
        let n = x.len();
        let full = n / LANES * LANES;
        let sc = f._mm512_set1_ps(scale);
        let zero = f._mm512_setzero_ps();
        let mut m = f._mm512_set1_ps(f32::NEG_INFINITY);
        // `v · 0` summed is NaN once any value is a NaN or an infinity.
        let mut bad = zero;
        let mut c = 0;
        while c < full {
            let v = f._mm512_mul_ps(cast(load(x, c)), sc);
            x[c..c + LANES].copy_from_slice(&cast::<__m512, [f32; LANES]>(v));
            m = f._mm512_max_ps(m, v);
            bad = f._mm512_fmadd_ps(v, zero, bad);
            c += LANES;
        }
        // The max of finite values, whatever the order.
        let mut max = cast::<__m512, [f32; LANES]>(m)
            .into_iter()
            .fold(f32::NEG_INFINITY, f32::max);
        for v in &mut x[full..] {
            *v *= scale;
            max = max.max(*v);
        }
        let bad: [f32; LANES] = cast(bad);
        if bad.iter().any(|v| v.is_nan())
            || !max.is_finite()
            || x[full..].iter().any(|v| !v.is_finite())
        {
            return false;
        }
        let mv = f._mm512_set1_ps(max);
        let mut sum = v3.avx._mm256_setzero_ps();
        let mut c = 0;
        while c < full {
            let e = exp_minus(simd, cast(load(x, c)), mv);
            x[c..c + LANES].copy_from_slice(&cast::<__m512, [f32; LANES]>(e));
            let (lo, hi) = halves(simd, cast(e));
            sum = v3.avx._mm256_add_ps(sum, cast::<f32x8, __m256>(lo));
            sum = v3.avx._mm256_add_ps(sum, cast::<f32x8, __m256>(hi));
            c += LANES;
        }
        let sum = x86::exp_sum_from(v3, x, full, max, sum);
        let inv = 1.0 / x86::pairwise(cast(sum));
        let iv = f._mm512_set1_ps(inv);
        let mut c = 0;
        while c < full {
            let y = f._mm512_mul_ps(cast(load(x, c)), iv);
            x[c..c + LANES].copy_from_slice(&cast::<__m512, [f32; LANES]>(y));
            c += LANES;
        }
        x86::scale_from(v3, x, full, inv);
        true
    }

    /// Columns `c..c + A·16` of the outputs of the first `rn` queries: `Σ_j p_r[j] · v_j` over
    /// `j < lens[r]`, `p_r` row `r` of `s` (rows of `w`), into `out[r]`; the keys every query
    /// sees serve all of them at once, the few after each query that sees them (as
    /// [`x86`]'s `block_output`).
    #[inline(always)]
    fn block_output<const A: usize>(
        simd: V4,
        v: Rows<'_>,
        (s, w): (&[f32], usize),
        (lens, rn): ([usize; QB], usize),
        c: usize,
        out: &mut [&mut [f32]; QB],
    ) {
        let zero = simd.splat_f32x16(0.0);
        let mut acc = [[zero; A]; QB];
        for j in 0..lens[0] {
            let row = &v.row(j)[c..c + A * LANES];
            let mut vv = [zero; A];
            for (a, vv) in vv.iter_mut().enumerate() {
                *vv = load(row, a * LANES);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let p = simd.splat_f32x16(s[r * w + j]);
                for (acc, vv) in acc.iter_mut().zip(&vv) {
                    *acc = simd.mul_add_f32x16(*vv, p, *acc);
                }
            }
        }
        for j in lens[0]..lens[rn - 1] {
            let row = &v.row(j)[c..c + A * LANES];
            for (r, acc) in acc.iter_mut().enumerate().take(rn).skip(1) {
                if j < lens[r] {
                    let p = simd.splat_f32x16(s[r * w + j]);
                    for (a, acc) in acc.iter_mut().enumerate() {
                        *acc = simd.mul_add_f32x16(load(row, a * LANES), p, *acc);
                    }
                }
            }
        }
        for (acc, o) in acc.iter().zip(out.iter_mut()).take(rn) {
            for (a, acc) in acc.iter().enumerate() {
                let at = c + a * LANES;
                o[at..at + LANES].copy_from_slice(&cast::<f32x16, [f32; LANES]>(*acc));
            }
        }
    }

    impl NullaryFnOnce for CausalAttention<'_, '_> {
        /// Whether every output was written (the views did not fit otherwise).
        type Output = bool;

        #[inline(always)]
        fn call(self) -> bool {
            let simd = self.simd;
            let (sq, sk, e) = (self.q.rows, self.k.rows, self.q.cols);
            let d = e / self.heads;
            let offset = sk - sq;
            let w = sk.div_ceil(LANES) * LANES;
            let mut kt = vec![0f32; d * w];
            let mut s = vec![0f32; QB * w];
            let mut qc = vec![[0f32; QB]; d];
            for h in 0..self.heads {
                let hc = h * d;
                for j in 0..sk {
                    for (c, &x) in self.k.row(j)[hc..hc + d].iter().enumerate() {
                        kt[c * w + j] = x;
                    }
                }
                let Some(v) = self.v.columns(hc, d) else {
                    return false;
                };
                let mut r0 = 0;
                while r0 < sq {
                    let rn = (sq - r0).min(QB);
                    // Rows past the prompt repeat its last; their results are dropped.
                    let mut lens = [0usize; QB];
                    for (r, len) in lens.iter_mut().enumerate() {
                        let row = r0 + r.min(rn - 1);
                        *len = offset + row + 1;
                        for (qc, &x) in qc.iter_mut().zip(&self.q.row(row)[hc..hc + d]) {
                            qc[r] = x;
                        }
                    }
                    let n = lens[QB - 1].div_ceil(LANES) * LANES;
                    let mut j = 0;
                    while j + 2 * LANES <= n {
                        scores::<2>(simd, (&kt, w), &qc, j, &mut s);
                        j += 2 * LANES;
                    }
                    if j < n {
                        scores::<1>(simd, (&kt, w), &qc, j, &mut s);
                    }
                    for (r, &len) in lens.iter().enumerate().take(rn) {
                        let p = &mut s[r * w..r * w + len];
                        if !softmax(simd, p, self.scale) {
                            // Scaled already.
                            super::softmax_scalar(p, 1.0);
                        }
                    }
                    let mut rows = self.out[r0 * e..(r0 + rn) * e].chunks_exact_mut(e);
                    let mut out: [&mut [f32]; QB] = Default::default();
                    for o in out.iter_mut().take(rn) {
                        *o = match rows.next() {
                            Some(row) => &mut row[hc..hc + d],
                            None => return false,
                        };
                    }
                    let mut c = 0;
                    while c + 2 * LANES <= d {
                        block_output::<2>(simd, v, (&s, w), (lens, rn), c, &mut out);
                        c += 2 * LANES;
                    }
                    if c < d {
                        block_output::<1>(simd, v, (&s, w), (lens, rn), c, &mut out);
                    }
                    r0 += QB;
                }
            }
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, seed: u32) -> Vec<f32> {
        // Deterministic values in [-1, 1).
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{what}: element {i}: {x} vs {y}"
            );
        }
    }

    /// Products over odd sizes (tails of columns and rows) and strided views equal the plain
    /// f64 sums to float rounding, and the same for a copy of the view, bitwise.
    #[test]
    fn products_match_plain_sums_on_views() {
        let Some(simd) = Simd::detect() else { return };
        for (rows, cols, stride) in [(1, 1, 1), (7, 13, 20), (128, 384, 384), (33, 100, 131)] {
            let data = seq((rows - 1) * stride + cols, rows as u32);
            let m = Rows::new(&data, rows, cols, stride).unwrap();
            let x = seq(rows, 7);
            let mut y = vec![0f32; cols];
            simd.row_times(&x, m, &mut y);
            let want: Vec<f32> = (0..cols)
                .map(|j| {
                    (0..rows)
                        .map(|i| f64::from(x[i] * m.row(i)[j]))
                        .sum::<f64>() as f32
                })
                .collect();
            close(&y, &want, "row_times");
            let xc = seq(cols, 9);
            let mut z = vec![0f32; rows];
            simd.times_cols(m, &xc, 1, &mut z);
            let want: Vec<f32> = (0..rows)
                .map(|j| {
                    (0..cols)
                        .map(|c| f64::from(m.row(j)[c] * xc[c]))
                        .sum::<f64>() as f32
                })
                .collect();
            close(&z, &want, "times_cols");
            // A contiguous copy of the view gives the same bits.
            let copy: Vec<f32> = (0..rows).flat_map(|i| m.row(i).to_vec()).collect();
            let mc = Rows::new(&copy, rows, cols, cols).unwrap();
            let (mut y2, mut z2) = (vec![0f32; cols], vec![0f32; rows]);
            simd.row_times(&x, mc, &mut y2);
            simd.times_cols(mc, &xc, 1, &mut z2);
            assert_eq!(y, y2);
            assert_eq!(z, z2);
        }
    }

    /// A batch of rows gives each row the bits it gets alone (from the one-row kernels), for
    /// any number of rows (groups of four and their remainders) and any widths (whole lane
    /// vectors, pairs of them, and scalar tails); and the products are the plain sums.
    #[test]
    fn batched_rows_give_the_bits_of_each_row_alone() {
        let Some(simd) = Simd::detect() else { return };
        for (k, n) in [
            (1, 1),
            (7, 13),
            (16, 24),
            (33, 100),
            (128, 384),
            (40, 9),
            (300, 70),
            (129, 16),
            // Past `K_BLOCK_MIN_ELEMENTS`: several rows go over `m` in ranges of rows.
            (600, 520),
        ] {
            // Contiguous, and a strided view (a slice of a wider matrix).
            for stride in [n, n + 3] {
                let data = seq((k - 1) * stride + n, 5);
                let m = Rows::new(&data, k, n, stride).unwrap();
                for batch in [1usize, 2, 3, 4, 5, 8, 9] {
                    let x = seq(batch * k, batch as u32);
                    let mut y = vec![0f32; batch * n];
                    simd.rows_times_matrix(&x, m, &mut y);
                    for r in 0..batch {
                        let mut alone = vec![0f32; n];
                        simd.row_times(&x[r * k..(r + 1) * k], m, &mut alone);
                        assert_eq!(
                            &y[r * n..(r + 1) * n],
                            &alone[..],
                            "[{k}x{n}] row {r} of {batch}"
                        );
                        let want: Vec<f32> = (0..n)
                            .map(|j| {
                                (0..k)
                                    .map(|i| f64::from(x[r * k + i] * m.row(i)[j]))
                                    .sum::<f64>() as f32
                            })
                            .collect();
                        close(&alone, &want, "rows_times_matrix");
                    }
                    // `[out, in]`: m's rows are the outputs, each a dot product with x's row.
                    let x = seq(batch * n, 11 + batch as u32);
                    let mut z = vec![0f32; batch * k];
                    simd.rows_times_cols(&x, m, &mut z);
                    for r in 0..batch {
                        let mut alone = vec![0f32; k];
                        simd.times_cols(m, &x[r * n..(r + 1) * n], 1, &mut alone);
                        assert_eq!(
                            &z[r * k..(r + 1) * k],
                            &alone[..],
                            "[{k}x{n}]ᵀ row {r} of {batch}"
                        );
                    }
                }
            }
        }
    }

    /// With AVX-512 the several-row products give the bits of the AVX2 kernels: every width
    /// against whole and partial 16-lane blocks (and 8-lane ones), contiguous and strided.
    #[test]
    fn avx512_gives_the_bits_of_avx2() {
        let Some(simd) = Simd::detect() else { return };
        if !simd.wide() {
            eprintln!("no AVX-512 here (or GENIE_SIMD=avx2): nothing to compare");
            return;
        }
        let narrow = simd.avx2_only();
        for (k, n) in [
            (1, 1),
            (8, 8),
            (16, 16),
            (24, 40),
            (33, 100),
            (128, 128),
            (128, 384),
            (512, 128),
            (136, 4104),
            (300, 70),
            (600, 520),
        ] {
            for stride in [n, n + 5] {
                let data = seq((k - 1) * stride + n, 3);
                let m = Rows::new(&data, k, n, stride).unwrap();
                for batch in 1..=9usize {
                    let x = seq(batch * k, batch as u32);
                    let (mut wide, mut base) = (vec![0f32; batch * n], vec![1f32; batch * n]);
                    simd.rows_times_matrix(&x, m, &mut wide);
                    narrow.rows_times_matrix(&x, m, &mut base);
                    assert_eq!(wide, base, "[{k}x{n}] stride {stride}, {batch} rows");
                    let x = seq(batch * n, 7 + batch as u32);
                    let (mut wide, mut base) = (vec![0f32; batch * k], vec![1f32; batch * k]);
                    simd.rows_times_cols(&x, m, &mut wide);
                    narrow.rows_times_cols(&x, m, &mut base);
                    assert_eq!(wide, base, "[{k}x{n}]ᵀ stride {stride}, {batch} rows");
                }
            }
        }
    }

    /// With AVX-512 a prompt's causal attention gives the bits of the AVX2 kernel: heads of 16,
    /// 32, 48 and 64, prompts shorter and longer than a block of queries, a cache before them
    /// (more keys than queries) read through a strided view, and a row holding an infinity
    /// (the softmax's fallback).
    #[test]
    fn avx512_causal_attention_gives_the_bits_of_avx2() {
        let Some(simd) = Simd::detect() else { return };
        if !simd.wide() {
            eprintln!("no AVX-512 here (or GENIE_SIMD=avx2): nothing to compare");
            return;
        }
        let narrow = simd.avx2_only();
        let same = |a: &[f32], b: &[f32]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
        };
        for (heads, d, sq, sk) in [
            (4, 32, 37, 37),
            (4, 32, 3, 3),
            (1, 16, 70, 75),
            (3, 48, 9, 9),
            (2, 64, 19, 40),
            (12, 64, 33, 33),
        ] {
            let e = heads * d;
            let stride = e + 8;
            let mut q = seq(sq * e, 11);
            if sq > 5 {
                q[5 * e + 1] = f32::INFINITY;
            }
            let (kd, vd) = (seq(sk * stride, 12), seq(sk * stride, 13));
            let qr = Rows::new(&q, sq, e, e).unwrap();
            let k = Rows::new(&kd, sk, e, stride).unwrap();
            let v = Rows::new(&vd, sk, e, stride).unwrap();
            let (mut wide, mut base) = (vec![0f32; sq * e], vec![1f32; sq * e]);
            assert!(simd.causal_attention((qr, k, v), heads, 1.3, &mut wide));
            assert!(narrow.causal_attention((qr, k, v), heads, 1.3, &mut base));
            assert!(
                same(&wide, &base),
                "{heads} heads of {d}, {sq} queries over {sk} keys"
            );
        }
    }

    /// With AVX-512 GELU gives the bits of the AVX2 kernel, NaNs, infinities, zeros of both
    /// signs and the values past the last whole vector included.
    #[test]
    fn avx512_gelu_gives_the_bits_of_avx2() {
        let Some(simd) = Simd::detect() else { return };
        if !simd.wide() {
            eprintln!("no AVX-512 here (or GENIE_SIMD=avx2): nothing to compare");
            return;
        }
        let mut x: Vec<f32> = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-30];
        x.extend(seq(1001, 21).iter().map(|v| v * 12.0));
        let (mut wide, mut base) = (x.clone(), x);
        simd.gelu_tanh(&mut wide);
        simd.avx2_only().gelu_tanh(&mut base);
        for (a, b) in wide.iter().zip(&base) {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{a} vs {b}"
            );
        }
    }

    /// Several parts at once give the bits of each part alone; a row gives the same bits
    /// inside an eight-row block as alone (the ways the kernels split and block work).
    #[test]
    fn parts_and_blocks_do_not_change_the_bits() {
        let Some(simd) = Simd::detect() else { return };
        for (rows, parts, w) in [(1000, 4, 32), (19, 3, 36), (9, 2, 5)] {
            let cols = parts * w;
            let data = seq(rows * cols, 3);
            let m = Rows::new(&data, rows, cols, cols).unwrap();
            let q = seq(cols, 4);
            let mut all = vec![0f32; parts * rows];
            simd.times_cols(m, &q, parts, &mut all);
            let p = seq(parts * rows, 5);
            let mut out = vec![0f32; cols];
            simd.rows_times(&p, m, parts, &mut out);
            for part in 0..parts {
                let sub = &data[part * w..];
                let one = Rows::new(sub, rows, w, cols).unwrap();
                let mut y = vec![0f32; rows];
                simd.times_cols(one, &q[part * w..(part + 1) * w], 1, &mut y);
                assert_eq!(
                    y,
                    all[part * rows..(part + 1) * rows],
                    "times_cols part {part}"
                );
                let mut o = vec![0f32; w];
                simd.row_times(&p[part * rows..(part + 1) * rows], one, &mut o);
                assert_eq!(o, out[part * w..(part + 1) * w], "rows_times part {part}");
                // The last row alone (outside any eight-row block).
                let last = Rows::new(&sub[(rows - 1) * cols..], 1, w, w).unwrap();
                let mut z = [0f32];
                simd.times_cols(last, &q[part * w..(part + 1) * w], 1, &mut z);
                assert_eq!(z[0], y[rows - 1], "row {} alone, part {part}", rows - 1);
            }
        }
    }

    /// The vectorised softmax is the scalar one to float rounding (tails included), and a row
    /// with a NaN or an infinity gives what the scalar one gives.
    #[test]
    fn softmax_matches_the_scalar_one() {
        let Some(simd) = Simd::detect() else { return };
        for n in [1, 7, 8, 13, 1000] {
            let x: Vec<f32> = seq(n, n as u32).iter().map(|v| v * 40.0).collect();
            let (mut a, mut b) = (x.clone(), x.clone());
            simd.softmax(&mut a, 0.3);
            softmax_scalar(&mut b, 0.3);
            close(&a, &b, &format!("softmax of {n}"));
            assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        // Far below the max: exactly zero, as f32's exp underflows.
        let mut x = vec![0.0, -200.0, -90.0, -80.0];
        simd.softmax(&mut x, 1.0);
        assert_eq!(&x[..3], &[1.0, 0.0, 0.0]);
        assert!(x[3] > 0.0 && x[3] < 1e-34);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let x = vec![1.0, bad, 2.0, 0.5, 0.1, 0.2, 0.3, 0.4, 0.5];
            let (mut a, mut b) = (x.clone(), x.clone());
            simd.softmax(&mut a, 0.5);
            softmax_scalar(&mut b, 0.5);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    /// The vectorised GELU is candle's formula to float rounding, tails and specials included.
    #[test]
    fn gelu_matches_the_formula() {
        let Some(simd) = Simd::detect() else { return };
        let reference = |v: f32| -> f32 {
            let v = f64::from(v);
            (0.5 * v
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt() * v * (1.0 + 0.044715 * v * v)).tanh()))
                as f32
        };
        let mut x: Vec<f32> = seq(1003, 11).iter().map(|v| v * 8.0).collect();
        x.extend([0.0, -0.0, 1e-6, -1e-6, 30.0, -30.0, 100.0, -100.0]);
        let mut y = x.clone();
        simd.gelu_tanh(&mut y);
        for (v, g) in x.iter().zip(&y) {
            let want = reference(*v);
            assert!(
                (g - want).abs() <= 2e-6 * (1.0 + want.abs()),
                "gelu({v}) = {g}, want {want}"
            );
        }
        let mut s = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        simd.gelu_tanh(&mut s);
        assert!(s[0].is_nan() && s[1] == f32::INFINITY && s[2].is_nan());
    }

    #[test]
    fn views_out_of_bounds_are_refused() {
        let data = [0f32; 10];
        assert!(Rows::new(&data, 3, 4, 3).is_none(), "overlapping rows");
        assert!(Rows::new(&data, 3, 4, 4).is_none(), "past the end");
        assert!(Rows::new(&data, 2, 4, 6).is_some());
    }
}
