//! A hostile driver, accept starvation and worker faults against real `genie worker`
//! processes (the cases are in `hostile_cases/mod.rs`; `scripts/test-hostile.sh` runs the same
//! ones through `examples/hostile.rs` and prints the summary line).

mod hostile_cases;
use hostile_cases::{accept_starvation, heal, run_hostile, Fault, Outcome, REPLY_WITHIN};
use std::path::Path;

fn genie() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_genie"))
}

/// Every hostile request gets a typed `Failed` reply within 5 s and the worker keeps serving.
#[test]
fn hostile_driver_requests_are_refused_typed() {
    let (results, rss) = run_hostile(genie());
    for r in &results {
        eprintln!("{:<30} {:?} {:?}", r.name, r.took, r.outcome);
    }
    eprintln!("max rss {rss:.0} MiB");
    for r in &results {
        assert_eq!(r.outcome, Outcome::RefusedTyped, "{}", r.name);
        assert!(r.took <= REPLY_WITHIN, "{} took {:?}", r.name, r.took);
    }
}

/// 100 connections that never say hello and 50 idle or dripping sockets do not keep a real
/// driver out for more than 5 s.
#[test]
fn silent_connections_do_not_starve_the_acceptor() {
    let r = accept_starvation(genie());
    assert_eq!(r.outcome, Outcome::RefusedTyped, "took {:?}", r.took);
}

/// A SIGKILLed worker, restarted, rejoins at the next setup.
#[test]
fn a_killed_and_restarted_worker_rejoins() {
    heal(genie(), Fault::Kill).unwrap();
}

/// A worker stopped past the peer timeout, resumed, rejoins at the next setup.
#[test]
fn a_stopped_and_resumed_worker_rejoins() {
    heal(genie(), Fault::Stop).unwrap();
}

/// The serving engine on `genie worker` processes: w1 (the decode worker) is SIGKILLed while
/// requests run; they fail with `WorkerFailed` naming w1 within the peer timeout + 1 s, the
/// KV pool gets their bytes back, and after w1 is restarted the engine reconnects by itself and
/// serves a new request with the tokens it gave before the fault.
#[test]
fn an_engine_survives_a_killed_decode_worker() {
    use genie_runtime::engine::{Engine, EngineConfig, EngineError, Request, Step};
    use genie_runtime::proto::WeightSpec;
    use genie_transport::TransportConfig;
    use hostile_cases::{small, Procs, Scratch};
    use std::time::{Duration, Instant};

    let s = Scratch::new(2, "engine");
    let mut procs = Procs((0..2).map(|i| s.spawn(genie(), i, None, 1024)).collect());
    let peer_timeout = TransportConfig::default().peer_timeout;
    let cfg = EngineConfig::for_cluster(small(), &s.cluster).unwrap();
    assert_eq!((cfg.prefill_worker, cfg.decode_worker), (0, 1));
    let pool = cfg.kv_pool_bytes;
    let engine = Engine::connect(&s.cluster, WeightSpec::Seeded(5), cfg).unwrap();
    let short = Request::greedy(vec![5, 6, 7, 8], 6);
    let before = engine.submit(short.clone()).unwrap().wait().unwrap().tokens;
    // Two long requests decoding on w1.
    let mut running: Vec<_> = (0..2)
        .map(|i| {
            engine
                .submit(Request::greedy(vec![1 + i, 2, 3], 240))
                .unwrap()
        })
        .collect();
    for h in &mut running {
        assert!(matches!(
            h.next(Duration::from_secs(30)).unwrap(),
            Step::Token(_)
        ));
    }
    let killed = Instant::now();
    procs.0[1].kill().unwrap();
    let _ = procs.0[1].wait();
    for h in &mut running {
        let end = loop {
            match h.next(Duration::from_secs(30)) {
                Ok(Step::Token(_)) => continue,
                other => break other,
            }
        };
        match end {
            Err(EngineError::WorkerFailed { worker, .. }) => assert_eq!(worker, "w1"),
            other => panic!("expected WorkerFailed naming w1, got {other:?}"),
        }
    }
    let took = killed.elapsed();
    assert!(
        took <= peer_timeout + Duration::from_secs(1),
        "failed only after {took:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.kv_free() != pool {
        assert!(
            Instant::now() < deadline,
            "failed requests kept their KV reservation"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    procs.0[1] = s.spawn(genie(), 1, None, 1024);
    let after = engine.submit(short).unwrap().wait().unwrap().tokens;
    assert_eq!(after, before, "tokens differ after the engine reconnected");
    let driver = engine.shutdown().unwrap();
    let _ = driver.shutdown();
}
