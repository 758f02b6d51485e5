//! `genie-runtime`: runs a scheduled graph across workers connected by the transport.
//!
//! - [`cluster`]: the static cluster file (`genie worker --cluster FILE`).
//! - `membership` (cargo feature `etcd`): workers register in etcd under a lease, drivers list
//!   them into a [`Cluster`](cluster::Cluster) and watch joins and leaves (`genie worker --etcd`).
//! - [`store`]: a worker's tensors (persistent weights, pinned KV caches, ephemeral activations).
//! - [`kv`]: the paged KV-cache manager.
//! - [`limits`]: what a driver may make a worker allocate or open (memory budget, checked
//!   sizes, the model directory).
//! - [`kernels`]: the [`Kernels`](kernels::Kernels) trait and the reference CPU backend.
//! - [`weights`]: seeded or safetensors weights.
//! - [`trace`]: timeline, counters, Chrome/Perfetto trace export.
//! - [`plan`]: placements (the scheduler's, [`Placement::scheduled`](plan::Placement::scheduled),
//!   as the engine and `genie` run them; hand-made ones as baselines and for tests) and the
//!   per-run execution plan (transfers, region offsets, lifetimes).
//! - [`cache`]: graphs, placements and plans kept across runs (a graph crosses the network once;
//!   later runs name it and the tensors that changed shape).
//! - [`worker`] / [`driver`]: the executor. Workers are threads ([`driver::EmbeddedCluster`])
//!   or `genie worker` processes; the [`driver::Driver`] hands them runs over the transport.
//!   A worker's concerns (peer mesh, region negotiation, notifications, execution, KV glue)
//!   are its submodules.
//! - [`control`]: the control messages driver and workers exchange (endpoint configuration,
//!   send/receive with the peer named in failures, connecting while a peer starts).
//! - [`models`]: the model families (one module each), generation, checkpoints and tokenizers.
//! - [`engine`]: the serving engine (many concurrent requests on one driver).
//! - [`feedback`]: calibration of the scheduler's cost model from measured spans.
//!
//! The `genie` command line (`src/main.rs`) and its own modules (`src/cli/`: the `genie demo`
//! experiment) are not part of this library.
//!
//! # Example
//!
//! GPT-2 (a small configuration) prefilled and decoded across two workers that talk TCP on
//! loopback, giving the same tokens as one worker:
//!
//! ```
//! use genie_runtime::driver::{Driver, EmbeddedCluster};
//! use genie_runtime::kernels::CpuKernels;
//! use genie_runtime::models::{generate, prompt};
//! use genie_runtime::plan::Placement;
//! use genie_runtime::proto::WeightSpec;
//! use genie_scheduler::builders::Gpt2Config;
//! use std::sync::Arc;
//!
//! # fn main() -> genie_runtime::Result<()> {
//! let cfg = Gpt2Config { layers: 2, hidden: 64, heads: 2, vocab: 256, context: 64, ..Gpt2Config::default() };
//! let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new()))?;
//! let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(1))?;
//! let p = prompt(8, cfg.vocab);
//! let one = |g: &_| Ok(Placement::single(g));
//! let two = |g: &_| Placement::by_layer(g, 2, cfg.layers);
//! let a = generate(&mut driver, &cfg, &p, 4, 0, one, one)?;
//! let b = generate(&mut driver, &cfg, &p, 4, 1, two, two)?;
//! assert_eq!(a.tokens, b.tokens);
//! assert!(b.prefill.counters.bytes_moved > 0);
//! cluster.stop(driver)?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod cluster;
pub mod control;
pub mod driver;
pub mod engine;
pub mod error;
pub mod feedback;
pub mod kernels;
pub mod kv;
pub mod limits;
#[cfg(feature = "etcd")]
pub mod membership;
pub mod models;
pub mod plan;
pub mod proto;
pub mod store;
pub mod trace;
pub mod weights;
pub mod worker;

pub use error::{Result, RuntimeError};
