//! `genie worker` processes joined by a cluster file: the same answers as in-process workers,
//! a worker killed mid-run fails the run with an error naming it, within a bounded time, and
//! an engine streams a request's first token while its decode worker is stopped and prefills
//! short prompts that waited together in one batched pass.

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
    start_with(n, tag, genie_runtime::cluster::DEFAULT_PEER_TIMEOUT)
}

fn start_with(n: usize, tag: &str, peer_timeout: Duration) -> (Cluster, Workers, PathBuf) {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let mut cluster = Cluster::loopback(&ports);
    cluster.secret = Some(format!("test-secret-{tag}"));
    cluster.peer_timeout = peer_timeout;
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

/// Sends `signal` (`STOP`, `CONT`) to a worker process, with procps' `kill` (which
/// `scripts/deps.sh` installs).
fn signal(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("no `kill` command: install procps (scripts/deps.sh does)")
        .success();
    assert!(ok, "kill -{signal} failed");
}

/// A disaggregated engine streams a request's first token from its prefill, before its KV
/// cache has moved: with the decode worker's process stopped (SIGSTOP), the first token still
/// arrives and the second does not; once it continues, the request ends with the tokens the
/// same request got before the stop. (An engine that sent the first token only after the
/// move would send nothing while the decode worker is stopped.)
#[test]
fn the_first_token_streams_while_the_decode_worker_is_stopped() {
    use genie_runtime::engine::{Engine, EngineConfig, EngineError, Request, Step};
    // Long enough that the stop below never counts as a death.
    let (cluster, workers, dir) = start_with(2, "first", Duration::from_secs(60));
    let driver = Driver::connect(&cluster, WeightSpec::Seeded(3)).unwrap();
    let engine = Engine::start(driver, EngineConfig::disaggregated(small())).unwrap();
    let request = || Request::greedy(prompt(24, small().vocab), 6);
    let reference = engine.submit(request()).unwrap().wait().unwrap().tokens;
    assert_eq!(reference.len(), 6);

    signal(&workers.0[1], "STOP");
    let mut handle = engine.submit(request()).unwrap();
    let first = handle.next(Duration::from_secs(30));
    // No decode step can run while w1 is stopped.
    let second = handle.next(Duration::from_millis(300));
    signal(&workers.0[1], "CONT");
    assert_eq!(first.unwrap(), Step::Token(reference[0]));
    assert!(
        matches!(second, Err(EngineError::Timeout(_))),
        "a second token came from a stopped decode worker: {second:?}"
    );
    let mut tokens = vec![reference[0]];
    let end = loop {
        match handle.next(Duration::from_secs(30)).unwrap() {
            Step::Token(t) => tokens.push(t),
            Step::Done(reason, timings) => break (reason, timings),
        }
    };
    assert_eq!(tokens, reference);
    // The first token did not wait for the move (which waited for w1 at least 300 ms).
    let (_, timings) = end;
    assert!(
        timings.first_token < timings.queue + timings.prefill + timings.kv_transfer,
        "{timings:?}"
    );
    engine.shutdown().unwrap().shutdown().unwrap();
    drop(workers);
    let _ = std::fs::remove_dir_all(dir);
}

/// Short prompts that wait together are prefilled in one batched pass, each with the tokens it
/// gets served alone: six are submitted while the prefill worker's process is stopped, so at
/// most two passes are handed to its lane before it continues and every request still waiting
/// then goes in the third (`Timings::prefill_batch` says how many shared each pass).
#[test]
fn short_prompts_that_waited_together_are_prefilled_in_one_pass() {
    use genie_runtime::engine::{Engine, EngineConfig, Request};
    let (cluster, workers, dir) = start_with(2, "batch", Duration::from_secs(60));
    let driver = Driver::connect(&cluster, WeightSpec::Seeded(4)).unwrap();
    let engine = Engine::start(driver, EngineConfig::disaggregated(small())).unwrap();
    let prompts: Vec<Vec<i64>> = [12usize, 9, 5, 17, 8, 11]
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            prompt(l, small().vocab)
                .iter()
                .map(|t| (t + 13 * i as i64) % small().vocab as i64)
                .collect()
        })
        .collect();
    let request = |i: usize| Request::greedy(prompts[i].clone(), 5);
    let alone: Vec<_> = (0..prompts.len())
        .map(|i| engine.submit(request(i)).unwrap().wait().unwrap())
        .collect();
    assert!(alone.iter().all(|c| c.timings.prefill_batch == 1));

    signal(&workers.0[0], "STOP");
    let handles: Vec<_> = (0..prompts.len())
        .map(|i| engine.submit(request(i)).unwrap())
        .collect();
    // Time for the engine thread to take every submission in.
    std::thread::sleep(Duration::from_millis(300));
    signal(&workers.0[0], "CONT");
    let done: Vec<_> = handles.into_iter().map(|h| h.wait().unwrap()).collect();
    for (i, (d, a)) in done.iter().zip(&alone).enumerate() {
        assert_eq!(
            d.tokens, a.tokens,
            "request {i} differs from itself served alone"
        );
    }
    // In arrival order, in at most three passes: the one that went first (stuck), the one
    // queued in the lane behind it, and one of whatever still waited once it continued (how
    // many went first depends on how many submissions the engine thread took in at once).
    let batches: Vec<usize> = done.iter().map(|d| d.timings.prefill_batch).collect();
    let mut passes = 0;
    let mut i = 0;
    while i < batches.len() {
        let n = batches[i];
        assert!(
            n >= 1 && batches[i..].len() >= n && batches[i..i + n].iter().all(|&b| b == n),
            "not passes of consecutive requests: {batches:?}"
        );
        passes += 1;
        i += n;
    }
    assert!(
        passes <= 3,
        "six short prompts that waited together took {passes} passes: {batches:?}"
    );
    engine.shutdown().unwrap().shutdown().unwrap();
    drop(workers);
    let _ = std::fs::remove_dir_all(dir);
}
