//! Feedback into the cost model: measured transfers calibrate the scheduler's topology, measured
//! compute spans calibrate a per-(op kind, phase) scale on the roofline cost model, and a replay of a
//! placement over the calibrated model predicts its makespan.

use crate::driver::{RunOutput, TransferSample};
use crate::error::{Result, RuntimeError};
use crate::plan::{ExecPlan, Placement};
use crate::trace::SpanKind;
use genie_scheduler::cost::RooflineCostModel;
use genie_scheduler::graph::Graph;
use genie_scheduler::placement::CostTable;
use genie_scheduler::topology::{Calibration, DeviceId};
use genie_scheduler::Topology;
use std::collections::HashMap;

/// Compute calibration: measured / predicted seconds per (op kind, phase).
///
/// Each run contributes one ratio per bucket (its measured over its predicted seconds there);
/// a bucket's scale is the median of its runs' ratios, so one run slowed down by a neighbour on
/// a shared machine does not move the prediction.
#[derive(Debug, Clone, Default)]
pub struct ComputeCalibration {
    ratios: HashMap<String, Vec<f64>>,
}

impl ComputeCalibration {
    /// Adds the compute spans of a run of `graph` (node names must be unique, as the builders
    /// make them).
    pub fn add_run(&mut self, graph: &Graph, topo: &Topology, run: &RunOutput) {
        let table = CostTable::new(graph, topo, &RooflineCostModel);
        let by_name: HashMap<&str, &genie_scheduler::graph::Node> =
            graph.nodes().iter().map(|n| (n.name.as_str(), n)).collect();
        let mut sums: HashMap<String, (f64, f64)> = HashMap::new();
        for s in &run.spans {
            if let SpanKind::Compute { .. } = s.kind {
                if let Some(n) = by_name.get(s.name.as_str()) {
                    let pred = table.time(n.id, DeviceId(0));
                    let e = sums.entry(cal_key(n)).or_default();
                    e.0 += s.dur_us / 1e6;
                    e.1 += pred;
                }
            }
        }
        for (k, (m, p)) in sums {
            if p > 0.0 && m.is_finite() {
                self.ratios.entry(k).or_default().push(m / p);
            }
        }
    }

    /// Keeps only the last `n` runs' ratios of every bucket (at least one): the calibration then
    /// follows a machine whose speed drifts.
    pub fn keep_last(&mut self, n: usize) {
        let n = n.max(1);
        for r in self.ratios.values_mut() {
            if r.len() > n {
                r.drain(..r.len() - n);
            }
        }
    }

    /// Calibrated seconds of `node`, whose uncalibrated prediction is `pred`.
    pub fn scale(&self, node: &genie_scheduler::graph::Node, pred: f64) -> f64 {
        match self.ratios.get(&cal_key(node)) {
            Some(r) if !r.is_empty() => {
                let mut r = r.clone();
                r.sort_by(f64::total_cmp);
                let mid = r.len() / 2;
                let m = if r.len() % 2 == 0 {
                    (r[mid - 1] + r[mid]) / 2.0
                } else {
                    r[mid]
                };
                pred * m
            }
            _ => pred,
        }
    }
}

/// Calibration bucket of a node: its op kind and phase (a decode step's tiny matmuls run at a
/// very different efficiency from a prefill's large ones).
fn cal_key(n: &genie_scheduler::graph::Node) -> String {
    format!("{}:{:?}", n.op.name(), n.semantics.phase)
}

/// Fits every link between the workers of `samples` and installs it in `topo`.
pub fn calibrate_links(
    topo: &mut Topology,
    samples: &[TransferSample],
) -> Result<Vec<Calibration>> {
    // Loopback links are symmetric: fit one line per unordered pair.
    let mut pairs: HashMap<(usize, usize), Vec<(u64, f64)>> = HashMap::new();
    for s in samples {
        let k = (s.src.min(s.dst), s.src.max(s.dst));
        pairs.entry(k).or_default().push((s.bytes, s.seconds));
    }
    let mut out = Vec::new();
    for ((a, b), v) in pairs {
        let c = topo
            .calibrate(DeviceId(a as u32), DeviceId(b as u32), &v)
            .map_err(|e| RuntimeError::Scheduler(e.into()))?;
        out.push(c);
    }
    Ok(out)
}

/// Predicted makespan (seconds) of `graph` under `placement`, replaying the executor: each
/// worker runs its nodes in topological order; a cross-worker input is ready when its producer
/// finished plus the link's (calibrated) transfer time, links carrying one transfer at a time.
pub fn predict_makespan(
    graph: &Graph,
    placement: &Placement,
    topo: &Topology,
    cal: &ComputeCalibration,
) -> Result<f64> {
    let plan = ExecPlan::new(graph, placement, &[])?;
    let table = CostTable::new(graph, topo, &RooflineCostModel);
    let nodes = graph.nodes();
    let mut end = vec![0.0f64; nodes.len()];
    let mut worker_free = vec![0.0f64; plan.workers];
    let mut link_free: HashMap<(usize, usize), f64> = HashMap::new();
    // Arrival time of each transfer, filled when its producer finishes.
    let mut arrival: HashMap<u32, f64> = HashMap::new();
    let mut makespan = 0.0f64;
    for &id in &plan.order {
        let i = id.index();
        if plan.replicated[i] {
            continue;
        }
        let w = plan.worker_of[i];
        let node = &nodes[i];
        let mut ready = worker_free[w];
        for t in &node.inputs {
            let p = t.node.index();
            if plan.replicated.get(p).copied().unwrap_or(true) {
                continue;
            }
            let at = if plan.worker_of[p] == w {
                end[p]
            } else {
                plan.incoming
                    .get(&(*t, w))
                    .and_then(|tid| arrival.get(tid))
                    .copied()
                    .unwrap_or(end[p])
            };
            ready = ready.max(at);
        }
        let dur = cal.scale(node, table.time(id, DeviceId(w as u32)));
        end[i] = ready + dur;
        worker_free[w] = end[i];
        makespan = makespan.max(end[i]);
        for o in 0..node.outputs.len() {
            let tref = genie_scheduler::graph::TensorRef::new(id, o as u32);
            for &tid in plan.outgoing.get(&tref).map(Vec::as_slice).unwrap_or(&[]) {
                let spec = &plan.transfers[tid as usize];
                let free = link_free.entry((spec.src, spec.dst)).or_default();
                let start = free.max(end[i]);
                let t = topo.transfer_time(
                    DeviceId(spec.src as u32),
                    DeviceId(spec.dst as u32),
                    spec.bytes,
                );
                *free = start + t;
                arrival.insert(tid, start + t);
                makespan = makespan.max(start + t);
            }
        }
    }
    Ok(makespan)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window keeps each bucket's latest ratios, so the scale follows a drifting machine.
    #[test]
    fn keep_last_follows_the_latest_runs() {
        let mut cal = ComputeCalibration::default();
        cal.ratios
            .insert("matmul:Prefill".into(), vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        cal.ratios.insert("add:Prefill".into(), vec![3.0]);
        cal.keep_last(3);
        assert_eq!(cal.ratios["matmul:Prefill"], vec![2.0, 2.0, 2.0]);
        assert_eq!(cal.ratios["add:Prefill"], vec![3.0]);
        cal.keep_last(0);
        assert_eq!(cal.ratios["matmul:Prefill"], vec![2.0]);
    }
}
