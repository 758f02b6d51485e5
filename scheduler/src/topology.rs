//! Cluster topology: devices on hosts, the links between them, their load, and calibration.
//!
//! A [`Topology`] is a value handed to the scheduler (no global state). Every change — load,
//! calibration, an edited link — bumps [`Topology::version`], which is part of the schedule
//! cache key, so schedules made for an older network are not reused.
//!
//! Transfer time over a link is `latency + bytes / bandwidth + queueing`, where queueing is the
//! time to drain the bytes already outstanding on that link (`outstanding / bandwidth`).
//! Pairs without an explicit link use the default intra-host or inter-host link.
//!
//! # Cluster files
//!
//! [`Topology::load`] reads a cluster description in TOML (`.toml`) or JSON (`.json`); see
//! [`ClusterSpec`] and `scheduler/examples/cluster.toml`:
//!
//! ```toml
//! [defaults]                    # links between pairs not listed below
//! intra_host = { bandwidth_gbps = 600.0, latency_us = 2.0 }   # e.g. NVLink
//! inter_host = { bandwidth_gbps = 25.0, latency_us = 10.0 }   # e.g. 25 Gb/s RoCE
//!
//! [[devices]]
//! name = "gpu0"
//! host = "node-a"
//! preset = "a100"               # cpu | v100 | a100 | h100 | h200 | l4
//!
//! [[devices]]
//! name = "gpu1"
//! host = "node-b"
//! preset = "l4"
//! memory_gib = 16.0             # optional overrides: peak_tflops, mem_bandwidth_gbps, memory_gib
//!
//! [[links]]
//! a = "gpu0"
//! b = "gpu1"
//! bandwidth_gbps = 100.0        # gigabits per second
//! latency_us = 5.0
//! ```

use crate::cost::DeviceSpec;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Index of a device in [`Topology::devices`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct DeviceId(pub u32);

impl DeviceId {
    /// As an index.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "d{}", self.0)
    }
}

/// A device of the cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Its index.
    pub id: DeviceId,
    /// Unique name (e.g. `gpu0`).
    pub name: String,
    /// Host it sits in.
    pub host: String,
    /// Performance and capacity.
    pub spec: DeviceSpec,
}

/// Bandwidth and latency of a link.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkSpec {
    /// Bytes per second.
    pub bandwidth: f64,
    /// Seconds per transfer.
    pub latency: f64,
}

impl LinkSpec {
    /// A link of `gbps` gigabits per second and `latency_us` microseconds.
    pub fn gbps(gbps: f64, latency_us: f64) -> Self {
        Self {
            bandwidth: gbps * 1e9 / 8.0,
            latency: latency_us * 1e-6,
        }
    }

    /// `latency + bytes / bandwidth`.
    pub fn time(&self, bytes: u64) -> f64 {
        self.latency + bytes as f64 / self.bandwidth.max(1.0)
    }
}

/// A link between two devices, with its current outstanding load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// One end.
    pub a: DeviceId,
    /// Other end (links are symmetric).
    pub b: DeviceId,
    /// Bandwidth and latency.
    pub spec: LinkSpec,
    /// Bytes queued on the link right now.
    pub outstanding_bytes: u64,
}

/// Result of fitting a link to measured transfers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calibration {
    /// The fitted link.
    pub spec: LinkSpec,
    /// Root-mean-square residual of the fit, seconds.
    pub rms_error: f64,
    /// The topology version after the update.
    pub version: u64,
}

/// Errors of topology construction, loading and calibration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// Reading a cluster file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A cluster file is not valid TOML/JSON or does not match [`ClusterSpec`].
    #[error("parsing {path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        reason: String,
    },
    /// The file extension is neither `.toml` nor `.json`.
    #[error("{path}: cluster files must end in .toml or .json")]
    UnknownFormat {
        /// The file.
        path: String,
    },
    /// A device preset name is not known.
    #[error("device `{device}`: unknown preset `{preset}` (cpu, v100, a100, h100, h200, l4)")]
    UnknownPreset {
        /// The device.
        device: String,
        /// The preset asked for.
        preset: String,
    },
    /// A name is used twice or a link names a device that does not exist.
    #[error("device name `{name}`: {reason}")]
    BadDeviceName {
        /// The name.
        name: String,
        /// Duplicate or unknown.
        reason: &'static str,
    },
    /// A device id is out of range.
    #[error("no device {0}")]
    NoDevice(DeviceId),
    /// A numeric value is out of range (non-positive bandwidth, negative latency, ...).
    #[error("invalid value: {reason}")]
    InvalidValue {
        /// What is wrong.
        reason: String,
    },
    /// Calibration needs at least two samples of different sizes and a positive slope.
    #[error("calibration of {a}-{b}: {reason}")]
    Calibration {
        /// One end.
        a: DeviceId,
        /// Other end.
        b: DeviceId,
        /// Why the fit failed.
        reason: &'static str,
    },
    /// The cluster has no device.
    #[error("a topology needs at least one device")]
    Empty,
}

