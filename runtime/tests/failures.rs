//! What a failed run leaves behind must not reach later runs.

mod common;
use candle_core::{Device, Tensor};
use common::bits;
use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::plan::Placement;
use genie_runtime::proto::WeightSpec;
use genie_scheduler::graph::{DType, Graph, NodeId, OpKind, Semantics, TensorMeta, TensorRef};
use std::sync::Arc;

/// `x` on w0 → `a = relu(x)`, `b = tanh(x)` on w0 → `d = a + b` on w1; with `fail`, also
/// `c = custom(a)` on w1, which has no kernel: w1 fails as soon as `a` lands, leaving `b`'s
/// notification unread.
fn graph(n: usize, fail: bool) -> (Graph, Placement, TensorRef) {
    let mut g = Graph::new(if fail { "fails" } else { "adds" });
    let s = Semantics::default;
    let meta = TensorMeta::new(vec![n], DType::F32);
    let x = g
        .add_with_outputs("x", OpKind::Input, vec![], vec![meta.clone()], s())
        .unwrap();
    let t = |id: NodeId| TensorRef::new(id, 0);
    let a = g.add("a", OpKind::Relu, vec![t(x)], s()).unwrap();
    let b = g.add("b", OpKind::Tanh, vec![t(x)], s()).unwrap();
    if fail {
        g.add_with_outputs(
            "c",
            OpKind::Custom("no-such-kernel".into()),
            vec![t(a)],
            vec![meta],
            s(),
        )
        .unwrap();
    }
    let d = g.add("d", OpKind::Add, vec![t(a), t(b)], s()).unwrap();
    let p = Placement::by_rule(&g, |node| {
        usize::from(matches!(node.name.as_str(), "c" | "d"))
    });
    (g, p, t(d))
}

fn input(n: usize, seed: f32) -> Tensor {
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f32) * 0.37 + seed).sin() * 3.0)
        .collect();
    Tensor::from_vec(v, n, &Device::Cpu).unwrap()
}

/// A run fails on the receiving worker after its peer posted transfers to it; the runs of the
/// next driver move the same transfer ids (and larger tensors, so new regions) and must get
/// the single-worker answer: the stale notification is dropped, not taken for a new transfer.
#[test]
fn a_failed_run_leaves_nothing_for_the_next() {
    let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
    let driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(1)).unwrap();
    let (g, p, d) = graph(256, true);
    let err = driver
        .run(&g, &p, &[("x", input(256, 0.0))], &[d], 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("w1"), "the failure names w1: {err}");
    drop(driver);

    let driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(1)).unwrap();
    for (k, n) in [(1.0, 256), (2.0, 256), (3.0, 100_000), (4.0, 256)] {
        let (g, p, d) = graph(n, false);
        let x = [("x", input(n, k))];
        let split = driver.run(&g, &p, &x, &[d], 0).unwrap();
        assert_eq!(split.counters.transfers, 2, "run {k}: a and b cross");
        let one = driver.run(&g, &Placement::single(&g), &x, &[d], 0).unwrap();
        assert_eq!(
            bits(&split.outputs[0]),
            bits(&one.outputs[0]),
            "run {k}, {n} values"
        );
    }
    cluster.stop(driver).unwrap();
}
