//! Run with `cargo run --release -p genie-runtime --example llama_decode_step [KV_LEN] [STEPS]`.
//!
//! The decode-step time of a 135M-class Llama-style model (`LlamaConfig::default()`: 30 layers
//! × 576 hidden, 9 heads, 3 KV heads, 1536 intermediate, vocabulary 49152, tied embeddings,
//! seeded random weights) on one in-process worker: a prefill of `KV_LEN` (default 512) tokens,
//! then `STEPS` (default 16) greedy decode steps against the pinned KV caches. Prints each
//! step's wall time (driver to worker and back, as a serving loop sees it) and the worker's
//! compute span, then the medians; the KV length of step `i` is `KV_LEN + i`. Last, the step
//! against its floor: the bytes of weights a step reads over its compute span, beside one
//! thread's memory read bandwidth measured in the same process.

use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::models::{generate_with, prompt, Family, Sampling};
use genie_runtime::plan::Placement;
use genie_runtime::proto::WeightSpec;
use genie_runtime::trace::{summarize, SpanKind};
use genie_scheduler::builders::LlamaConfig;
use std::sync::Arc;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let kv: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(512);
    let steps: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(16);
    let cfg = LlamaConfig::default();
    println!("{} ({} parameters)", cfg.describe(), cfg.parameter_count());
    let cluster = EmbeddedCluster::start(1, Arc::new(CpuKernels::new()))?;
    let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(7))?;
    let one = |g: &_| Ok(Placement::single(g));
    // A first short run materialises the weights, so the timed steps do not pay for it.
    let greedy = Sampling::default();
    generate_with(
        &mut driver,
        &cfg,
        &prompt(4, cfg.vocab),
        1,
        1,
        &greedy,
        one,
        one,
    )?;
    driver.free_sequence(1)?;
    let p = prompt(kv, cfg.vocab);
    let gen = generate_with(&mut driver, &cfg, &p, steps, 0, &greedy, one, one)?;
    println!(
        "prefill {kv} tokens: {:.1} ms",
        gen.prefill.wall.as_secs_f64() * 1e3
    );
    let (mut wall, mut span) = (Vec::new(), Vec::new());
    for (i, r) in gen.steps.iter().enumerate() {
        let s = summarize(&r.spans);
        println!(
            "step {i} (kv {}): {:.2} ms wall, {:.2} ms compute span",
            kv + i,
            r.wall.as_secs_f64() * 1e3,
            s.makespan_us / 1e3
        );
        wall.push(r.wall.as_secs_f64() * 1e3);
        span.push(s.makespan_us / 1e3);
    }
    // Where a step's compute goes: span time per node kind, the layer index dropped
    // (`model.layers.7.mlp.up_proj.out` counts as `mlp.up_proj.out`), summed over the steps.
    let mut by_kind: std::collections::BTreeMap<String, f64> = Default::default();
    for r in &gen.steps {
        for s in r
            .spans
            .iter()
            .filter(|s| matches!(s.kind, SpanKind::Compute { .. }))
        {
            let key = match s.name.strip_prefix("model.layers.") {
                Some(rest) => rest.split_once('.').map_or(rest, |(_, k)| k).to_owned(),
                None => s.name.clone(),
            };
            *by_kind.entry(key).or_default() += s.dur_us / 1e3 / steps.max(1) as f64;
        }
    }
    let mut top: Vec<(String, f64)> = by_kind.into_iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (k, ms) in top.iter().take(10) {
        println!("  {ms:7.2} ms/step  {k}");
    }
    let (wall, span) = (median(wall), median(span));
    println!("decode step at kv {kv}: median {wall:.2} ms wall, {span:.2} ms compute span ({steps} steps)");
    cluster.stop(driver)?;
    // A decode step reads every weight once (the tied embedding whole, as the LM head), more
    // than any cache holds: its floor is the time to stream them from memory. The baseline, in
    // this process: one thread summing a buffer larger than the caches.
    let weight_bytes = cfg.parameter_count() as f64 * 4.0;
    let step_gbps = weight_bytes / (span / 1e3) / 1e9;
    let mem_gbps = memory_read_gbps();
    println!(
        "weights read per step {:.0} MB: {step_gbps:.1} GB/s over the compute span; one thread streams memory at {mem_gbps:.1} GB/s",
        weight_bytes / 1e6
    );
    println!(
        "llama_decode_step kv={kv} step_ms={span:.2} weight_read_gbps={step_gbps:.1} memory_read_gbps={mem_gbps:.1} ratio_vs_memory={:.2}",
        step_gbps / mem_gbps
    );
    Ok(())
}

/// One thread's read bandwidth from memory: the best of five sums over 512 MiB of f32 (eight
/// independent lanes, so that the adds keep up with the loads).
fn memory_read_gbps() -> f64 {
    let buf = vec![1.0f32; 128 << 20];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let mut acc = [0f32; 8];
        for c in buf.chunks_exact(8) {
            for (a, x) in acc.iter_mut().zip(c) {
                *a += *x;
            }
        }
        std::hint::black_box(acc);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (buf.len() * 4) as f64 / best / 1e9
}
