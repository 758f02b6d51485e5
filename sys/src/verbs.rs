//! Small safe types over ibverbs (through the `sideway` crate, which loads libibverbs at run time).
//!
//! The objects and their order of use:
//!
//! ```text
//! rdma_available() / Context::open_port(name, port)   device list, open, port attributes + GID
//!                                                    table (for crate::addressing)
//!   └─ ProtectionDomain                       memory registration (Mr) and QPs live in one PD
//!   └─ CompletionQueue (+ completion channel) busy polling, or sleeping on the channel's fd
//!        └─ QueuePair<Init> ─to_rtr─► QueuePair<Rtr> ─to_rts─► QueuePair<Rts>   (RC only)
//! ```
//!
//! Children keep their parents alive (sideway holds an `Arc` of each parent), so any drop order
//! is sound. The posting methods only take memory as `(&Mr, offset, len)`, checked against the
//! registration, so a work request can never name memory outside a registered buffer.
//!
//! ## Memory lifetime
//!
//! A registration pins the pages of its buffer; a remote peer may write into them until the
//! [`Mr`] is dropped, and a posted work request may touch them until its completion is polled or
//! the registration is gone. [`ProtectionDomain::register`] takes an `Arc<SharedBuf>` (memory that
//! cannot move or be freed while shared) and the [`Mr`] keeps it, dropping the registration first,
//! so no safe use of this module can leave the device naming freed memory.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::addressing::{GidEntry, GidType, LinkLayer, PortAttrs, Route};
use crate::mem::SharedBuf;

use rdma_mummy_sys::{
    bind_mw_t, bind_mw_tso_union_t, ibv_access_flags, ibv_cq, ibv_mw, ibv_mw_bind_info,
    ibv_mw_type, ibv_qp_state, ibv_recv_wr, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc,
    ibv_wc_opcode, ibv_wc_status, ibv_wr_opcode, imm_data_invalidated_rkey_union_t, rdma_t, wr_t,
};
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::GenericCompletionQueue;
use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionChannel, CompletionQueue as _};
use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain as SwPd;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, QueuePair as _, QueuePairAttribute, QueuePairAttributeMask, QueuePairState,
};
use sideway::ibverbs::AccessFlags;

/// The port a [`Context`] uses unless told otherwise (rxe and most NICs have one port per
/// device).
pub const PORT: u8 = 1;

