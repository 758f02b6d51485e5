//! Run with `cargo run --release -p genie-runtime --example two_workers`.
//!
//! Two in-process workers on TCP loopback: a small GPT-2 prefills on w0 with its KV caches
//! built on w1 (streamed layer by layer), then decodes on w1; prints tokens, bytes and timings.

use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::models::{generate, prompt};
use genie_runtime::plan::Placement;
use genie_runtime::proto::WeightSpec;
use genie_runtime::trace::summarize;
use genie_scheduler::builders::Gpt2Config;
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let cfg = Gpt2Config {
        layers: 4,
        hidden: 128,
        heads: 4,
        vocab: 4096,
        context: 1024,
        ..Gpt2Config::default()
    };
    let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new()))?;
    println!(
        "transport: {} ({})",
        cluster.selection.backend, cluster.selection.reason
    );
    let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(42))?;
    let p = prompt(256, cfg.vocab);
    let gen = generate(
        &mut driver,
        &cfg,
        &p,
        8,
        0,
        |g| Ok(Placement::colocated_prefill(g)),
        |g| Ok(Placement::colocated_decode(g)),
    )?;
    let s = summarize(&gen.prefill.spans);
    println!(
        "prefill: {:.1} ms, KV streamed to w1: {} bytes",
        s.makespan_us / 1e3,
        gen.prefill.counters.bytes_moved
    );
    for (i, r) in gen.steps.iter().enumerate() {
        println!(
            "step {i}: {:.2} ms, {} bytes moved",
            r.wall.as_secs_f64() * 1e3,
            r.counters.bytes_moved
        );
    }
    println!("tokens: {:?}", gen.tokens);
    cluster.stop(driver)?;
    Ok(())
}
