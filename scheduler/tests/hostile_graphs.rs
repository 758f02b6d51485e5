//! Graphs a hostile or buggy frontend can send: millions of inputs, shapes whose sizes overflow,
//! attributes whose arithmetic overflows. Each is refused (or accepted) quickly with a typed error
//! naming the node, never a panic, a wrapped size or a quadratic scan.

use genie_scheduler::graph::{
    DType, Graph, GraphError, NodeId, OpKind, Scalar, Semantics, TensorMeta, MAX_GRAPH_BYTES,
    MAX_RANK,
};
use genie_scheduler::{Error, OptimizationPlan, Scheduler, Topology};
use std::time::{Duration, Instant};

/// Inputs of the wide concatenation, and how many distinct nodes they read (in turn). A
/// validation that deduplicated producers by scanning the inputs before each input would make
/// about `INPUTS · PRODUCERS / 2` ≈ 4.5·10¹¹ comparisons here (minutes; hours with 3M distinct
/// producers), so these sizes catch a quadratic scan; linear, it takes about a second in release. Unoptimised builds (a plain
/// `cargo test`) use a tenth of both; CI runs the full sizes with `--release`.
const INPUTS: usize = 3_000_000 / SCALE;
const PRODUCERS: usize = 300_000 / SCALE;
const SCALE: usize = if cfg!(debug_assertions) { 10 } else { 1 };

/// A generous bound: the checks are linear and take about a second in release.
const LIMIT: Duration = Duration::from_secs(30);

/// `PRODUCERS` model inputs, the first rewritten as a relu of the second (so one edge points to a
/// later node and validation computes a topological order, with the consumer lists), and a
/// concatenation of `inputs` tensors read from them in turn.
fn wide_concat_json(producers: usize, inputs: usize) -> String {
    let mut j = String::with_capacity(producers * 90 + inputs * 16 + 512);
    j.push_str(
        r#"{"name":"wide","nodes":[
        {"id":0,"name":"act","op":{"kind":"relu"},"inputs":[{"node":1}],
         "outputs":[{"shape":[1,4],"dtype":"f32"}]}"#,
    );
    for i in 1..producers {
        j.push_str(&format!(
            r#",{{"id":{i},"name":"x{i}","op":{{"kind":"input"}},"outputs":[{{"shape":[1,4],"dtype":"f32"}}]}}"#
        ));
    }
    j.push_str(&format!(
        r#",{{"id":{producers},"name":"cat","op":{{"kind":"concat","attrs":{{"axis":0}}}},"inputs":["#
    ));
    for i in 0..inputs {
        if i > 0 {
            j.push(',');
        }
        j.push_str(&format!(r#"{{"node":{}}}"#, i % producers));
    }
    j.push_str(&format!(
        r#"],"outputs":[{{"shape":[{inputs},4],"dtype":"f32"}}]}}],"outputs":[{{"node":{producers}}}]}}"#
    ));
    j
}

#[test]
fn concat_of_three_million_inputs_validates_and_schedules_in_linear_time() {
    let json = wide_concat_json(PRODUCERS, INPUTS);
    let t = Instant::now();
    let g = Graph::from_json(&json).unwrap();
    assert!(!g.is_id_ordered());
    let cat = NodeId(PRODUCERS as u32);
    let order = g.topo_order().unwrap();
    assert_eq!((order[0], order.len()), (NodeId(1), PRODUCERS + 1));
    let cons = g.consumers();
    assert_eq!(cons.of(NodeId(1)), &[NodeId(0), cat]);
    assert_eq!(g.node(cat).unwrap().outputs[0].shape, [INPUTS, 4]);
    let took = t.elapsed();
    assert!(took < LIMIT, "validation took {took:?}");

    // The whole scheduling path (analysis, cost, placement, memory sweep) stays linear too.
    let t = Instant::now();
    let topology = Topology::uniform(
        2,
        genie_scheduler::cost::DeviceSpec::a100(),
        genie_scheduler::topology::LinkSpec::gbps(25.0, 10.0),
    )
    .unwrap();
    let s = Scheduler::new(topology)
        .create_schedule(&g, &OptimizationPlan::default())
        .unwrap();
    s.validate(&g).unwrap();
    let took = t.elapsed();
    assert!(took < LIMIT, "scheduling took {took:?}");
}

#[test]
fn concat_whose_length_overflows_is_refused_quickly() {
    // [2^63, 0] u8 is an empty tensor whose dims fit; 3M copies along axis 0 do not.
    let mut g = Graph::new("overflow");
    let x = g
        .add_with_outputs(
            "x",
            OpKind::Input,
            vec![],
            vec![TensorMeta::new([1 << 63, 0], DType::U8)],
            Semantics::default(),
        )
        .unwrap();
    let t = Instant::now();
    let e = g
        .add(
            "cat",
            OpKind::Concat { axis: 0 },
            vec![x.into(); INPUTS],
            Semantics::default(),
        )
        .unwrap_err();
    assert!(
        matches!(&e, GraphError::ShapeOverflow { node: NodeId(1), name, .. } if name == "cat"),
        "{e:?}"
    );
    assert!(t.elapsed() < LIMIT);
}

fn source(shape: &[usize], dtype: DType) -> Result<Graph, GraphError> {
    let mut g = Graph::new("big");
    g.add_with_outputs(
        "w",
        OpKind::Parameter { trainable: true },
        vec![],
        vec![TensorMeta::new(shape, dtype)],
        Semantics::default(),
    )?;
    Ok(g)
}

#[test]
fn tensor_sizes_that_overflow_are_typed_errors() {
    // Elements overflow u64.
    let e = source(&[1 << 32, 1 << 32], DType::F32).unwrap_err();
    assert!(
        matches!(&e, GraphError::TensorTooLarge { node: NodeId(0), name, output: 0, .. } if name == "w"),
        "{e:?}"
    );
    // Elements fit, bytes do not.
    let e = source(&[1 << 62, 2], DType::F32).unwrap_err();
    assert!(matches!(e, GraphError::TensorTooLarge { .. }), "{e:?}");
    // The same through JSON (the frontend path), which validates.
    let json = format!(
        r#"{{"name":"big","nodes":[{{"id":0,"name":"w","op":{{"kind":"input"}},
        "outputs":[{{"shape":[{},{}],"dtype":"i64"}}]}}]}}"#,
        1u64 << 40,
        1u64 << 40
    );
    match Graph::from_json(&json) {
        Err(Error::Graph(GraphError::TensorTooLarge { node, shape, .. })) => {
            assert_eq!((node, shape), (NodeId(0), vec![1 << 40, 1 << 40]));
        }
        other => panic!("expected TensorTooLarge, got {other:?}"),
    }
    // Sizes of unvalidated metadata saturate instead of wrapping or panicking.
    let m = TensorMeta::new([usize::MAX, usize::MAX], DType::F32);
    assert_eq!((m.checked_elements(), m.elements()), (None, u64::MAX));
    assert_eq!((m.checked_bytes(), m.bytes()), (None, u64::MAX));
    // An empty tensor has no bytes, but its strides must still fit.
    assert_eq!(
        TensorMeta::new([1 << 40, 0], DType::F32).checked_bytes(),
        Some(0)
    );
    assert_eq!(
        TensorMeta::new([1 << 40, 0, 1 << 40], DType::F32).checked_bytes(),
        None
    );
}

