//! `genie-transport`: moves bytes between machines through one interface, whatever the backend.
//!
//! # Model
//!
//! - An **endpoint** ([`Transport`], made by [`open`]) owns registered memory regions, listens for
//!   peers and runs its backend's progress engine (for TCP: one thread on a mio event loop).
//! - A **region** ([`Region`]) is memory the endpoint registered: page-aligned memory it allocated
//!   ([`Transport::alloc_region`]), a caller's `Vec<u8>` ([`Transport::register`]) or memory
//!   owned elsewhere, without a copy ([`Transport::register_shared`]). Its
//!   [`RemoteRegion`] descriptor (endpoint, region id, length, access key, address) is serializable;
//!   send it to a peer so that it can access the region one-sidedly.
//! - A **connection** ([`Connection`], from [`Transport::connect`] / [`Transport::accept`]) carries
//!   one-sided [`write`](Connection::write)s and [`read`](Connection::read)s between a local region
//!   and a remote descriptor, writes with a 32-bit notification
//!   ([`write_notify`](Connection::write_notify), delivered to the target's per-connection queue
//!   after the data has landed, in order), small two-sided messages ([`send`](Connection::send) /
//!   [`recv`](Connection::recv)), and batches ([`post_batch`](Connection::post_batch)).
//! - Every operation returns a completion handle ([`Op`], or [`Batch`] for a batch) that can be
//!   polled, spun on (lowest latency) or waited on with a timeout; see [`completion`].
//!
//! # Access control
//!
//! Peers authenticate at connect time with the shared secret ([`auth`]), before any remote access
//! is possible. A region grants only the [`RegionAccess`] it was registered with. On TCP the
//! target's progress thread checks every access against region id, key, access and bounds before
//! memory is touched. On RDMA the requester first asks the target (side channel) and refuses a
//! violation before posting; the NIC then enforces the rkey, the registration's bounds and its
//! access flags, not the region id: a peer that bypasses the check can reach whatever the
//! registration allows, and nothing else. A violation fails the requester's operation with a typed
//! error ([`TransportError::RegionOutOfBounds`], [`TransportError::UnknownRegion`],
//! [`TransportError::AccessDenied`]) and the connection stays usable, except for a wrong key
//! ([`TransportError::BadKey`]), which also closes it. A region's [`Region::descriptor`] is valid
//! on every authenticated connection to its endpoint; a private region
//! ([`Transport::alloc_private_region`]) is reached only through [`Connection::grant`], on the
//! one connection that granted it (RDMA: a type-2 memory window bound to its queue pair, so the
//! NIC itself refuses any other). What a peer can make an endpoint hold is bounded
//! ([`accept`], [`TransportConfig::max_inbound_queue`]).
//!
//! A peer that dies fails all pending operations on its connection within
//! [`TransportConfig::peer_timeout`]; other connections carry on; connecting again to a restarted
//! peer works.
//!
//! # Device memory
//!
//! A region may be GPU memory ([`Transport::alloc_device_region`],
//! [`Transport::register_device_ptr`] for a serving stack's tensor, [`Transport::register_device`]):
//! the same [`Region`]/[`RemoteRegion`] and operations, between any mix of host and device
//! regions. RDMA registers it with the NIC (dma-buf, else peer memory: GPUDirect); TCP stages it
//! through host buffers, chunked and pipelined; [`Region::gpudirect`] says which. See [`device`].
//!
//! # Backends
//!
//! [`open`] is the one place that chooses: [`BackendChoice::Auto`] takes RDMA when the `rdma`
//! feature is built in and a usable device exists, else TCP (logging why, and returning the reason
//! from [`select_backend`]). The TCP backend is described in [`tcp`].
//!
//! What the backends have in common is written once: authentication ([`auth`]), accepting
//! ([`accept`]), completions ([`completion`]), regions ([`region`]), the liveness timers
//! (heartbeats, the dead-peer bound: [`liveness`]) and the receiving end of a connection's message
//! and notification queues (the crate-private `inbound` module: take, else the close error, else
//! wait, busy-polling through the backend's hook).
//!
//! # Example
//!
//! Two endpoints on loopback: write with a notification, read it back, exchange a message.
//!
//! ```
//! use genie_transport::{open, TransportConfig};
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), genie_transport::TransportError> {
//! let t = Duration::from_secs(5);
//! let server = open(TransportConfig::tcp())?;
//! let client = open(TransportConfig::tcp())?;
//!
//! // The server exposes a region and tells the client about it.
//! let target = server.alloc_region(1 << 20)?;
//! let conn = client.connect(server.local_addr())?;
//! let peer = server.accept(t)?;
//! peer.send(&serde_json::to_vec(&target.descriptor()).unwrap())?.wait(t)?;
//! let remote: genie_transport::RemoteRegion = serde_json::from_slice(&conn.recv(t)?).unwrap();
//!
//! // One-sided write with a notification, then a read back into another local region.
//! let src = client.register(b"hello, genie".to_vec())?;
//! conn.write_notify(&src, 0, &remote, 4096, src.len(), 42)?.wait(t)?;
//! assert_eq!(peer.recv_notification(t)?, 42); // the data has landed
//! let mut landed = [0u8; 12];
//! target.read(4096, &mut landed)?;
//! assert_eq!(&landed, b"hello, genie");
//!
//! let back = client.alloc_region(12)?;
//! conn.read(&back, 0, &remote, 4096, 12)?.wait(t)?;
//! back.with(|b| assert_eq!(b, b"hello, genie"));
//! # Ok(())
//! # }
//! ```
//!
//! # Drop order
//!
//! Dropping the [`Transport`] handle shuts the endpoint down: its connections close and their
//! pending operations fail with [`TransportError::EndpointClosed`]. A [`Region`] stays registered
//! while any handle or in-flight operation holds it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accept;
pub mod auth;
pub mod codec;
pub mod completion;
pub mod config;
pub mod device;
pub mod error;
pub mod fuzzing;
mod inbound;
pub mod liveness;

#[cfg(feature = "rdma")]
mod rdma;
pub mod region;
pub mod tcp;

pub use completion::{Batch, BatchStatus, Op};
pub use config::{Backend, BackendChoice, PollMode, RdmaConfig, TcpConfig, TransportConfig};
pub use device::{DeviceMem, DeviceMemory, GpuDirect, HostStandIn};
pub use error::{Result, TransportError};
pub use genie_sys::mem::SharedBuf;
pub use region::{EndpointId, Region, RegionAccess, RemoteRegion};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// An endpoint: registered regions, a listening address, and the backend's progress engine.
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// The backend this endpoint uses.
    fn backend(&self) -> Backend;
    /// This endpoint's identity (random per endpoint).
    fn endpoint_id(&self) -> EndpointId;
    /// The address peers connect to.
    fn local_addr(&self) -> SocketAddr;
    /// The configuration it was opened with.
    fn config(&self) -> &TransportConfig;
    /// Allocates and registers a zeroed, page-aligned region of `len` bytes (large ones are fine)
    /// that peers may read and write ([`RegionAccess::ReadWrite`]).
    fn alloc_region(&self, len: usize) -> Result<Region> {
        self.alloc_region_with(len, RegionAccess::ReadWrite)
    }
    /// Allocates a region whose descriptor grants peers only `access` (least privilege: a
    /// landing region [`RegionAccess::Write`], a source [`RegionAccess::Read`]).
    fn alloc_region_with(&self, len: usize, access: RegionAccess) -> Result<Region>;
    /// Registers the caller's buffer, which peers may read and write; ownership moves into the
    /// region (get it back with [`Region::try_into_vec`]).
    fn register(&self, buf: Vec<u8>) -> Result<Region> {
        self.register_with(buf, RegionAccess::ReadWrite)
    }
    /// Registers the caller's buffer, granting peers only `access`.
    fn register_with(&self, buf: Vec<u8>, access: RegionAccess) -> Result<Region>;
    /// Registers memory the caller already has without copying it: typically a buffer owned
    /// elsewhere (a Python array, a serving stack's tensor) wrapped by
    /// [`SharedBuf::from_foreign`] with the object that keeps it alive; the region keeps that
    /// owner until it and every operation using it are gone. Peers get only `access`.
    fn register_shared(&self, mem: SharedBuf, access: RegionAccess) -> Result<Region>;
    /// Allocates a region that no endpoint-wide descriptor reaches: a peer can access it only
    /// with a descriptor from [`Connection::grant`], and only on the connection that granted it
    /// (on RDMA: a type-2 memory window bound to that connection's queue pair).
    fn alloc_private_region(&self, len: usize, access: RegionAccess) -> Result<Region>;
    /// Allocates `len` bytes of zeroed device memory on GPU `gpu` (feature `cuda`) and registers
    /// it as a region peers may read and write: the same [`Region`]/[`RemoteRegion`] as host
    /// memory, used by the same operations (see [`device`]). Without the `cuda` feature:
    /// [`TransportError::DeviceUnavailable`]; without a driver or GPU: [`TransportError::Cuda`].
    fn alloc_device_region(&self, gpu: usize, len: usize) -> Result<Region> {
        self.alloc_device_region_with(gpu, len, RegionAccess::ReadWrite)
    }
    /// [`Transport::alloc_device_region`] granting peers only `access`.
    fn alloc_device_region_with(
        &self,
        gpu: usize,
        len: usize,
        access: RegionAccess,
    ) -> Result<Region> {
        self.register_device(device::alloc(gpu, len)?, access)
    }
    /// Registers device memory the caller already has (a serving stack's tensor, wrapped as
    /// [`device::CudaMemory`](crate::device) from its pointer, length, device and keep-alive
    /// owner; or a [`HostStandIn`]); the region keeps `mem` until it and every operation using it
    /// are gone. Peers get only `access`.
    fn register_device(&self, mem: DeviceMem, access: RegionAccess) -> Result<Region>;
    /// Registers `len` bytes of device memory at device address `ptr` on GPU `gpu` that someone
    /// else allocated (a serving stack's tensor: `data_ptr`, `nbytes`, device), keeping `owner`
    /// (the tensor) alive as long as the region. The driver is asked first that the range is
    /// plain device memory of that GPU inside one allocation; peers get only `access`. Without
    /// the `cuda` feature: [`TransportError::DeviceUnavailable`].
    fn register_device_ptr(
        &self,
        ptr: u64,
        len: usize,
        gpu: usize,
        owner: Box<dyn std::any::Any + Send + Sync>,
        access: RegionAccess,
    ) -> Result<Region> {
        self.register_device(device::from_ptr(ptr, len, gpu, owner)?, access)
    }
    /// Connects to the endpoint listening at `addr` (handshake included; bounded by the peer timeout).
    fn connect(&self, addr: SocketAddr) -> Result<Arc<dyn Connection>>;
    /// Waits up to `timeout` for the next incoming connection. An `Err` other than
    /// [`TransportError::Timeout`] reports one failed incoming attempt (bad handshake, wrong secret,
    /// malformed frame); the endpoint keeps listening.
    fn accept(&self, timeout: Duration) -> Result<Arc<dyn Connection>>;
}