/// Errors of the verbs layer, each naming the verb that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerbsError {
    /// `ibv_get_device_list` failed.
    #[error("ibv_get_device_list failed")]
    DeviceList(#[source] io::Error),
    /// No device with the requested name.
    #[error("no RDMA device named {name:?} (devices: {available:?})")]
    DeviceNotFound {
        /// The name asked for.
        name: String,
        /// The devices that exist.
        available: Vec<String>,
    },
    /// There is no RDMA device at all.
    #[error("no RDMA device")]
    NoDevice,
    /// A verb failed; `verb` names it.
    #[error("{verb} failed on {device}")]
    Verb {
        /// The verb (`ibv_open_device`, `ibv_modify_qp(RTR)`, ...).
        verb: &'static str,
        /// The device.
        device: String,
        /// What the library reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A work request names memory outside its registration.
    #[error("[{offset}, {offset}+{len}) is outside the registered buffer of {size} bytes")]
    OutOfRegistration {
        /// Offset in the registration.
        offset: usize,
        /// Length.
        len: usize,
        /// Size of the registration.
        size: usize,
    },
    /// A message or transfer is too long for one work request (over 4 GiB - 1 or the port maximum).
    #[error("{len} bytes is more than one work request can carry ({max})")]
    TooLong {
        /// Requested length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Allocating memory to register failed.
    #[error("allocating memory to register failed")]
    Alloc(#[source] crate::mem::AllocError),
    /// The send queue has no free slot (`ENOMEM` from `ibv_post_send`): poll completions first.
    #[error("send queue full")]
    SendQueueFull,
    /// Waiting on the completion channel failed.
    #[error("waiting for a completion event failed")]
    Event(#[source] io::Error),
    /// The driver reported a link layer this crate does not know.
    #[error("port {port} of {device} has an unknown link layer ({raw})")]
    UnknownLinkLayer {
        /// The device.
        device: String,
        /// The port.
        port: u8,
        /// The driver's value.
        raw: u8,
    },
    /// Device memory could not be exported as a dma-buf for `ibv_reg_dmabuf_mr`.
    #[cfg(feature = "cuda")]
    #[error("exporting device memory as a dma-buf failed")]
    DmabufExport(#[source] crate::cuda::CudaError),
}

fn verb(
    verb: &'static str,
    device: &str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> VerbsError {
    VerbsError::Verb {
        verb,
        device: device.to_owned(),
        source: Box::new(source),
    }
}

/// Why RDMA cannot be used on this machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// The kernel has no RDMA support (the device list failed with `ENOSYS`, or no
    /// `/sys/class/infiniband_verbs`).
    #[error("the kernel has no RDMA (ibv_get_device_list: {0})")]
    KernelWithoutRdma(String),
    /// libibverbs could not be loaded or failed.
    #[error("libibverbs unusable: {0}")]
    Library(String),
    /// The stack works but there is no device.
    #[error("no RDMA device (for soft-RoCE: modprobe rdma_rxe; rdma link add rxe0 type rxe netdev <if>)")]
    NoDevice,
    /// Devices exist but none has an active port.
    #[error("no RDMA device with an active port ({0})")]
    NoActivePort(String),
}

/// What [`rdma_available`] found about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device name (`rxe0`, `mlx5_0`).
    pub name: String,
    /// Whether port 1 is active.
    pub port_active: bool,
    /// Active MTU of port 1 in bytes.
    pub active_mtu: u32,
}

/// Lists the usable RDMA devices, or says why there are none. Never panics, loads libibverbs
/// lazily (a machine without rdma-core gets [`Unavailable::Library`] or `KernelWithoutRdma`).
pub fn rdma_available() -> Result<Vec<DeviceInfo>, Unavailable> {
    let list = match DeviceList::new() {
        Ok(l) => l,
        Err(e) => {
            let io = io_source(&e);
            return Err(match io.and_then(io::Error::raw_os_error) {
                Some(libc::ENOSYS) | Some(libc::ENOENT) => {
                    Unavailable::KernelWithoutRdma(describe(&e))
                }
                _ => Unavailable::Library(describe(&e)),
            });
        }
    };
    if list.is_empty() {
        if !std::path::Path::new("/sys/class/infiniband_verbs").exists() {
            return Err(Unavailable::KernelWithoutRdma(
                "no /sys/class/infiniband_verbs".into(),
            ));
        }
        return Err(Unavailable::NoDevice);
    }
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for dev in list.iter() {
        let name = dev.name();
        match dev.open() {
            Ok(ctx) => match ctx.query_port(PORT) {
                Ok(p) => out.push(DeviceInfo {
                    name,
                    port_active: p.attr.state == rdma_mummy_sys::ibv_port_state::IBV_PORT_ACTIVE,
                    active_mtu: mtu_bytes(p.attr.active_mtu),
                }),
                Err(e) => problems.push(format!("{name}: {}", describe(&e))),
            },
            Err(e) => problems.push(format!("{name}: {}", describe(&e))),
        }
    }
    if out.iter().any(|d| d.port_active) {
        Ok(out)
    } else {
        out.iter()
            .for_each(|d| problems.push(format!("{}: port {PORT} not active", d.name)));
        Err(Unavailable::NoActivePort(problems.join("; ")))
    }
}

fn io_source<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = c.source();
    }
    None
}

/// `e` and its chain of sources on one line (`"outer: inner: root"`): a verbs failure with the OS
/// or library cause beneath it, as the transport reports it.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Path MTU in bytes for an `ibv_mtu` value (256 for unknown values).
pub fn mtu_bytes(mtu: u32) -> u32 {
    match mtu {
        1 => 256,
        2 => 512,
        3 => 1024,
        4 => 2048,
        5 => 4096,
        _ => 256,
    }
}

fn mtu_enum(bytes: u32) -> Mtu {
    match bytes {
        4096.. => Mtu::Mtu4096,
        2048.. => Mtu::Mtu2048,
        1024.. => Mtu::Mtu1024,
        512.. => Mtu::Mtu512,
        _ => Mtu::Mtu256,
    }
}

/// The IPv4-mapped (or plain IPv6) GID of an IP address: what RoCE v2 puts in the GID table for an
/// address of the bound netdev.
pub fn gid_of_ip(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Limits of an open device and its port, queried once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message one work request may carry (`max_msg_sz` of the port).
    pub max_msg_size: u64,
    /// Active MTU of the port in bytes.
    pub active_mtu: u32,
    /// Most work requests per queue.
    pub max_qp_wr: u32,
    /// Most completion queue entries.
    pub max_cqe: u32,
    /// Most outstanding RDMA READs a QP may issue / accept.
    pub max_rd_atomic: u8,
    /// Whether port 1 is active.
    pub port_active: bool,
}

/// An open RDMA device.
#[derive(Clone)]
pub struct Context {
    ctx: Arc<DeviceContext>,
    name: String,
    port: u8,
    limits: Limits,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Context {
    /// Opens port [`PORT`] of the device called `name`, or of the first device with that port
    /// active when `None`.
    pub fn open(name: Option<&str>) -> Result<Self, VerbsError> {
        Self::open_port(name, PORT)
    }

    /// Opens port `port` (from 1) of the device called `name`, or of the first device with that
    /// port active when `None`. Every QP of this context uses that port.
    pub fn open_port(name: Option<&str>, port: u8) -> Result<Self, VerbsError> {
        let list = DeviceList::new()
            .map_err(|e| VerbsError::DeviceList(io::Error::other(describe(&e))))?;
        let names: Vec<String> = list.iter().map(|d| d.name()).collect();
        if names.is_empty() {
            return Err(VerbsError::NoDevice);
        }
        let mut last_err = None;
        for dev in list.iter() {
            let dname = dev.name();
            if name.is_some_and(|n| n != dname) {
                continue;
            }
            let ctx = dev.open().map_err(|e| verb("ibv_open_device", &dname, e))?;
            let c = Self::from_ctx(ctx, dname.clone(), port)?;
            if name.is_some() || c.limits.port_active {
                return Ok(c);
            }
            last_err = Some(dname);
        }
        match (name, last_err) {
            (Some(n), _) => Err(VerbsError::DeviceNotFound {
                name: n.to_owned(),
                available: names,
            }),
            (None, _) => Err(VerbsError::NoDevice),
        }
    }

    fn from_ctx(ctx: Arc<DeviceContext>, name: String, port_num: u8) -> Result<Self, VerbsError> {
        let dev = ctx
            .query_device()
            .map_err(|e| verb("ibv_query_device", &name, e))?;
        let port = ctx
            .query_port(port_num)
            .map_err(|e| verb("ibv_query_port", &name, e))?;
        let limits = Limits {
            max_msg_size: u64::from(port.attr.max_msg_sz),
            active_mtu: mtu_bytes(port.attr.active_mtu),
            max_qp_wr: u32::try_from(dev.max_qp_wr()).unwrap_or(0),
            max_cqe: u32::try_from(dev.max_cqe()).unwrap_or(0),
            max_rd_atomic: u8::try_from(dev.max_qp_rd_atom().clamp(0, 255)).unwrap_or(0),
            port_active: port.attr.state == rdma_mummy_sys::ibv_port_state::IBV_PORT_ACTIVE,
        };
        Ok(Self {
            ctx,
            name,
            port: port_num,
            limits,
        })
    }

    /// The port this context uses.
    pub fn port(&self) -> u8 {
        self.port
    }

    /// Records what [`crate::addressing`] decides from: the port's link layer, state, LID, active
    /// MTU and GID table (at most 256 entries; entries the driver cannot read, or of a type it
    /// does not name, are left out).
    pub fn port_attrs(&self) -> Result<PortAttrs, VerbsError> {
        let p = self
            .ctx
            .query_port(self.port)
            .map_err(|e| verb("ibv_query_port", &self.name, e))?;
        // Raw fields, not sideway's enum accessors: those panic on values they do not know.
        let link_layer =
            LinkLayer::from_raw(p.attr.link_layer).ok_or_else(|| VerbsError::UnknownLinkLayer {
                device: self.name.clone(),
                port: self.port,
                raw: p.attr.link_layer,
            })?;
        let table_len = u32::try_from(p.gid_tbl_len()).unwrap_or(0);
        let mut gids = Vec::new();
        for idx in 0..table_len.min(256) {
            let Ok(g) = self.ctx.query_gid(self.port, idx) else {
                continue;
            };
            let kind = match self.ctx.query_gid_type(self.port, idx) {
                // The sysfs numbering (0 IB/RoCE v1, 1 RoCE v2), not `ibv_gid_type`'s.
                Ok(t) => GidType::from_sysfs(t, link_layer),
                // Kernels without GID types: an InfiniBand port's GIDs are IB GIDs.
                Err(_) => (link_layer == LinkLayer::InfiniBand).then_some(GidType::Ib),
            };
            if let (Some(kind), Ok(index)) = (kind, u8::try_from(idx)) {
                gids.push(GidEntry {
                    index,
                    gid: g.raw,
                    kind,
                });
            }
        }
        Ok(PortAttrs {
            port: self.port,
            link_layer,
            active: p.attr.state == rdma_mummy_sys::ibv_port_state::IBV_PORT_ACTIVE,
            lid: p.attr.lid,
            active_mtu: mtu_bytes(p.attr.active_mtu),
            gid_table_len: table_len,
            gids,
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's and port's limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Allocates a protection domain.
    pub fn alloc_pd(&self) -> Result<ProtectionDomain, VerbsError> {
        let pd = self
            .ctx
            .alloc_pd()
            .map_err(|e| verb("ibv_alloc_pd", &self.name, e))?;
        Ok(ProtectionDomain {
            pd,
            name: self.name.clone(),
            port: self.port,
        })
    }

    /// Creates a completion queue of `depth` entries; with `with_channel`, it also gets a completion
    /// channel so a thread can sleep until completions arrive ([`CompletionQueue::wait_event`]).
    pub fn create_cq(&self, depth: u32, with_channel: bool) -> Result<CompletionQueue, VerbsError> {
        let channel = if with_channel {
            let ch = self
                .ctx
                .create_comp_channel()
                .map_err(|e| verb("ibv_create_comp_channel", &self.name, e))?;
            ch.set_nonblocking(true)
                .map_err(|e| verb("fcntl(O_NONBLOCK)", &self.name, e))?;
            Some(ch)
        } else {
            None
        };
        let mut b = self.ctx.create_cq_builder();
        b.setup_cqe(depth.max(1));
        if let Some(ch) = &channel {
            b.setup_comp_channel(ch, 0);
        }
        let cq = b
            .build()
            .map_err(|e| verb("ibv_create_cq", &self.name, e))?;
        Ok(CompletionQueue {
            cq,
            channel,
            name: self.name.clone(),
        })
    }
}

/// What a peer's one-sided operations may do to a registration (the NIC checks it with the rkey).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RemoteAccess {
    /// Nothing: local send/receive buffers.
    None,
    /// Nothing through the registration's own rkey; type-2 memory windows bound to one QP each
    /// ([`QueuePair::post_bind`]) grant access to it, on that QP only.
    WindowsOnly,
    /// RDMA READ only (a source the peer pulls from).
    Read,
    /// RDMA WRITE only (a landing region the peer pushes into).
    Write,
    /// Both.
    ReadWrite,
}

/// How [`ProtectionDomain::register_device`] registers device memory.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRegistration {
    /// Export a dma-buf and register it (`ibv_reg_dmabuf_mr`; Linux 5.12+, rdma-core 34+).
    Dmabuf,
    /// Register the device address itself, for the peer-memory module (`nvidia_peermem`).
    PeerMemory,
}

fn access_flags(remote: RemoteAccess) -> AccessFlags {
    match remote {
        RemoteAccess::None => AccessFlags::LocalWrite,
        RemoteAccess::WindowsOnly => AccessFlags::LocalWrite | AccessFlags::MemoryWindowBind,
        RemoteAccess::Read => AccessFlags::LocalWrite | AccessFlags::RemoteRead,
        RemoteAccess::Write => AccessFlags::LocalWrite | AccessFlags::RemoteWrite,
        RemoteAccess::ReadWrite => {
            AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead
        }
    }
}

/// A protection domain: memory registrations and QPs that may be used together.
#[derive(Clone)]
pub struct ProtectionDomain {
    pd: Arc<SwPd>,
    name: String,
    port: u8,
}

impl fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.name)
            .finish()
    }
}

impl ProtectionDomain {
    /// Registers `mem` with local write, remote read and remote write access
    /// ([`RemoteAccess::ReadWrite`]; see [`ProtectionDomain::register_with`]).
    pub fn register(&self, mem: Arc<SharedBuf>) -> Result<Mr, VerbsError> {
        self.register_with(mem, RemoteAccess::ReadWrite)
    }

    /// Registers `mem` for local use only (send and receive buffers): no rkey grants anything.
    pub fn register_local(&self, mem: Arc<SharedBuf>) -> Result<Mr, VerbsError> {
        self.register_with(mem, RemoteAccess::None)
    }

    /// Registers `mem` with local write access and the remote access `remote` allows.
    ///
    /// The returned [`Mr`] keeps `mem` alive (it holds the `Arc`) and deregisters before releasing
    /// it, so the registration can never name freed memory; [`Mr::mem`] gives the bytes back.
    pub fn register_with(
        &self,
        mem: Arc<SharedBuf>,
        remote: RemoteAccess,
    ) -> Result<Mr, VerbsError> {
        let access = access_flags(remote);
        // ibv_reg_mr rejects length 0 on some providers, and an empty `Vec`'s address is dangling:
        // register one byte of a page of our own instead, so empty regions still get keys.
        let (mem_for_reg, len) = if mem.is_empty() {
            (
                Arc::new(SharedBuf::zeroed(1).map_err(VerbsError::Alloc)?),
                1,
            )
        } else {
            (Arc::clone(&mem), mem.len())
        };
        // SAFETY: `[addr, addr+len)` is the live allocation of `mem_for_reg` (a `SharedBuf`, whose
        // storage can never move, shrink or be freed while it exists). The returned `Mr` keeps that
        // `Arc` and drops its registration first (field order), so the pages stay allocated for
        // as long as the device may access them: after ibv_dereg_mr the device no longer does.
        let mr = unsafe { self.pd.reg_mr(mem_for_reg.addr(), len, access) }
            .map_err(|e| verb("ibv_reg_mr", &self.name, e))?;
        Ok(Mr {
            mr,
            len: mem.len(),
            _pinned: mem_for_reg,
            mem,
        })
    }

    /// Registers the device memory of `buf` (GPUDirect RDMA: the NIC reads and writes it over
    /// PCIe), `via` a dma-buf export (`cuMemGetHandleForAddressRange` → `ibv_reg_dmabuf_mr`) or
    /// the peer-memory module (`nvidia_peermem`: plain `ibv_reg_mr` on the device address). The
    /// registration's addresses are device addresses (`Mr::addr` is `buf.ptr()`). `keep` must keep
    /// `buf`'s memory allocated; the `Mr` holds it and deregisters first. An empty buffer is
    /// refused (nothing to register).
    #[cfg(feature = "cuda")]
    pub fn register_device(
        &self,
        buf: &crate::cuda::DeviceBuffer,
        via: DeviceRegistration,
        remote: RemoteAccess,
        keep: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Mr, VerbsError> {
        use std::os::fd::AsRawFd as _;
        let len = buf.len();
        if len == 0 {
            return Err(VerbsError::TooLong { len, max: 0 });
        }
        let access = access_flags(remote);
        let mr = match via {
            DeviceRegistration::Dmabuf => {
                let fd = buf.dmabuf_fd().map_err(VerbsError::DmabufExport)?;
                // SAFETY: `fd` is a dma-buf the CUDA driver just exported for `buf`'s whole
                // allocation, which starts at `buf.ptr()`, so `[0, len)` of it is `buf`; the iova
                // is the device address, so work requests name device addresses. Device memory
                // is never Rust memory, and the kernel holds its own reference to the dma-buf for
                // the registration's life (closing `fd` below is fine); `keep`, held by the `Mr`
                // and dropped after the registration, keeps the allocation itself.
                unsafe {
                    self.pd
                        .reg_dmabuf_mr(0, len, buf.ptr(), fd.as_raw_fd(), access)
                }
                .map_err(|e| verb("ibv_reg_dmabuf_mr", &self.name, e))?
            }
            DeviceRegistration::PeerMemory => {
                let addr = usize::try_from(buf.ptr()).map_err(|_| VerbsError::TooLong {
                    len,
                    max: usize::MAX,
                })?;
                // SAFETY: `[addr, addr + len)` is device memory (the `DeviceBuffer`'s contract),
                // never Rust memory; the kernel's peer-memory client pins it (or the call fails,
                // where no client claims it) and `keep` keeps it allocated while the `Mr` lives.
                unsafe { self.pd.reg_mr(addr, len, access) }
                    .map_err(|e| verb("ibv_reg_mr(device memory)", &self.name, e))?
            }
        };
        // SAFETY: a zero-length range at a dangling, well-aligned pointer: no byte of it is
        // ever read or written; the buffer exists only to hold `keep` (the device memory's
        // owner) for as long as the `Mr`, which drops its registration first.
        let keep = Arc::new(unsafe {
            SharedBuf::from_foreign(std::ptr::NonNull::<u8>::dangling().as_ptr(), 0, keep)
        });
        Ok(Mr {
            mr,
            len,
            _pinned: keep,
            mem: Arc::new(SharedBuf::from_vec(Vec::new())),
        })
    }

    /// Allocates a type-2 memory window: unbound (it grants nothing) until a QP binds it with
    /// [`QueuePair::post_bind`], and then valid on that QP only.
    pub fn alloc_window(&self) -> Result<MemoryWindow, VerbsError> {
        // SAFETY: `pd()` is the handle of the PD that `self.pd` owns, valid while that `Arc`
        // lives; the window keeps a clone of it (field `_pd`), so the PD outlives the window.
        let mw = unsafe {
            rdma_mummy_sys::ibv_alloc_mw(self.pd.pd().as_ptr(), ibv_mw_type::IBV_MW_TYPE_2)
        };
        if mw.is_null() {
            return Err(verb(
                "ibv_alloc_mw(type 2)",
                &self.name,
                io::Error::last_os_error(),
            ));
        }
        Ok(MemoryWindow {
            mw,
            _pd: Arc::clone(&self.pd),
            name: self.name.clone(),
        })
    }

    /// Creates a reliable-connected QP in state INIT (on the context's port, remote read/write
    /// allowed).
    pub fn create_rc_qp(
        &self,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
        caps: QpCaps,
    ) -> Result<QueuePair<Init>, VerbsError> {
        let mut b = self.pd.create_qp_builder();
        b.setup_max_send_wr(caps.max_send_wr)
            .setup_max_recv_wr(caps.max_recv_wr)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_max_inline_data(caps.max_inline_data)
            .setup_send_cq(GenericCompletionQueue::from(Arc::clone(&send_cq.cq)))
            .setup_recv_cq(GenericCompletionQueue::from(Arc::clone(&recv_cq.cq)));
        let mut qp = b
            .build()
            .map_err(|e| verb("ibv_create_qp", &self.name, e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.port)
            .setup_access_flags(
                AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
            );
        qp.modify(&attr)
            .map_err(|e| verb("ibv_modify_qp(INIT)", &self.name, e))?;
        Ok(QueuePair {
            qp,
            name: self.name.clone(),
            port: self.port,
            max_inline: caps.max_inline_data,
            _state: Init,
        })
    }
}

/// A type-2 memory window (`ibv_mw`): once bound by one QP, a remote key valid on that QP only,
/// for a range of a registration made with [`RemoteAccess::WindowsOnly`]. Deallocated on drop
/// (which invalidates its key).
pub struct MemoryWindow {
    mw: *mut ibv_mw,
    _pd: Arc<SwPd>,
    name: String,
}

// SAFETY: the window is a handle to a kernel/provider object that verbs allow to be used from
// any thread; `MemoryWindow` only reads its `rkey` through `&self` and hands the pointer to verbs
// under `&mut` (binding) or in `Drop`, so no data race on the pointee is possible from Rust.
unsafe impl Send for MemoryWindow {}
// SAFETY: see `Send`: shared references only read the `rkey` field, which verbs write only
// during a bind, which takes `&mut self`.
unsafe impl Sync for MemoryWindow {}

impl fmt::Debug for MemoryWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryWindow")
            .field("rkey", &self.rkey())
            .finish()
    }
}

impl MemoryWindow {
    /// The window's current remote key (changes at each bind).
    pub fn rkey(&self) -> u32 {
        // SAFETY: `mw` is a live window allocated by `ibv_alloc_mw` (non-null, checked) and
        // freed only in `Drop`; reading its `rkey` field is a plain load.
        unsafe { (*self.mw).rkey }
    }
}

impl Drop for MemoryWindow {
    fn drop(&mut self) {
        // SAFETY: `mw` came from `ibv_alloc_mw` and is deallocated exactly once, here; the PD it
        // belongs to is still alive (`_pd`).
        let rc = unsafe { rdma_mummy_sys::ibv_dealloc_mw(self.mw) };
        if rc != 0 {
            tracing::warn!(device = %self.name, rc, "ibv_dealloc_mw failed");
        }
    }
}

/// A memory registration (`ibv_mr`): keys for local and remote access to one buffer.
pub struct Mr {
    // Field order is drop order: the registration goes before the memory it names.
    mr: Arc<MemoryRegion>,
    len: usize,
    /// The memory registered (`mem` itself, or a one-byte page for an empty `mem`); for device
    /// memory, an empty buffer whose owner keeps the device memory allocated.
    _pinned: Arc<SharedBuf>,
    mem: Arc<SharedBuf>,
}

impl fmt::Debug for Mr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mr")
            .field("addr", &self.addr())
            .field("len", &self.len)
            .field("rkey", &self.rkey())
            .finish()
    }
}

