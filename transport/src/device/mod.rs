//! Device (GPU) memory as regions, and the staging that moves it through host memory.
//!
//! A [`crate::Region`] is host memory or device memory; both have the same descriptor
//! ([`crate::RemoteRegion`]) and the same operations, so `write`/`read`/`write_notify`/batches
//! work between any mix of the two. What differs is how the bytes reach the wire:
//!
//! - **RDMA with GPUDirect**: the NIC reads and writes device memory itself (a dma-buf or
//!   peer-memory registration, see the `rdma` backend's `device` module); nothing is staged.
//! - **TCP** (and RDMA without GPUDirect): bytes are *staged* through host bounce buffers in
//!   chunks of [`STAGE_CHUNK`], pipelined [`STAGE_DEPTH`] deep on both sides: the sender copies
//!   chunk i+1 (and the next ones) from the device while chunk i is on the wire; the receiver
//!   reads chunk i+1 from the socket while chunk i is copied to the device. A write is
//!   acknowledged, and its notification delivered, only after its last chunk has landed in
//!   device memory.
//!
//! The staging logic only sees the [`DeviceMemory`] trait, the *device copier*: allocate a host
//! staging buffer, start a copy device→host or host→device, wait for it. Two implementations:
//! `CudaMemory` (feature `cuda`: a CUDA stream, pinned host buffers) and [`HostStandIn`], host
//! memory that behaves like a device (its copies really copy, and only when waited for, as an
//! asynchronous device copy would), which the tests use on machines without a GPU.
//!
//! Host-only calls on a device region ([`crate::Region::with`], `lock`) see no bytes (an empty
//! slice), and [`crate::Region::try_with`] says [`TransportError::HostOnly`];
//! [`crate::Region::read`] and [`crate::Region::write`] stage, so they work on both kinds.

use crate::error::{Result, TransportError};
use parking_lot::Mutex;
use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::CudaMemory;

/// Bytes per staged chunk: one TCP frame's payload ([`crate::tcp::proto::CHUNK`]).
pub const STAGE_CHUNK: usize = crate::tcp::proto::CHUNK;
/// Staged chunks in flight per connection and direction: the pipeline's depth, which bounds the
/// host memory staging takes ([`STAGE_DEPTH`] × [`STAGE_CHUNK`] per direction per connection).
pub const STAGE_DEPTH: usize = 4;

/// A region's device memory and the *device copier* that stages it through host memory.
///
/// Copies are asynchronous: a copy owns its host [`Staging`] buffer until it is done
/// ([`CopyInFlight::wait`] gives it back), so no host memory is touched by a device after it was
/// handed back. Copies of one memory run in the order they were started.
pub trait DeviceMemory: Send + Sync + fmt::Debug + 'static {
    /// The device's ordinal (`cuda:N`).
    fn ordinal(&self) -> usize;
    /// The device address of the first byte (what an RDMA registration names).
    fn ptr(&self) -> u64;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A host buffer of at least `len` bytes to stage through (pinned memory for CUDA).
    fn staging(&self, len: usize) -> Result<Staging>;
    /// Starts copying `len` bytes of device memory at `offset` into `buf[..len]`.
    fn copy_to_host(&self, offset: usize, buf: Staging, len: usize) -> Result<CopyInFlight>;
    /// Starts copying `buf[..len]` into device memory at `offset`.
    fn copy_from_host(&self, buf: Staging, len: usize, offset: usize) -> Result<CopyInFlight>;
    /// The implementation, for a backend that needs more (the RDMA registration of CUDA memory).
    fn as_any(&self) -> &dyn Any;
}

/// Shared device memory, as a region holds it.
pub type DeviceMem = Arc<dyn DeviceMemory>;

/// The bytes of a host staging buffer (see [`Staging`]).
pub trait StagingBytes: Send + 'static {
    /// The bytes.
    fn bytes(&self) -> &[u8];
    /// The bytes, writable.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// The implementation, so that its [`DeviceMemory`] can take it apart.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// A host staging buffer of some [`DeviceMemory`].
pub struct Staging(Box<dyn StagingBytes>);

