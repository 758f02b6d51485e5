//! The worker against drivers that misbehave, and KV caches across sessions.

use super::*;
use crate::control::{connect_retry, transport_config};
use crate::driver::EmbeddedCluster;
use crate::kernels::CpuKernels;
use crate::proto::{self, Reshape};
use genie_scheduler::builders::{gpt2_decode, gpt2_prefill, Gpt2Config};
use genie_scheduler::graph::DType;
use genie_scheduler::graph::TensorMeta;
use std::net::SocketAddr;

/// Runs naming graphs the worker does not keep, or reshaping them into something invalid,
/// are refused with a typed failure; the worker goes on serving.
#[test]
fn malformed_graph_refs_are_refused() {
    let cluster = EmbeddedCluster::start(1, Arc::new(CpuKernels::new())).unwrap();
    let endpoint = genie_transport::open(transport_config(
        &cluster.cluster,
        SocketAddr::from(([127, 0, 0, 1], 0)),
    ))
    .unwrap();
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let addr = cluster.cluster.workers[0].address;
    let c = connect_retry(&*endpoint, addr, "w0", deadline).unwrap();
    send_msg(&*c, "w0", &Msg::HelloDriver, &[]).unwrap();
    send_msg(
        &*c,
        "w0",
        &Msg::Setup {
            weights: WeightSpec::Seeded(1),
        },
        &[],
    )
    .unwrap();
    assert!(matches!(
        recv_msg(&*c, "w0", SETUP_TIMEOUT).unwrap().0,
        Msg::SetupDone
    ));
    let cfg = Gpt2Config {
        layers: 1,
        hidden: 32,
        heads: 2,
        vocab: 64,
        context: 64,
        ..Gpt2Config::default()
    };
    let g = gpt2_decode(&cfg, 4).unwrap();
    let placement = Placement::single(&g);
    let mut run = 0;
    let mut ask_seqs = |graph: GraphRef, forget: Vec<u64>, seqs: Vec<u64>| -> String {
        run += 1;
        let msg = Msg::Run {
            run,
            forget,
            graph,
            seqs,
            inputs: vec![],
            wanted: vec![],
            spans: true,
            free: vec![],
            feed: None,
            acks_later: false,
        };
        send_msg(&*c, "w0", &msg, &[]).unwrap();
        match recv_msg(&*c, "w0", SETUP_TIMEOUT).unwrap().0 {
            Msg::Failed { error, .. } => error,
            other => panic!("expected a failure, got {other:?}"),
        }
    };
    // The sequences a run names: 1 to MAX_DECODE_BATCH, distinct.
    let cached = || GraphRef::Cached {
        id: 7,
        reshape: vec![],
    };
    for (bad, why) in [
        (vec![], "names 0 sequences"),
        (vec![3, 4, 3], "twice"),
        (
            (0..=genie_scheduler::builders::MAX_DECODE_BATCH as u64).collect(),
            "sequences (1 to",
        ),
    ] {
        let e = ask_seqs(cached(), vec![], bad);
        assert!(e.contains(why), "{e}");
    }
    let mut ask = |graph: GraphRef, forget: Vec<u64>| ask_seqs(graph, forget, vec![0]);
    let never = ask(
        GraphRef::Cached {
            id: 7,
            reshape: vec![],
        },
        vec![],
    );
    assert!(never.contains("never defined"), "{never}");
    // A good definition (the run itself fails: no KV cache, no inputs).
    let define = GraphRef::Define {
        id: 1,
        graph: g.clone(),
        placement: placement.clone(),
    };
    let e = ask(define.clone(), vec![]);
    assert!(e.contains("kv cache"), "{e}");
    let out_of_range = ask(
        GraphRef::Cached {
            id: 1,
            reshape: vec![Reshape {
                node: g.len() as u32,
                output: 0,
                meta: TensorMeta::new([1], DType::F32),
            }],
        },
        vec![],
    );
    assert!(
        out_of_range.contains("reshape names no tensor"),
        "{out_of_range}"
    );
    // The failed reshape dropped graph 1; define it again and break a shape.
    ask(define.clone(), vec![]);
    let inconsistent = ask(
        GraphRef::Cached {
            id: 1,
            reshape: vec![Reshape {
                node: g.outputs[0].node.0,
                output: 0,
                meta: TensorMeta::new([3, 5, 7], DType::F32),
            }],
        },
        vec![],
    );
    assert!(inconsistent.contains("invalid graph"), "{inconsistent}");
    // A forgotten graph is gone.
    ask(define, vec![]);
    let forgotten = ask(
        GraphRef::Cached {
            id: 1,
            reshape: vec![],
        },
        vec![1],
    );
    assert!(forgotten.contains("never defined"), "{forgotten}");
    // Too many definitions without forgetting.
    let mut last = String::new();
    for id in 0..=WORKER_GRAPHS as u64 {
        last = ask(
            GraphRef::Define {
                id: 100 + id,
                graph: g.clone(),
                placement: placement.clone(),
            },
            vec![],
        );
    }
    assert!(last.contains("forget some first"), "{last}");
    // Malformed JSON of a run is a bad message, not a panic.
    let bad = br#"{"Run":{"run":1,"forget":[],"graph":{"Cached":{"id":"x"}}}}"#;
    let mut framed = (bad.len() as u32).to_le_bytes().to_vec();
    framed.extend_from_slice(bad);
    assert!(matches!(
        proto::decode(&framed, "d"),
        Err(RuntimeError::BadMessage { .. })
    ));
    // The worker thread ends on shutdown.
    send_msg(&*c, "w0", &Msg::Shutdown, &[]).unwrap();
}