/// Devices and links of a cluster. See the [module docs](self); files are [`ClusterSpec`]s.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    devices: Vec<Device>,
    links: Vec<Link>,
    intra_host: LinkSpec,
    inter_host: LinkSpec,
    /// `pair[a * n + b]`: index into `links` + 1, or 0 for the default link.
    pair: Vec<u32>,
    /// `dense[a * n + b]`: (latency, 1 / bandwidth, queueing delay) of the effective link, kept
    /// in step with every change so [`Topology::transfer_time`] is one lookup.
    dense: Vec<[f64; 3]>,
    version: u64,
}

impl Topology {
    /// Devices with default links only (`intra_host` between devices on one host, `inter_host`
    /// otherwise).
    pub fn new(
        devices: Vec<(String, String, DeviceSpec)>,
        intra_host: LinkSpec,
        inter_host: LinkSpec,
    ) -> Result<Self, TopologyError> {
        if devices.is_empty() {
            return Err(TopologyError::Empty);
        }
        for l in [intra_host, inter_host] {
            check_link(&l)?;
        }
        let mut out = Vec::with_capacity(devices.len());
        for (i, (name, host, spec)) in devices.into_iter().enumerate() {
            if out.iter().any(|d: &Device| d.name == name) {
                return Err(TopologyError::BadDeviceName {
                    name,
                    reason: "used twice",
                });
            }
            if !(spec.peak_flops > 0.0 && spec.mem_bandwidth > 0.0 && spec.utilization > 0.0) {
                return Err(TopologyError::InvalidValue {
                    reason: format!("device {name}: rates must be positive"),
                });
            }
            out.push(Device {
                id: DeviceId(i as u32),
                name,
                host,
                spec,
            });
        }
        let n = out.len();
        let mut t = Self {
            devices: out,
            links: Vec::new(),
            intra_host,
            inter_host,
            pair: vec![0; n * n],
            dense: Vec::new(),
            version: 1,
        };
        t.rebuild_dense();
        Ok(t)
    }

    fn rebuild_dense(&mut self) {
        let n = self.devices.len();
        let mut dense = Vec::with_capacity(n * n);
        for a in 0..n as u32 {
            for b in 0..n as u32 {
                let (a, b) = (DeviceId(a), DeviceId(b));
                let l = self.link(a, b);
                let q = self.outstanding(a, b) as f64 / l.bandwidth.max(1.0);
                dense.push([l.latency, 1.0 / l.bandwidth.max(1.0), q]);
            }
        }
        self.dense = dense;
    }

    /// `n` identical devices, each on its own host, joined by `link`.
    pub fn uniform(n: usize, spec: DeviceSpec, link: LinkSpec) -> Result<Self, TopologyError> {
        Self::new(
            (0..n)
                .map(|i| (format!("dev{i}"), format!("host{i}"), spec.clone()))
                .collect(),
            link,
            link,
        )
    }

    /// Adds or replaces the link between `a` and `b`; bumps the version.
    pub fn set_link(
        &mut self,
        a: DeviceId,
        b: DeviceId,
        spec: LinkSpec,
    ) -> Result<(), TopologyError> {
        check_link(&spec)?;
        let n = self.devices.len();
        for d in [a, b] {
            if d.index() >= n {
                return Err(TopologyError::NoDevice(d));
            }
        }
        let slot = self.pair[a.index() * n + b.index()];
        if slot > 0 {
            self.links[slot as usize - 1].spec = spec;
        } else {
            self.links.push(Link {
                a,
                b,
                spec,
                outstanding_bytes: 0,
            });
            let idx = self.links.len() as u32;
            self.pair[a.index() * n + b.index()] = idx;
            self.pair[b.index() * n + a.index()] = idx;
        }
        self.rebuild_dense();
        self.version += 1;
        Ok(())
    }