impl fmt::Debug for Staging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Staging").field("len", &self.len()).finish()
    }
}

impl Staging {
    /// Wraps a buffer.
    pub fn new(bytes: impl StagingBytes) -> Self {
        Self(Box::new(bytes))
    }
    /// Its length.
    pub fn len(&self) -> usize {
        self.0.bytes().len()
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        self.0.bytes()
    }
    /// Its bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.bytes_mut()
    }
    /// The implementation `T`, or the buffer unchanged if it is another kind.
    pub fn downcast<T: StagingBytes>(self) -> std::result::Result<T, Box<dyn Any + Send>> {
        self.0.into_any().downcast::<T>().map(|b| *b)
    }
}

/// A copy in progress (see [`CopyInFlight`]).
pub trait PendingCopy: Send {
    /// Whether the copy is done (then `wait` does not block).
    fn is_done(&mut self) -> Result<bool>;
    /// Blocks until the copy is done and hands the staging buffer back.
    fn wait(self: Box<Self>) -> Result<Staging>;
}

/// A staging copy in flight; it owns its host buffer until [`wait`](Self::wait) returns it.
/// Dropping one waits for the copy (an implementation that cannot wait leaks the buffer rather
/// than free it under the device).
#[must_use = "a staging copy's buffer comes back from wait()"]
pub struct CopyInFlight(Box<dyn PendingCopy>);

impl fmt::Debug for CopyInFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CopyInFlight")
    }
}

impl CopyInFlight {
    /// Wraps an implementation's pending copy.
    pub fn new(p: impl PendingCopy + 'static) -> Self {
        Self(Box::new(p))
    }
    /// Whether the copy is done.
    pub fn is_done(&mut self) -> Result<bool> {
        self.0.is_done()
    }
    /// Blocks until the copy is done; returns the buffer.
    pub fn wait(self) -> Result<Staging> {
        self.0.wait()
    }
}

fn range_ok(offset: usize, len: usize, size: usize) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// Checks a staging copy's arguments the same way for every implementation.
fn check_copy(
    mem: &dyn DeviceMemory,
    offset: usize,
    len: usize,
    buf: &Staging,
) -> Result<(), TransportError> {
    if !range_ok(offset, len, mem.len()) || len > buf.len() {
        return Err(TransportError::InvalidArgument(format!(
            "staging copy [{offset}, +{len}) of device memory of {} bytes through a buffer of {}",
            mem.len(),
            buf.len()
        )));
    }
    Ok(())
}

/// Copies device memory at `offset` into `out`, staged in chunks (for [`crate::Region::read`]).
pub(crate) fn read_staged(mem: &dyn DeviceMemory, offset: usize, out: &mut [u8]) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let mut buf = mem.staging(out.len().min(STAGE_CHUNK))?;
    for (i, piece) in out.chunks_mut(STAGE_CHUNK).enumerate() {
        let at = offset + i * STAGE_CHUNK;
        check_copy(mem, at, piece.len(), &buf)?;
        buf = mem.copy_to_host(at, buf, piece.len())?.wait()?;
        piece.copy_from_slice(&buf.bytes()[..piece.len()]);
    }
    Ok(())
}

/// Copies `data` into device memory at `offset`, staged in chunks (for [`crate::Region::write`]).
pub(crate) fn write_staged(mem: &dyn DeviceMemory, offset: usize, data: &[u8]) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let mut buf = mem.staging(data.len().min(STAGE_CHUNK))?;
    for (i, piece) in data.chunks(STAGE_CHUNK).enumerate() {
        let at = offset + i * STAGE_CHUNK;
        check_copy(mem, at, piece.len(), &buf)?;
        buf.bytes_mut()[..piece.len()].copy_from_slice(piece);
        buf = mem.copy_from_host(buf, piece.len(), at)?.wait()?;
    }
    Ok(())
}

/// Starts a checked copy device→host (the staging pipeline's entry).
pub(crate) fn start_to_host(
    mem: &dyn DeviceMemory,
    offset: usize,
    buf: Staging,
    len: usize,
) -> Result<CopyInFlight> {
    check_copy(mem, offset, len, &buf)?;
    mem.copy_to_host(offset, buf, len)
}