#[test]
fn a_graph_larger_than_the_limit_is_refused() {
    // Each tensor fits (2^59 bytes) but three of them pass MAX_GRAPH_BYTES (2^60).
    let mut g = Graph::new("huge");
    for i in 0..3 {
        g.add_with_outputs(
            format!("w{i}"),
            OpKind::Parameter { trainable: true },
            vec![],
            vec![TensorMeta::new([1 << 57], DType::F32)],
            Semantics::default(),
        )
        .unwrap();
    }
    let e = g.validate().unwrap_err();
    assert_eq!(
        e,
        GraphError::GraphTooLarge {
            node: NodeId(2),
            name: "w2".into(),
            max: MAX_GRAPH_BYTES
        }
    );
    // Sums over such a graph saturate.
    assert_eq!(g.parameter_count(), 3 << 57);
}

#[test]
fn rank_is_bounded() {
    let e = source(&[1; MAX_RANK + 1], DType::F32).unwrap_err();
    assert!(
        matches!(e, GraphError::RankTooLarge { rank, max: MAX_RANK, .. } if rank == MAX_RANK + 1),
        "{e:?}"
    );
    source(&[1; MAX_RANK], DType::F32).unwrap();
}

/// A graph with one input `x` of `shape` (f32) and `op` applied to it, declared with `declared`.
fn unary(shape: &[usize], op: OpKind, declared: &[usize]) -> Result<(), GraphError> {
    let mut g = Graph::new("unary");
    let x = g.add_with_outputs(
        "x",
        OpKind::Input,
        vec![],
        vec![TensorMeta::new(shape, DType::F32)],
        Semantics::default(),
    )?;
    g.add_with_outputs(
        "op",
        op,
        vec![x.into()],
        vec![TensorMeta::new(declared, DType::F32)],
        Semantics::default(),
    )?;
    g.validate()
}

