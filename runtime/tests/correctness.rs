//! Disaggregated runs give the same answer as one worker: GPT-2 (prefill + decode steps with
//! KV caches pinned on workers) on 1, 2 and 3 in-process workers over real TCP on loopback.

mod common;
use common::bits;
use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::models::{generate, prompt};
use genie_runtime::plan::Placement;
use genie_runtime::proto::WeightSpec;
use genie_scheduler::builders::Gpt2Config;
use std::sync::Arc;

fn small() -> Gpt2Config {
    Gpt2Config {
        layers: 2,
        hidden: 128,
        heads: 4,
        vocab: 512,
        context: 128,
        ..Gpt2Config::default()
    }
}

#[test]
fn gpt2_prefill_and_decode_match_single_worker_on_1_2_3_workers() {
    let cfg = small();
    let cluster = EmbeddedCluster::start(3, Arc::new(CpuKernels::new())).unwrap();
    let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(42)).unwrap();
    let p = prompt(12, cfg.vocab);
    let mut reference = None;
    for (seq, n) in [1usize, 2, 3].into_iter().enumerate() {
        let place = |g: &genie_scheduler::graph::Graph| Placement::by_layer(g, n, cfg.layers);
        let gen = generate(&mut driver, &cfg, &p, 3, seq as u64, place, place).unwrap();
        let logits: Vec<Vec<u32>> = std::iter::once(&gen.prefill)
            .chain(&gen.steps)
            .map(|r| bits(&r.outputs[0]))
            .collect();
        if n > 1 {
            assert!(
                gen.prefill.counters.transfers > 0,
                "{n} workers moved nothing"
            );
        } else {
            assert_eq!(gen.prefill.counters.transfers, 0);
        }
        match &reference {
            None => reference = Some((logits, gen.tokens)),
            Some((l, t)) => {
                assert_eq!(&gen.tokens, t, "tokens differ on {n} workers");
                assert!(l == &logits, "logits differ on {n} workers");
            }
        }
        driver.free_sequence(seq as u64).unwrap();
    }
    cluster.stop(driver).unwrap();
}

/// The KV-cache path computes what a full recomputation computes: a decode step's logits equal
/// the last position of a prefill over the prompt plus that token (up to float summation order).
#[test]
fn decode_with_kv_cache_matches_full_prefill() {
    let cfg = small();
    let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
    let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(5)).unwrap();
    let p = prompt(9, cfg.vocab);
    let place = |g: &genie_scheduler::graph::Graph| Placement::by_layer(g, 2, cfg.layers);
    let gen = generate(&mut driver, &cfg, &p, 1, 0, place, place).unwrap();
    let step: Vec<f32> = gen.steps[0].outputs[0]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut longer = p.clone();
    longer.push(gen.tokens[0]);
    let full = generate(&mut driver, &cfg, &longer, 0, 1, place, place).unwrap();
    let all: Vec<f32> = full.prefill.outputs[0]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let last = &all[all.len() - cfg.vocab..];
    let worst = step
        .iter()
        .zip(last)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "decode and prefill differ by {worst}");
    // And a causal prefill's earlier positions do not see later tokens.
    let short: Vec<f32> = gen.prefill.outputs[0]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let worst = short
        .iter()
        .zip(&all[..short.len()])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-4,
        "a later token changed earlier logits by {worst}"
    );
    cluster.stop(driver).unwrap();
}

