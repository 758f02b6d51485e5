//! The transport's error type, split by whose fault it is.

use crate::config::Backend;
use std::net::SocketAddr;
use std::sync::Arc;

/// Everything that can go wrong in the transport.
///
/// Grouped by cause:
/// - **remote access violations** (the peer refused our one-sided access; nothing was touched):
///   [`RegionOutOfBounds`](Self::RegionOutOfBounds), [`BadKey`](Self::BadKey),
///   [`AccessDenied`](Self::AccessDenied),
///   [`UnknownRegion`](Self::UnknownRegion) — fix the descriptor or offsets;
/// - **peer misbehaved** (it sent something that breaks the protocol; its connection was closed):
///   [`InvalidFrame`](Self::InvalidFrame), [`PeerMisbehaved`](Self::PeerMisbehaved);
/// - **handshake** (the connection was refused): [`VersionMismatch`](Self::VersionMismatch),
///   [`AuthFailed`](Self::AuthFailed), [`Addressing`](Self::Addressing);
/// - **peer gone**: [`PeerDead`](Self::PeerDead), [`ConnectionClosed`](Self::ConnectionClosed) —
///   reconnect;
/// - **waiting**: [`Timeout`](Self::Timeout) — the operation may still complete later;
/// - **caller misuse** (nothing was sent): [`MessageTooLarge`](Self::MessageTooLarge),
///   [`LocalOutOfBounds`](Self::LocalOutOfBounds), [`InvalidArgument`](Self::InvalidArgument);
/// - **system**: [`Io`](Self::Io) (names the OS call), [`Alloc`](Self::Alloc),
///   [`BackendUnavailable`](Self::BackendUnavailable);
/// - **device memory** (GPU regions): [`DeviceUnavailable`](Self::DeviceUnavailable) (no `cuda`
///   feature, driver or device), [`Device`](Self::Device) (a copy or allocation failed),
///   [`HostOnly`](Self::HostOnly) (a host-only call on a device region),
///   [`GpuDirectUnavailable`](Self::GpuDirectUnavailable) (no way to register GPU memory for
///   RDMA), and with the `cuda` feature [`Cuda`](Self::Cuda) (the driver's error).
///
/// The type is `Clone` (I/O errors are shared through an `Arc`) so that one failure can be
/// reported to every operation it affects.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A remote access fell outside the target region.
    #[error("access [{offset}, {offset}+{len}) is outside region {region} of {size} bytes")]
    RegionOutOfBounds {
        /// Target region id.
        region: u64,
        /// Offset of the access in the region.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the region.
        size: u64,
    },
    /// The access key did not match the target region's key.
    #[error("wrong access key for region {region}")]
    BadKey {
        /// Target region id.
        region: u64,
    },
    /// The target region does not allow this kind of remote access (a read of a write-only
    /// landing region, a write into a read-only source, any access to a local-only region).
    #[error("region {region} does not allow remote {op}s")]
    AccessDenied {
        /// Target region id.
        region: u64,
        /// What was refused: "read" or "write".
        op: &'static str,
    },
    /// The target endpoint has no region with this id (never registered, or dropped).
    #[error("unknown region {region}")]
    UnknownRegion {
        /// Target region id.
        region: u64,
    },
    /// A frame could not be decoded.
    #[error("invalid frame from {peer:?}: expected {expected}, got {got}")]
    InvalidFrame {
        /// The peer that sent it, when known.
        peer: Option<SocketAddr>,
        /// What the decoder expected.
        expected: &'static str,
        /// What arrived instead.
        got: String,
    },
    /// The peer broke the protocol with a well-formed frame (wrong state, unknown operation, size
    /// over the limit).
    #[error("peer {peer:?} misbehaved: {what}")]
    PeerMisbehaved {
        /// The peer, when known.
        peer: Option<SocketAddr>,
        /// What it did.
        what: String,
    },
    /// The two sides speak different protocol versions.
    #[error("protocol version mismatch with {peer:?}: ours {ours}, theirs {theirs}")]
    VersionMismatch {
        /// The peer, when known.
        peer: Option<SocketAddr>,
        /// Our protocol version.
        ours: u8,
        /// The peer's protocol version.
        theirs: u8,
    },
    /// Authentication with the shared secret failed (missing, or wrong on one side).
    #[error("authentication with {peer:?} failed: {reason}")]
    AuthFailed {
        /// The peer, when known.
        peer: Option<SocketAddr>,
        /// What failed.
        reason: String,
    },
    /// A secondary TCP stream ([`crate::config::TcpConfig::streams`]) was refused: it named a
    /// connection the peer does not know (or one of another endpoint), or one that has all its
    /// streams already. The stream is closed; the connection it claimed is unaffected.
    #[error("stream to {peer:?} refused: {reason}")]
    StreamRefused {
        /// The peer, when known.
        peer: Option<SocketAddr>,
        /// Why.
        reason: String,
    },
    /// The peer stopped responding (no frame, not even a heartbeat, within the peer timeout) or its
    /// socket failed.
    #[error("peer {peer} is dead: {reason}")]
    PeerDead {
        /// The peer.
        peer: SocketAddr,
        /// Why it was declared dead.
        reason: String,
    },
    /// The connection was closed (by us or by the peer) before the operation completed.
    #[error("connection to {peer} is closed")]
    ConnectionClosed {
        /// The peer.
        peer: SocketAddr,
    },
    /// The endpoint shut down before the operation completed.
    #[error("the endpoint was shut down before the operation completed")]
    EndpointClosed,
    /// Waiting ran out of time. For operations the work may still complete later.
    #[error("timed out after {after:?}")]
    Timeout {
        /// How long we waited.
        after: std::time::Duration,
    },
    /// A two-sided message is larger than the configured maximum.
    #[error("message of {len} bytes exceeds the maximum of {max} bytes")]
    MessageTooLarge {
        /// Message length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A local offset/length does not fit the local region (caller bug; nothing was sent).
    #[error(
        "local access [{offset}, {offset}+{len}) is outside local region {region} of {size} bytes"
    )]
    LocalOutOfBounds {
        /// Local region id.
        region: u64,
        /// Offset of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the region.
        size: usize,
    },
    /// A remote descriptor of another endpoint than this connection's peer (e.g. of a peer that
    /// has since restarted): nothing was sent.
    #[error("descriptor belongs to endpoint {descriptor_endpoint:#x}, but the connection's peer is {peer_endpoint:#x}")]
    ForeignDescriptor {
        /// The endpoint named by the descriptor.
        descriptor_endpoint: u64,
        /// The connection's peer endpoint.
        peer_endpoint: u64,
    },
    /// RDMA addressing failed: our port cannot be used as configured (a GID index that is out of
    /// range or empty, an InfiniBand port without a LID; `peer` is `None`), or the peer's port
    /// cannot be reached from ours (InfiniBand against Ethernet, RoCE v1 against v2, an address
    /// it sent that cannot be used). Fix the device, port or GID index on one side.
    #[error("RDMA addressing failed (peer {peer:?}): {reason}")]
    Addressing {
        /// The peer's side-channel address, when a peer is involved.
        peer: Option<SocketAddr>,
        /// What does not fit, naming both sides' values.
        reason: genie_sys::addressing::AddressingError,
    },
    /// An argument is not acceptable (caller bug), e.g. a region of another endpoint.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An operating-system call failed.
    #[error("{call} failed")]
    Io {
        /// The call that failed (`connect`, `bind`, `epoll_wait`, ...).
        call: &'static str,
        /// The OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Memory for a region could not be allocated.
    #[error("cannot allocate region memory")]
    Alloc(#[from] genie_sys::mem::AllocError),
    /// The requested backend cannot be used here.
    #[error("backend {backend} unavailable: {reason}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: Backend,
        /// Why not.
        reason: String,
    },
    /// Device memory cannot be used here: built without the `cuda` feature, or no usable device.
    #[error("device memory unavailable: {reason}")]
    DeviceUnavailable {
        /// Why not.
        reason: String,
    },
    /// A device-memory operation failed (a staging copy, a staging buffer allocation).
    #[error("device memory: {what} failed: {reason}")]
    Device {
        /// What was being done (`"copy device to host"`, ...).
        what: &'static str,
        /// The device layer's error.
        reason: String,
    },
    /// The region is device memory, and this call needs host bytes (use [`crate::Region::read`]
    /// and [`crate::Region::write`], which stage through host memory).
    #[error("region {region} is device memory; {what} needs a host region")]
    HostOnly {
        /// The region.
        region: u64,
        /// The host-only call.
        what: &'static str,
    },
    /// GPU memory cannot be registered with the RDMA device: neither dma-buf nor peer memory
    /// works here, and staging was not allowed. `tried` says what each way answered.
    #[error("cannot register GPU memory for RDMA: {tried}")]
    GpuDirectUnavailable {
        /// Each way tried and why it failed.
        tried: String,
    },
    /// The CUDA driver's error (no driver, no device, a failed call).
    #[cfg(feature = "cuda")]
    #[error("CUDA: {0}")]
    Cuda(#[from] genie_sys::cuda::CudaError),
}

impl TransportError {
    /// Wraps an OS error, naming the call that failed.
    pub fn io(call: &'static str, source: std::io::Error) -> Self {
        Self::Io {
            call,
            source: Arc::new(source),
        }
    }

    /// Whether the peer refused a one-sided access (bad key, bounds or region): the connection is
    /// still usable.
    pub fn is_access_violation(&self) -> bool {
        matches!(
            self,
            Self::RegionOutOfBounds { .. }
                | Self::BadKey { .. }
                | Self::UnknownRegion { .. }
                | Self::AccessDenied { .. }
        )
    }
}

/// The transport's `Result`.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;
