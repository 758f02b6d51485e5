//! Scheduling real model graphs: the behaviours of issue 4 §8.

use genie_scheduler::analysis::analyze;
use genie_scheduler::builders::{self, Gpt2Config, ModelSize, ResNetConfig};
use genie_scheduler::cost::{DeviceSpec, RooflineCostModel};
use genie_scheduler::graph::{DType, Graph, OpKind, Semantics, TensorMeta};
use genie_scheduler::placement::{CostTable, PolicyKind};
use genie_scheduler::recompute::choose_recompute;
use genie_scheduler::topology::{DeviceId, LinkSpec};
use genie_scheduler::{OptimizationPlan, Scheduler, Strategy, Topology};

fn cluster(n: usize, spec: DeviceSpec) -> Topology {
    Topology::uniform(n, spec, LinkSpec::gbps(25.0, 10.0)).unwrap()
}

#[test]
fn gpt2_decode_kv_caches_share_a_device_with_their_attention() {
    let g = builders::gpt2_decode(&Gpt2Config::default(), 1023).unwrap();
    let a = analyze(&g);
    for policy in [
        PolicyKind::Heft,
        PolicyKind::Pipeline,
        PolicyKind::Heterogeneous,
    ] {
        let mut s = Scheduler::new(cluster(4, DeviceSpec::a100()));
        let plan = OptimizationPlan {
            policy: Some(policy),
            ..OptimizationPlan::default()
        };
        let sched = s.create_schedule(&g, &plan).unwrap();
        sched.validate(&g).unwrap();
        for b in &a.attention_blocks {
            let cache = b.kv_cache.unwrap();
            let d = sched.node_device[cache.index()];
            assert_eq!(sched.node_device[b.attention.index()], d, "{policy:?}");
            // The append and both reads too.
            for n in g.nodes() {
                if a.colocation[n.id.index()] == a.colocation[cache.index()] {
                    assert_eq!(sched.node_device[n.id.index()], d);
                }
            }
        }
        // The KV caches never travel.
        assert!(sched
            .transfers
            .iter()
            .all(|t| !matches!(g.node(t.tensor.node).unwrap().op, OpKind::KvCache { .. })));
    }
}

#[test]
fn resnet50_pipeline_over_four_equal_devices_is_balanced() {
    let g = builders::resnet(&ResNetConfig::default()).unwrap();
    let topo = cluster(4, DeviceSpec::a100());
    let costs = CostTable::new(&g, &topo, &RooflineCostModel);
    let mut s = Scheduler::new(topo);
    let plan = OptimizationPlan {
        strategy: Some(Strategy::Pipeline),
        ..OptimizationPlan::default()
    };
    let sched = s.create_schedule(&g, &plan).unwrap();
    sched.validate(&g).unwrap();
    assert_eq!(sched.policy, PolicyKind::Pipeline);
    let mut per_dev = [0.0f64; 4];
    for n in g.nodes() {
        let d = sched.node_device[n.id.index()];
        per_dev[d.index()] += costs.time(n.id, d);
    }
    let mean = per_dev.iter().sum::<f64>() / 4.0;
    for (d, c) in per_dev.iter().enumerate() {
        assert!(
            (c - mean).abs() <= 0.15 * mean,
            "device {d}: {c:.6} s vs mean {mean:.6} s ({per_dev:?})"
        );
    }
    // Stages of a pipeline are contiguous: at most 3 boundaries crossed by the main path.
    assert!(sched.transfers.len() >= 3);
}

/// x (input, on d0) → big (relu, on d0) → sink (on d1), where x is also consumed on d1, so `big`
/// can be recomputed on d1 from the copy of x that travels anyway.
fn recompute_graph() -> Graph {
    let mut g = Graph::new("recompute");
    let x = g
        .add_with_outputs(
            "x",
            OpKind::Input,
            vec![],
            vec![TensorMeta::new([1 << 18], DType::F32)],
            Semantics::default(),
        )
        .unwrap();
    let big = g
        .add("big", OpKind::Relu, vec![x.into()], Semantics::default())
        .unwrap();
    let local = g
        .add("local", OpKind::Tanh, vec![x.into()], Semantics::default())
        .unwrap();
    let far = g
        .add("far", OpKind::Tanh, vec![x.into()], Semantics::default())
        .unwrap();
    let sink = g
        .add(
            "sink",
            OpKind::Add,
            vec![big.into(), far.into()],
            Semantics::default(),
        )
        .unwrap();
    g.outputs.push(local.into());
    g.outputs.push(sink.into());
    g
}

