//! The serving engine on an embedded two-worker cluster (prefill on w0, decode on w1, TCP on
//! loopback): many concurrent requests equal serving each alone, cancellation and KV-pool
//! admission, invalid requests, shutdown.

use genie_runtime::cluster::WorkerLink;
use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::engine::{
    Engine, EngineConfig, EngineError, FinishReason, PrefillOrder, Request, RequestHandle,
    Sampling, Step,
};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::limits::WorkerOptions;
use genie_runtime::models::{generate, prompt};
use genie_runtime::plan::Placement;
use genie_runtime::proto::WeightSpec;
use genie_scheduler::builders::Gpt2Config;
use genie_scheduler::graph::OpKind;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn cfg() -> Gpt2Config {
    Gpt2Config {
        layers: 2,
        hidden: 64,
        heads: 2,
        vocab: 256,
        context: 64,
        ..Gpt2Config::default()
    }
}

fn start() -> (EmbeddedCluster, Driver) {
    start_with(WorkerOptions::default())
}

fn start_with(opts: WorkerOptions) -> (EmbeddedCluster, Driver) {
    let cluster = EmbeddedCluster::start_with(2, Arc::new(CpuKernels::new()), opts).unwrap();
    let driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(11)).unwrap();
    (cluster, driver)
}

/// Prompt `i` of the workload: lengths 3 … 13, distinct contents.
fn prompt_of(i: usize) -> Vec<i64> {
    prompt(3 + 2 * i, 256)
        .iter()
        .map(|t| (t + i as i64 * 31) % 256)
        .collect()
}

/// Tokens of request `i` of the workload: `steps(i)` of them.
fn steps(i: usize) -> usize {
    4 + i % 3
}

/// The reference: each of the first `n` prompts generated alone through the plain generation
/// loop, with the engine's placements (prefill on w0 building the KV caches on worker `decode`,
/// decode whole there).
fn alone(driver: &mut Driver, n: usize, decode: usize) -> Vec<Vec<i64>> {
    (0..n)
        .map(|i| {
            let gen = generate(
                driver,
                &cfg(),
                &prompt_of(i),
                steps(i) - 1,
                1000 + i as u64,
                |g| {
                    Ok(Placement::by_rule(g, |n| {
                        if matches!(n.op, OpKind::KvCacheAppend) {
                            decode
                        } else {
                            0
                        }
                    }))
                },
                |g| Ok(Placement::by_rule(g, |_| decode)),
            )
            .unwrap();
            driver.free_sequence(1000 + i as u64).unwrap();
            gen.tokens
        })
        .collect()
}

