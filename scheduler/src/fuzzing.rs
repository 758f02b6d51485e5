//! Hooks for fuzzers (see `fuzz/` at the repository root) and for the property tests that run
//! the same inputs in CI. Not part of the stable API.

use crate::cost::{CostModel, DeviceSpec, RooflineCostModel};
use crate::graph::Graph;
use crate::topology::LinkSpec;
use crate::{OptimizationPlan, Scheduler, Topology};

/// Graphs up to this many nodes are also scheduled, so the fuzzer reaches analysis, the cost
/// model, placement and the memory sweep; larger ones stop after validation.
const SCHEDULE_NODES: usize = 256;

/// Parses untrusted bytes as a graph in JSON, as `genie schedule` or a worker would, and runs
/// what a valid graph goes through next. Must never panic, whatever `data` holds; a graph that
/// validates must serialize and parse back to itself.
pub fn graph_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(graph) = Graph::from_json(text) else {
        return;
    };
    let back = graph.to_json().and_then(|json| Graph::from_json(&json));
    assert!(
        back.as_ref().is_ok_and(|b| *b == graph),
        "a valid graph does not round-trip: {back:?}"
    );
    let _ = graph.structural_hash();
    let _ = graph.topo_order();
    let _ = crate::analysis::analyze(&graph);
    let spec = DeviceSpec::a100();
    for node in graph.nodes() {
        let _ = RooflineCostModel.node_time(&graph, node, &spec);
    }
    if graph.len() <= SCHEDULE_NODES {
        if let Ok(topology) = Topology::uniform(2, spec, LinkSpec::gbps(25.0, 10.0)) {
            let mut scheduler = Scheduler::new(topology);
            if let Ok(schedule) = scheduler.create_schedule(&graph, &OptimizationPlan::default()) {
                assert!(
                    schedule.validate(&graph).is_ok(),
                    "the scheduler made an invalid schedule"
                );
            }
        }
    }
}