impl Mr {
    /// The registered bytes.
    pub fn mem(&self) -> &Arc<SharedBuf> {
        &self.mem
    }
    /// Local key (for work requests of this process).
    pub fn lkey(&self) -> u32 {
        self.mr.lkey()
    }
    /// Remote key (for a peer's one-sided access).
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
    /// Address of the first byte (what a peer puts in its work requests).
    pub fn addr(&self) -> u64 {
        self.mr.get_ptr() as u64
    }
    /// Registered length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the registration is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn sge(&self, offset: usize, len: usize) -> Result<(u64, u32), VerbsError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(VerbsError::OutOfRegistration {
                    offset,
                    len,
                    size: self.len,
                })
            }
        }
        let l = u32::try_from(len).map_err(|_| VerbsError::TooLong {
            len,
            max: u32::MAX as usize,
        })?;
        Ok((self.addr() + offset as u64, l))
    }
}

/// Queue sizes of a QP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Send queue depth.
    pub max_send_wr: u32,
    /// Receive queue depth.
    pub max_recv_wr: u32,
    /// Largest inline payload.
    pub max_inline_data: u32,
}

/// A completion queue, optionally with a completion channel for sleeping.
pub struct CompletionQueue {
    // Field order: the CQ drops before its channel (sideway also holds the channel in the CQ).
    cq: Arc<BasicCompletionQueue>,
    channel: Option<Arc<CompletionChannel>>,
    name: String,
}