#[test]
fn recompute_is_chosen_on_a_congested_link_only() {
    let g = recompute_graph();
    g.validate().unwrap();
    // A slow device: relu over 1 MiB in + 1 MiB out takes ~210 µs, more than the idle transfer
    // of its 1 MiB output (~89 µs at 100 Gb/s) but far less than that transfer behind 64 MiB of
    // queued traffic (~5.5 ms).
    let slow = DeviceSpec {
        mem_bandwidth: 10e9,
        ..DeviceSpec::cpu()
    };
    let mut topo = Topology::uniform(2, slow, LinkSpec::gbps(100.0, 5.0)).unwrap();
    let (d0, d1) = (DeviceId(0), DeviceId(1));
    let placement = [d0, d0, d0, d1, d1];
    let a = analyze(&g);
    let costs = CostTable::new(&g, &topo, &RooflineCostModel);
    let idle = choose_recompute(&g, &topo, &costs, &a.residency, &placement);
    assert!(idle.is_empty(), "idle link: shipping is cheaper: {idle:?}");
    topo.set_outstanding(d0, d1, 64 << 20).unwrap();
    let busy = choose_recompute(&g, &topo, &costs, &a.residency, &placement);
    assert_eq!(busy.len(), 1, "{busy:?}");
    assert_eq!((busy[0].node.0, busy[0].device), (1, d1));
    assert!(busy[0].compute_s < busy[0].transfer_s);
    // `far` reads the input directly; the input is a source and stays a transfer.
    assert!(busy.iter().all(|r| r.node.0 != 0));
}

#[test]
fn cache_hits_on_a_repeated_graph_and_misses_after_a_topology_change() {
    let g = builders::by_name("gpt2-decode", &ModelSize::default()).unwrap();
    let mut s = Scheduler::new(cluster(8, DeviceSpec::a100()));
    let plan = OptimizationPlan::default();
    let first = s.create_schedule(&g, &plan).unwrap();
    let again = s.create_schedule(&g.clone(), &plan).unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &again));
    assert_eq!((s.stats().created, s.stats().cache_hits), (1, 1));
    s.topology_mut()
        .calibrate(
            DeviceId(0),
            DeviceId(1),
            &[(1 << 10, 12e-6), (1 << 20, 400e-6)],
        )
        .unwrap();
    let after = s.create_schedule(&g, &plan).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&first, &after));
    assert_eq!((s.stats().created, s.stats().cache_hits), (2, 1));
    // A different plan misses too.
    let single = OptimizationPlan {
        strategy: Some(Strategy::Sequential),
        ..OptimizationPlan::default()
    };
    let seq = s.create_schedule(&g, &single).unwrap();
    assert_eq!(s.stats().created, 3);
    assert!(seq.node_device.iter().all(|&d| d == seq.node_device[0]));
    assert!(seq.transfers.is_empty());
    assert!(s.stats().avg_time > std::time::Duration::ZERO);
}

#[test]
fn every_builder_and_strategy_gives_a_valid_schedule() {
    let topo = Topology::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/cluster.toml"
    ))
    .unwrap();
    let mut s = Scheduler::new(topo);
    for name in builders::MODEL_NAMES {
        let g = builders::by_name(name, &ModelSize::default()).unwrap();
        for strategy in [
            None,
            Some(Strategy::Sequential),
            Some(Strategy::Parallel),
            Some(Strategy::Pipeline),
            Some(Strategy::Dynamic),
            Some(Strategy::Priority),
        ] {
            let plan = OptimizationPlan {
                strategy,
                ..OptimizationPlan::default()
            };
            let sched = s.create_schedule(&g, &plan).unwrap();
            sched.validate(&g).unwrap();
            assert!(sched.makespan_s > 0.0);
            let text = sched.to_string();
            assert!(text.contains(name) && text.contains("makespan"), "{text}");
            let json = sched.to_json().unwrap();
            let back: genie_scheduler::ExecutionSchedule = serde_json::from_str(&json).unwrap();
            assert!(
                back == *sched,
                "JSON round trip changed the schedule of {name}"
            );
        }
    }
}

