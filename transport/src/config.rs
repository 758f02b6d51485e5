//! Endpoint configuration: which backend, where to listen, limits and timeouts.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

/// A transport backend that actually moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Backend {
    /// TCP sockets driven by a mio event loop (always available).
    Tcp,
    /// RDMA reliable-connected queue pairs (cargo feature `rdma`, needs a verbs device).
    Rdma,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Tcp => "tcp",
            Backend::Rdma => "rdma",
        })
    }
}

/// Which backend [`crate::open`] should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// RDMA when the `rdma` feature is built in and a usable device exists, else TCP (default).
    #[default]
    Auto,
    /// TCP, always.
    Tcp,
    /// RDMA, or an error ([`crate::TransportError::BackendUnavailable`]) when it cannot be used.
    Rdma,
}

/// How completions and the progress engine wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PollMode {
    /// Threads sleep in the kernel until there is work (default; kind to shared CPUs).
    #[default]
    Blocking,
    /// The progress thread and [`crate::Op::wait`] spin instead of sleeping: lowest latency,
    /// costs one busy core per endpoint plus the waiting thread.
    BusyPoll,
}

/// Configuration of one endpoint. Every field has a default (see [`TransportConfig::default`]),
/// so a config file only needs the fields it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Backend to use. Default: [`BackendChoice::Auto`].
    pub backend: BackendChoice,
    /// Address the endpoint listens on for incoming connections. Default `127.0.0.1:0`
    /// (an ephemeral port on loopback; read it back with [`crate::Transport::local_addr`]).
    pub listen: SocketAddr,
    /// Shared secret. When set, both sides of every connection must prove they know it
    /// (HMAC-SHA256 challenge-response); a peer without it is refused. Default: none.
    pub secret: Option<String>,
    /// A peer that sends nothing (not even a heartbeat) for this long is declared dead and every
    /// pending operation on that connection fails. Also bounds connect and handshake. Default 2 s.
    #[serde(with = "duration_ms")]
    pub peer_timeout: Duration,
    /// Largest two-sided message ([`crate::Connection::send`]) in bytes. Default 64 KiB.
    pub max_message_size: usize,
    /// Spin or sleep while waiting. Default [`PollMode::Blocking`].
    pub poll_mode: PollMode,
    /// Messages and notifications one connection queues for the application (not yet taken with
    /// `recv`/`recv_notification`) before it stops taking more from the peer, which is then held
    /// by flow control (back-pressure, never growth): TCP stops reading the socket; RDMA withholds
    /// the receive credits of what arrives past it until the application takes it, so the
    /// peer's sends wait. Default 4096.
    pub max_inbound_queue: usize,
    /// Bytes of queued messages per connection before the same back-pressure (one message of up
    /// to `max_message_size` may overshoot it). Default 64 MiB.
    pub max_inbound_bytes: usize,
    /// Settings only the TCP backend reads.
    pub tcp: TcpConfig,
    /// Settings only the RDMA backend reads.
    pub rdma: RdmaConfig,
}

/// Settings only the TCP backend reads ([`TransportConfig::tcp`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TcpConfig {
    /// TCP streams per peer connection, 1 to [`TcpConfig::MAX_STREAMS`]; anything else is refused
    /// by [`crate::open`] with [`crate::TransportError::InvalidArgument`]. Default 1. With more,
    /// large one-sided transfers are striped over the streams and the two ends use the smaller
    /// of their two settings (see [`crate::tcp`]).
    pub streams: usize,
}

impl TcpConfig {
    /// Most TCP streams one connection may use.
    pub const MAX_STREAMS: usize = 8;
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self { streams: 1 }
    }
}

/// Settings only the RDMA backend reads ([`TransportConfig::rdma`]); the same choices as
/// perftest's `-d`, `-i` and `-x` (see [`genie_sys::addressing`] for how the GID is picked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RdmaConfig {
    /// RDMA device name (e.g. `rxe0`, `mlx5_0`); `None` takes `GENIE_RDMA_DEVICE` when set, else
    /// the first usable device. Default none.
    pub device: Option<String>,
    /// Port of the device (from 1). Default 1.
    pub port: u8,
    /// GID table index to use; `None` picks one: on RoCE a RoCE v2 GID, IPv4-mapped preferred;
    /// on InfiniBand none (LID routing). Given, it must hold a GID, and on InfiniBand it makes
    /// every packet carry a GRH. Default none.
    pub gid_index: Option<u8>,
    /// Queue pairs ("lanes") per connection, 1 to [`RdmaConfig::MAX_QPS`]; anything else is
    /// refused by [`crate::open`] with [`crate::TransportError::InvalidArgument`]. Default 1.
    /// With more, transfers of at least 256 KiB are striped over the lanes, and the two ends use
    /// the smaller of their two settings (the RDMA backend's module docs, "Lanes"). The first
    /// lane carries messages and notifications as with one QP; one posted after a striped
    /// transfer waits until every part has landed.
    pub qps: usize,
    /// Further RDMA devices (NICs) of this host, by name, that a connection's lanes spread over:
    /// the lanes go round [`RdmaConfig::device`] and these, the first lane always on `device`,
    /// the others in the order of NUMA affinity (devices on the opening thread's node first) where
    /// the kernel says. Each must use port [`RdmaConfig::port`]; a name that is no usable device
    /// fails [`crate::open`]. Needs `qps` of at least 2 to be used. Default none.
    pub devices: Vec<String>,
}

