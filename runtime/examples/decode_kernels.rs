//! Times a decode step's products (one row, and eight: a batched step's) with Genie's decode
//! kernels and with candle's
//! (`CpuKernels::new()` vs `CpuKernels::candle_only()`), interleaved in one process, and prints
//! the median time of each and their ratio, then one line with every ratio.
//!
//! `cargo run --release -p genie-runtime --example decode_kernels [-- <iterations> [cold] [<name>]]`
//! (`cold`: the caches are evicted before every call, as between the steps of a large model;
//! a `<name>`: only the cases whose name contains it).

use candle_core::{Device, Tensor};
use genie_runtime::kernels::{CpuKernels, Kernels};
use genie_scheduler::graph::{
    DType, GeluApprox, Node, NodeId, OpKind, Scalar, Semantics, TensorMeta, WeightLayout,
};
use std::time::Instant;

fn node(op: OpKind, out: &[usize]) -> Node {
    Node {
        id: NodeId(0),
        name: "bench".into(),
        op,
        inputs: vec![],
        outputs: vec![TensorMeta::new(out.to_vec(), DType::F32)],
        semantics: Semantics::default(),
    }
}

/// A causal attention node of `heads` heads of `head_dim`, output shape `out`.
fn attention(heads: usize, head_dim: usize, scale: f32, out: &[usize]) -> Node {
    let op = OpKind::Attention {
        heads,
        kv_heads: None,
        head_dim,
        causal: true,
        scale: Scalar(scale),
    };
    node(op, out)
}

fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::args()
        .nth(1)
        .map_or(Ok(2000), |s| s.parse())?
        .max(1);
    // `cold`: evict the caches before each call (a decode step's working set does not stay
    // cached between steps of a real model).
    let cold = std::env::args().skip(2).any(|s| s == "cold");
    // Any other word: only the cases whose name contains it.
    let only = std::env::args().skip(2).find(|s| s != "cold");
    let mut evict = vec![0u8; if cold { 64 << 20 } else { 0 }];
    let mut flush = |round: u8| {
        for b in evict.iter_mut().step_by(64) {
            *b = b.wrapping_add(round);
        }
    };
    let d = Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 1., s, &d);
    let (e, l) = (128, 1000);
    let store = Tensor::randn(0f32, 1., (2, 1, 1024, e), &d)?;
    let view = store.narrow(2, 0, l)?;
    let big = Tensor::randn(0f32, 1., (2, 1, 512, 768), &d)?;
    // A `[k, n]` linear layer with bias on `rows` rows (one per sequence of a batched decode
    // step), the weight stored `[in, out]` (GPT-2) or `[out, in]` (Llama), named as in the
    // output.
    let linear = |k: usize, n: usize, rows: usize, layout: WeightLayout| {
        let op = OpKind::Linear { bias: true, layout };
        let w = match layout {
            WeightLayout::InOut => r(&[k, n])?,
            WeightLayout::OutIn => r(&[n, k])?,
        };
        let ins = vec![r(&[rows, 1, k])?, w, r(&[n])?];
        let t = if layout == WeightLayout::OutIn {
            "ᵀ"
        } else {
            ""
        };
        let name = format!("linear {k}x{n}{t} x{rows}");
        anyhow::Ok((name, node(op, &[rows, 1, n]), ins))
    };
    let (io, oi) = (WeightLayout::InOut, WeightLayout::OutIn);
    let cases: Vec<(String, Node, Vec<Tensor>)> = vec![
        linear(e, 384, 1, io)?,
        linear(e, 384, 8, io)?,
        linear(512, e, 1, io)?,
        linear(512, e, 8, io)?,
        linear(e, 4096, 1, oi)?,
        linear(e, 4096, 8, oi)?,
        linear(768, 768, 1, io)?,
        linear(3072, 768, 1, io)?,
        linear(768, 3072, 1, io)?,
        linear(768, 3072, 8, io)?,
        linear(576, 1536, 1, oi)?,
        linear(576, 1536, 8, oi)?,
        linear(768, 8192, 1, oi)?,
        linear(768, 8192, 8, oi)?,
        (
            "attention 12x64 over 512".into(),
            attention(12, 64, 0.125, &[1, 1, 768]),
            vec![r(&[1, 1, 768])?, big.get(0)?, big.get(1)?],
        ),
        (
            "attention 4x32 over 1000".into(),
            attention(4, 32, 0.17, &[1, 1, e]),
            vec![r(&[1, 1, e])?, view.get(0)?, view.get(1)?],
        ),
        (
            "prefill attention 4x32 320".into(),
            attention(4, 32, 0.17, &[1, 320, e]),
            vec![r(&[1, 320, e])?, r(&[1, 320, e])?, r(&[1, 320, e])?],
        ),
        (
            "prefill gelu 320x512".into(),
            node(
                OpKind::Gelu {
                    approximate: GeluApprox::Tanh,
                },
                &[1, 320, 512],
            ),
            vec![r(&[1, 320, 512])?],
        ),
        (
            "layer_norm 128 x8".into(),
            node(OpKind::LayerNorm { eps: Scalar(1e-5) }, &[8, 1, e]),
            vec![r(&[8, 1, e])?, r(&[e])?, r(&[e])?],
        ),
        (
            "prefill layer_norm 320x128".into(),
            node(OpKind::LayerNorm { eps: Scalar(1e-5) }, &[1, 320, e]),
            vec![r(&[1, 320, e])?, r(&[e])?, r(&[e])?],
        ),
    ];
    let (fast, reference) = (CpuKernels::new(), CpuKernels::candle_only());
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "op", "candle[us]", "genie[us]", "ratio"
    );
    let mut last = String::from("decode_kernels");
    for (name, n, ins) in &cases {
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let (mut a, mut b) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
        for i in 0..iters {
            flush(i as u8);
            let t = Instant::now();
            reference.run(n, ins)?;
            a.push(t.elapsed().as_secs_f64() * 1e6);
            flush(i as u8);
            let t = Instant::now();
            fast.run(n, ins)?;
            b.push(t.elapsed().as_secs_f64() * 1e6);
        }
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        let (ma, mb) = (a[iters / 2], b[iters / 2]);
        println!("{name:<28} {ma:>12.2} {mb:>12.2} {:>8.2}", ma / mb);
        let key: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        last.push_str(&format!(" {key}_speedup_vs_candle={:.2}", ma / mb));
    }
    println!("{last}");
    Ok(())
}