/// A raw driver connection to `addr`, past its hello.
fn raw_driver(cluster: &Cluster, addr: SocketAddr) -> (Arc<dyn Transport>, Arc<dyn Connection>) {
    let ep = genie_transport::open(transport_config(
        cluster,
        SocketAddr::from(([127, 0, 0, 1], 0)),
    ))
    .unwrap();
    let c = connect_retry(&*ep, addr, "w", Instant::now() + SETUP_TIMEOUT).unwrap();
    (ep, c)
}

fn refusal(c: &dyn Connection) -> String {
    match recv_msg(c, "w", SETUP_TIMEOUT).unwrap().0 {
        Msg::Failed { error, .. } => error,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Once a peer's connection is up, nobody else may take its name (nor the worker's own);
/// the mesh keeps working.
#[test]
fn hello_peer_for_a_live_name_is_refused() {
    let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
    let driver = crate::driver::Driver::connect(&cluster.cluster, WeightSpec::Seeded(1)).unwrap();
    let w1 = cluster.cluster.workers[1].address;
    for name in ["w0", "w1"] {
        let (_ep, c) = raw_driver(&cluster.cluster, w1);
        let hello = Msg::HelloPeer { name: name.into() };
        send_msg(&*c, "w1", &hello, &[]).unwrap();
        let e = refusal(&*c);
        assert!(e.contains("refused by worker w1"), "{name}: {e}");
    }
    let cfg = crate::plan::tests::small();
    let g = genie_scheduler::builders::gpt2_prefill(&cfg, 4).unwrap();
    let p = Placement::by_layer(&g, 2, cfg.layers).unwrap();
    let ids = Tensor::new(&[[1i64, 2, 3, 4]], &candle_core::Device::Cpu).unwrap();
    let pos = Tensor::new(&[[0i64, 1, 2, 3]], &candle_core::Device::Cpu).unwrap();
    let inputs = [("input_ids", ids), ("position_ids", pos)];
    driver.run(&g, &p, &inputs, &[g.outputs[0]], 0).unwrap();
    cluster.stop(driver).unwrap();
}

/// A decoder whose blocks are named as Llama-style checkpoints name them
/// (`model.layers.{i}`) keeps its KV caches per layer and runs layer-wise on two workers,
/// prefill then decode steps, bitwise equal to one worker: layers come from the nodes.
#[test]
fn llama_style_names_run_layer_wise() {
    use crate::models::{argmax_last, prompt, row_i64};
    use crate::plan::tests::llama_named;
    let cfg = crate::plan::tests::small();
    let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
    let driver = crate::driver::Driver::connect(&cluster.cluster, WeightSpec::Seeded(3)).unwrap();
    let s = 5;
    let mut runs: Vec<Vec<Vec<u32>>> = Vec::new();
    for (seq, workers) in [(0u64, 1usize), (1, 2)] {
        let place = |g: &Graph| {
            let p = Placement::by_layer(g, workers, cfg.layers).unwrap();
            assert_eq!(p.workers(), workers);
            p
        };
        let run = |g: &Graph, ids: Vec<i64>, pos: Vec<i64>| {
            let inputs = [
                ("input_ids", row_i64(ids).unwrap()),
                ("position_ids", row_i64(pos).unwrap()),
            ];
            let out = driver
                .run(g, &place(g), &inputs, &[g.outputs[0]], seq)
                .unwrap();
            let logits = &out.outputs[0];
            let bits: Vec<u32> = logits
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            (argmax_last(logits).unwrap(), bits)
        };
        let g = llama_named(&gpt2_prefill(&cfg, s).unwrap());
        let (mut tok, bits) = run(&g, prompt(s, cfg.vocab), (0..s as i64).collect());
        let mut steps = vec![bits];
        for l in s..s + 2 {
            let g = llama_named(&gpt2_decode(&cfg, l).unwrap());
            let (next, bits) = run(&g, vec![tok], vec![l as i64]);
            tok = next;
            steps.push(bits);
        }
        runs.push(steps);
    }
    assert_eq!(runs[0], runs[1]);
    cluster.stop(driver).unwrap();
}

/// A driver's sequences are its own: after it leaves, another driver can neither read its
/// KV cache nor free it; each gets a typed refusal.
#[test]
fn sequences_belong_to_their_driver() {
    let cluster = EmbeddedCluster::start(1, Arc::new(CpuKernels::new())).unwrap();
    let cfg = crate::plan::tests::small();
    let mut a = crate::driver::Driver::connect(&cluster.cluster, WeightSpec::Seeded(1)).unwrap();
    let one = |g: &Graph| Ok(Placement::single(g));
    let p = crate::models::prompt(6, cfg.vocab);
    crate::models::generate(&mut a, &cfg, &p, 1, 5, one, one).unwrap();
    drop(a);
    // Driver B: a decode step of sequence 5 finds no cache of its own.
    let b = crate::driver::Driver::connect(&cluster.cluster, WeightSpec::Seeded(1)).unwrap();
    let g = gpt2_decode(&cfg, 7).unwrap();
    let ids = Tensor::new(&[[1i64]], &candle_core::Device::Cpu).unwrap();
    let pos = Tensor::new(&[[7i64]], &candle_core::Device::Cpu).unwrap();
    let e = b
        .run(
            &g,
            &Placement::single(&g),
            &[("input_ids", ids), ("position_ids", pos)],
            &[g.outputs[0]],
            5,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("kv cache"), "{e}");
    drop(b);
    // A raw driver frees sequence 5 without having run it: refused, typed.
    let (_ep, c) = raw_driver(&cluster.cluster, cluster.cluster.workers[0].address);
    send_msg(&*c, "w0", &Msg::HelloDriver, &[]).unwrap();
    send_msg(&*c, "w0", &Msg::FreeSequence { seq: 5 }, &[]).unwrap();
    let e = refusal(&*c);
    assert!(e.contains("not this driver's"), "{e}");
    // The same free carried by a run: the run is refused before anything else; and a feed in a
    // session whose last run returned no token ids, saying so.
    let run = |free: Vec<u64>, feed: Option<proto::Feed>| Msg::Run {
        run: 9,
        forget: vec![],
        graph: GraphRef::Cached {
            id: 1,
            reshape: vec![],
        },
        seqs: vec![6],
        inputs: vec![],
        wanted: vec![],
        spans: false,
        free,
        feed,
        acks_later: false,
    };
    let feed = proto::Feed {
        run: 8,
        rows: vec![(0, 0)],
    };
    for (msg, why) in [
        (run(vec![5], None), "not this driver's"),
        (run(vec![], Some(feed)), "no run here returned token ids"),
    ] {
        send_msg(&*c, "w0", &msg, &[]).unwrap();
        let e = refusal(&*c);
        assert!(e.contains(why), "{e}");
    }
    send_msg(&*c, "w0", &Msg::Shutdown, &[]).unwrap();
}

/// A peer failure goes to the driver as its culprit and reason, so the driver's
/// `worker w1 failed: …` names the worker once; any other error goes whole, blaming no one.
#[test]
fn a_peer_failure_is_reported_once() {
    let e = RuntimeError::WorkerFailed {
        worker: "w1".into(),
        reason: "peer is dead".into(),
    };
    let Msg::Failed {
        run,
        error,
        culprit,
    } = failed(3, &e)
    else {
        panic!("not a Failed reply");
    };
    assert_eq!(
        (run, error.as_str(), culprit.as_deref()),
        (3, "peer is dead", Some("w1"))
    );
    let e = RuntimeError::Plan("no such node".into());
    let Msg::Failed { error, culprit, .. } = failed(4, &e) else {
        panic!("not a Failed reply");
    };
    assert_eq!((error, culprit), (e.to_string(), None));
}
