//! `genie-scheduler`: turns an annotated model graph into an execution schedule.
//!
//! ```
//! use genie_scheduler::builders::{gpt2_decode, Gpt2Config};
//!
//! let graph = gpt2_decode(&Gpt2Config::default(), 1023)?;
//! graph.validate()?;
//! assert_eq!(graph.parameter_count(), 124_439_808);
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