/// The scheduler's own schedules (HEFT on 2 and 3 CPU devices) run on the cluster and give the
/// single-worker answer; the runtime moves exactly the bytes the schedule lists.
#[test]
fn scheduler_schedules_run_and_match() {
    use genie_scheduler::builders::gpt2_prefill;
    use genie_scheduler::cost::DeviceSpec;
    use genie_scheduler::topology::LinkSpec;
    use genie_scheduler::{OptimizationPlan, Scheduler, Strategy, Topology};
    let cfg = small();
    let cluster = EmbeddedCluster::start(3, Arc::new(CpuKernels::new())).unwrap();
    let driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(9)).unwrap();
    let g = gpt2_prefill(&cfg, 16).unwrap();
    let ids = genie_runtime::models::row_i64(prompt(16, cfg.vocab)).unwrap();
    let pos = genie_runtime::models::row_i64((0..16).collect()).unwrap();
    let inputs = [("input_ids", ids), ("position_ids", pos)];
    let single = driver
        .run(&g, &Placement::single(&g), &inputs, &g.outputs[..1], 0)
        .unwrap();
    for n in [2usize, 3] {
        let topo = Topology::uniform(n, DeviceSpec::cpu(), LinkSpec::gbps(1.0, 50.0)).unwrap();
        let mut s = Scheduler::new(topo);
        let plan = OptimizationPlan {
            strategy: Some(Strategy::Pipeline),
            no_recompute: true,
            ..OptimizationPlan::default()
        };
        let sched = s.create_schedule(&g, &plan).unwrap();
        let p = Placement::from_schedule(&sched);
        let out = driver
            .run(&g, &p, &inputs, &g.outputs[..1], 10 + n as u64)
            .unwrap();
        assert!(
            bits(&out.outputs[0]) == bits(&single.outputs[0]),
            "{n} devices"
        );
        let listed: u64 = sched.transfers.iter().map(|t| t.bytes).sum();
        assert_eq!(out.counters.bytes_moved, listed, "{n} devices");
        assert!(listed > 0);
    }
    cluster.stop(driver).unwrap();
}

/// Recompute directives: the embeddings recomputed on the worker that consumes them instead of
/// being shipped; same answer, fewer bytes, recomputes counted.
#[test]
fn recompute_directives_save_bytes_and_keep_the_answer() {
    let cfg = small();
    let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
    let driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(11)).unwrap();
    let g = genie_scheduler::builders::gpt2_prefill(&cfg, 8).unwrap();
    let ids = genie_runtime::models::row_i64(prompt(8, cfg.vocab)).unwrap();
    let pos = genie_runtime::models::row_i64((0..8).collect()).unwrap();
    let inputs = [("input_ids", ids), ("position_ids", pos)];
    // Embeddings on w0, everything else on w1.
    let base = Placement::by_rule(&g, |n| {
        usize::from(!n.name.ends_with(".embed") && n.name != "embed_sum")
    });
    let plain = driver.run(&g, &base, &inputs, &g.outputs[..1], 0).unwrap();
    let mut rec = base.clone();
    for n in g.nodes() {
        if n.name.ends_with(".embed") || n.name == "embed_sum" {
            rec.recompute.insert(n.id.0);
        }
    }
    let recomputed = driver.run(&g, &rec, &inputs, &g.outputs[..1], 1).unwrap();
    assert!(bits(&plain.outputs[0]) == bits(&recomputed.outputs[0]));
    assert!(plain.counters.bytes_moved > 0);
    assert_eq!(recomputed.counters.bytes_moved, 0);
    assert!(recomputed.counters.recomputes >= 3);
    cluster.stop(driver).unwrap();
}

/// The demo's disaggregated placements: prefill on w0 with the KV caches built on w1, then decode
/// steps on w1 alone (w0 takes no part and is sent nothing), alternating with steps that put the
/// front end back on w0 (so w0 must get the graph again, whole, after the runs it missed). Same
/// tokens and bitwise the same logits as one worker; every run reports the bytes it exchanged
/// with the driver.
#[test]
fn decode_on_the_decode_worker_alone_matches_single_worker() {
    let cfg = small();
    let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
    let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(11)).unwrap();
    let p = prompt(10, cfg.vocab);
    let one = |g: &genie_scheduler::graph::Graph| Ok(Placement::single(g));
    let reference = generate(&mut driver, &cfg, &p, 4, 0, one, one).unwrap();
    let mut step = 0usize;
    let alternate = |g: &genie_scheduler::graph::Graph| {
        step += 1;
        Ok(if step % 2 == 1 {
            Placement::colocated_decode(g)
        } else {
            // Layers (and their KV caches) on w1, the front end on w0.
            Placement::by_rule(g, |n| {
                usize::from(genie_runtime::plan::layer_of(g, n.id).is_some())
            })
        })
    };
    let gen = generate(
        &mut driver,
        &cfg,
        &p,
        4,
        1,
        |g| Ok(Placement::colocated_prefill(g)),
        alternate,
    )
    .unwrap();
    assert_eq!(gen.tokens, reference.tokens);
    for (a, b) in gen.steps.iter().zip(&reference.steps) {
        assert!(bits(&a.outputs[0]) == bits(&b.outputs[0]), "logits differ");
        assert!(a.driver_bytes > 0, "no driver bytes counted");
    }
    // Steps on w1 alone move nothing between workers; the split ones move the hidden state.
    assert_eq!(gen.steps[0].counters.bytes_moved, 0);
    assert_eq!(gen.steps[2].counters.bytes_moved, 0);
    assert!(gen.steps[1].counters.bytes_moved > 0);
    cluster.stop(driver).unwrap();
}