    /// All devices, indexed by [`DeviceId`].
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Explicit links.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether there is no device (never true for a constructed topology).
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The device with `id`.
    pub fn device(&self, id: DeviceId) -> Option<&Device> {
        self.devices.get(id.index())
    }

    /// The device called `name`.
    pub fn device_by_name(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// Changes whenever the topology changes.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn link_index(&self, a: DeviceId, b: DeviceId) -> Option<usize> {
        let n = self.devices.len();
        match self.pair.get(a.index() * n + b.index()) {
            Some(&s) if s > 0 => Some(s as usize - 1),
            _ => None,
        }
    }

    /// The link spec between two distinct devices (explicit or default).
    pub fn link(&self, a: DeviceId, b: DeviceId) -> LinkSpec {
        if let Some(i) = self.link_index(a, b) {
            return self.links[i].spec;
        }
        match (self.devices.get(a.index()), self.devices.get(b.index())) {
            (Some(x), Some(y)) if x.host == y.host => self.intra_host,
            _ => self.inter_host,
        }
    }

    /// Bytes outstanding between `a` and `b` (0 for default links).
    pub fn outstanding(&self, a: DeviceId, b: DeviceId) -> u64 {
        self.link_index(a, b)
            .map_or(0, |i| self.links[i].outstanding_bytes)
    }

    /// Time a transfer of `bytes` from `a` to `b` waits behind the outstanding load.
    pub fn queueing_delay(&self, a: DeviceId, b: DeviceId) -> f64 {
        if a == b {
            return 0.0;
        }
        self.outstanding(a, b) as f64 / self.link(a, b).bandwidth.max(1.0)
    }

    /// Predicted seconds to move `bytes` from `a` to `b`: 0 on one device, else latency +
    /// size / bandwidth + queueing.
    #[inline]
    pub fn transfer_time(&self, a: DeviceId, b: DeviceId, bytes: u64) -> f64 {
        if a == b {
            return 0.0;
        }
        let n = self.devices.len();
        match self.dense.get(a.index() * n + b.index()) {
            Some(&[lat, inv_bw, queue]) => lat + bytes as f64 * inv_bw + queue,
            None => self.link(a, b).time(bytes) + self.queueing_delay(a, b),
        }
    }

    /// Sets the bytes currently queued between `a` and `b` (making the link explicit if it was a
    /// default one); bumps the version.
    pub fn set_outstanding(
        &mut self,
        a: DeviceId,
        b: DeviceId,
        bytes: u64,
    ) -> Result<(), TopologyError> {
        if self.link_index(a, b).is_none() {
            let spec = self.link(a, b);
            self.set_link(a, b, spec)?;
        }
        if let Some(i) = self.link_index(a, b) {
            self.links[i].outstanding_bytes = bytes;
        }
        self.rebuild_dense();
        self.version += 1;
        Ok(())
    }

