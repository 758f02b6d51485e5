//! `genie worker` processes joined by a cluster file: the same answers as in-process workers,
//! and a worker killed mid-run fails the run with an error naming it, within a bounded time.

mod common;
use common::bits;
use genie_runtime::cluster::Cluster;
use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::models::{generate, prompt, Family, Model};
use genie_runtime::plan::Placement;
use genie_runtime::proto::WeightSpec;
use genie_scheduler::builders::{Gpt2Config, LlamaConfig};
use genie_scheduler::graph::Graph;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn small() -> Gpt2Config {
    Gpt2Config {
        layers: 3,
        hidden: 128,
        heads: 4,
        vocab: 512,
        context: 512,
        ..Gpt2Config::default()
    }
}

/// Worker processes, killed on drop.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(n: usize, tag: &str) -> (Cluster, Workers, PathBuf) {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let mut cluster = Cluster::loopback(&ports);
    cluster.secret = Some(format!("test-secret-{tag}"));
    let dir = std::env::temp_dir().join(format!("genie-proc-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cluster.toml");
    std::fs::write(&file, cluster.to_toml()).unwrap();
    let children = cluster
        .workers
        .iter()
        .map(|w| {
            Command::new(env!("CARGO_BIN_EXE_genie"))
                .args(["worker", "--cluster"])
                .arg(&file)
                .args(["--name", &w.name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    (cluster, Workers(children), dir)
}

#[test]
fn worker_processes_match_in_process_reference() {
    processes_match_in_process_reference(&Model::Gpt2(small()), "match");
}

/// A Llama-style decoder (grouped-query attention, KV caches sized by its KV heads) as well.
#[test]
fn llama_worker_processes_match_in_process_reference() {
    let cfg = LlamaConfig {
        layers: 3,
        hidden: 128,
        heads: 4,
        kv_heads: Some(2),
        intermediate: 256,
        vocab: 512,
        context: 512,
        ..LlamaConfig::default()
    };
    processes_match_in_process_reference(&Model::Llama(cfg), "llama");
}

fn processes_match_in_process_reference(cfg: &Model, tag: &str) {
    let p = prompt(10, cfg.vocab());
    // Reference: one in-process worker.
    let emb = EmbeddedCluster::start(1, Arc::new(CpuKernels::new())).unwrap();
    let mut d = Driver::connect(&emb.cluster, WeightSpec::Seeded(3)).unwrap();
    let one = |g: &Graph| Ok(Placement::single(g));
    let reference = generate(&mut d, cfg, &p, 3, 0, one, one).unwrap();
    emb.stop(d).unwrap();
    let want: Vec<Vec<u32>> = std::iter::once(&reference.prefill)
        .chain(&reference.steps)
        .map(|r| bits(&r.outputs[0]))
        .collect();

    let (cluster, workers, dir) = start(3, tag);
    let mut driver = Driver::connect(&cluster, WeightSpec::Seeded(3)).unwrap();
    for (seq, n) in [1usize, 2, 3].into_iter().enumerate() {
        let place = |g: &Graph| Placement::by_layer(g, n, cfg.layers());
        let gen = generate(&mut driver, cfg, &p, 3, seq as u64, place, place).unwrap();
        let got: Vec<Vec<u32>> = std::iter::once(&gen.prefill)
            .chain(&gen.steps)
            .map(|r| bits(&r.outputs[0]))
            .collect();
        assert_eq!(gen.tokens, reference.tokens, "{n} worker processes");
        assert!(got == want, "logits differ on {n} worker processes");
    }
    driver.shutdown().unwrap();
    drop(workers);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn killed_worker_fails_the_run_naming_it() {
    let cfg = Gpt2Config {
        layers: 3,
        hidden: 256,
        heads: 4,
        vocab: 512,
        context: 512,
        ..Gpt2Config::default()
    };
    let (cluster, mut workers, dir) = start(3, "kill");
    let mut driver = Driver::connect(&cluster, WeightSpec::Seeded(1)).unwrap();
    let p = prompt(400, cfg.vocab);
    // The cluster works before the kill.
    let place = |g: &Graph| Placement::by_layer(g, 3, 3);
    generate(&mut driver, &cfg, &prompt(8, cfg.vocab), 2, 7, place, place).unwrap();
    let start = Instant::now();
    let run = std::thread::spawn(move || {
        let place = |g: &Graph| Placement::by_layer(g, 3, 3);
        let r = generate(&mut driver, &cfg, &p, 50, 0, place, place);
        (r.map(|g| g.tokens), driver)
    });
    // Kill the middle worker while the generation runs (or, if it has not started yet, before
    // its first run: either way the run must fail and name w1).
    workers.0[1].kill().unwrap();
    workers.0[1].wait().unwrap();
    let (res, driver) = run.join().unwrap();
    let err = res.expect_err("the run survived a dead worker");
    let msg = err.to_string();
    eprintln!("run failed after {:?}: {msg}", start.elapsed());
    assert!(
        msg.contains("w1"),
        "error does not name the dead worker: {msg}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "failure took {:?}",
        start.elapsed()
    );
    // The driver refuses further runs on the broken cluster.
    let g = genie_scheduler::builders::gpt2_prefill(&small(), 4).unwrap();
    assert!(driver.run(&g, &Placement::single(&g), &[], &[], 9).is_err());
    drop(workers);
    let _ = std::fs::remove_dir_all(dir);
}