/// What one transfer of a batch does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferKind {
    /// One-sided write local → remote.
    Write,
    /// One-sided write with a notification carrying this value.
    WriteNotify(u32),
    /// One-sided read remote → local.
    Read,
}

/// One transfer of a batch ([`Connection::post_batch`]).
#[derive(Debug, Clone, Copy)]
pub struct Transfer<'a> {
    /// What to do.
    pub kind: TransferKind,
    /// Local region (source of a write, destination of a read).
    pub local: &'a Region,
    /// Offset in the local region.
    pub local_offset: usize,
    /// The peer's region.
    pub remote: &'a RemoteRegion,
    /// Offset in the remote region.
    pub remote_offset: u64,
    /// Bytes to move.
    pub len: usize,
}

/// A connection to one peer endpoint.
///
/// Operations are submitted without blocking and complete asynchronously; operations on one
/// connection are executed by the target in submission order. Notifications and messages are
/// queued per connection until received; receiving from a closed connection first drains what
/// arrived, then returns the close reason.
///
/// Waits (`recv`, `recv_notification`, [`Op::wait`]) have no spurious returns: they return a value,
/// the connection's error, or [`TransportError::Timeout`] once the whole timeout has passed.
/// The backend's progress engine takes a region's lock while it moves data in or out of it, so a
/// caller holding [`Region::with_mut`] for long stalls transfers to or from that region.
pub trait Connection: Send + Sync + std::fmt::Debug {
    /// The backend carrying this connection.
    fn backend(&self) -> Backend;
    /// The peer's address.
    fn peer_addr(&self) -> SocketAddr;
    /// The peer endpoint's identity (from the handshake).
    fn peer_endpoint(&self) -> EndpointId;
    /// Submits one transfer; [`write`](Self::write), [`write_notify`](Self::write_notify) and
    /// [`read`](Self::read) are this with the transfer spelled out.
    fn submit(&self, transfer: Transfer<'_>) -> Result<Op>;
    /// Writes `len` bytes from `local[local_offset..]` to `remote[remote_offset..]`.
    fn write(
        &self,
        local: &Region,
        local_offset: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
        len: usize,
    ) -> Result<Op> {
        self.submit(Transfer {
            kind: TransferKind::Write,
            local,
            local_offset,
            remote,
            remote_offset,
            len,
        })
    }
    /// Like [`write`](Self::write), then delivers `imm` to the target's notification queue once
    /// the data has landed.
    fn write_notify(
        &self,
        local: &Region,
        local_offset: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
        len: usize,
        imm: u32,
    ) -> Result<Op> {
        self.submit(Transfer {
            kind: TransferKind::WriteNotify(imm),
            local,
            local_offset,
            remote,
            remote_offset,
            len,
        })
    }
    /// Reads `len` bytes from `remote[remote_offset..]` into `local[local_offset..]`.
    fn read(
        &self,
        local: &Region,
        local_offset: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
        len: usize,
    ) -> Result<Op> {
        self.submit(Transfer {
            kind: TransferKind::Read,
            local,
            local_offset,
            remote,
            remote_offset,
            len,
        })
    }
    /// A descriptor of our `region` that the peer can use on this connection and no other
    /// (another connection presenting it gets [`TransportError::BadKey`] and is closed, and its
    /// target memory is untouched). For a region from [`Transport::alloc_private_region`] this is
    /// the only way in; for any other region it is its endpoint-wide
    /// [`Region::descriptor`]. The grant lasts as long as the connection (and keeps the region
    /// registered until then).
    fn grant(&self, region: &Region) -> Result<RemoteRegion>;
    /// Sends a message of at most [`TransportConfig::max_message_size`] bytes.
    fn send(&self, msg: &[u8]) -> Result<Op>;
    /// Waits up to `timeout` for the next message.
    fn recv(&self, timeout: Duration) -> Result<Vec<u8>>;
    /// The next message if one is queued.
    fn try_recv(&self) -> Result<Option<Vec<u8>>>;
    /// Waits up to `timeout` for the next notification.
    fn recv_notification(&self, timeout: Duration) -> Result<u32>;
    /// The next notification if one is queued.
    fn try_recv_notification(&self) -> Result<Option<u32>>;
    /// Submits many transfers at once. A transfer rejected at submission (e.g. local out of bounds)
    /// fails on its own; the others proceed.
    fn post_batch(&self, transfers: &[Transfer<'_>]) -> Result<Batch>;
    /// Whether the connection is still open.
    fn is_alive(&self) -> bool;
    /// Closes the connection; pending operations fail with [`TransportError::ConnectionClosed`].
    fn close(&self);
}

/// Which backend [`open`] picked, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSelection {
    /// The backend.
    pub backend: Backend,
    /// Why it was picked (e.g. "configured", or why RDMA could not be used).
    pub reason: String,
}

/// Decides which backend `config` gets, without opening anything.
pub fn select_backend(config: &TransportConfig) -> Result<BackendSelection> {
    match config.backend {
        BackendChoice::Tcp => Ok(BackendSelection {
            backend: Backend::Tcp,
            reason: "configured".into(),
        }),
        BackendChoice::Rdma => match probe_rdma(config) {
            Ok(device) => Ok(BackendSelection {
                backend: Backend::Rdma,
                reason: format!("configured; device {device}"),
            }),
            Err(reason) => Err(TransportError::BackendUnavailable {
                backend: Backend::Rdma,
                reason,
            }),
        },
        BackendChoice::Auto => match probe_rdma(config) {
            Ok(device) => Ok(BackendSelection {
                backend: Backend::Rdma,
                reason: format!("auto: RDMA device {device}"),
            }),
            Err(why) => Ok(BackendSelection {
                backend: Backend::Tcp,
                reason: format!("auto: RDMA not usable ({why})"),
            }),
        },
    }
}

/// Returns the RDMA device that would be used, or why none can be.
#[cfg(not(feature = "rdma"))]
fn probe_rdma(_config: &TransportConfig) -> std::result::Result<String, String> {
    Err("built without the `rdma` feature".into())
}

/// Returns the RDMA device that would be used, or why none can be.
#[cfg(feature = "rdma")]
fn probe_rdma(config: &TransportConfig) -> std::result::Result<String, String> {
    rdma::probe(config)
}

/// Opens an endpoint with the backend chosen by [`select_backend`].
pub fn open(config: TransportConfig) -> Result<Arc<dyn Transport>> {
    Ok(open_with_selection(config)?.0)
}

/// Like [`open`], also returning which backend was picked and why.
pub fn open_with_selection(
    config: TransportConfig,
) -> Result<(Arc<dyn Transport>, BackendSelection)> {
    // Checked whatever the backend: a cluster file with a bad value fails on every host alike.
    config
        .rdma
        .validate()
        .map_err(TransportError::InvalidArgument)?;
    let sel = select_backend(&config)?;
    if config.backend == BackendChoice::Auto {
        tracing::info!(backend = %sel.backend, reason = %sel.reason, "transport backend selected");
    }
    let t: Arc<dyn Transport> = match sel.backend {
        Backend::Tcp => Arc::new(tcp::TcpTransport::open(config)?),
        #[cfg(feature = "rdma")]
        Backend::Rdma => rdma::open(config)?,
        #[cfg(not(feature = "rdma"))]
        Backend::Rdma => {
            return Err(TransportError::BackendUnavailable {
                backend: Backend::Rdma,
                reason: "built without the `rdma` feature".into(),
            })
        }
    };
    Ok((t, sel))
}