impl RdmaConfig {
    /// Most queue pairs one connection may use.
    pub const MAX_QPS: usize = 8;

    /// Checks `qps` and `devices` (a typed refusal rather than a surprise at connect time).
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=Self::MAX_QPS).contains(&self.qps) {
            return Err(format!(
                "rdma.qps = {}: must be 1 to {}",
                self.qps,
                Self::MAX_QPS
            ));
        }
        if !self.devices.is_empty() && self.qps < 2 {
            return Err(format!(
                "rdma.devices lists {} further device(s) but rdma.qps is {}: lanes spread over \
                 devices, so set qps to at least 2",
                self.devices.len(),
                self.qps
            ));
        }
        if self.devices.len() >= Self::MAX_QPS {
            return Err(format!(
                "rdma.devices lists {} devices: at most {}",
                self.devices.len(),
                Self::MAX_QPS - 1
            ));
        }
        for (i, d) in self.devices.iter().enumerate() {
            if d.is_empty() || self.devices[..i].contains(d) || self.device.as_ref() == Some(d) {
                return Err(format!(
                    "rdma.devices: {d:?} is empty or named twice (rdma.device included)"
                ));
            }
        }
        Ok(())
    }
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            device: None,
            port: 1,
            gid_index: None,
            qps: 1,
            devices: Vec::new(),
        }
    }
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Auto,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret: None,
            peer_timeout: Duration::from_secs(2),
            max_message_size: 64 * 1024,
            poll_mode: PollMode::Blocking,
            max_inbound_queue: 4096,
            max_inbound_bytes: 64 << 20,
            tcp: TcpConfig::default(),
            rdma: RdmaConfig::default(),
        }
    }
}

impl TransportConfig {
    /// The default configuration with the TCP backend forced.
    pub fn tcp() -> Self {
        Self {
            backend: BackendChoice::Tcp,
            ..Self::default()
        }
    }
}

mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdma_lanes_are_validated() {
        let ok = |qps, devices: &[&str]| {
            RdmaConfig {
                qps,
                devices: devices.iter().map(|s| s.to_string()).collect(),
                device: Some("rxe0".into()),
                ..RdmaConfig::default()
            }
            .validate()
        };
        assert!(ok(1, &[]).is_ok());
        assert!(ok(8, &["rxe1", "rxe2"]).is_ok());
        assert!(ok(0, &[]).unwrap_err().contains("rdma.qps = 0"));
        assert!(ok(9, &[]).unwrap_err().contains("must be 1 to 8"));
        assert!(ok(1, &["rxe1"]).unwrap_err().contains("at least 2"));
        assert!(ok(2, &["rxe1", "rxe1"]).unwrap_err().contains("twice"));
        assert!(ok(2, &["rxe0"]).unwrap_err().contains("twice"));
        assert!(ok(2, &[""]).is_err());
    }

    #[test]
    fn partial_json_keeps_defaults() {
        let c: TransportConfig =
            serde_json::from_str(r#"{"backend":"tcp","peer_timeout":500}"#).unwrap();
        assert_eq!(c.backend, BackendChoice::Tcp);
        assert_eq!(c.peer_timeout, Duration::from_millis(500));
        assert_eq!(c.max_message_size, 64 * 1024);
        let back: TransportConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn backend_settings_are_grouped() {
        let c: TransportConfig =
            serde_json::from_str(r#"{"rdma":{"device":"rxe0"},"tcp":{"streams":1}}"#).unwrap();
        assert_eq!(c.rdma.device.as_deref(), Some("rxe0"));
        assert_eq!((c.rdma.port, c.rdma.gid_index), (1, None));
        assert_eq!(c.tcp, TcpConfig::default());
        let c: TransportConfig =
            serde_json::from_str(r#"{"rdma":{"device":"mlx5_1","port":2,"gid_index":3}}"#).unwrap();
        assert_eq!((c.rdma.port, c.rdma.gid_index), (2, Some(3)));
        assert_eq!((c.rdma.qps, c.rdma.devices.len()), (1, 0));
        let c: TransportConfig =
            serde_json::from_str(r#"{"rdma":{"qps":4,"devices":["rxe1"]}}"#).unwrap();
        assert_eq!(
            (c.rdma.qps, c.rdma.devices.as_slice()),
            (4, &["rxe1".to_string()][..])
        );
        // The flat names of before are unknown fields, not silently ignored.
        assert!(serde_json::from_str::<TransportConfig>(r#"{"rdma_device":"rxe0"}"#).is_err());
    }
}