/// Starts a checked copy host→device (the staging pipeline's entry).
pub(crate) fn start_from_host(
    mem: &dyn DeviceMemory,
    buf: Staging,
    len: usize,
    offset: usize,
) -> Result<CopyInFlight> {
    check_copy(mem, offset, len, &buf)?;
    mem.copy_from_host(buf, len, offset)
}

/// Allocates `len` bytes of device memory on GPU `gpu` (feature `cuda`).
#[cfg(feature = "cuda")]
pub fn alloc(gpu: usize, len: usize) -> Result<DeviceMem> {
    Ok(Arc::new(CudaMemory::alloc(gpu, len)?))
}

/// Allocates `len` bytes of device memory on GPU `gpu`: without the `cuda` feature, always
/// [`TransportError::DeviceUnavailable`].
#[cfg(not(feature = "cuda"))]
pub fn alloc(gpu: usize, len: usize) -> Result<DeviceMem> {
    let _ = (gpu, len);
    Err(TransportError::DeviceUnavailable {
        reason: "built without the `cuda` feature".into(),
    })
}

/// Device memory at `ptr` (`len` bytes on GPU `gpu`) that `owner` keeps allocated, checked with
/// the driver (feature `cuda`; see [`crate::Transport::register_device_ptr`]).
#[cfg(feature = "cuda")]
pub fn from_ptr(
    ptr: u64,
    len: usize,
    gpu: usize,
    owner: Box<dyn Any + Send + Sync>,
) -> Result<DeviceMem> {
    let buf = genie_sys::cuda::DeviceBuffer::from_device_ptr(ptr, len, gpu, owner)?;
    Ok(Arc::new(CudaMemory::new(buf)?))
}

/// Device memory at `ptr`: without the `cuda` feature, always
/// [`TransportError::DeviceUnavailable`].
#[cfg(not(feature = "cuda"))]
pub fn from_ptr(
    ptr: u64,
    len: usize,
    gpu: usize,
    owner: Box<dyn Any + Send + Sync>,
) -> Result<DeviceMem> {
    let _ = (ptr, len, gpu, owner);
    Err(TransportError::DeviceUnavailable {
        reason: "built without the `cuda` feature".into(),
    })
}

// ---- how device memory reaches the NIC ----

/// How a device region's bytes reach the network: reported per region by
/// [`crate::Region::gpudirect`] (`gpudirect=dmabuf|peermem|staged`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GpuDirect {
    /// GPUDirect RDMA through a dma-buf registration (`ibv_reg_dmabuf_mr`).
    Dmabuf,
    /// GPUDirect RDMA through the peer-memory module (`nvidia_peermem`, plain `ibv_reg_mr`).
    Peermem,
    /// Staged through host bounce buffers (TCP, or RDMA without GPUDirect).
    Staged,
}

impl fmt::Display for GpuDirect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GpuDirect::Dmabuf => "dmabuf",
            GpuDirect::Peermem => "peermem",
            GpuDirect::Staged => "staged",
        })
    }
}

/// What decides how device memory is registered with an RDMA device, as recorded on a machine
/// (the input of [`decide_gpudirect`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GpuDirectProbe {
    /// The memory is CUDA memory (not a stand-in), so the NIC could reach it at all.
    pub cuda_memory: bool,
    /// The GPU and driver export dma-bufs (`CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` and
    /// `cuMemGetHandleForAddressRange`).
    pub gpu_dmabuf: bool,
    /// The GPU supports GPUDirect RDMA (`CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED`).
    pub gpu_rdma: bool,
    /// The peer-memory module is loaded ([`peermem_loaded`] on `/proc/modules`).
    pub peermem_loaded: bool,
    /// The backend can stage this memory through host buffers instead.
    pub staging: bool,
}

/// Which way was used, and why each one before it was not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDirectChoice {
    /// The way used.
    pub used: GpuDirect,
    /// Ways tried or ruled out before it, each with why.
    pub passed_over: Vec<(GpuDirect, String)>,
}