#[test]
fn attribute_arithmetic_that_overflows_is_a_typed_error() {
    // Split sizes that wrap to the axis length (usize::MAX + 2 = 1).
    let e = unary(
        &[1],
        OpKind::Split {
            axis: 0,
            sizes: vec![usize::MAX, 2],
        },
        &[1],
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            GraphError::InvalidAttribute {
                node: NodeId(1),
                ..
            }
        ),
        "{e:?}"
    );
    // A reshape whose element count wraps to the input's (0): refused by the shape rule, and
    // its declared output by the size check.
    let mut g = Graph::new("reshape");
    let x = g
        .add_with_outputs(
            "x",
            OpKind::Input,
            vec![],
            vec![TensorMeta::new([4, 0], DType::F32)],
            Semantics::default(),
        )
        .unwrap();
    let reshape = OpKind::Reshape {
        shape: vec![1 << 32, 1 << 32, 0],
    };
    let e = g
        .add("op", reshape.clone(), vec![x.into()], Semantics::default())
        .unwrap_err();
    assert!(
        matches!(
            e,
            GraphError::ShapeMismatch {
                node: NodeId(1),
                ..
            }
        ),
        "{e:?}"
    );
    let e = unary(&[4, 0], reshape, &[1 << 32, 1 << 32, 0]).unwrap_err();
    assert!(
        matches!(
            e,
            GraphError::TensorTooLarge {
                node: NodeId(1),
                ..
            }
        ),
        "{e:?}"
    );
    // Pool padding whose double overflows.
    let e = unary(
        &[1, 1, 4, 4],
        OpKind::MaxPool2d {
            kernel: [1, 1],
            stride: [1, 1],
            padding: [usize::MAX / 2 + 1, 0],
        },
        &[1, 1, 4, 4],
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            GraphError::InvalidAttribute {
                node: NodeId(1),
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn attention_and_conv_products_that_overflow_are_typed_errors() {
    let mut g = Graph::new("attn");
    let q = g
        .add_with_outputs(
            "q",
            OpKind::Input,
            vec![],
            vec![TensorMeta::new([1, 1, 1], DType::F32)],
            Semantics::default(),
        )
        .unwrap();
    let e = g
        .add(
            "attn",
            OpKind::Attention {
                heads: 1 << 32,
                kv_heads: None,
                head_dim: 1 << 32,
                causal: false,
                scale: Scalar(1.0),
            },
            vec![q.into(), q.into(), q.into()],
            Semantics::default(),
        )
        .unwrap_err();
    assert!(
        matches!(&e, GraphError::ShapeOverflow { node: NodeId(1), name, .. } if name == "attn"),
        "{e:?}"
    );

    // groups · (C/groups) wraps to the input's 0 channels.
    let mut g = Graph::new("conv");
    let x = g
        .add_with_outputs(
            "x",
            OpKind::Input,
            vec![],
            vec![TensorMeta::new([1, 0, 4, 4], DType::F32)],
            Semantics::default(),
        )
        .unwrap();
    let w = g
        .add_with_outputs(
            "w",
            OpKind::Parameter { trainable: true },
            vec![],
            vec![TensorMeta::new([0, 1 << 32, 1, 1], DType::F32)],
            Semantics::default(),
        )
        .unwrap();
    let e = g
        .add(
            "conv",
            OpKind::Conv2d {
                stride: [1, 1],
                padding: [0, 0],
                dilation: [1, 1],
                groups: 1 << 32,
                bias: false,
            },
            vec![x.into(), w.into()],
            Semantics::default(),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            GraphError::ShapeMismatch {
                node: NodeId(2),
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn deeply_nested_or_truncated_json_is_refused() {
    let deep = "[".repeat(1_000_000);
    assert!(matches!(Graph::from_json(&deep), Err(Error::Json(_))));
    let deep = format!(
        r#"{{"name":"x","nodes":[{{"id":0,"name":"x","op":{{"kind":"input"}},"semantics":{{"custom":{}"#,
        "{\"a\":".repeat(100_000)
    );
    assert!(matches!(Graph::from_json(&deep), Err(Error::Json(_))));
    let json = wide_concat_json(3, 5);
    for cut in 0..json.len() {
        assert!(Graph::from_json(&json[..cut]).is_err());
    }
}

#[test]
fn cost_of_a_valid_graph_with_huge_attributes_is_finite() {
    // A 2^40 × 2^40 window over a padded 1×1 image, strided to a single output: valid, and its
    // FLOPs (window area · outputs) do not fit in a usize.
    let g = unary(
        &[1, 1, 1, 1],
        OpKind::MaxPool2d {
            kernel: [1 << 40, 1 << 40],
            stride: [1 << 62, 1 << 62],
            padding: [1 << 40, 1 << 40],
        },
        &[1, 1, 1, 1],
    );
    assert_eq!(g, Ok(()));
    let mut graph = Graph::new("pool");
    let x = graph
        .add_with_outputs(
            "x",
            OpKind::Input,
            vec![],
            vec![TensorMeta::new([1, 1, 1, 1], DType::F32)],
            Semantics::default(),
        )
        .unwrap();
    let pool = graph
        .add(
            "pool",
            OpKind::MaxPool2d {
                kernel: [1 << 40, 1 << 40],
                stride: [1 << 62, 1 << 62],
                padding: [1 << 40, 1 << 40],
            },
            vec![x.into()],
            Semantics::default(),
        )
        .unwrap();
    use genie_scheduler::cost::{CostModel, DeviceSpec, RooflineCostModel};
    let node = graph.node(pool).unwrap();
    let work = RooflineCostModel.work(&graph, node);
    assert_eq!(work.flops, 2f64.powi(80));
    assert!(RooflineCostModel
        .node_time(&graph, node, &DeviceSpec::a100())
        .is_finite());
}
