//! The crate's error type.

use crate::graph::GraphError;
use crate::schedule::ScheduleError;
use crate::topology::{DeviceId, TopologyError};

/// Everything that can go wrong in the scheduler, split by cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The graph is malformed (the variant names the node).
    #[error("invalid graph: {0}")]
    Graph(#[from] GraphError),
    /// A graph or schedule could not be (de)serialized as JSON.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A builder got an unknown model name.
    #[error("unknown model `{name}` (known: {known})")]
    UnknownModel {
        /// What was asked for.
        name: String,
        /// What exists.
        known: String,
    },
    /// A builder or configuration value is out of range.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// The topology could not be built, loaded or calibrated.
    #[error("topology: {0}")]
    Topology(#[from] TopologyError),
    /// A schedule does not fit its graph.
    #[error("invalid schedule: {0}")]
    Schedule(#[from] ScheduleError),
    /// The plan names a device the topology lacks.
    #[error("plan names unknown device `{name}`")]
    UnknownDevice {
        /// The name.
        name: String,
    },
    /// The plan names a node the graph lacks.
    #[error("plan names unknown node `{name}`")]
    UnknownNode {
        /// The name.
        name: String,
    },
    /// The plan allows no device.
    #[error("the plan allows no device")]
    NoDevices,
    /// No placement keeps every device within its memory.
    #[error(
        "does not fit: device {device_name} ({device}) needs {peak_bytes} bytes at peak but has \
         {capacity_bytes}; all devices together need {total_peak_bytes} of {total_capacity_bytes}"
    )]
    OutOfMemory {
        /// The device that stays over capacity.
        device: DeviceId,
        /// Its name.
        device_name: String,
        /// Its predicted peak.
        peak_bytes: u64,
        /// Its capacity (after any plan cap).
        capacity_bytes: u64,
        /// Sum of all devices' peaks.
        total_peak_bytes: u64,
        /// Sum of the allowed devices' capacities.
        total_capacity_bytes: u64,
    },
}
