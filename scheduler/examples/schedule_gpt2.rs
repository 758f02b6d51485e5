//! Schedules a GPT-2 decode step on the example cluster and prints the summary:
//! `cargo run --release -p genie-scheduler --example schedule_gpt2 [cluster.toml|cluster.json]`

use genie_scheduler::builders::{by_name, ModelSize};
use genie_scheduler::{OptimizationPlan, Scheduler, Topology};

fn main() -> Result<(), genie_scheduler::Error> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/cluster.toml").to_owned()
    });
    let topology = Topology::load(&path)?;
    let graph = by_name("gpt2-decode", &ModelSize::default())?;
    let mut scheduler = Scheduler::new(topology);
    let schedule = scheduler.create_schedule(&graph, &OptimizationPlan::default())?;
    schedule.validate(&graph)?;
    print!("{schedule}");
    Ok(())
}