impl fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("device", &self.name)
            .field("channel", &self.channel.is_some())
            .finish()
    }
}

/// What a work request did, from its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    /// A send finished.
    Send,
    /// An RDMA write (with or without immediate) finished.
    Write,
    /// An RDMA read finished.
    Read,
    /// A receive got a send (with `imm` if it carried one).
    Recv,
    /// A receive was consumed by an RDMA write with immediate.
    RecvWriteImm,
    /// Something else.
    Other(u32),
}

/// Why a work request failed (`ibv_wc_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WcError {
    /// The peer refused the access: bad rkey, out of its registration, or no remote permission.
    #[error("remote access error")]
    RemoteAccess,
    /// The peer found the request invalid (e.g. a send longer than its receive buffer).
    #[error("remote invalid request")]
    RemoteInvalidRequest,
    /// The peer failed to execute the operation.
    #[error("remote operation error")]
    RemoteOperation,
    /// No acknowledgement after all retries: the peer is gone or unreachable.
    #[error("transport retry counter exceeded (peer unreachable)")]
    RetryExceeded,
    /// The peer had no receive posted after all RNR retries.
    #[error("receiver-not-ready retry counter exceeded")]
    RnrRetryExceeded,
    /// The QP was in error state and the request was flushed without executing.
    #[error("flushed (queue pair in error state)")]
    Flushed,
    /// Local protection or length error (a bug: wrong lkey or length).
    #[error("local error (status {0})")]
    Local(u32),
    /// Any other status.
    #[error("work completion status {0}")]
    Other(u32),
}

/// One polled completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The work request id given when posting.
    pub wr_id: u64,
    /// Success or why not.
    pub status: Result<(), WcError>,
    /// Valid only on success.
    pub opcode: WcOpcode,
    /// Bytes received (receives only).
    pub byte_len: u32,
    /// Immediate data (receives of a send-with-imm or write-with-imm).
    pub imm: Option<u32>,
}

fn wc_status(s: u32) -> Result<(), WcError> {
    match s {
        ibv_wc_status::IBV_WC_SUCCESS => Ok(()),
        ibv_wc_status::IBV_WC_REM_ACCESS_ERR => Err(WcError::RemoteAccess),
        ibv_wc_status::IBV_WC_REM_INV_REQ_ERR => Err(WcError::RemoteInvalidRequest),
        ibv_wc_status::IBV_WC_REM_OP_ERR => Err(WcError::RemoteOperation),
        ibv_wc_status::IBV_WC_RETRY_EXC_ERR => Err(WcError::RetryExceeded),
        ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR => Err(WcError::RnrRetryExceeded),
        ibv_wc_status::IBV_WC_WR_FLUSH_ERR => Err(WcError::Flushed),
        ibv_wc_status::IBV_WC_LOC_LEN_ERR
        | ibv_wc_status::IBV_WC_LOC_QP_OP_ERR
        | ibv_wc_status::IBV_WC_LOC_PROT_ERR
        | ibv_wc_status::IBV_WC_LOC_ACCESS_ERR => Err(WcError::Local(s)),
        other => Err(WcError::Other(other)),
    }
}