#[test]
fn plan_restrictions_and_memory_caps() {
    let g = builders::gpt2_decode(&Gpt2Config::default(), 1023).unwrap();
    let mut s = Scheduler::new(cluster(4, DeviceSpec::a100()));
    let plan = OptimizationPlan {
        devices: Some(vec!["dev2".into(), "dev3".into()]),
        ..OptimizationPlan::default()
    };
    let sched = s.create_schedule(&g, &plan).unwrap();
    assert!(sched.node_device.iter().all(|d| d.0 >= 2));
    // The model needs ~500 MB of weights; 300 MB per device forces a spread over two devices.
    let plan = OptimizationPlan {
        strategy: Some(Strategy::Sequential),
        memory_cap_bytes: Some(300 << 20),
        ..OptimizationPlan::default()
    };
    let sched = s.create_schedule(&g, &plan).unwrap();
    sched.validate(&g).unwrap();
    assert!(sched.peak_memory.iter().all(|&p| p <= 300 << 20));
    assert!(sched.peak_memory.iter().filter(|&&p| p > 0).count() >= 2);
    let plan = OptimizationPlan {
        memory_cap_bytes: Some(64 << 20),
        ..OptimizationPlan::default()
    };
    match s.create_schedule(&g, &plan) {
        Err(genie_scheduler::Error::OutOfMemory {
            peak_bytes,
            capacity_bytes,
            ..
        }) => {
            assert!(peak_bytes > capacity_bytes);
            assert_eq!(capacity_bytes, 64 << 20);
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    let bad = OptimizationPlan {
        devices: Some(vec!["nope".into()]),
        ..OptimizationPlan::default()
    };
    assert!(matches!(
        s.create_schedule(&g, &bad),
        Err(genie_scheduler::Error::UnknownDevice { .. })
    ));
}

#[test]
fn heterogeneous_matching_sends_prefill_to_flops_and_decode_to_bandwidth_per_cost() {
    // H100: most FLOPS; A100: most memory bandwidth per unit of price.
    let topo = Topology::new(
        vec![
            ("h100".into(), "a".into(), DeviceSpec::h100()),
            ("a100".into(), "b".into(), DeviceSpec::a100()),
        ],
        LinkSpec::gbps(400.0, 2.0),
        LinkSpec::gbps(100.0, 5.0),
    )
    .unwrap();
    let mut s = Scheduler::new(topo);
    let plan = OptimizationPlan {
        policy: Some(PolicyKind::Heterogeneous),
        ..OptimizationPlan::default()
    };
    let c = Gpt2Config {
        layers: 2,
        ..Gpt2Config::default()
    };
    let prefill = builders::gpt2_prefill(&c, 256).unwrap();
    let decode = builders::gpt2_decode(&c, 256).unwrap();
    let on =
        |g: &genie_scheduler::Graph, sched: &genie_scheduler::ExecutionSchedule, name: &str| {
            let n = g.nodes().iter().find(|n| n.name == name).unwrap();
            sched.device_names[sched.node_device[n.id.index()].index()].clone()
        };
    let sp = s.create_schedule(&prefill, &plan).unwrap();
    sp.validate(&prefill).unwrap();
    assert_eq!(on(&prefill, &sp, "h.1.mlp.c_fc.out"), "h100");
    assert_eq!(on(&prefill, &sp, "h.0.attn.attention"), "h100");
    let sd = s.create_schedule(&decode, &plan).unwrap();
    sd.validate(&decode).unwrap();
    assert_eq!(on(&decode, &sd, "h.1.mlp.c_fc.out"), "a100");
    assert_eq!(on(&decode, &sd, "h.0.attn.attention"), "a100");
}

#[test]
fn malformed_graphs_are_rejected_before_scheduling() {
    let g = builders::gpt2_decode(
        &Gpt2Config {
            layers: 1,
            ..Gpt2Config::default()
        },
        8,
    )
    .unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&g.to_json().unwrap()).unwrap();
    // Point an input at a node that does not exist, bypassing Graph::from_json's check.
    json["nodes"][5]["inputs"][0]["node"] = serde_json::json!(10_000);
    let bad: genie_scheduler::Graph = serde_json::from_value(json).unwrap();
    let mut s = Scheduler::new(cluster(2, DeviceSpec::a100()));
    match s.create_schedule(&bad, &OptimizationPlan::default()) {
        Err(genie_scheduler::Error::Graph(genie_scheduler::graph::GraphError::DanglingEdge {
            producer: 10_000,
            ..
        })) => {}
        other => panic!(
            "expected a dangling-edge error, got {:?}",
            other.map(|_| ())
        ),
    }
}

/// A serving engine's prefill: compute restricted to the prefill device, KV caches on the
/// decode device. Every KV-cache node lands there; nothing else leaves the prefill device; an
/// unknown KV device is a typed error.
#[test]
fn kv_device_takes_the_kv_caches_and_nothing_else() {
    let cfg = Gpt2Config {
        layers: 3,
        ..Gpt2Config::default()
    };
    let g = builders::gpt2_prefill(&cfg, 16).unwrap();
    let mut s = Scheduler::new(cluster(2, DeviceSpec::cpu()));
    let plan = OptimizationPlan {
        devices: Some(vec!["dev0".into()]),
        kv_device: Some("dev1".into()),
        ..OptimizationPlan::default()
    };
    let sched = s.create_schedule(&g, &plan).unwrap();
    let kv = |op: &OpKind| {
        matches!(
            op,
            OpKind::KvCache { .. } | OpKind::KvCacheAppend | OpKind::KvCacheRead { .. }
        )
    };
    let mut on_kv = 0;
    for n in g.nodes() {
        let d = sched.node_device[n.id.index()];
        if kv(&n.op) {
            assert_eq!(d, DeviceId(1), "{} not on the KV device", n.name);
            on_kv += 1;
        } else {
            assert_eq!(d, DeviceId(0), "{} left the prefill device", n.name);
        }
    }
    assert!(
        on_kv >= cfg.layers,
        "each layer keeps a KV cache: {on_kv} KV nodes"
    );
    let bad = OptimizationPlan {
        kv_device: Some("nowhere".into()),
        ..plan
    };
    assert!(matches!(
        s.create_schedule(&g, &bad),
        Err(genie_scheduler::Error::UnknownDevice { .. })
    ));
}
