//! `genie-scheduler`: turns an annotated model graph into an execution schedule.
//!
//! The pipeline, one module per step:
//!
//! - [`graph`]: the semantic relationship graph (SRG) — ops with kernel attributes, tensor
//!   metadata, phase/residency/co-location annotations; JSON in/out; `validate()`.
//! - [`builders`]: GPT-2 (prefill and decode step with KV caches), BERT-base, ResNet-50 at their
//!   real sizes; [`builders::by_name`] for `gpt2-decode`, `gpt2-prefill`, `bert`, `resnet50`.
//! - [`analysis`]: workload class, patterns (attention, convolution stages, KV reads/appends,
//!   fusable chains), and the annotations a frontend left out.
//! - [`cost`]: FLOPs/bytes per op and a roofline on device specs (presets CPU, V100, A100, H100,
//!   H200, L4).
//! - [`topology`]: devices, hosts, links, load, least-squares calibration, a version; cluster
//!   files in TOML or JSON ([`Topology::load`], example in `scheduler/examples/cluster.toml`).
//! - [`placement`]: single-device, HEFT, pipeline and heterogeneous policies.
//! - [`constraints`]: co-location by union-find, peak memory by lifetime sweep, rebalancing.
//! - [`recompute`]: recompute a cheap producer instead of shipping over a congested link.
//! - [`schedule`]: the [`ExecutionSchedule`] (stages, groups, placement, transfers, caching,
//!   recompute, makespan) with `validate`, serde and a readable `Display`.
//! - [`scheduler`]: the cached [`Scheduler`].
//! - [`dispatch`]: a lock-free ready queue (work-stealing deques + atomic dependency counters).
//! - [`synthetic`]: seeded random layered DAGs for tests and scale benchmarks.
//!
//! Everything is deterministic and free of I/O except [`Topology::load`]: the same graph,
//! topology and plan always give the same schedule.
//!
//! ```
//! use genie_scheduler::builders::{gpt2_decode, Gpt2Config};
//! use genie_scheduler::cost::DeviceSpec;
//! use genie_scheduler::topology::LinkSpec;
//! use genie_scheduler::{OptimizationPlan, Scheduler, Topology};
//!
//! let graph = gpt2_decode(&Gpt2Config::default(), 1023)?;
//! graph.validate()?;
//! assert_eq!(graph.parameter_count(), 124_439_808);
//!
//! // Four A100s joined by 25 Gb/s links.
//! let topology = Topology::uniform(4, DeviceSpec::a100(), LinkSpec::gbps(25.0, 10.0))?;
//! let mut scheduler = Scheduler::new(topology);
//! let schedule = scheduler.create_schedule(&graph, &OptimizationPlan::default())?;
//! schedule.validate(&graph)?;
//! println!("{schedule}");
//! # Ok::<(), genie_scheduler::Error>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod analysis;
pub mod builders;
pub mod constraints;
pub mod cost;
pub mod dispatch;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod graph;
pub mod placement;
pub mod recompute;
pub mod schedule;
pub mod scheduler;
pub mod synthetic;
pub mod topology;

pub use error::Error;

pub use graph::{Graph, NodeId};
pub use schedule::{ExecutionSchedule, Strategy};
pub use scheduler::{OptimizationPlan, Scheduler};
pub use topology::Topology;
