//! The runtime over the rdma backend: run by `scripts/test-rdma.sh` inside soft-RoCE, where
//! `GENIE_RDMA_DEVICE` is set. The embedded cluster's automatic backend choice must pick RDMA there,
//! GPT-2 prefill + decode on 2 and 3 workers must equal the single-worker run bitwise, and a
//! SIGKILLed `genie worker` process, restarted, rejoins over rdma; the Llama-style fixtures match
//! `transformers`' reference and are bitwise equal on 1/2/3 workers and disaggregated over rdma;
//! the serving engine runs a Llama-style checkpoint over rdma.
#![cfg(feature = "rdma")]

mod family_check;
mod hostile_cases;
use genie_runtime::cluster::Cluster;
use genie_runtime::control::transport_config;
use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::models::{generate, prompt};
use genie_runtime::plan::Placement;
use genie_runtime::proto::WeightSpec;
use genie_scheduler::builders::Gpt2Config;
use genie_transport::{select_backend, Backend};
use hostile_cases::common::{self, bits};
use hostile_cases::{heal, Fault};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// The soft-RoCE device the harness set up; fails (never skips) without one.
fn device() -> String {
    let device = std::env::var("GENIE_RDMA_DEVICE").unwrap_or_default();
    assert!(
        !device.is_empty(),
        "GENIE_RDMA_DEVICE is not set: run this through scripts/test-rdma.sh (soft-RoCE)"
    );
    device
}

#[test]
fn gpt2_over_rdma_matches_single_worker() {
    let device = device();
    let cfg = Gpt2Config {
        layers: 2,
        hidden: 64,
        heads: 2,
        vocab: 256,
        context: 64,
        ..Gpt2Config::default()
    };
    let cluster = EmbeddedCluster::start(3, Arc::new(CpuKernels::new())).unwrap();
    assert_eq!(
        cluster.selection.backend,
        Backend::Rdma,
        "automatic choice did not pick RDMA on {device}: {}",
        cluster.selection.reason
    );
    let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(7)).unwrap();
    let p = prompt(10, cfg.vocab);
    let mut reference: Option<(Vec<Vec<u32>>, Vec<i64>)> = None;
    for (seq, n) in [1usize, 2, 3].into_iter().enumerate() {
        let place = |g: &genie_scheduler::graph::Graph| Placement::by_layer(g, n, cfg.layers);
        let gen = generate(&mut driver, &cfg, &p, 2, seq as u64, place, place).unwrap();
        let logits: Vec<Vec<u32>> = std::iter::once(&gen.prefill)
            .chain(&gen.steps)
            .map(|r| bits(&r.outputs[0]))
            .collect();
        if n > 1 {
            assert!(
                gen.prefill.counters.transfers > 0,
                "{n} workers moved nothing"
            );
        }
        match &reference {
            None => reference = Some((logits, gen.tokens)),
            Some((l, t)) => {
                assert_eq!(&gen.tokens, t, "tokens differ on {n} workers over rdma");
                assert!(l == &logits, "logits differ on {n} workers over rdma");
            }
        }
        driver.free_sequence(seq as u64).unwrap();
    }
    cluster.stop(driver).unwrap();
}

/// The Llama-style fixtures (`llama`: GQA, tied; `qwen2`: q/k/v biases) over rdma: logits within
/// 1e-4 of `transformers`' and its greedy tokens, bitwise the same on 1, 2 and 3 workers and
/// disaggregated (prefill on w0, its KV cache streamed to w1 over RDMA, decoded there).
#[test]
fn llama_families_over_rdma_match_the_reference_on_1_2_3_workers() {
    let device = device();
    for kind in ["llama", "qwen2"] {
        let (backend, reason) = family_check::check_family(kind);
        assert_eq!(
            backend,
            Backend::Rdma,
            "{kind}: automatic choice did not pick RDMA on {device}: {reason}"
        );
    }
}

/// A Llama-style checkpoint (the committed GQA fixture) served by the engine over rdma:
/// prefill on w0, its KV cache streamed to w1 over RDMA and decoded there; two concurrent
/// requests give the greedy tokens of `transformers`' reference.
#[test]
fn the_engine_serves_a_llama_checkpoint_over_rdma() {
    use genie_runtime::engine::{Engine, EngineConfig, Request, Sampling};
    use genie_runtime::limits::WorkerOptions;
    use genie_runtime::models::Model;
    let device = device();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let model = Model::load(&fixtures.join("llama")).unwrap();
    #[derive(serde::Deserialize)]
    struct Reference {
        prompt_ids: Vec<i64>,
        tokens: Vec<i64>,
    }
    let text = std::fs::read_to_string(fixtures.join("llama/reference.json")).unwrap();
    let r: Reference = serde_json::from_str(&text).unwrap();
    let opts = WorkerOptions {
        model_dir: Some(fixtures),
        ..WorkerOptions::default()
    };
    let cluster = EmbeddedCluster::start_with(2, Arc::new(CpuKernels::new()), opts).unwrap();
    assert_eq!(
        cluster.selection.backend,
        Backend::Rdma,
        "automatic choice did not pick RDMA on {device}: {}",
        cluster.selection.reason
    );
    let driver = Driver::connect(&cluster.cluster, WeightSpec::Checkpoint("llama".into())).unwrap();
    let engine = Engine::start(driver, EngineConfig::disaggregated(model)).unwrap();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let req = Request {
                prompt: r.prompt_ids.clone(),
                max_new_tokens: r.tokens.len(),
                stop: vec![],
                sampling: Sampling::Greedy,
            };
            engine.submit(req).unwrap()
        })
        .collect();
    for h in handles {
        let got: Vec<i64> = h.tokens().collect::<Result<_, _>>().unwrap();
        assert_eq!(got, r.tokens, "llama over rdma");
    }
    let driver = engine.shutdown().unwrap();
    cluster.stop(driver).unwrap();
}

/// `hostile_cases::heal` over rdma: three `genie worker` processes (built with this test's
/// features, so with rdma) and the driver all pick RDMA from the same environment; a driver on
/// RDMA reaches only workers on RDMA, so the run is over rdma end to end. w1 is SIGKILLed during a
/// generation: the run fails naming w1 within the peer timeout + 1 s; w1, restarted, rejoins at
/// the next setup and the generation equals the first one bitwise.
#[test]
fn a_killed_and_restarted_worker_rejoins_over_rdma() {
    let device = device();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let sel = select_backend(&transport_config(&Cluster::loopback(&[0]), loopback)).unwrap();
    assert_eq!(
        sel.backend,
        Backend::Rdma,
        "automatic choice did not pick RDMA on {device}: {}",
        sel.reason
    );
    let detail = heal(Path::new(env!("CARGO_BIN_EXE_genie")), Fault::Kill).unwrap();
    eprintln!("over rdma: {detail}");
}