    /// Fits `seconds = latency + bytes / bandwidth` to measured `(bytes, seconds)` samples by
    /// least squares, installs the fitted link between `a` and `b` and bumps the version.
    pub fn calibrate(
        &mut self,
        a: DeviceId,
        b: DeviceId,
        samples: &[(u64, f64)],
    ) -> Result<Calibration, TopologyError> {
        let err = |reason| TopologyError::Calibration { a, b, reason };
        if samples.len() < 2 {
            return Err(err("need at least two samples"));
        }
        let n = samples.len() as f64;
        let mx = samples.iter().map(|s| s.0 as f64).sum::<f64>() / n;
        let my = samples.iter().map(|s| s.1).sum::<f64>() / n;
        let sxx: f64 = samples.iter().map(|s| (s.0 as f64 - mx).powi(2)).sum();
        let sxy: f64 = samples.iter().map(|s| (s.0 as f64 - mx) * (s.1 - my)).sum();
        if sxx <= 0.0 || !sxx.is_finite() {
            return Err(err("samples need at least two different sizes"));
        }
        let slope = sxy / sxx;
        if slope.is_nan() || slope <= 0.0 || !slope.is_finite() {
            return Err(err("time does not grow with size"));
        }
        let latency = (my - slope * mx).max(0.0);
        let spec = LinkSpec {
            bandwidth: 1.0 / slope,
            latency,
        };
        let rms = (samples
            .iter()
            .map(|s| (spec.time(s.0) - s.1).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        self.set_link(a, b, spec)?;
        Ok(Calibration {
            spec,
            rms_error: rms,
            version: self.version,
        })
    }

    /// Builds a topology from a parsed cluster description.
    pub fn from_spec(spec: &ClusterSpec) -> Result<Self, TopologyError> {
        let mut devices = Vec::with_capacity(spec.devices.len());
        for d in &spec.devices {
            let mut s = match &d.preset {
                Some(p) => DeviceSpec::by_name(p).ok_or_else(|| TopologyError::UnknownPreset {
                    device: d.name.clone(),
                    preset: p.clone(),
                })?,
                None => DeviceSpec::cpu(),
            };
            if let Some(t) = d.peak_tflops {
                s.peak_flops = t * 1e12;
            }
            if let Some(bw) = d.mem_bandwidth_gbps {
                s.mem_bandwidth = bw * 1e9;
            }
            if let Some(m) = d.memory_gib {
                if m.is_nan() || m < 0.0 || !m.is_finite() {
                    return Err(TopologyError::InvalidValue {
                        reason: format!("device {}: memory_gib {m}", d.name),
                    });
                }
                s.memory = (m * (1u64 << 30) as f64) as u64;
            }
            if let Some(u) = d.utilization {
                s.utilization = u;
            }
            if let Some(c) = d.cost_per_hour {
                s.cost_per_hour = c;
            }
            devices.push((d.name.clone(), d.host.clone(), s));
        }
        let dl = &spec.defaults;
        let mut t = Self::new(devices, dl.intra_host.to_spec(), dl.inter_host.to_spec())?;
        for l in &spec.links {
            let find = |name: &str| {
                t.device_by_name(name)
                    .map(|d| d.id)
                    .ok_or_else(|| TopologyError::BadDeviceName {
                        name: name.to_owned(),
                        reason: "link names an unknown device",
                    })
            };
            let (a, b) = (find(&l.a)?, find(&l.b)?);
            t.set_link(a, b, LinkSpec::gbps(l.bandwidth_gbps, l.latency_us))?;
        }
        t.version = 1;
        Ok(t)
    }

    /// Parses a TOML cluster description.
    pub fn from_toml_str(text: &str) -> Result<Self, TopologyError> {
        let spec: ClusterSpec = toml::from_str(text).map_err(|e| TopologyError::Parse {
            path: "<toml>".into(),
            reason: e.to_string(),
        })?;
        Self::from_spec(&spec)
    }

    /// Parses a JSON cluster description.
    pub fn from_json_str(text: &str) -> Result<Self, TopologyError> {
        let spec: ClusterSpec = serde_json::from_str(text).map_err(|e| TopologyError::Parse {
            path: "<json>".into(),
            reason: e.to_string(),
        })?;
        Self::from_spec(&spec)
    }

    /// Loads a cluster file, TOML or JSON by its extension (`.toml`, `.json`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TopologyError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Io {
            path: shown.clone(),
            source,
        })?;
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let with_path = |e: TopologyError| match e {
            TopologyError::Parse { reason, .. } => TopologyError::Parse {
                path: shown.clone(),
                reason,
            },
            other => other,
        };
        match ext.as_deref() {
            Some("toml") => Self::from_toml_str(&text).map_err(with_path),
            Some("json") => Self::from_json_str(&text).map_err(with_path),
            _ => Err(TopologyError::UnknownFormat { path: shown }),
        }
    }
}

fn check_link(l: &LinkSpec) -> Result<(), TopologyError> {
    if l.bandwidth > 0.0 && l.bandwidth.is_finite() && l.latency >= 0.0 && l.latency.is_finite() {
        Ok(())
    } else {
        Err(TopologyError::InvalidValue {
            reason: format!(
                "link bandwidth {} B/s, latency {} s",
                l.bandwidth, l.latency
            ),
        })
    }
}

/// A cluster file (TOML or JSON). See the [module docs](self) for an example.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Default links (optional).
    #[serde(default)]
    pub defaults: DefaultLinks,
    /// Devices, at least one.
    pub devices: Vec<DeviceEntry>,
    /// Explicit links (optional).
    #[serde(default)]
    pub links: Vec<LinkEntry>,
}

/// Default links of a [`ClusterSpec`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultLinks {
    /// Between devices of one host (default 600 Gb/s, 2 µs).
    pub intra_host: LinkEntrySpec,
    /// Between hosts (default 25 Gb/s, 10 µs).
    pub inter_host: LinkEntrySpec,
}

impl Default for DefaultLinks {
    fn default() -> Self {
        Self {
            intra_host: LinkEntrySpec {
                bandwidth_gbps: 600.0,
                latency_us: 2.0,
            },
            inter_host: LinkEntrySpec {
                bandwidth_gbps: 25.0,
                latency_us: 10.0,
            },
        }
    }
}

