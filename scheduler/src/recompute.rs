//! Recompute versus transfer.
//!
//! For every tensor consumed on another device than its producer's, compare the predicted
//! transfer time (latency + size / bandwidth + the queueing delay of the link's outstanding load)
//! with the time to run the producer again on the consumer's device. The producer is a candidate
//! only if it is cheap to re-run there: not a source (weights, inputs, KV caches stay where they
//! are), not stateful, and every one of its inputs is already present on the consumer's device
//! (produced there, or shipped there anyway for another consumer). When recomputing is faster, the
//! edge is marked for recompute and its transfer is dropped.

use crate::graph::{Graph, NodeId, Residency};
use crate::placement::CostTable;
use crate::schedule::Recompute;
use crate::topology::{DeviceId, Topology};

/// Chooses recomputes for `placement`. `residency` is the effective residency per node.
pub fn choose_recompute(
    graph: &Graph,
    topology: &Topology,
    costs: &CostTable,
    residency: &[Residency],
    placement: &[DeviceId],
) -> Vec<Recompute> {
    // Every (producer, destination device) that needs the producer's output remotely.
    let mut needs: Vec<(u32, DeviceId)> = Vec::new();
    for node in graph.nodes() {
        let d = placement[node.id.index()];
        for t in &node.inputs {
            if placement[t.node.index()] != d {
                needs.push((t.node.0, d));
            }
        }
    }
    needs.sort_unstable();
    needs.dedup();
    let present = |u: NodeId, d: DeviceId, needs: &[(u32, DeviceId)]| {
        placement[u.index()] == d || needs.binary_search(&(u.0, d)).is_ok()
    };
    let mut out = Vec::new();
    for &(p, dst) in &needs {
        let prod = &graph.nodes()[p as usize];
        if prod.op.is_source() || residency[p as usize] != Residency::EphemeralActivation {
            continue;
        }
        // Weights never travel (they are co-located with their consumers), so a producer that
        // reads a weight is never recomputable elsewhere: its weight is not present there.
        if !prod
            .inputs
            .iter()
            .all(|t| t.node.0 != p && present(t.node, dst, &needs))
        {
            continue;
        }
        let src = placement[p as usize];
        let transfer_s = topology.transfer_time(src, dst, prod.output_bytes());
        let compute_s = costs.time(prod.id, dst);
        if compute_s < transfer_s {
            tracing::debug!(
                node = p,
                %src,
                %dst,
                transfer_s,
                compute_s,
                "recompute instead of transfer"
            );
            out.push(Recompute {
                node: prod.id,
                device: dst,
                transfer_s,
                compute_s,
            });
        }
    }
    out
}
