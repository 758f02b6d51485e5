//! The static cluster file: which workers exist, where they listen and what devices they own.
//!
//! ```toml
//! secret = "optional shared secret"   # peers authenticate with it at connect time
//!
//! [[workers]]
//! name = "w0"
//! address = "127.0.0.1:7100"
//! devices = ["cpu"]                    # default: ["cpu"]
//!
//! [[workers]]
//! name = "w1"
//! address = "127.0.0.1:7101"
//! ```
//!
//! Parsing never panics; every rejection names the field (`workers[1].address`).

use crate::error::{Result, RuntimeError};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A device a worker owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The host CPU (the reference kernels).
    Cpu,
    /// A CUDA GPU (needs the `cuda` feature).
    Cuda,
}

/// One worker of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerSpec {
    /// Unique name, used in errors, traces and `genie worker --name`.
    pub name: String,
    /// Address its transport endpoint listens on.
    pub address: SocketAddr,
    /// Devices it owns (default: one CPU).
    pub devices: Vec<DeviceKind>,
}

/// A parsed and checked cluster file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    /// The workers, in file order. The first one coordinates runs.
    pub workers: Vec<WorkerSpec>,
    /// Shared secret peers authenticate with (none: no authentication).
    pub secret: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    secret: Option<String>,
    workers: Vec<RawWorker>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    name: String,
    address: String,
    devices: Option<Vec<String>>,
}

impl Cluster {
    /// Reads and checks a cluster file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| RuntimeError::ClusterRead {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks cluster TOML; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let raw: RawCluster = toml::from_str(text).map_err(|e| RuntimeError::ClusterParse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let field = |field: String, reason: String| RuntimeError::ClusterField {
            path: path.to_path_buf(),
            field,
            reason,
        };
        if raw.workers.is_empty() {
            return Err(field(
                "workers".into(),
                "at least one worker is needed".into(),
            ));
        }
        if let Some(s) = &raw.secret {
            if s.is_empty() {
                return Err(field(
                    "secret".into(),
                    "must not be empty when given".into(),
                ));
            }
        }
        let mut workers: Vec<WorkerSpec> = Vec::with_capacity(raw.workers.len());
        for (i, w) in raw.workers.into_iter().enumerate() {
            if w.name.is_empty() {
                return Err(field(
                    format!("workers[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            if workers.iter().any(|o| o.name == w.name) {
                return Err(field(
                    format!("workers[{i}].name"),
                    format!("duplicate worker name `{}`", w.name),
                ));
            }
            let address: SocketAddr = w.address.parse().map_err(|e| {
                field(
                    format!("workers[{i}].address"),
                    format!("`{}` is not an ip:port address ({e})", w.address),
                )
            })?;
            if address.port() == 0 {
                return Err(field(
                    format!("workers[{i}].address"),
                    "port 0 cannot be reached by peers".into(),
                ));
            }
            if workers.iter().any(|o| o.address == address) {
                return Err(field(
                    format!("workers[{i}].address"),
                    format!("address {address} is used by another worker"),
                ));
            }
            let devices = match w.devices {
                None => vec![DeviceKind::Cpu],
                Some(list) => {
                    if list.is_empty() {
                        return Err(field(
                            format!("workers[{i}].devices"),
                            "must list at least one device".into(),
                        ));
                    }
                    let mut out = Vec::with_capacity(list.len());
                    for (j, d) in list.iter().enumerate() {
                        out.push(match d.as_str() {
                            "cpu" => DeviceKind::Cpu,
                            "cuda" => DeviceKind::Cuda,
                            other => {
                                return Err(field(
                                    format!("workers[{i}].devices[{j}]"),
                                    format!("unknown device `{other}` (expected `cpu` or `cuda`)"),
                                ))
                            }
                        });
                    }
                    out
                }
            };
            workers.push(WorkerSpec {
                name: w.name,
                address,
                devices,
            });
        }
        Ok(Self {
            workers,
            secret: raw.secret,
        })
    }

    /// A loopback cluster of `n` workers named `w0..`, on the given ports.
    pub fn loopback(ports: &[u16]) -> Self {
        Self {
            workers: ports
                .iter()
                .enumerate()
                .map(|(i, p)| WorkerSpec {
                    name: format!("w{i}"),
                    address: SocketAddr::from(([127, 0, 0, 1], *p)),
                    devices: vec![DeviceKind::Cpu],
                })
                .collect(),
            secret: None,
        }
    }

    /// Renders the cluster as TOML that [`Cluster::parse`] reads back.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        if let Some(secret) = &self.secret {
            s.push_str(&format!("secret = {secret:?}\n"));
        }
        for w in &self.workers {
            let devs: Vec<&str> = w
                .devices
                .iter()
                .map(|d| match d {
                    DeviceKind::Cpu => "\"cpu\"",
                    DeviceKind::Cuda => "\"cuda\"",
                })
                .collect();
            s.push_str(&format!(
                "\n[[workers]]\nname = {:?}\naddress = \"{}\"\ndevices = [{}]\n",
                w.name,
                w.address,
                devs.join(", ")
            ));
        }
        s
    }

    /// Index of the worker called `name`.
    pub fn index_of(&self, name: &str) -> Result<usize> {
        self.workers
            .iter()
            .position(|w| w.name == name)
            .ok_or_else(|| RuntimeError::UnknownWorker { name: name.into() })
    }

    /// Path placeholder for errors on clusters parsed from memory.
    pub fn inline_path() -> PathBuf {
        PathBuf::from("<inline>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Cluster> {
        Cluster::parse(s, Path::new("c.toml"))
    }

    #[test]
    fn parses_a_good_file_and_round_trips() {
        let c = parse(
            "secret = \"s3\"\n[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\n\
             [[workers]]\nname = \"b\"\naddress = \"127.0.0.1:7001\"\ndevices = [\"cpu\", \"cuda\"]\n",
        )
        .unwrap();
        assert_eq!(c.workers.len(), 2);
        assert_eq!(c.workers[0].devices, vec![DeviceKind::Cpu]);
        assert_eq!(
            c.workers[1].devices,
            vec![DeviceKind::Cpu, DeviceKind::Cuda]
        );
        assert_eq!(c.secret.as_deref(), Some("s3"));
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        assert_eq!(c.index_of("b").unwrap(), 1);
        assert!(matches!(
            c.index_of("z"),
            Err(RuntimeError::UnknownWorker { .. })
        ));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("[[workers]]\nname = \"a\"\naddress = \"nope\"\n", "workers[0].address"),
            (
                "[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n",
                "workers[1].name",
            ),
            (
                "[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\ndevices = [\"tpu\"]\n",
                "workers[0].devices[0]",
            ),
            ("workers = []\n", "workers"),
            ("[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\n", "workers[0].address"),
            (
                "secret = \"\"\n[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n",
                "secret",
            ),
        ];
        for (text, want) in cases {
            match parse(text) {
                Err(RuntimeError::ClusterField { field, .. }) => assert_eq!(field, want, "{text}"),
                other => panic!("{text}: expected a field error, got {other:?}"),
            }
        }
        // Missing field / unknown field: the TOML layer names it.
        let e = parse("[[workers]]\nname = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("address"), "{e}");
        let e = parse("[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nport = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
    }
}