/// A run refused after the driver looked its graph up in its graph cache (which brings the
/// driver's copy to the run's shapes at once) leaves no worker behind that copy: an input the
/// graph does not have, a wanted tensor it does not have, on a run and on a step stream; the
/// next run of those shapes then gives, bit for bit, what a fresh driver gives.
#[test]
fn a_run_refused_after_its_lookup_leaves_the_graph_cache_in_step() {
    use genie_runtime::models::prefill_inputs;
    use genie_runtime::RuntimeError;
    use genie_scheduler::builders::gpt2_prefill;
    use genie_scheduler::graph::{NodeId, TensorRef};
    let cfg = small();
    let p = prompt(9, cfg.vocab);
    let (g8, g9) = (
        gpt2_prefill(&cfg, 8).unwrap(),
        gpt2_prefill(&cfg, 9).unwrap(),
    );
    let place = Placement::single(&g9);
    let logits = g9.outputs[0];
    let nowhere = TensorRef {
        node: NodeId(1 << 20),
        output: 0,
    };
    let fresh = EmbeddedCluster::start(1, Arc::new(CpuKernels::new())).unwrap();
    let reference = Driver::connect(&fresh.cluster, WeightSpec::Seeded(3)).unwrap();
    let ins = prefill_inputs(&[&p]).unwrap();
    let want = bits(
        &reference
            .run(&g9, &place, &ins, &[logits], 0)
            .unwrap()
            .outputs[0],
    );
    fresh.stop(reference).unwrap();

    let cluster = EmbeddedCluster::start(1, Arc::new(CpuKernels::new())).unwrap();
    let driver = Arc::new(Driver::connect(&cluster.cluster, WeightSpec::Seeded(3)).unwrap());
    // The worker keeps the graph at 8 tokens.
    let ins8 = prefill_inputs(&[&p[..8]]).unwrap();
    driver.run(&g8, &place, &ins8, &[g8.outputs[0]], 1).unwrap();
    let mut extra = ins.to_vec();
    extra.push(("no_such_input", ins[0].1.clone()));
    let refused = |r: genie_runtime::Result<_>| matches!(r, Err(RuntimeError::Plan(_)));
    assert!(refused(driver.run(&g9, &place, &extra, &[logits], 2)));
    assert!(refused(driver.run(&g9, &place, &ins, &[nowhere], 3)));
    let got = driver.run(&g9, &place, &ins, &[logits], 4).unwrap();
    assert_eq!(bits(&got.outputs[0]), want, "a run after refused ones");
    // The same on a step stream, from 8 tokens again.
    driver.run(&g8, &place, &ins8, &[g8.outputs[0]], 5).unwrap();
    let mut stream = driver.stream(0).unwrap();
    assert!(matches!(
        stream.send(&g9, &place, (&ins, &[nowhere]), &[6], None),
        Err(RuntimeError::Plan(_))
    ));
    stream
        .send(&g9, &place, (&ins, &[logits]), &[7], None)
        .unwrap();
    let got = stream.wait(&g9).unwrap();
    assert_eq!(bits(&got.outputs[0]), want, "a step after a refused one");
    drop(stream);
    let driver = Arc::try_unwrap(driver).ok().unwrap();
    cluster.stop(driver).unwrap();
}
