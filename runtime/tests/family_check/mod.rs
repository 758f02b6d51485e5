//! The family check shared by `families.rs` (over the embedded cluster's automatic backend: TCP
//! here) and `rdma_backend.rs` (over soft-RoCE): a committed fixture's logits against the
//! reference of `transformers`, and bitwise equal on 1, 2 and 3 workers and disaggregated.

use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::limits::WorkerOptions;
use genie_runtime::models::{generate, Family, Generation, Model};
use genie_runtime::plan::{cpu_topology, Placement};
use genie_runtime::proto::WeightSpec;
use genie_scheduler::graph::Graph;
use genie_scheduler::Scheduler;
use genie_transport::Backend;
use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;

// `crate::common`: the including test's `mod common` (or its `use` of one).
use crate::common::bits;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(serde::Deserialize)]
pub struct Reference {
    pub prompt_ids: Vec<i64>,
    pub tokens: Vec<i64>,
    pub logits: Vec<Vec<f32>>,
}

pub fn reference(kind: &str) -> Reference {
    let text = std::fs::read_to_string(fixtures().join(kind).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The last row of each run's logits: the prefill's last position, then each step's.
fn step_logits(g: &Generation) -> Vec<Vec<f32>> {
    std::iter::once(&g.prefill)
        .chain(&g.steps)
        .map(|r| {
            let v: Vec<f32> = r.outputs[0].flatten_all().unwrap().to_vec1().unwrap();
            let n = r.outputs[0].dims().last().copied().unwrap();
            v[v.len() - n..].to_vec()
        })
        .collect()
}

pub fn check_family(kind: &str) -> (Backend, String) {
    let model = Model::load(&fixtures().join(kind)).unwrap();
    assert_eq!(model.model_type(), kind);
    let r = reference(kind);
    let steps = r.tokens.len() - 1;
    let opts = WorkerOptions {
        model_dir: Some(fixtures()),
        ..WorkerOptions::default()
    };
    let cluster = EmbeddedCluster::start_with(3, Arc::new(CpuKernels::new()), opts).unwrap();
    let mut driver =
        Driver::connect(&cluster.cluster, WeightSpec::Checkpoint(kind.to_owned())).unwrap();
    let layers = model.layers();
    let mut first: Option<(Vec<Vec<u32>>, Vec<i64>)> = None;
    for (seq, n) in [1usize, 2, 3, 0].into_iter().enumerate() {
        let by_layer = |g: &Graph| Placement::by_layer(g, n, layers);
        let gen = if n == 0 {
            // Disaggregated as the engine runs it, by the scheduler: prefill on w0 with its KV
            // caches built on w1, every decode step on w1.
            let sched = RefCell::new(Scheduler::new(cpu_topology(3).unwrap()));
            let pre = |g: &Graph| Placement::scheduled(&mut sched.borrow_mut(), g, 0, 1);
            let dec = |g: &Graph| Placement::scheduled(&mut sched.borrow_mut(), g, 1, 1);
            generate(
                &mut driver,
                &model,
                &r.prompt_ids,
                steps,
                seq as u64,
                pre,
                dec,
            )
            .unwrap()
        } else {
            let seq = seq as u64;
            generate(
                &mut driver,
                &model,
                &r.prompt_ids,
                steps,
                seq,
                by_layer,
                by_layer,
            )
            .unwrap()
        };
        assert_eq!(gen.tokens, r.tokens, "{kind}: greedy tokens on {n} workers");
        let logits = step_logits(&gen);
        assert_eq!(logits.len(), r.logits.len());
        for (i, (got, want)) in logits.iter().zip(&r.logits).enumerate() {
            let worst = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-4, "{kind}: step {i} logits differ by {worst}");
        }
        let b: Vec<Vec<u32>> = std::iter::once(&gen.prefill)
            .chain(&gen.steps)
            .map(|o| bits(&o.outputs[0]))
            .collect();
        match &first {
            None => first = Some((b, gen.tokens.clone())),
            Some((b0, _)) => assert!(b0 == &b, "{kind}: logits differ bitwise on {n} workers"),
        }
        driver.free_sequence(seq as u64).unwrap();
    }
    let used = (cluster.selection.backend, cluster.selection.reason.clone());
    cluster.stop(driver).unwrap();
    used
}