/// Requests 0..n of the workload, each twice, all submitted at once from threads of their own;
/// what `read` makes of each handle, with the request's index.
fn at_once<T: Send>(
    engine: &Engine,
    n: usize,
    read: impl Fn(RequestHandle) -> T + Sync,
) -> Vec<(usize, T)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2 * n)
            .map(|k| {
                let read = &read;
                let i = k % n;
                s.spawn(move || {
                    let h = engine
                        .submit(Request::greedy(prompt_of(i), steps(i)))
                        .unwrap();
                    (i, read(h))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

const WAIT: Duration = Duration::from_secs(60);

/// Reads `h` to its end: why it ended.
fn until_done(h: &mut RequestHandle) -> FinishReason {
    loop {
        match h.next(WAIT).unwrap() {
            Step::Token(_) => continue,
            Step::Done(reason, _) => break reason,
        }
    }
}

/// Waits (within [`WAIT`]) until the engine's KV pool has all its `pool` bytes free again.
fn refilled(engine: &Engine, pool: u64, why: &str) {
    let deadline = Instant::now() + WAIT;
    while engine.kv_free() != pool {
        assert!(Instant::now() < deadline, "{why}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn concurrent_requests_equal_each_served_alone() {
    concurrent_equal_alone(start());
}

/// The same with each worker computing on a pool of one thread of its own
/// (`WorkerOptions::threads`), as serve-bench runs them: the same tokens.
#[test]
fn workers_with_compute_threads_of_their_own_serve_the_same_tokens() {
    let started = start_with(WorkerOptions {
        threads: Some(1),
        ..WorkerOptions::default()
    });
    // Each worker runs on its own pool's thread (named after it).
    #[cfg(target_os = "linux")]
    {
        let names: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .collect();
        for w in ["genie-w0-c0", "genie-w1-c0"] {
            assert!(names.iter().any(|n| n == w), "no thread {w} in {names:?}");
        }
    }
    concurrent_equal_alone(started);
}

fn concurrent_equal_alone((cluster, mut driver): (EmbeddedCluster, Driver)) {
    let model = cfg();
    let n = 6;
    let reference = alone(&mut driver, n, 1);
    let engine = Engine::start(driver, EngineConfig::disaggregated(model)).unwrap();
    // Alone, one after the other.
    for (i, want) in reference.iter().enumerate() {
        let done = engine
            .submit(Request::greedy(prompt_of(i), steps(i)))
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(&done.tokens, want, "request {i} alone");
        assert_eq!(done.reason, FinishReason::Length);
        assert_eq!(done.timings.tokens.len(), steps(i));
        assert!(done.timings.kv_bytes > 0, "prefill moved no KV to w1");
    }
    // All at once, each from its own thread, twice over, tokens read as they stream.
    let streamed = at_once(&engine, n, |h| {
        h.tokens().collect::<Result<Vec<_>, _>>().unwrap()
    });
    for (i, tokens) in streamed {
        assert_eq!(tokens, reference[i], "request {i} under concurrency");
    }
    assert_eq!(
        engine.kv_free(),
        EngineConfig::disaggregated(cfg()).kv_pool_bytes
    );
    cluster.stop(engine.shutdown().unwrap()).unwrap();
}

/// A prefill pool: prefills on w0 and w1 (a lane each), KV caches pinned and decoded on w2.
/// Requests submitted at once are prefilled on both workers at the same time, and every one
/// gives the tokens of serving it alone; a pool that includes the decode worker, or a worker
/// outside the cluster, is refused.
#[test]
fn a_prefill_pool_shares_the_prefills_and_serves_the_same_tokens() {
    let cluster = EmbeddedCluster::start(3, Arc::new(CpuKernels::new())).unwrap();
    let connect = || Driver::connect(&cluster.cluster, WeightSpec::Seeded(11)).unwrap();
    let model = cfg();
    let pooled = EngineConfig {
        prefill_worker: 0,
        prefill_pool: vec![1],
        decode_worker: 2,
        ..EngineConfig::disaggregated(model.clone())
    };
    assert_eq!(pooled.prefill_workers(), vec![0, 1]);
    // Refused before anything runs: the decode worker in the pool, a worker outside the cluster.
    for bad in [vec![2], vec![3]] {
        let cfg = EngineConfig {
            prefill_pool: bad.clone(),
            ..pooled.clone()
        };
        let err = Engine::start(connect(), cfg)
            .err()
            .unwrap_or_else(|| panic!("pool {bad:?} accepted"));
        assert!(err.to_string().contains("prefill"), "{err}");
    }
    let mut driver = connect();
    let n = 6;
    let reference = alone(&mut driver, n, 2);
    let engine = Engine::start(driver, pooled.clone()).unwrap();
    let mut used = [0usize; 3];
    for round in 0..2 {
        for (i, done) in at_once(&engine, n, |h| h.wait().unwrap()) {
            assert_eq!(done.tokens, reference[i], "request {i}, round {round}");
            assert!(done.timings.kv_bytes > 0, "request {i}: no KV moved to w2");
            used[done.timings.prefill_worker] += 1;
        }
    }
    // Both prefill workers took requests (the second of any two takes the other lane), the
    // decode worker none.
    assert!(
        used[0] > 0 && used[1] > 0 && used[2] == 0,
        "prefills per worker: {used:?}"
    );
    assert_eq!(engine.kv_free(), pooled.kv_pool_bytes);
    cluster.stop(engine.shutdown().unwrap()).unwrap();
}

/// The network weighs in the choice of prefill worker: with the link from w0 to the decode
/// worker w2 stated as slow (as a cluster file's `[[links]]` would), requests served one after
/// another are all prefilled on w1, whose link is the default; with every link alike they
/// alternate between the two (equal queues: the one given fewer tokens). A link naming a
/// worker outside the cluster is refused at start.
#[test]
fn a_slow_link_to_the_decode_worker_steers_prefills_to_the_other_worker() {
    let cluster = EmbeddedCluster::start(3, Arc::new(CpuKernels::new())).unwrap();
    let connect = || Driver::connect(&cluster.cluster, WeightSpec::Seeded(11)).unwrap();
    let pooled = EngineConfig {
        prefill_worker: 0,
        prefill_pool: vec![1],
        decode_worker: 2,
        ..EngineConfig::disaggregated(cfg())
    };
    let slow = WorkerLink {
        between: (0, 2),
        gbps: 0.01,
        latency_us: 100.0,
    };
    let outside = EngineConfig {
        links: vec![WorkerLink {
            between: (0, 3),
            ..slow
        }],
        ..pooled.clone()
    };
    let err = Engine::start(connect(), outside).expect_err("a link to worker 3 of 3");
    assert!(err.to_string().contains("link"), "{err}");
    let reference = alone(&mut connect(), 6, 2);
    for (links, want) in [(vec![], [3, 3]), (vec![slow], [0, 6])] {
        let cfg = EngineConfig {
            links,
            ..pooled.clone()
        };
        let engine = Engine::start(connect(), cfg.clone()).unwrap();
        let mut used = [0usize; 2];
        for (i, tokens) in reference.iter().enumerate() {
            let done = engine
                .submit(Request::greedy(prompt_of(i), steps(i)))
                .unwrap()
                .wait()
                .unwrap();
            assert_eq!(&done.tokens, tokens, "request {i}");
            used[done.timings.prefill_worker] += 1;
        }
        assert_eq!(used, want, "prefills on w0, w1 with links {:?}", cfg.links);
        assert_eq!(engine.kv_free(), cfg.kv_pool_bytes);
        drop(engine.shutdown().unwrap());
    }
    let last = connect();
    cluster.stop(last).unwrap();
}

/// Long prompts then a short one, submitted at once on one prefill lane: in arrival order the
/// short one's first token comes last; shortest first, it passes the long prompts still waiting
/// (the lane holds two at most; for none to be waiting, twenty-odd prefills would have to end
/// while this thread submits). Its tokens are the same either way.
#[test]
fn shortest_first_passes_waiting_long_prompts() {
    let long = 24;
    let mut short_tokens = Vec::new();
    for order in [
        PrefillOrder::Arrival,
        PrefillOrder::ShortestFirst {
            max_wait: Duration::from_secs(60),
        },
    ] {
        let (cluster, driver) = start();
        let cfg = EngineConfig {
            prefill_order: order,
            ..EngineConfig::disaggregated(cfg())
        };
        let engine = Engine::start(driver, cfg).unwrap();
        let mut handles = Vec::new();
        for i in 0..=long {
            let len = if i < long { 56 } else { 4 };
            let p: Vec<i64> = prompt(len, 256)
                .iter()
                .map(|t| (t + i as i64) % 256)
                .collect();
            let at = Instant::now();
            handles.push((at, engine.submit(Request::greedy(p, 2)).unwrap()));
        }
        // When each request's first token came, on one clock.
        let done: Vec<(Instant, Vec<i64>)> = handles
            .into_iter()
            .map(|(at, h)| {
                let c = h.wait().unwrap();
                (at + c.timings.first_token, c.tokens)
            })
            .collect();
        let (short_at, tokens) = done[long].clone();
        let later = done[..long].iter().filter(|(t, _)| *t > short_at).count();
        match order {
            PrefillOrder::Arrival => assert_eq!(later, 0, "arrival order: a long prompt after"),
            _ => assert!(later >= 1, "shortest first: no long prompt passed"),
        }
        short_tokens.push(tokens);
        cluster.stop(engine.shutdown().unwrap()).unwrap();
    }
    assert_eq!(short_tokens[0], short_tokens[1]);
}

/// With one request running at most, requests submitted together run one after the other:
/// each one's first token comes after the one before it ended (its prefill waits till then),
/// and each serves the tokens it serves alone. Zero is refused (and a `max_prefill_batch` of 0).
#[test]
fn max_running_bounds_the_requests_in_flight() {
    let (cluster, mut driver) = start();
    let n = 4;
    let reference = alone(&mut driver, n, 1);
    let zero = EngineConfig {
        max_running: 0,
        ..EngineConfig::disaggregated(cfg())
    };
    let err = Engine::start(driver, zero).expect_err("max_running 0 accepted");
    assert!(err.to_string().contains("max_running"), "{err}");
    let driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(11)).unwrap();
    let no_prefill = EngineConfig {
        max_prefill_batch: 0,
        ..EngineConfig::disaggregated(cfg())
    };
    let err = Engine::start(driver, no_prefill).expect_err("max_prefill_batch 0 accepted");
    assert!(err.to_string().contains("max_prefill_batch"), "{err}");
    let driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(11)).unwrap();
    let one = EngineConfig {
        max_running: 1,
        ..EngineConfig::disaggregated(cfg())
    };
    let engine = Engine::start(driver, one).unwrap();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let at = Instant::now();
            let req = Request::greedy(prompt_of(i), steps(i));
            (at, engine.submit(req).unwrap())
        })
        .collect();
    let done: Vec<_> = handles
        .into_iter()
        .map(|(at, h)| (at, h.wait().unwrap()))
        .collect();
    for (i, (_, c)) in done.iter().enumerate() {
        assert_eq!(c.tokens, reference[i], "request {i}");
    }
    for pair in done.windows(2) {
        let ((a_at, a), (b_at, b)) = (&pair[0], &pair[1]);
        let a_end = *a_at + *a.timings.tokens.last().unwrap();
        assert!(
            *b_at + b.timings.first_token > a_end,
            "a request's first token came before the one running ended"
        );
    }
    cluster.stop(engine.shutdown().unwrap()).unwrap();
}

#[test]
fn stop_tokens_and_seeded_sampling() {
    let (cluster, driver) = start();
    let engine = Engine::start(driver, EngineConfig::disaggregated(cfg())).unwrap();
    let greedy = engine
        .submit(Request::greedy(prompt_of(1), 6))
        .unwrap()
        .wait()
        .unwrap();
    // Stopping at the third greedy token streams exactly three.
    let stop = greedy.tokens[2];
    let first = greedy.tokens.iter().position(|&t| t == stop).unwrap();
    let stopped = engine
        .submit(Request {
            stop: vec![stop],
            ..Request::greedy(prompt_of(1), 6)
        })
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(stopped.tokens, greedy.tokens[..=first]);
    assert_eq!(stopped.reason, FinishReason::Stop);
    // Seeded sampling: the same seed gives the same tokens.
    let seeded = |seed| Request {
        sampling: Sampling::Seeded {
            seed,
            temperature: 1.0,
            top_k: 50,
            top_p: 0.9,
        },
        ..Request::greedy(prompt_of(2), 8)
    };
    let a = engine.submit(seeded(5)).unwrap().wait().unwrap();
    let b = engine.submit(seeded(5)).unwrap().wait().unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert!(a.tokens.iter().all(|&t| (0..256).contains(&t)));
    cluster.stop(engine.shutdown().unwrap()).unwrap();
}

/// Requests decoding together, some ending early at a stop token (while the step after it is
/// already on its way) and one cancelled midway, with decode steps sent ahead and without:
/// every request streams the tokens it streams alone, up to its stop token; the pool gets its
/// bytes back and no KV cache is left to free on the workers once the engine shut down.
#[test]
fn steps_sent_ahead_or_not_stream_the_same_tokens_with_stops_and_cancels() {
    let (cluster, mut driver) = start();
    let n = 6;
    let longer = |i: usize| 10 + 3 * i;
    let reference: Vec<Vec<i64>> = (0..n)
        .map(|i| {
            let seq = 2000 + i as u64;
            let gen = generate(
                &mut driver,
                &cfg(),
                &prompt_of(i),
                longer(i) - 1,
                seq,
                |g| {
                    Ok(Placement::by_rule(g, |n| {
                        usize::from(matches!(n.op, OpKind::KvCacheAppend))
                    }))
                },
                |g| Ok(Placement::by_rule(g, |_| 1)),
            )
            .unwrap();
            driver.free_sequence(seq).unwrap();
            gen.tokens
        })
        .collect();
    // Odd requests stop at their reference's token 3 (its first occurrence ends them).
    let request = |i: usize| Request {
        stop: if i % 2 == 1 {
            vec![reference[i][3]]
        } else {
            vec![]
        },
        ..Request::greedy(prompt_of(i), longer(i))
    };
    let expected = |i: usize| -> Vec<i64> {
        let r = &reference[i];
        match request(i).stop.first() {
            Some(s) => r[..=r.iter().position(|t| t == s).unwrap()].to_vec(),
            None => r.clone(),
        }
    };
    for step_ahead in [true, false] {
        let config = EngineConfig {
            step_ahead,
            ..EngineConfig::disaggregated(cfg())
        };
        let pool = config.kv_pool_bytes;
        let engine = Engine::start(driver, config).unwrap();
        let cancelled = engine.submit(Request::greedy(prompt_of(2), 40)).unwrap();
        let handles: Vec<RequestHandle> =
            (0..n).map(|i| engine.submit(request(i)).unwrap()).collect();
        // Cancelled after its third token, while the others decode with it.
        let id = cancelled.id();
        let mut cancelled = cancelled;
        for _ in 0..3 {
            assert!(matches!(cancelled.next(WAIT).unwrap(), Step::Token(_)));
        }
        engine.cancel(id);
        for (i, h) in handles.into_iter().enumerate() {
            let done = h.wait().unwrap();
            assert_eq!(
                done.tokens,
                expected(i),
                "request {i}, step_ahead {step_ahead}"
            );
            let why = if i % 2 == 1 {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            assert_eq!(done.reason, why, "request {i}");
        }
        let end = until_done(&mut cancelled);
        assert!(
            matches!(end, FinishReason::Cancelled | FinishReason::Length),
            "{end:?}"
        );
        refilled(&engine, pool, "the pool did not get its bytes back");
        driver = engine.shutdown().unwrap();
        assert_eq!(driver.frees_pending(), 0, "step_ahead {step_ahead}");
    }
    cluster.stop(driver).unwrap();
}

#[test]
fn a_full_kv_pool_refuses_and_cancel_frees_it() {
    let (cluster, driver) = start();
    let mut config = EngineConfig::disaggregated(cfg());
    // Room for one request of 4 + 40 tokens, not two.
    config.kv_pool_bytes = config.kv_bytes(50);
    let pool = config.kv_pool_bytes;
    let engine = Engine::start(driver, config).unwrap();
    let mut long = engine.submit(Request::greedy(prompt_of(0), 40)).unwrap();
    assert!(matches!(long.next(WAIT).unwrap(), Step::Token(_)));
    let refused = engine
        .submit(Request::greedy(prompt_of(1), 20))
        .unwrap_err();
    assert!(
        matches!(refused, EngineError::KvPoolFull { pool: p, .. } if p == pool),
        "{refused:?}"
    );
    engine.cancel(long.id());
    assert_eq!(until_done(&mut long), FinishReason::Cancelled);
    refilled(&engine, pool, "the pool did not get its bytes back");
    // A dropped handle cancels too.
    drop(engine.submit(Request::greedy(prompt_of(0), 40)).unwrap());
    refilled(&engine, pool, "a dropped request kept its KV");
    let done = engine
        .submit(Request::greedy(prompt_of(1), 20))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(done.tokens.len(), 20);
    cluster.stop(engine.shutdown().unwrap()).unwrap();
}

/// Requests that end at their first token (one token asked, a stop token first, cancelled
/// before their prefill came back) end while their KV cache is still moving to the decode
/// worker: each is done once the move is over and its cache freed on both workers, so the
/// pool gets every byte back and the driver knows of no cache left on any worker.
#[test]
fn requests_that_end_at_their_first_token_free_their_cache_on_both_workers() {
    let (cluster, mut driver) = start();
    let first: Vec<i64> = alone(&mut driver, 4, 1).iter().map(|t| t[0]).collect();
    let config = EngineConfig::disaggregated(cfg());
    let pool = config.kv_pool_bytes;
    let engine = Engine::start(driver, config).unwrap();
    let mut ids = Vec::new();
    let mut ended = Vec::new();
    for round in 0..3 {
        let handles: Vec<(RequestHandle, FinishReason)> = (0..4)
            .flat_map(|i| {
                let one = Request::greedy(prompt_of(i), 1);
                let stop = Request {
                    stop: vec![first[i]],
                    ..Request::greedy(prompt_of(i), 20)
                };
                [(one, FinishReason::Length), (stop, FinishReason::Stop)]
            })
            .map(|(r, why)| (engine.submit(r).unwrap(), why))
            .collect();
        // In the last round, also one cancelled at once (it may end before its prefill or
        // between its prefill and its move).
        let cancelled = (round == 2).then(|| {
            let h = engine.submit(Request::greedy(prompt_of(5), 20)).unwrap();
            engine.cancel(h.id());
            h
        });
        for (h, why) in handles {
            ids.push(h.id());
            let k = ended.len() % 8 / 2;
            let done = h.wait().unwrap();
            assert_eq!(done.tokens, vec![first[k]]);
            assert_eq!(done.reason, why);
            ended.push(done);
        }
        if let Some(h) = cancelled {
            ids.push(h.id());
            let done = h.wait().unwrap();
            assert_eq!(done.reason, FinishReason::Cancelled);
        }
    }
    // Each ended once its cache had moved (its Done carries the move).
    assert!(ended
        .iter()
        .all(|d| d.timings.kv_transfer > Duration::ZERO && d.timings.kv_bytes > 0));
    assert_eq!(engine.kv_free(), pool);
    let driver = engine.shutdown().unwrap();
    for id in ids {
        assert_eq!(
            driver.free_sequence(id).unwrap(),
            0,
            "request {id} left a KV cache"
        );
    }
    cluster.stop(driver).unwrap();
}

#[test]
fn invalid_requests_are_refused_and_shutdown_ends_the_rest() {
    let (cluster, driver) = start();
    let engine = Engine::start(driver, EngineConfig::disaggregated(cfg())).unwrap();
    for bad in [
        Request::greedy(vec![], 4),
        Request::greedy(vec![1], 0),
        Request::greedy(vec![1, 256], 4),
        Request::greedy(vec![-1], 4),
        Request::greedy(vec![1; 60], 10),
        Request {
            sampling: Sampling::Seeded {
                seed: 1,
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
            },
            ..Request::greedy(vec![1], 4)
        },
    ] {
        let e = engine.submit(bad.clone()).unwrap_err();
        assert!(
            matches!(e, EngineError::InvalidRequest(_)),
            "{bad:?}: {e:?}"
        );
    }
    let mut h = engine.submit(Request::greedy(prompt_of(0), 50)).unwrap();
    assert!(matches!(h.next(WAIT).unwrap(), Step::Token(_)));
    let driver = engine.shutdown().unwrap();
    let end = loop {
        match h.next(WAIT) {
            Ok(Step::Token(_)) => continue,
            other => break other,
        }
    };
    assert_eq!(end, Err(EngineError::ShutDown));
    cluster.stop(driver).unwrap();
}