fn wc_opcode(o: u32) -> WcOpcode {
    match o {
        ibv_wc_opcode::IBV_WC_SEND => WcOpcode::Send,
        ibv_wc_opcode::IBV_WC_RDMA_WRITE => WcOpcode::Write,
        ibv_wc_opcode::IBV_WC_RDMA_READ => WcOpcode::Read,
        ibv_wc_opcode::IBV_WC_RECV => WcOpcode::Recv,
        ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvWriteImm,
        other => WcOpcode::Other(other),
    }
}

impl CompletionQueue {
    /// Polls up to `max` completions into `out` (appended). Returns how many. Never blocks and
    /// never allocates (beyond growing `out`): completions land in a buffer on the stack. (sideway's
    /// `start_poll` allocates a `Vec` per call, empty CQ included: a malloc/free pair on every
    /// poll of a busy-polling thread.)
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, VerbsError> {
        const BATCH: usize = 32;
        let want = max.min(BATCH);
        if want == 0 {
            return Ok(0);
        }
        let mut wcs = [std::mem::MaybeUninit::<ibv_wc>::uninit(); BATCH];
        // SAFETY: the CQ handle is valid while `self` lives (see `raw_cq`); `wcs` has room for
        // `want` (<= BATCH) entries, the most ibv_poll_cq writes; providers lock the CQ inside
        // poll_cq, so concurrent polls from several threads are allowed (verbs' threading rules).
        let rc = unsafe {
            rdma_mummy_sys::ibv_poll_cq(self.raw_cq(), want as i32, wcs.as_mut_ptr().cast())
        };
        if rc < 0 {
            return Err(verb(
                "ibv_poll_cq",
                &self.name,
                std::io::Error::from_raw_os_error(-rc),
            ));
        }
        let n = (rc as usize).min(want);
        for slot in &wcs[..n] {
            // SAFETY: ibv_poll_cq returned `rc`: it filled the first `rc` entries.
            let wc = unsafe { slot.assume_init_ref() };
            let status = wc_status(wc.status);
            let opcode = if status.is_ok() {
                wc_opcode(wc.opcode)
            } else {
                WcOpcode::Other(wc.opcode)
            };
            let imm = match opcode {
                // SAFETY: for a receive with immediate the union holds the immediate (verbs.h).
                WcOpcode::RecvWriteImm => Some(u32::from_be(unsafe {
                    wc.imm_data_invalidated_rkey_union.imm_data
                })),
                _ => None,
            };
            out.push(Completion {
                wr_id: wc.wr_id,
                status,
                opcode,
                byte_len: wc.byte_len,
                imm,
            });
        }
        Ok(n)
    }

    fn raw_cq(&self) -> *mut ibv_cq {
        // SAFETY: `cq()` returns the handle of the CQ that `self.cq` owns; it stays valid while
        // `self` lives, and it is only passed to verbs on `&self`.
        unsafe { self.cq.cq().as_ptr() }
    }

    /// Arms the CQ: the next completion makes the channel readable. Call before sleeping, then poll
    /// once more (a completion may have arrived before arming).
    pub fn req_notify(&self) -> Result<(), VerbsError> {
        // SAFETY: the CQ handle is valid (see `raw_cq`); ibv_req_notify_cq only arms it.
        let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(self.raw_cq(), 0) };
        if rc != 0 {
            return Err(verb(
                "ibv_req_notify_cq",
                &self.name,
                io::Error::from_raw_os_error(rc.abs()),
            ));
        }
        Ok(())
    }

    /// The completion channel's file descriptor (readable after an armed CQ got a completion), for
    /// an event loop. `None` without a channel.
    pub fn event_fd(&self) -> Option<i32> {
        self.channel.as_ref().map(|c| c.as_raw_fd())
    }

    /// Sleeps until the armed CQ reports an event or `timeout` passes; consumes and acknowledges the
    /// event. Returns whether there was one. Without a channel, returns `Ok(false)` at once.
    pub fn wait_event(&self, timeout: Duration) -> Result<bool, VerbsError> {
        let Some(ch) = &self.channel else {
            return Ok(false);
        };
        let mut pfd = libc::pollfd {
            fd: ch.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is one valid pollfd on our stack; poll reads/writes only it.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(VerbsError::Event(e));
        }
        if rc == 0 {
            return Ok(false);
        }
        Ok(self.take_events()? > 0)
    }

    /// Consumes and acknowledges every event waiting on the completion channel, without blocking
    /// (the channel is non-blocking): for an event loop that saw [`CompletionQueue::event_fd`]
    /// readable. Returns how many there were; `Ok(0)` without a channel.
    pub fn take_events(&self) -> Result<u32, VerbsError> {
        let Some(ch) = &self.channel else {
            return Ok(0);
        };
        let mut got = 0u32;
        loop {
            let mut cq: *mut ibv_cq = std::ptr::null_mut();
            let mut ctx: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: the channel handle is valid while `ch` lives; the out-pointers are our locals.
            // The channel is non-blocking, so this returns -1/EAGAIN when drained.
            let rc = unsafe {
                rdma_mummy_sys::ibv_get_cq_event(ch.comp_channel().as_ptr(), &mut cq, &mut ctx)
            };
            if rc != 0 {
                break;
            }
            got += 1;
        }
        if got > 0 {
            // SAFETY: this channel serves only this CQ, so every event read above was for it; each
            // must be acknowledged once or ibv_destroy_cq would wait forever.
            unsafe { rdma_mummy_sys::ibv_ack_cq_events(self.raw_cq(), got) };
        }
        Ok(got)
    }
}

/// QP state marker: INIT (receives may be posted, nothing sent).
#[derive(Debug)]
pub struct Init;
/// QP state marker: ready to receive.
#[derive(Debug)]
pub struct Rtr;
/// QP state marker: ready to send (connected).
#[derive(Debug)]
pub struct Rts;

/// What a peer needs to connect its QP to ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    /// QP number.
    pub qpn: u32,
    /// First packet sequence number (24 bits).
    pub psn: u32,
}

/// Path parameters agreed during connection set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathParams {
    /// Destination LID, GRH (only when chosen) and path MTU, from [`crate::addressing::route`].
    pub route: Route,
    /// Outstanding RDMA READs/atomics in both directions.
    pub max_rd_atomic: u8,
    /// Ack timeout exponent (4.096 µs * 2^timeout).
    pub timeout: u8,
    /// Transport retries before an error completion.
    pub retry_cnt: u8,
}

/// A reliable-connected queue pair in state `S` ([`Init`], [`Rtr`], [`Rts`]).
pub struct QueuePair<S> {
    qp: BasicQueuePair,
    name: String,
    port: u8,
    max_inline: u32,
    _state: S,
}

impl<S> fmt::Debug for QueuePair<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuePair")
            .field("device", &self.name)
            .field("qpn", &self.qp.qp_number())
            .finish()
    }
}

/// One local buffer range of a work request.
#[derive(Debug, Clone, Copy)]
pub enum Local<'a> {
    /// `len` bytes at `offset` of a registration.
    Mr {
        /// The registration.
        mr: &'a Mr,
        /// Offset in it.
        offset: usize,
        /// Length.
        len: usize,
    },
    /// Bytes copied into the work request itself (at most the QP's max inline size; sends and
    /// writes only).
    Inline(&'a [u8]),
}