/// Decides how device memory is registered for RDMA: dma-buf where the GPU exports one and the
/// NIC's driver takes it, else the peer-memory module's plain registration where it is loaded,
/// else staging through host buffers where the backend can; else
/// [`TransportError::GpuDirectUnavailable`] saying why each way failed. `register` performs one
/// way (`Dmabuf` or `Peermem`) and says why it failed; it is never called for a way the probe
/// rules out, nor for `Staged`. Pure apart from `register`, so recorded probes and outcomes
/// replay a machine's decision.
pub fn decide_gpudirect(
    probe: &GpuDirectProbe,
    mut register: impl FnMut(GpuDirect) -> std::result::Result<(), String>,
) -> Result<GpuDirectChoice> {
    let mut passed_over = Vec::new();
    let ways = [
        (
            GpuDirect::Dmabuf,
            if !probe.cuda_memory {
                Some("not CUDA memory")
            } else if !probe.gpu_dmabuf {
                Some("the GPU or driver cannot export a dma-buf")
            } else {
                None
            },
        ),
        (
            GpuDirect::Peermem,
            if !probe.cuda_memory {
                Some("not CUDA memory")
            } else if !probe.gpu_rdma {
                Some("the GPU does not support GPUDirect RDMA")
            } else if !probe.peermem_loaded {
                Some("the nvidia_peermem module is not loaded")
            } else {
                None
            },
        ),
    ];
    for (way, ruled_out) in ways {
        if let Some(why) = ruled_out {
            passed_over.push((way, why.to_string()));
            continue;
        }
        match register(way) {
            Ok(()) => {
                return Ok(GpuDirectChoice {
                    used: way,
                    passed_over,
                })
            }
            Err(why) => passed_over.push((way, why)),
        }
    }
    if probe.staging {
        return Ok(GpuDirectChoice {
            used: GpuDirect::Staged,
            passed_over,
        });
    }
    passed_over.push((
        GpuDirect::Staged,
        "this backend cannot stage device memory".to_string(),
    ));
    let tried = passed_over
        .iter()
        .map(|(w, why)| format!("{w}: {why}"))
        .collect::<Vec<_>>()
        .join("; ");
    Err(TransportError::GpuDirectUnavailable { tried })
}

/// Whether a peer-memory module is loaded, from the text of `/proc/modules` (`nvidia_peermem`,
/// or the older `nv_peer_mem`).
pub fn peermem_loaded(proc_modules: &str) -> bool {
    proc_modules.lines().any(|l| {
        matches!(
            l.split_whitespace().next(),
            Some("nvidia_peermem" | "nv_peer_mem")
        )
    })
}

// ---- the host stand-in ----

/// Counters of a [`HostStandIn`] (shared by all its staging buffers and copies), to check that
/// nothing leaks and that transfers really staged.
#[derive(Debug, Default)]
pub struct StandInStats {
    /// Staging buffers alive now.
    pub staging_live: AtomicUsize,
    /// Staging buffers ever allocated.
    pub staging_allocated: AtomicUsize,
    /// Copies started and not yet done.
    pub copies_in_flight: AtomicUsize,
    /// Copies done, device→host.
    pub copies_to_host: AtomicU64,
    /// Copies done, host→device.
    pub copies_from_host: AtomicU64,
    /// Most copies in flight at once (the pipeline's depth, as seen by the device).
    pub max_in_flight: AtomicUsize,
}

impl StandInStats {
    fn started(&self) {
        // Relaxed: counters for tests, read after the transfers they count have completed (the
        // completion's own synchronisation orders them).
        let n = self.copies_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight.fetch_max(n, Ordering::Relaxed);
    }
}

/// Host memory that stands in for a GPU's: the same [`DeviceMemory`] contract, and copies that
/// really copy but only when waited for (or dropped), as an asynchronous device copy completes
/// later. So a staging bug that uses a buffer before its copy is done shows as wrong bytes.
/// Used by the tests on machines without a GPU, and usable to try device-region code paths.
#[derive(Debug)]
pub struct HostStandIn {
    ordinal: usize,
    len: usize,
    bytes: Arc<Mutex<Box<[u8]>>>,
    ptr: u64,
    stats: Arc<StandInStats>,
}

