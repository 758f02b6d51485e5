//! Property tests over random DAGs, co-location groups, device counts and capacities.

use genie_scheduler::analysis::analyze;
use genie_scheduler::constraints::peak_memory;
use genie_scheduler::cost::DeviceSpec;
use genie_scheduler::placement::PolicyKind;
use genie_scheduler::synthetic::{layered_dag, SyntheticConfig};
use genie_scheduler::topology::{DeviceId, LinkSpec};
use genie_scheduler::{Error, OptimizationPlan, Scheduler, Strategy, Topology};
use proptest::prelude::*;
use std::collections::HashMap;

fn strategy_of(i: u8) -> Option<Strategy> {
    [
        None,
        Some(Strategy::Sequential),
        Some(Strategy::Parallel),
        Some(Strategy::Pipeline),
        Some(Strategy::Dynamic),
        Some(Strategy::Priority),
    ]
    .get(i as usize % 6)
    .copied()
    .flatten()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn schedules_respect_every_invariant(
        nodes in 4usize..90,
        width in 1usize..8,
        fan_in in 1usize..4,
        groups in 0usize..6,
        devices in 1usize..5,
        seed in any::<u64>(),
        strategy in 0u8..6,
        hetero in any::<bool>(),
        policy in 0u8..5,
        // Capacity as a percentage of the whole graph's bytes; >= 100 always fits.
        cap_percent in prop_oneof![Just(1000u64), 5u64..120],
    ) {
        let g = layered_dag(&SyntheticConfig {
            nodes,
            width,
            max_fan_in: fan_in,
            colocation_groups: groups,
            colocation_percent: 40,
            elements: (16, 4096),
            seed,
            ..SyntheticConfig::default()
        }).unwrap();
        g.validate().unwrap();
        let total: u64 = g.nodes().iter().map(|n| n.output_bytes()).sum();
        let cap = (total * cap_percent / 100).max(1);
        let mk = |i: usize| {
            let base = if hetero && i % 2 == 1 { DeviceSpec::l4() } else { DeviceSpec::a100() };
            (format!("d{i}"), format!("h{}", i / 2), DeviceSpec { memory: cap, ..base })
        };
        let topo = Topology::new(
            (0..devices).map(mk).collect(),
            LinkSpec::gbps(400.0, 2.0),
            LinkSpec::gbps(25.0, 10.0),
        ).unwrap();
        let mut s = Scheduler::new(topo);
        let plan = OptimizationPlan {
            strategy: strategy_of(strategy),
            policy: [None, Some(PolicyKind::Heft), Some(PolicyKind::Pipeline),
                     Some(PolicyKind::Heterogeneous), Some(PolicyKind::SingleDevice)][policy as usize],
            ..OptimizationPlan::default()
        };
        match s.create_schedule(&g, &plan) {
            Ok(sched) => {
                // Structural checks: placed once, stages after producers, co-location, transfers.
                prop_assert_eq!(sched.validate(&g), Ok(()));
                prop_assert_eq!(sched.node_device.len(), g.len());
                for n in g.nodes() {
                    for t in &n.inputs {
                        prop_assert!(sched.node_stage[n.id.index()] > sched.node_stage[t.node.index()]);
                    }
                }
                // Every explicit label on one device.
                let mut label_dev: HashMap<&str, DeviceId> = HashMap::new();
                for n in g.nodes() {
                    if let Some(l) = &n.semantics.colocation_group {
                        let d = sched.node_device[n.id.index()];
                        prop_assert_eq!(*label_dev.entry(l.as_str()).or_insert(d), d);
                    }
                    // Weights with their consumers.
                    if n.op.is_source() {
                        for c in g.consumers().of(n.id) {
                            prop_assert_eq!(sched.node_device[c.index()], sched.node_device[n.id.index()]);
                        }
                    }
                }
                // Peak memory, recomputed independently, within capacity.
                let a = analyze(&g);
                let peak = peak_memory(&g, &g.consumers(), &a.residency, &sched.order,
                                       &sched.node_device, devices);
                prop_assert_eq!(&peak, &sched.peak_memory);
                for p in peak {
                    prop_assert!(p <= cap, "peak {} > capacity {}", p, cap);
                }
            }
            Err(Error::OutOfMemory { peak_bytes, capacity_bytes, .. }) => {
                prop_assert!(peak_bytes > capacity_bytes);
                prop_assert_eq!(capacity_bytes, cap);
                prop_assert!(cap_percent < 100, "a device holding every tensor must fit");
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}