/// The operation of a send-queue work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// Two-sided send.
    Send,
    /// RDMA write to `remote_addr` under `rkey`.
    Write {
        /// Remote key.
        rkey: u32,
        /// Remote virtual address.
        remote_addr: u64,
    },
    /// RDMA write that also consumes a receive at the peer, delivering `imm`.
    WriteImm {
        /// Remote key.
        rkey: u32,
        /// Remote virtual address.
        remote_addr: u64,
        /// Immediate data.
        imm: u32,
    },
    /// RDMA read from `remote_addr` under `rkey` into the local buffer.
    Read {
        /// Remote key.
        rkey: u32,
        /// Remote virtual address.
        remote_addr: u64,
    },
}

impl<S> QueuePair<S> {
    /// Our QP number.
    pub fn qpn(&self) -> u32 {
        self.qp.qp_number()
    }

    /// Whether the QP is in the error state (after an error completion).
    /// Queries the device (the cached state in `ibv_qp` does not follow asynchronous errors).
    pub fn is_error(&self) -> bool {
        match self.qp.query(QueuePairAttributeMask::State) {
            Ok((attr, _)) => attr.state() == QueuePairState::Error,
            Err(_) => true,
        }
    }

    /// Posts a receive of up to `len` bytes into `mr` at `offset`.
    pub fn post_recv(
        &mut self,
        wr_id: u64,
        mr: &Mr,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError> {
        let (addr, length) = mr.sge(offset, len)?;
        // As in `post_send`: one request on the stack, no allocation.
        let mut sge = ibv_sge {
            addr,
            length,
            lkey: mr.lkey(),
        };
        let mut wr = ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: the QP handle is valid while `self` lives (sideway's `BasicQueuePair` owns
        // it). `wr` is one request (`next` NULL) whose SGE lies inside `mr`'s registration
        // (checked by `sge`) with its key; the `Mr` owns that memory and deregisters before
        // freeing it, and once deregistered the device fails the request rather than touching
        // the memory. `sge`, `wr` and `bad` outlive the call.
        let rc = unsafe { rdma_mummy_sys::ibv_post_recv(self.qp.qp().as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(verb(
                "ibv_post_recv",
                &self.name,
                io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }

    /// Moves the QP to the error state: every outstanding work request completes with
    /// [`WcError::Flushed`]. Used to fail a connection's pending operations.
    pub fn set_error(&mut self) -> Result<(), VerbsError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Error);
        self.qp
            .modify(&attr)
            .map_err(|e| verb("ibv_modify_qp(ERR)", &self.name, e))
    }

    fn change<T>(self, state: T) -> QueuePair<T> {
        QueuePair {
            qp: self.qp,
            name: self.name,
            port: self.port,
            max_inline: self.max_inline,
            _state: state,
        }
    }
}

impl QueuePair<Init> {
    /// INIT → RTR: connect the receive side to `remote` over `path` (a GRH only when
    /// `path.route` has one: InfiniBand within a subnet goes by LID alone).
    pub fn to_rtr(
        mut self,
        local_psn: u32,
        remote: &QpEndpoint,
        path: &PathParams,
    ) -> Result<QueuePair<Rtr>, VerbsError> {
        let _ = local_psn;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu_enum(path.route.mtu))
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn & 0xff_ffff)
            .setup_max_dest_read_atomic(path.max_rd_atomic)
            .setup_min_rnr_timer(1);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(path.route.dlid)
            .setup_port(self.port)
            .setup_service_level(0);
        // Each GRH setter also sets `is_global`: only call them when a GRH is wanted.
        if let Some(grh) = path.route.grh {
            ah.setup_grh_src_gid_index(grh.sgid_index)
                .setup_grh_dest_gid(&Gid { raw: grh.dgid })
                .setup_grh_hop_limit(grh.hop_limit);
        }
        attr.setup_address_vector(&ah);
        self.qp
            .modify(&attr)
            .map_err(|e| verb("ibv_modify_qp(RTR)", &self.name, e))?;
        Ok(self.change(Rtr))
    }
}

impl QueuePair<Rtr> {
    /// RTR → RTS: the send side starts at `local_psn`.
    pub fn to_rts(
        mut self,
        local_psn: u32,
        path: &PathParams,
    ) -> Result<QueuePair<Rts>, VerbsError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(local_psn & 0xff_ffff)
            .setup_timeout(path.timeout)
            .setup_retry_cnt(path.retry_cnt)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(path.max_rd_atomic);
        self.qp
            .modify(&attr)
            .map_err(|e| verb("ibv_modify_qp(RTS)", &self.name, e))?;
        Ok(self.change(Rts))
    }
}

impl QueuePair<Rts> {
    /// Binds `mw` to this QP over `[offset, offset + len)` of `mr` (registered with
    /// [`RemoteAccess::WindowsOnly`]) with `remote` access, as the send-queue work request
    /// `wr_id` (always signalled). Returns the window's new rkey, valid on this QP only once the
    /// bind's completion is seen.
    pub fn post_bind(
        &mut self,
        wr_id: u64,
        mw: &mut MemoryWindow,
        mr: &Mr,
        offset: usize,
        len: usize,
        remote: RemoteAccess,
    ) -> Result<u32, VerbsError> {
        let (addr, length) = mr.sge(offset, len)?;
        let access = match remote {
            RemoteAccess::Read => ibv_access_flags::IBV_ACCESS_REMOTE_READ.0,
            RemoteAccess::Write => ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0,
            RemoteAccess::ReadWrite => {
                ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
                    | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            }
            _ => 0,
        };
        // SAFETY: a pure function of its argument (rdma-core's ibv_inc_rkey).
        let rkey = unsafe { rdma_mummy_sys::ibv_inc_rkey(mw.rkey()) };
        // SAFETY: as in `post_send`, the all-zero `ibv_send_wr` is valid.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.opcode = ibv_wr_opcode::IBV_WR_BIND_MW;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.bind_mw_tso_union = bind_mw_tso_union_t {
            bind_mw: bind_mw_t {
                mw: mw.mw,
                rkey,
                bind_info: ibv_mw_bind_info {
                    // SAFETY: the handle of the registration `mr` owns, valid while `mr` lives.
                    mr: unsafe { mr.mr.mr().as_ptr() },
                    addr,
                    length: u64::from(length),
                    mw_access_flags: access,
                },
            },
        };
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP handle is valid while `self` lives and `&mut self` excludes other posts
        // through this wrapper; `mw` (borrowed mutably: no other bind of it can be in this call)
        // and `mr` are live handles of the same PD as the QP; the range is inside `mr` (checked by
        // `Mr::sge`). `wr` and `bad` live on this stack frame for the whole call. The caller keeps
        // `mw` and `mr` alive until the bind's completion is seen (the window keeps the
        // registration busy until it is deallocated).
        let rc = unsafe { rdma_mummy_sys::ibv_post_send(self.qp.qp().as_ptr(), &mut wr, &mut bad) };
        match rc {
            0 => Ok(rkey),
            libc::ENOMEM => Err(VerbsError::SendQueueFull),
            e => Err(verb(
                "ibv_post_send(BIND_MW)",
                &self.name,
                io::Error::from_raw_os_error(e),
            )),
        }
    }

    /// Largest inline payload this QP accepts.
    pub fn max_inline(&self) -> u32 {
        self.max_inline
    }