impl HostStandIn {
    /// `len` zeroed bytes of "device" memory of device `ordinal`. Fails on an allocation the host
    /// cannot make, as a device allocation would.
    pub fn new(ordinal: usize, len: usize) -> Result<Self> {
        let mut v = Vec::new();
        v.try_reserve_exact(len)
            .map_err(|e| TransportError::Device {
                what: "stand-in allocation",
                reason: e.to_string(),
            })?;
        v.resize(len, 0);
        let bytes: Box<[u8]> = v.into_boxed_slice();
        let ptr = bytes.as_ptr() as u64;
        Ok(Self {
            ordinal,
            len,
            bytes: Arc::new(Mutex::new(bytes)),
            ptr,
            stats: Arc::default(),
        })
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<StandInStats> {
        Arc::clone(&self.stats)
    }
}

struct StandInStaging {
    buf: Vec<u8>,
    stats: Arc<StandInStats>,
}

impl Drop for StandInStaging {
    fn drop(&mut self) {
        self.stats.staging_live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StagingBytes for StandInStaging {
    fn bytes(&self) -> &[u8] {
        &self.buf
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

enum Direction {
    ToHost { offset: usize },
    FromHost { offset: usize },
}

/// A stand-in copy: done when waited for (or dropped).
struct StandInCopy {
    bytes: Arc<Mutex<Box<[u8]>>>,
    stats: Arc<StandInStats>,
    buf: Option<Staging>,
    len: usize,
    dir: Direction,
    polled: bool,
}

impl StandInCopy {
    fn run(&mut self) -> Option<Staging> {
        let mut buf = self.buf.take()?;
        let mut dev = self.bytes.lock();
        match self.dir {
            Direction::ToHost { offset } => {
                buf.bytes_mut()[..self.len].copy_from_slice(&dev[offset..offset + self.len]);
                self.stats.copies_to_host.fetch_add(1, Ordering::Relaxed);
            }
            Direction::FromHost { offset } => {
                dev[offset..offset + self.len].copy_from_slice(&buf.bytes()[..self.len]);
                self.stats.copies_from_host.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats.copies_in_flight.fetch_sub(1, Ordering::Relaxed);
        Some(buf)
    }
}

impl PendingCopy for StandInCopy {
    fn is_done(&mut self) -> Result<bool> {
        // Not done the first time it is asked, as a real copy just started is not.
        if !self.polled {
            self.polled = true;
            return Ok(false);
        }
        if self.buf.is_some() {
            self.run();
        }
        Ok(true)
    }
    fn wait(mut self: Box<Self>) -> Result<Staging> {
        self.run().ok_or(TransportError::Device {
            what: "stand-in copy",
            reason: "waited for twice".into(),
        })
    }
}

impl Drop for StandInCopy {
    fn drop(&mut self) {
        // As a CUDA copy: dropping it waits, so the copy happens.
        drop(self.run());
    }
}

impl HostStandIn {
    /// A copy of `len` bytes through `buf`, in direction `dir` (which names the device offset):
    /// checked, counted, finished when polled or waited for.
    fn start_copy(&self, buf: Staging, len: usize, dir: Direction) -> Result<CopyInFlight> {
        let (Direction::ToHost { offset } | Direction::FromHost { offset }) = dir;
        check_copy(self, offset, len, &buf)?;
        let buf = self.own_staging(buf)?;
        self.stats.started();
        Ok(CopyInFlight::new(StandInCopy {
            bytes: Arc::clone(&self.bytes),
            stats: Arc::clone(&self.stats),
            buf: Some(buf),
            len,
            dir,
            polled: false,
        }))
    }

    fn own_staging(&self, buf: Staging) -> Result<Staging> {
        match buf.downcast::<StandInStaging>() {
            Ok(b) => Ok(Staging::new(b)),
            Err(_) => Err(TransportError::InvalidArgument(
                "a staging buffer of another device memory kind".into(),
            )),
        }
    }
}

impl DeviceMemory for HostStandIn {
    fn ordinal(&self) -> usize {
        self.ordinal
    }
    fn ptr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn staging(&self, len: usize) -> Result<Staging> {
        let mut buf = Vec::new();
        buf.try_reserve_exact(len)
            .map_err(|e| TransportError::Device {
                what: "stand-in staging allocation",
                reason: e.to_string(),
            })?;
        buf.resize(len, 0);
        self.stats.staging_live.fetch_add(1, Ordering::Relaxed);
        self.stats.staging_allocated.fetch_add(1, Ordering::Relaxed);
        Ok(Staging::new(StandInStaging {
            buf,
            stats: Arc::clone(&self.stats),
        }))
    }
    fn copy_to_host(&self, offset: usize, buf: Staging, len: usize) -> Result<CopyInFlight> {
        self.start_copy(buf, len, Direction::ToHost { offset })
    }
    fn copy_from_host(&self, buf: Staging, len: usize, offset: usize) -> Result<CopyInFlight> {
        self.start_copy(buf, len, Direction::FromHost { offset })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stand_in_copies_only_when_waited_for() {
        let d = HostStandIn::new(0, 10).unwrap();
        let mut buf = d.staging(4).unwrap();
        buf.bytes_mut().copy_from_slice(&[1, 2, 3, 4]);
        let mut c = d.copy_from_host(buf, 4, 6).unwrap();
        assert!(!c.is_done().unwrap(), "a copy just started is not done");
        assert_eq!(
            &d.bytes.lock()[6..],
            &[0, 0, 0, 0],
            "nothing copied before the wait"
        );
        let buf = c.wait().unwrap();
        assert_eq!(&d.bytes.lock()[6..], &[1, 2, 3, 4]);
        let back = d.copy_to_host(7, buf, 3).unwrap().wait().unwrap();
        assert_eq!(&back.bytes()[..3], &[2, 3, 4]);
        drop(back);
        let s = d.stats();
        assert_eq!(s.staging_live.load(Ordering::Relaxed), 0);
        assert_eq!(s.copies_in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn staging_copies_are_bounds_checked() {
        let d = HostStandIn::new(0, 10).unwrap();
        let buf = d.staging(4).unwrap();
        let e = d.copy_to_host(8, buf, 4).unwrap_err();
        assert!(matches!(e, TransportError::InvalidArgument(_)), "{e}");
        let buf = d.staging(4).unwrap();
        let e = d.copy_from_host(buf, 5, 0).unwrap_err();
        assert!(matches!(e, TransportError::InvalidArgument(_)), "{e}");
        let buf = d.staging(4).unwrap();
        assert!(d.copy_to_host(usize::MAX, buf, 2).is_err());
        assert_eq!(d.stats().staging_live.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn staged_read_and_write_cross_chunk_boundaries() {
        let len = 2 * STAGE_CHUNK + 3;
        let d = HostStandIn::new(0, len + 10).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        write_staged(&d, 5, &data).unwrap();
        let mut out = vec![0u8; len];
        read_staged(&d, 5, &mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(d.stats().copies_from_host.load(Ordering::Relaxed), 3);
        assert_eq!(d.stats().staging_live.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn dropping_a_copy_finishes_it() {
        let d = HostStandIn::new(0, 4).unwrap();
        let mut buf = d.staging(4).unwrap();
        buf.bytes_mut().fill(9);
        drop(d.copy_from_host(buf, 4, 0).unwrap());
        assert_eq!(&d.bytes.lock()[..], &[9; 4]);
        assert_eq!(d.stats().staging_live.load(Ordering::Relaxed), 0);
    }

    fn probe(dmabuf: bool, rdma: bool, peermem: bool, staging: bool) -> GpuDirectProbe {
        GpuDirectProbe {
            cuda_memory: true,
            gpu_dmabuf: dmabuf,
            gpu_rdma: rdma,
            peermem_loaded: peermem,
            staging,
        }
    }

    /// Recorded machines: (probe, what each registration answers, expected way or error text).
    #[test]
    fn gpudirect_decision_on_recorded_machines() {
        type Outcome = fn(GpuDirect) -> std::result::Result<(), String>;
        let ok: Outcome = |_| Ok(());
        let dmabuf_einval: Outcome = |w| match w {
            GpuDirect::Dmabuf => Err("ibv_reg_dmabuf_mr: Invalid argument".into()),
            _ => Ok(()),
        };
        let all_fail: Outcome = |w| Err(format!("{w} refused"));
        let cases: [(
            GpuDirectProbe,
            Outcome,
            std::result::Result<GpuDirect, &str>,
        ); 7] = [
            // H100 + ConnectX-7, open kernel module, Linux 6.x: dma-buf.
            (probe(true, true, true, true), ok, Ok(GpuDirect::Dmabuf)),
            // Same GPU, an rdma-core or provider without dma-buf: falls back to peermem.
            (
                probe(true, true, true, true),
                dmabuf_einval,
                Ok(GpuDirect::Peermem),
            ),
            // Proprietary module on an old kernel: no dma-buf export, peermem loaded.
            (probe(false, true, true, true), ok, Ok(GpuDirect::Peermem)),
            // No peermem, no dma-buf, TCP-like backend that stages.
            (probe(false, true, false, true), ok, Ok(GpuDirect::Staged)),
            // Both fail at registration, staging allowed.
            (
                probe(true, true, true, true),
                all_fail,
                Ok(GpuDirect::Staged),
            ),
            // Both fail, no staging: an error naming every way.
            (
                probe(true, true, true, false),
                all_fail,
                Err("dmabuf: dmabuf refused; peermem: peermem refused; staged:"),
            ),
            // A consumer GPU without GPUDirect RDMA and no dma-buf, no staging.
            (
                probe(false, false, true, false),
                ok,
                Err("peermem: the GPU does not support GPUDirect RDMA"),
            ),
        ];
        for (i, (p, outcome, want)) in cases.into_iter().enumerate() {
            let mut calls = Vec::new();
            let got = decide_gpudirect(&p, |w| {
                calls.push(w);
                outcome(w)
            });
            match (got, want) {
                (Ok(c), Ok(w)) => assert_eq!(c.used, w, "case {i}: {c:?}"),
                (Err(TransportError::GpuDirectUnavailable { tried }), Err(text)) => {
                    assert!(tried.contains(text), "case {i}: {tried}")
                }
                (got, want) => panic!("case {i}: got {got:?}, want {want:?}"),
            }
            assert!(
                !calls.contains(&GpuDirect::Staged),
                "staging is never registered"
            );
            if !p.gpu_dmabuf {
                assert!(
                    !calls.contains(&GpuDirect::Dmabuf),
                    "case {i}: ruled out, not tried"
                );
            }
        }
        // Stand-in memory never reaches the NIC: staged, without any registration attempt.
        let c = decide_gpudirect(
            &GpuDirectProbe {
                staging: true,
                ..Default::default()
            },
            |_| panic!("registered stand-in memory"),
        )
        .unwrap();
        assert_eq!(c.used, GpuDirect::Staged);
        assert_eq!(c.passed_over.len(), 2);
    }

    #[test]
    fn peermem_is_found_in_proc_modules() {
        let with = "nvidia_uvm 1818624 0 - Live 0x0000000000000000\n\
                    nvidia_peermem 16384 0 - Live 0x0000000000000000\n\
                    ib_core 462848 8 nvidia_peermem,rdma_ucm, Live 0x0000000000000000\n";
        assert!(peermem_loaded(with));
        assert!(peermem_loaded("nv_peer_mem 20480 0 - Live 0x0\n"));
        // Named only as a user of another module: not loaded.
        assert!(!peermem_loaded(
            "ib_core 462848 8 nvidia_peermem, Live 0x0\n"
        ));
        assert!(!peermem_loaded(""));
        assert_eq!(GpuDirect::Peermem.to_string(), "peermem");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_cuda_feature_device_allocation_is_a_typed_error() {
        let e = alloc(0, 4096).unwrap_err();
        assert!(matches!(e, TransportError::DeviceUnavailable { .. }), "{e}");
    }
}