/// A link in file units.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkEntrySpec {
    /// Gigabits per second.
    pub bandwidth_gbps: f64,
    /// Microseconds.
    pub latency_us: f64,
}

impl LinkEntrySpec {
    fn to_spec(self) -> LinkSpec {
        LinkSpec::gbps(self.bandwidth_gbps, self.latency_us)
    }
}

/// A device of a [`ClusterSpec`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// Unique name.
    pub name: String,
    /// Host name (devices on one host use the intra-host default link).
    pub host: String,
    /// Preset (`cpu`, `v100`, `a100`, `h100`, `h200`, `l4`); default `cpu`.
    #[serde(default)]
    pub preset: Option<String>,
    /// Override: peak TFLOP/s.
    #[serde(default)]
    pub peak_tflops: Option<f64>,
    /// Override: memory bandwidth, GB/s.
    #[serde(default)]
    pub mem_bandwidth_gbps: Option<f64>,
    /// Override: memory, GiB.
    #[serde(default)]
    pub memory_gib: Option<f64>,
    /// Override: fraction of peak reached.
    #[serde(default)]
    pub utilization: Option<f64>,
    /// Override: relative price per hour.
    #[serde(default)]
    pub cost_per_hour: Option<f64>,
}

/// An explicit link of a [`ClusterSpec`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkEntry {
    /// Device name.
    pub a: String,
    /// Device name.
    pub b: String,
    /// Gigabits per second.
    pub bandwidth_gbps: f64,
    /// Microseconds.
    pub latency_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_recovers_latency_and_bandwidth() {
        let mut t = Topology::uniform(2, DeviceSpec::a100(), LinkSpec::gbps(25.0, 10.0)).unwrap();
        let v0 = t.version();
        let truth = LinkSpec::gbps(80.0, 7.0);
        let samples: Vec<(u64, f64)> = [4096u64, 65536, 1 << 20, 16 << 20]
            .iter()
            .map(|&b| (b, truth.time(b)))
            .collect();
        let c = t.calibrate(DeviceId(0), DeviceId(1), &samples).unwrap();
        assert!((c.spec.bandwidth / truth.bandwidth - 1.0).abs() < 1e-9);
        assert!((c.spec.latency - truth.latency).abs() < 1e-12);
        assert!(c.version > v0);
        assert_eq!(t.link(DeviceId(1), DeviceId(0)), c.spec);
        assert!(matches!(
            t.calibrate(DeviceId(0), DeviceId(1), &[(10, 1.0), (10, 2.0)]),
            Err(TopologyError::Calibration { .. })
        ));
    }

    #[test]
    fn queueing_raises_transfer_time_and_version() {
        let mut t = Topology::uniform(2, DeviceSpec::a100(), LinkSpec::gbps(25.0, 10.0)).unwrap();
        let idle = t.transfer_time(DeviceId(0), DeviceId(1), 1 << 20);
        let v = t.version();
        t.set_outstanding(DeviceId(0), DeviceId(1), 100 << 20)
            .unwrap();
        assert!(t.version() > v);
        assert!(t.transfer_time(DeviceId(0), DeviceId(1), 1 << 20) > idle * 10.0);
        assert_eq!(t.transfer_time(DeviceId(1), DeviceId(1), 1 << 20), 0.0);
    }

    #[test]
    fn example_cluster_file_loads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/cluster.toml");
        let t = Topology::load(path).unwrap();
        assert!(t.len() >= 2);
        let json = serde_json::to_string(&ClusterSpec {
            defaults: DefaultLinks::default(),
            devices: vec![DeviceEntry {
                name: "x".into(),
                host: "h".into(),
                preset: Some("h100".into()),
                peak_tflops: None,
                mem_bandwidth_gbps: None,
                memory_gib: Some(1.0),
                utilization: None,
                cost_per_hour: None,
            }],
            links: vec![],
        })
        .unwrap();
        let t = Topology::from_json_str(&json).unwrap();
        assert_eq!(t.devices()[0].spec.memory, 1 << 30);
        assert!(matches!(
            Topology::from_toml_str("[[devices]]\nname='a'\nhost='h'\npreset='tpu'\n"),
            Err(TopologyError::UnknownPreset { .. })
        ));
        assert!(matches!(
            Topology::load("/nonexistent/c.yaml"),
            Err(TopologyError::Io { .. })
        ));
    }
}
