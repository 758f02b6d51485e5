//! Criterion micro-benchmarks of the scheduler: `cargo bench -p genie-benches --bench scheduler`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use genie_benches::mutex_queue::run_with_mutex_queue;
use genie_scheduler::analysis::analyze;
use genie_scheduler::builders::{self, Gpt2Config, ModelSize};
use genie_scheduler::cost::DeviceSpec;
use genie_scheduler::dispatch::{Dispatcher, TaskGraph};
use genie_scheduler::synthetic::{layered_dag, SyntheticConfig};
use genie_scheduler::topology::LinkSpec;
use genie_scheduler::{OptimizationPlan, Scheduler, Topology};

fn topo(n: usize) -> Topology {
    Topology::uniform(n, DeviceSpec::a100(), LinkSpec::gbps(25.0, 10.0)).expect("topology")
}

fn builders_bench(c: &mut Criterion) {
    let cfg = Gpt2Config::default();
    c.bench_function("build gpt2 decode (L=1023)", |b| {
        b.iter(|| builders::gpt2_decode(black_box(&cfg), 1023).expect("graph"))
    });
    c.bench_function("build resnet50", |b| {
        b.iter(|| builders::by_name("resnet50", &ModelSize::default()).expect("graph"))
    });
    let g = builders::gpt2_decode(&cfg, 1023).expect("graph");
    c.bench_function("validate gpt2 decode", |b| {
        b.iter(|| black_box(&g).validate())
    });
    c.bench_function("analyze gpt2 decode", |b| b.iter(|| analyze(black_box(&g))));
}

fn schedule_bench(c: &mut Criterion) {
    let plan = OptimizationPlan::default();
    for name in ["gpt2-decode", "gpt2-prefill", "bert", "resnet50"] {
        let g = builders::by_name(name, &ModelSize::default()).expect("graph");
        let t = topo(8);
        c.bench_function(&format!("cold schedule {name}, 8 dev"), |b| {
            b.iter(|| {
                let mut s = Scheduler::new(t.clone());
                s.create_schedule(black_box(&g), &plan).expect("schedule")
            })
        });
    }
    let g = builders::by_name("gpt2-decode", &ModelSize::default()).expect("graph");
    let mut s = Scheduler::new(topo(8));
    s.create_schedule(&g, &plan).expect("schedule");
    c.bench_function("cache hit gpt2 decode", |b| {
        b.iter(|| s.create_schedule(black_box(&g), &plan).expect("schedule"))
    });
}

fn dispatch_bench(c: &mut Criterion) {
    let dag = layered_dag(&SyntheticConfig {
        nodes: 20_000,
        width: 64,
        weight_percent: 0,
        ..SyntheticConfig::default()
    })
    .expect("dag");
    let tasks = TaskGraph::from_graph(&dag);
    let d = Dispatcher::new(2);
    c.bench_function("dispatch 20k tasks, 2 threads, work stealing", |b| {
        b.iter(|| {
            d.run(&tasks, |i, _| {
                black_box(i);
            })
        })
    });
    c.bench_function("dispatch 20k tasks, 2 threads, mutex queue", |b| {
        b.iter(|| {
            run_with_mutex_queue(&tasks, 2, |i, _| {
                black_box(i);
            })
        })
    });
}

criterion_group!(benches, builders_bench, schedule_bench, dispatch_bench);
criterion_main!(benches);