    /// Posts one send-queue work request. `signaled`: whether it produces a completion on success
    /// (errors always do). [`VerbsError::SendQueueFull`] when the queue has no free slot.
    pub fn post_send(
        &mut self,
        wr_id: u64,
        op: SendOp,
        local: Local<'_>,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        let inline = matches!(local, Local::Inline(_));
        if let Local::Inline(b) = local {
            if b.len() > self.max_inline as usize || matches!(op, SendOp::Read { .. }) {
                return Err(VerbsError::TooLong {
                    len: b.len(),
                    max: self.max_inline as usize,
                });
            }
        }
        // One work request and its one scatter-gather entry, on the stack: sideway's post guard
        // allocates three vectors per post (and copies inline data once more), which on the
        // soft-RoCE latency path cost as much as the provider's own work (callgrind: ~750 of
        // ~1,400 instructions per post).
        let (addr, length, lkey) = match local {
            Local::Mr { mr, offset, len } => {
                let (addr, len) = mr.sge(offset, len)?;
                (addr, len, mr.lkey())
            }
            // Inline data is copied into the work queue entry by ibv_post_send itself.
            Local::Inline(b) => (b.as_ptr() as u64, b.len() as u32, 0),
        };
        let mut sge = ibv_sge { addr, length, lkey };
        let mut flags = 0;
        if signaled {
            flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        if inline {
            flags |= ibv_send_flags::IBV_SEND_INLINE.0;
        }
        // SAFETY: `ibv_send_wr` is a C struct of integers, raw pointers and unions of those: the
        // all-zero pattern is valid (NULL `next`, no SGEs), as rdma-core's own helpers build it.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.send_flags = flags;
        let (opcode, remote) = match op {
            SendOp::Send => (ibv_wr_opcode::IBV_WR_SEND, None),
            SendOp::Write { rkey, remote_addr } => {
                (ibv_wr_opcode::IBV_WR_RDMA_WRITE, Some((remote_addr, rkey)))
            }
            SendOp::WriteImm {
                rkey,
                remote_addr,
                imm,
            } => {
                wr.imm_data_invalidated_rkey_union = imm_data_invalidated_rkey_union_t {
                    imm_data: imm.to_be(),
                };
                (
                    ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
                    Some((remote_addr, rkey)),
                )
            }
            SendOp::Read { rkey, remote_addr } => {
                (ibv_wr_opcode::IBV_WR_RDMA_READ, Some((remote_addr, rkey)))
            }
        };
        wr.opcode = opcode;
        if let Some((remote_addr, rkey)) = remote {
            wr.wr = wr_t {
                rdma: rdma_t { remote_addr, rkey },
            };
        }
        if length > 0 {
            wr.sg_list = &mut sge;
            wr.num_sge = 1;
        }
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP handle is valid while `self` lives (sideway's `BasicQueuePair` owns it
        // and `&mut self` excludes other posts through this wrapper). `wr` is one request
        // (`next` NULL) whose SGE, when present, describes either a range of a registration
        // whose lkey this is (checked by `Mr::sge`; the `Mr` deregisters before its memory is
        // freed, see `ProtectionDomain::register`) or, inline, the caller's slice, which outlives
        // this call (the provider copies inline data during ibv_post_send). `sge`, `wr` and
        // `bad` live on this stack frame for the whole call.
        let rc = unsafe { rdma_mummy_sys::ibv_post_send(self.qp.qp().as_ptr(), &mut wr, &mut bad) };
        match rc {
            0 => Ok(()),
            // ibv_post_send's "send queue full".
            libc::ENOMEM => Err(VerbsError::SendQueueFull),
            e => Err(verb(
                "ibv_post_send",
                &self.name,
                io::Error::from_raw_os_error(e),
            )),
        }
    }
}

/// The QP state, for diagnostics.
pub fn qp_state_name(s: u32) -> &'static str {
    match s {
        ibv_qp_state::IBV_QPS_RESET => "RESET",
        ibv_qp_state::IBV_QPS_INIT => "INIT",
        ibv_qp_state::IBV_QPS_RTR => "RTR",
        ibv_qp_state::IBV_QPS_RTS => "RTS",
        ibv_qp_state::IBV_QPS_ERR => "ERR",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtu_conversions_round_trip() {
        for (e, b) in [(1, 256), (2, 512), (3, 1024), (4, 2048), (5, 4096)] {
            assert_eq!(mtu_bytes(e), b);
            assert_eq!(mtu_bytes(mtu_enum(b) as u32), b);
        }
        assert_eq!(mtu_bytes(mtu_enum(1500) as u32), 1024);
    }

    #[test]
    fn ipv4_mapped_gid() {
        let g = gid_of_ip("127.0.0.1".parse().unwrap());
        assert_eq!(g, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
    }

    #[test]
    fn wc_status_mapping() {
        assert_eq!(wc_status(ibv_wc_status::IBV_WC_SUCCESS), Ok(()));
        assert_eq!(
            wc_status(ibv_wc_status::IBV_WC_REM_ACCESS_ERR),
            Err(WcError::RemoteAccess)
        );
        assert_eq!(
            wc_status(ibv_wc_status::IBV_WC_WR_FLUSH_ERR),
            Err(WcError::Flushed)
        );
        assert_eq!(
            wc_status(ibv_wc_status::IBV_WC_RETRY_EXC_ERR),
            Err(WcError::RetryExceeded)
        );
    }

    /// On a machine without RDMA this says why; with `GENIE_RDMA_DEVICE` set (the soft-RoCE
    /// harness sets it) the device must be found and usable.
    #[test]
    fn detection_matches_environment() {
        match (rdma_available(), std::env::var("GENIE_RDMA_DEVICE")) {
            (Ok(devs), Ok(want)) => assert!(
                devs.iter().any(|d| d.name == want && d.port_active),
                "{devs:?}"
            ),
            (Err(e), Ok(want)) => panic!("GENIE_RDMA_DEVICE={want} but RDMA is unavailable: {e}"),
            (_, Err(_)) => {}
        }
    }

    /// The path of a loopback connection on `ctx`'s port, addressed as connections are (on
    /// soft-RoCE over `lo`: the RoCE v2 GID `::ffff:127.0.0.1`).
    fn test_path(ctx: &Context) -> PathParams {
        let attrs = ctx.port_attrs().unwrap();
        let local = crate::addressing::choose_local(
            &attrs,
            None,
            Some(gid_of_ip("127.0.0.1".parse().unwrap())),
        )
        .unwrap();
        if attrs.link_layer == LinkLayer::Ethernet {
            assert_eq!(local.gid_type, GidType::RoceV2, "{attrs:?}");
        }
        PathParams {
            route: crate::addressing::route(&local, &local.as_remote()).unwrap(),
            max_rd_atomic: 4,
            timeout: 14,
            retry_cnt: 7,
        }
    }

    fn poll_one(cq: &CompletionQueue) -> Completion {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no completion within 10 s"
            );
            cq.poll(&mut out, 1).unwrap();
        }
        out[0]
    }

    /// Connected RC QP pairs in one PD. A type-2 memory window bound by one pair's target QP
    /// works for that pair's requester only: the other pair's requester, presenting the same
    /// rkey, gets a remote access error from the NIC, and so does the registration's own rkey
    /// (registered `WindowsOnly`), and the rkey of a local-only registration (what message
    /// buffers are). Runs where the soft-RoCE harness set `GENIE_RDMA_DEVICE`.
    #[test]
    fn memory_windows_bind_to_one_qp() {
        let Ok(dev) = std::env::var("GENIE_RDMA_DEVICE") else {
            return;
        };
        let ctx = Context::open(Some(&dev)).unwrap();
        let pd = ctx.alloc_pd().unwrap();
        let path = test_path(&ctx);
        let caps = QpCaps {
            max_send_wr: 16,
            max_recv_wr: 16,
            max_inline_data: 64,
        };
        // A connected pair: (requester, its CQ, target, its CQ).
        let pair = || {
            let (cq_r, cq_t) = (
                ctx.create_cq(16, false).unwrap(),
                ctx.create_cq(16, false).unwrap(),
            );
            let r = pd.create_rc_qp(&cq_r, &cq_r, caps).unwrap();
            let t = pd.create_rc_qp(&cq_t, &cq_t, caps).unwrap();
            let (er, et) = (
                QpEndpoint {
                    qpn: r.qpn(),
                    psn: 1,
                },
                QpEndpoint {
                    qpn: t.qpn(),
                    psn: 2,
                },
            );
            let r = r.to_rtr(1, &et, &path).unwrap().to_rts(1, &path).unwrap();
            let t = t.to_rtr(2, &er, &path).unwrap().to_rts(2, &path).unwrap();
            (r, cq_r, t, cq_t)
        };
        let (mut r1, cq_r1, mut t1, cq_t1) = pair();
        let (mut r2, cq_r2, _t2, _cq_t2) = pair();
        let target = pd
            .register_with(
                Arc::new(SharedBuf::zeroed(4096).unwrap()),
                RemoteAccess::WindowsOnly,
            )
            .unwrap();
        let src = pd
            .register(Arc::new(SharedBuf::from_vec(vec![7u8; 64])))
            .unwrap();
        let mut mw = pd.alloc_window().unwrap();
        let rkey = t1
            .post_bind(9, &mut mw, &target, 0, 4096, RemoteAccess::ReadWrite)
            .unwrap();
        assert_eq!(poll_one(&cq_t1).status, Ok(()), "bind");
        let write = |rkey| SendOp::Write {
            rkey,
            remote_addr: target.addr(),
        };
        let from = |len| Local::Mr {
            mr: &src,
            offset: 0,
            len,
        };
        r1.post_send(1, write(rkey), from(64), true).unwrap();
        assert_eq!(
            poll_one(&cq_r1).status,
            Ok(()),
            "the bound QP's peer writes"
        );
        assert!(target.mem().read()[..64].iter().all(|&b| b == 7));
        target.mem().write()[..64].fill(0);
        r2.post_send(2, write(rkey), from(64), true).unwrap();
        assert_eq!(
            poll_one(&cq_r2).status,
            Err(WcError::RemoteAccess),
            "another QP presenting the window's rkey"
        );
        r1.post_send(3, write(target.rkey()), from(64), true)
            .unwrap();
        assert_eq!(
            poll_one(&cq_r1).status,
            Err(WcError::RemoteAccess),
            "the registration's own rkey"
        );
        assert!(target.mem().read().iter().all(|&b| b == 0), "untouched");
        // A local-only registration (message buffers): its own rkey grants nothing either.
        let (mut r3, cq_r3, _t3, _cq_t3) = pair();
        let local = pd
            .register_local(Arc::new(SharedBuf::zeroed(4096).unwrap()))
            .unwrap();
        let to_local = SendOp::Write {
            rkey: local.rkey(),
            remote_addr: local.addr(),
        };
        r3.post_send(4, to_local, from(64), true).unwrap();
        assert_eq!(
            poll_one(&cq_r3).status,
            Err(WcError::RemoteAccess),
            "a local-only registration"
        );
        assert!(local.mem().read().iter().all(|&b| b == 0), "untouched");
    }

    /// Two RC QPs on one device connected to each other: write, read, write-with-imm, send/recv,
    /// and a bad rkey that must come back as a remote access error. Runs where the soft-RoCE
    /// harness set `GENIE_RDMA_DEVICE`.
    #[test]
    fn loopback_rc_operations() {
        let Ok(dev) = std::env::var("GENIE_RDMA_DEVICE") else {
            return;
        };
        let ctx = Context::open(Some(&dev)).unwrap();
        let pd = ctx.alloc_pd().unwrap();
        let cq_a = ctx.create_cq(64, false).unwrap();
        let cq_b = ctx.create_cq(64, true).unwrap();
        let caps = QpCaps {
            max_send_wr: 16,
            max_recv_wr: 16,
            max_inline_data: 64,
        };
        let qa = pd.create_rc_qp(&cq_a, &cq_a, caps).unwrap();
        let mut qb = pd.create_rc_qp(&cq_b, &cq_b, caps).unwrap();
        let mut buf_a = vec![0u8; 8192];
        buf_a[..5].copy_from_slice(b"hello");
        let mr_a = pd.register(Arc::new(SharedBuf::from_vec(buf_a))).unwrap();
        let mr_b = pd
            .register(Arc::new(SharedBuf::zeroed(8192).unwrap()))
            .unwrap();
        qb.post_recv(7, &mr_b, 4096, 4096).unwrap();
        let path = test_path(&ctx);
        let ea = QpEndpoint {
            qpn: qa.qpn(),
            psn: 100,
        };
        let eb = QpEndpoint {
            qpn: qb.qpn(),
            psn: 200,
        };
        let mut qa = qa
            .to_rtr(100, &eb, &path)
            .unwrap()
            .to_rts(100, &path)
            .unwrap();
        let _qb = qb
            .to_rtr(200, &ea, &path)
            .unwrap()
            .to_rts(200, &path)
            .unwrap();

        let w = SendOp::Write {
            rkey: mr_b.rkey(),
            remote_addr: mr_b.addr(),
        };
        qa.post_send(
            1,
            w,
            Local::Mr {
                mr: &mr_a,
                offset: 0,
                len: 5,
            },
            true,
        )
        .unwrap();
        let c = poll_one(&cq_a);
        assert_eq!(
            (c.wr_id, c.status, c.opcode, c.imm),
            (1, Ok(()), WcOpcode::Write, None)
        );

        let r = SendOp::Read {
            rkey: mr_b.rkey(),
            remote_addr: mr_b.addr() + 1,
        };
        qa.post_send(
            2,
            r,
            Local::Mr {
                mr: &mr_a,
                offset: 100,
                len: 4,
            },
            true,
        )
        .unwrap();
        let c = poll_one(&cq_a);
        assert_eq!((c.wr_id, c.status, c.opcode), (2, Ok(()), WcOpcode::Read));

        let wi = SendOp::WriteImm {
            rkey: mr_b.rkey(),
            remote_addr: mr_b.addr() + 10,
            imm: 0xdead_beef,
        };
        qa.post_send(3, wi, Local::Inline(b"xyz"), true).unwrap();
        assert_eq!(poll_one(&cq_a).status, Ok(()));
        cq_b.req_notify().unwrap();
        let c = poll_one(&cq_b);
        assert_eq!(
            (c.wr_id, c.opcode, c.imm),
            (7, WcOpcode::RecvWriteImm, Some(0xdead_beef))
        );

        let bad = SendOp::Write {
            rkey: mr_b.rkey() ^ 0x5a5a,
            remote_addr: mr_b.addr(),
        };
        qa.post_send(
            4,
            bad,
            Local::Mr {
                mr: &mr_a,
                offset: 0,
                len: 1,
            },
            true,
        )
        .unwrap();
        let c = poll_one(&cq_a);
        assert_eq!((c.wr_id, c.status), (4, Err(WcError::RemoteAccess)));
        assert!(qa.is_error());
        assert!(matches!(
            qa.post_send(
                5,
                w,
                Local::Mr {
                    mr: &mr_a,
                    offset: 8000,
                    len: 500
                },
                true
            ),
            Err(VerbsError::OutOfRegistration { .. })
        ));
        let (buf_a, buf_b) = (Arc::clone(mr_a.mem()), Arc::clone(mr_b.mem()));
        drop((mr_a, mr_b));
        assert_eq!(&buf_b.read()[..5], b"hello");
        assert_eq!(&buf_a.read()[100..104], b"ello");
        assert_eq!(&buf_b.read()[10..13], b"xyz");
    }
}
