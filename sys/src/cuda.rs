//! Small safe types over the CUDA driver API (through `cudarc`, which loads libcuda at run time).
//!
//! The objects and their order of use:
//!
//! ```text
//! devices()                                  ordinal, name, memory, PCI bus id, GPUDirect support
//! Device::open(ordinal)                      retains the device's primary context
//!   ├─ DeviceBuffer  (Device::alloc)         device memory, freed on drop; dma-buf export
//!   ├─ PinnedBuf     (Device::alloc_pinned)  page-locked host memory, derefs to [u8]
//!   ├─ Event         (Device::event)         a point in a stream's work
//!   └─ Stream        (Device::stream)        async copies host↔device, device↔device
//!        └─ InFlight                         a copy that owns its host buffer until it is done
//! ```
//!
//! Children hold the [`Device`] (an `Arc` of the retained primary context), so any drop order is
//! sound. Every call binds the device's primary context to the calling thread first, so every type
//! may be used from any thread.
//!
//! ```
//! use genie_sys::cuda::{self, CudaError, Device};
//!
//! # fn main() -> Result<(), CudaError> {
//! let gpus = match cuda::devices() {
//!     Ok(gpus) => gpus,
//!     Err(e @ (CudaError::NoDriver { .. } | CudaError::NoDevice)) => {
//!         println!("no GPU here: {e}");
//!         return Ok(());
//!     }
//!     Err(e) => return Err(e),
//! };
//! println!("{} (nearest NIC: {:?})", gpus[0], gpus[0].nearest_rdma_device());
//! let dev = Device::open(gpus[0].ordinal)?;
//! let stream = dev.stream()?;
//! let mut host = dev.alloc_pinned(4096)?;
//! host.fill(7);
//! let mut gpu = dev.alloc(4096)?;
//! // The copy owns `host` until it is done; `wait` hands it back.
//! let _host = stream.copy_to_device(host, 0..4096, &mut gpu, 0)?.wait()?;
//! let back = stream.copy_from_device(&gpu, 0, dev.alloc_pinned(4096)?, 0..4096)?.wait()?;
//! assert!(back.iter().all(|&b| b == 7));
//! # Ok(())
//! # }
//! ```
//!
//! ## Loading
//!
//! Nothing is linked: the first call probes the library names cudarc would load (`libcuda.so`,
//! `libcuda.so.1`, ...), checks that every driver symbol this module calls is there, and only then
//! lets cudarc call into it (its own loader panics where the library or a symbol is missing).
//! Without a driver every function returns [`CudaError::NoDriver`]; a driver too old for a symbol
//! gives [`CudaError::MissingSymbol`]; no GPU gives [`CudaError::NoDevice`].
//!
//! ## Host memory in flight
//!
//! An async copy reads or writes host memory after the call that enqueued it returns. The safe
//! copies therefore take the [`PinnedBuf`] by value and keep it in the returned [`InFlight`] until
//! the copy's event has completed ([`InFlight::wait`] hands it back; dropping an `InFlight` waits;
//! forgetting one leaks the buffer, which is safe). Device memory is never Rust memory, so device
//! operands are only borrowed while the copy is enqueued; ordering on device memory is the
//! stream's job, as in CUDA itself. Copies from or to other host memory are the `unsafe` `*_raw`
//! methods.

use std::any::Any;
use std::ffi::{c_int, c_void, CStr};
use std::fmt;
use std::ops::{Deref, DerefMut, Range};
use std::os::fd::{FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys;

use crate::pci::PciAddress;

/// Errors of the CUDA layer, each naming the driver call that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No CUDA driver library could be loaded: this machine has no NVIDIA driver (or it is not on
    /// the loader path).
    #[error("no CUDA driver: none of {tried:?} could be loaded")]
    NoDriver {
        /// The library names tried, in order.
        tried: Vec<String>,
    },
    /// The driver library lacks a function Genie calls: the driver is too old.
    #[error("the CUDA driver {library} has no {symbol} (driver too old?)")]
    MissingSymbol {
        /// The library that was loaded.
        library: String,
        /// The missing function.
        symbol: &'static str,
    },
    /// The driver works but sees no GPU.
    #[error("the CUDA driver sees no device")]
    NoDevice,
    /// No device with this ordinal.
    #[error("no CUDA device {ordinal} (there are {count})")]
    DeviceNotFound {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices there are.
        count: usize,
    },
    /// A driver call failed; `call` names it.
    #[error("{call} failed: {name} ({code})")]
    Driver {
        /// The driver function (`cuMemAlloc_v2`, ...).
        call: &'static str,
        /// The `CUresult` it returned.
        code: u32,
        /// Its name (`CUDA_ERROR_OUT_OF_MEMORY`).
        name: String,
    },
    /// The driver reported a PCI bus id that does not parse.
    #[error("CUDA device {ordinal} reported PCI bus id {raw:?}")]
    BadBusId {
        /// The device.
        ordinal: usize,
        /// What the driver said.
        raw: String,
    },
    /// A range lies outside its buffer.
    #[error("[{offset}, {offset}+{len}) is outside the buffer of {size} bytes")]
    OutOfBounds {
        /// Start of the range.
        offset: usize,
        /// Its length.
        len: usize,
        /// Size of the buffer.
        size: usize,
    },
    /// An allocation size overflows when rounded up to its granularity.
    #[error("cannot allocate {len} bytes: the size overflows")]
    TooLarge {
        /// The requested length.
        len: usize,
    },
    /// A host↔device copy names device memory of another device than the stream's.
    #[error("device memory of device {found} on a stream of device {expected}")]
    WrongDevice {
        /// The stream's device.
        expected: usize,
        /// The buffer's device.
        found: usize,
    },
    /// A dma-buf export range is not aligned to the host page size, as the driver requires.
    #[error("dma-buf export: {what} {value:#x} is not a multiple of the {page}-byte page")]
    Unaligned {
        /// `"address"` or `"length"`.
        what: &'static str,
        /// The offending value.
        value: u64,
        /// The host page size.
        page: usize,
    },
    /// A pointer given as device memory is not plain device memory of the device named (host,
    /// managed or unknown memory, another device, or a range past its allocation).
    #[error("{ptr:#x} is not device memory of device {ordinal}: {reason}")]
    NotDeviceMemory {
        /// The pointer.
        ptr: u64,
        /// The device it was said to be on.
        ordinal: usize,
        /// What the driver said instead.
        reason: String,
    },
    /// Device memory cannot be exported as a dma-buf here (old driver, device or kernel); the
    /// transport falls back to peer memory or staging.
    #[error("dma-buf export of device memory is unsupported: {reason}")]
    DmabufUnsupported {
        /// Why.
        reason: String,
    },
}

/// The driver functions this module calls; all are checked at load time, so that cudarc's loader
/// (which panics on a missing symbol) never meets one that is absent.
const REQUIRED: &[&str] = &[
    "cuInit",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetPCIBusId",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuPointerGetAttribute",
    "cuMemGetAddressRange_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemsetD8_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventDestroy_v2",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemcpyPeerAsync",
];

/// Optional: dma-buf export (CUDA 11.7 drivers and later).
const DMABUF_SYMBOL: &str = "cuMemGetHandleForAddressRange";

/// Granularity of [`Device::alloc`]: device allocations are whole 2 MiB GPU pages, so each buffer
/// starts on a page boundary and can be exported as a dma-buf without exposing a neighbour.
pub const DEVICE_ALLOC_GRANULARITY: usize = 2 << 20;

/// The loaded driver. The library handle is kept for the life of the process, so that cudarc's
/// loader, which opens the same name first, finds the same library.
struct Driver {
    library: String,
    dmabuf: bool,
    _lib: libloading::Library,
}

static DRIVER: OnceLock<Result<Driver, CudaError>> = OnceLock::new();

/// Loads and initialises the driver once per process; later calls see the same outcome.
fn driver() -> Result<&'static Driver, CudaError> {
    DRIVER
        .get_or_init(|| load(&candidates()))
        .as_ref()
        .map_err(Clone::clone)
}

/// The names cudarc loads libcuda from, in its order, without repeats.
fn candidates() -> Vec<String> {
    let mut names = cudarc::get_lib_name_candidates("cuda");
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Opens the first loadable library of `candidates` and checks the symbols of [`REQUIRED`].
fn open_driver(candidates: &[String]) -> Result<Driver, CudaError> {
    let found = candidates.iter().find_map(|name| {
        // SAFETY: loading a library runs its initialisers; the candidates are the CUDA driver's
        // names (the same list cudarc loads from), whose initialisers have no preconditions.
        unsafe { libloading::Library::new(name) }
            .ok()
            .map(|lib| (name.clone(), lib))
    });
    let Some((library, lib)) = found else {
        return Err(CudaError::NoDriver {
            tried: candidates.to_vec(),
        });
    };
    let has = |symbol: &str| {
        // SAFETY: the symbol is only looked up, never called through this type.
        unsafe { lib.get::<*const c_void>(symbol.as_bytes()) }.is_ok()
    };
    if let Some(symbol) = REQUIRED.iter().find(|s| !has(s)) {
        return Err(CudaError::MissingSymbol { library, symbol });
    }
    let dmabuf = has(DMABUF_SYMBOL);
    Ok(Driver {
        library,
        dmabuf,
        _lib: lib,
    })
}

fn load(candidates: &[String]) -> Result<Driver, CudaError> {
    let driver = open_driver(candidates)?;
    // SAFETY: cuInit takes no pointers; the library and the symbol were checked above.
    let r = unsafe { sys::cuInit(0) };
    if r == sys::CUresult::CUDA_ERROR_NO_DEVICE {
        return Err(CudaError::NoDevice);
    }
    check("cuInit", r)?;
    tracing::debug!(library = %driver.library, dmabuf = driver.dmabuf, "CUDA driver loaded");
    Ok(driver)
}

/// Turns a `CUresult` into a `Result`, naming the call. Only called once the driver is loaded.
fn check(call: &'static str, r: sys::CUresult) -> Result<(), CudaError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: `name` is a valid out-pointer; the driver sets it to a static string or leaves it.
    let named = unsafe { sys::cuGetErrorName(r, &mut name) } == sys::CUresult::CUDA_SUCCESS;
    let name = if named && !name.is_null() {
        // SAFETY: on success the driver points `name` at a static NUL-terminated string.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    } else {
        format!("{r:?}")
    };
    Err(CudaError::Driver {
        call,
        code: r as u32,
        name,
    })
}

/// The host page size, which dma-buf export ranges must be aligned to.
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096).max(1)
}

fn range_in(offset: usize, len: usize, size: usize) -> Result<(), CudaError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(CudaError::OutOfBounds { offset, len, size }),
    }
}

/// The driver's version as `major * 1000 + minor * 10` (12080 for CUDA 12.8).
pub fn driver_version() -> Result<i32, CudaError> {
    driver()?;
    let mut v = 0;
    // SAFETY: `v` is a valid out-pointer.
    check("cuDriverGetVersion", unsafe {
        sys::cuDriverGetVersion(&mut v)
    })?;
    Ok(v)
}

/// How many CUDA devices the driver sees.
pub fn device_count() -> Result<usize, CudaError> {
    driver()?;
    let mut n: c_int = 0;
    // SAFETY: `n` is a valid out-pointer.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// What the driver says about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its ordinal (the `N` of `cuda:N`).
    pub ordinal: usize,
    /// Its name (`NVIDIA H200`).
    pub name: String,
    /// Total device memory in bytes.
    pub total_memory: u64,
    /// Its PCI address, to find the nearest NIC with [`crate::pci::nearest_rdma_device`].
    pub pci_bus_id: PciAddress,
    /// Whether the device supports GPUDirect RDMA (`CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED`).
    pub gpudirect_rdma: bool,
    /// Whether its memory can be exported as a dma-buf (device attribute and driver both).
    pub dmabuf: bool,
}

impl DeviceInfo {
    /// The RDMA device closest to this GPU over PCIe, from the real sysfs (see
    /// [`crate::pci::nearest_rdma_device`]); `None` where the machine has none.
    pub fn nearest_rdma_device(
        &self,
    ) -> Result<Option<crate::pci::Affinity>, crate::pci::PciError> {
        crate::pci::nearest_rdma_device(std::path::Path::new(crate::pci::SYSFS), self.pci_bus_id)
    }
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cuda:{} {} {} MiB pci={} gpudirect_rdma={} dmabuf={}",
            self.ordinal,
            self.name,
            self.total_memory >> 20,
            self.pci_bus_id,
            self.gpudirect_rdma,
            self.dmabuf
        )
    }
}

/// Lists the devices, or says why there are none: [`CudaError::NoDriver`] without a driver,
/// [`CudaError::NoDevice`] without a GPU. Never panics.
pub fn devices() -> Result<Vec<DeviceInfo>, CudaError> {
    let count = device_count()?;
    if count == 0 {
        return Err(CudaError::NoDevice);
    }
    (0..count).map(|o| device_info(o, cu_device(o)?)).collect()
}

fn cu_device(ordinal: usize) -> Result<sys::CUdevice, CudaError> {
    let count = device_count()?;
    let not_found = CudaError::DeviceNotFound { ordinal, count };
    let o = c_int::try_from(ordinal).map_err(|_| not_found.clone())?;
    if ordinal >= count {
        return Err(not_found);
    }
    let mut dev: sys::CUdevice = 0;
    // SAFETY: `dev` is a valid out-pointer; the ordinal is below the device count.
    check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, o) })?;
    Ok(dev)
}

fn attribute(dev: sys::CUdevice, attr: sys::CUdevice_attribute) -> Result<i32, CudaError> {
    let mut v = 0;
    // SAFETY: `v` is a valid out-pointer and `dev` came from cuDeviceGet.
    check("cuDeviceGetAttribute", unsafe {
        sys::cuDeviceGetAttribute(&mut v, attr, dev)
    })?;
    Ok(v)
}

fn device_info(ordinal: usize, dev: sys::CUdevice) -> Result<DeviceInfo, CudaError> {
    let mut name = [0u8; 256];
    // SAFETY: the buffer is valid for its length, which is passed; the driver NUL-terminates.
    check("cuDeviceGetName", unsafe {
        sys::cuDeviceGetName(name.as_mut_ptr().cast(), name.len() as c_int, dev)
    })?;
    let mut total = 0usize;
    // SAFETY: `total` is a valid out-pointer and `dev` came from cuDeviceGet.
    check("cuDeviceTotalMem_v2", unsafe {
        sys::cuDeviceTotalMem_v2(&mut total, dev)
    })?;
    let mut bus = [0u8; 64];
    // SAFETY: as for the name.
    check("cuDeviceGetPCIBusId", unsafe {
        sys::cuDeviceGetPCIBusId(bus.as_mut_ptr().cast(), bus.len() as c_int, dev)
    })?;
    let text = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    let raw_bus = text(&bus);
    let pci_bus_id = raw_bus.parse().map_err(|_| CudaError::BadBusId {
        ordinal,
        raw: raw_bus.clone(),
    })?;
    use sys::CUdevice_attribute as A;
    let gpudirect_rdma = attribute(dev, A::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED)? != 0;
    let dmabuf = driver()?.dmabuf && attribute(dev, A::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)? != 0;
    Ok(DeviceInfo {
        ordinal,
        name: text(&name),
        total_memory: total as u64,
        pci_bus_id,
        gpudirect_rdma,
        dmabuf,
    })
}

/// One CUDA device with its primary context retained (the context CUDA runtimes such as PyTorch
/// use, so memory they allocated is valid here too). Cheap to clone.
#[derive(Clone)]
pub struct Device {
    inner: Arc<DeviceInner>,
}

struct DeviceInner {
    ordinal: usize,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a CUcontext is a process-wide handle; the driver API may use it from any thread (each
// call binds it to the calling thread first), and the release in `Drop` may run on any thread.
unsafe impl Send for DeviceInner {}
// SAFETY: `&DeviceInner` only reads the handles; concurrent driver calls are thread-safe.
unsafe impl Sync for DeviceInner {}

impl Drop for DeviceInner {
    fn drop(&mut self) {
        // SAFETY: `dev` had its primary context retained in `Device::open`; this is the one release.
        let r = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
        if let Err(e) = check("cuDevicePrimaryCtxRelease_v2", r) {
            tracing::error!(ordinal = self.ordinal, error = %e, "releasing a CUDA context failed");
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.inner.ordinal)
            .finish()
    }
}

impl Device {
    /// Opens device `ordinal` (retains its primary context).
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        let dev = cu_device(ordinal)?;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `ctx` is a valid out-pointer and `dev` came from cuDeviceGet; the retain is
        // balanced by the release in `DeviceInner::drop`.
        check("cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
        })?;
        Ok(Self {
            inner: Arc::new(DeviceInner { ordinal, dev, ctx }),
        })
    }

    /// Its ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// What the driver says about it.
    pub fn info(&self) -> Result<DeviceInfo, CudaError> {
        device_info(self.inner.ordinal, self.inner.dev)
    }

    /// Makes this device's context current on the calling thread (cheap; done before every call).
    fn bind(&self) -> Result<(), CudaError> {
        // SAFETY: the context is retained for as long as `self` lives.
        check("cuCtxSetCurrent", unsafe {
            sys::cuCtxSetCurrent(self.inner.ctx)
        })
    }

    /// Allocates `len` bytes of zeroed device memory. The allocation is rounded up to
    /// [`DEVICE_ALLOC_GRANULARITY`], so the buffer can be exported as a dma-buf on its own;
    /// [`DeviceBuffer::len`] stays `len`.
    pub fn alloc(&self, len: usize) -> Result<DeviceBuffer, CudaError> {
        let size = len
            .max(1)
            .checked_next_multiple_of(DEVICE_ALLOC_GRANULARITY)
            .ok_or(CudaError::TooLarge { len })?;
        self.bind()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out-pointer; the context is current.
        check("cuMemAlloc_v2", unsafe {
            sys::cuMemAlloc_v2(&mut ptr, size)
        })?;
        let buf = DeviceBuffer {
            device: self.clone(),
            ptr,
            len,
            alloc_len: size,
            owner: Owner::Driver,
        };
        // Zeroed, so that memory a peer may read never shows a previous owner's data.
        // SAFETY: [ptr, ptr + size) was just allocated.
        check("cuMemsetD8_v2", unsafe { sys::cuMemsetD8_v2(ptr, 0, size) })?;
        // A device memset may return before it has run, on the legacy default stream, which the
        // non-blocking streams of this module do not wait for: wait here, or a copy could race it.
        // SAFETY: the null stream is the context's legacy default stream; the context is current.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(std::ptr::null_mut())
        })?;
        Ok(buf)
    }

    /// Allocates `len` zeroed bytes of page-locked host memory, usable by every context.
    pub fn alloc_pinned(&self, len: usize) -> Result<PinnedBuf, CudaError> {
        self.bind()?;
        let mut raw: *mut c_void = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; the context is current. One byte at least, so
        // that a zero-length buffer still has a unique valid address.
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(&mut raw, len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE)
        })?;
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or(CudaError::Driver {
            call: "cuMemHostAlloc",
            code: 0,
            name: "null pointer".into(),
        })?;
        // SAFETY: the driver returned `len.max(1)` writable bytes at `ptr`.
        unsafe { ptr.as_ptr().write_bytes(0, len.max(1)) };
        Ok(PinnedBuf {
            device: self.clone(),
            ptr,
            len,
        })
    }

    /// Creates a stream that does not synchronise with the legacy default stream.
    pub fn stream(&self) -> Result<Stream, CudaError> {
        self.bind()?;
        let mut raw: sys::CUstream = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; the context is current.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut raw, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        Ok(Stream {
            device: self.clone(),
            raw,
        })
    }

    /// Creates an event (timing disabled: events here only order and wait).
    pub fn event(&self) -> Result<Event, CudaError> {
        self.bind()?;
        let mut raw: sys::CUevent = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; the context is current.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut raw, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
        })?;
        Ok(Event {
            device: self.clone(),
            raw,
        })
    }

    /// Exports the device memory `[ptr, ptr + len)` of this device as a dma-buf file descriptor
    /// (`cuMemGetHandleForAddressRange`, `CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD`), for
    /// `ibv_reg_dmabuf_mr`. Both must be multiples of the host page size. Memory the driver does
    /// not know is refused by the driver, so no use of this can touch memory; the descriptor
    /// keeps nothing alive, so the caller keeps the memory allocated as long as it is in use.
    pub fn dmabuf_fd(&self, ptr: u64, len: usize) -> Result<OwnedFd, CudaError> {
        let driver = driver()?;
        let page = page_size();
        if ptr % page as u64 != 0 {
            return Err(CudaError::Unaligned {
                what: "address",
                value: ptr,
                page,
            });
        }
        if len == 0 || len % page != 0 {
            return Err(CudaError::Unaligned {
                what: "length",
                value: len as u64,
                page,
            });
        }
        if !driver.dmabuf {
            return Err(CudaError::DmabufUnsupported {
                reason: format!("{} has no {DMABUF_SYMBOL}", driver.library),
            });
        }
        let supported = attribute(
            self.inner.dev,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED,
        )?;
        if supported == 0 {
            return Err(CudaError::DmabufUnsupported {
                reason: format!(
                    "device {} reports CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 0 (needs Turing+, \
                     an open kernel module or Linux 5.12+)",
                    self.inner.ordinal
                ),
            });
        }
        self.bind()?;
        let mut fd: c_int = -1;
        // SAFETY: `fd` is a valid out-pointer for the int that a DMA_BUF_FD handle is; the driver
        // checks that the range is device memory it allocated.
        let r = unsafe {
            sys::cuMemGetHandleForAddressRange(
                (&mut fd as *mut c_int).cast(),
                ptr,
                len,
                sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        };
        if r == sys::CUresult::CUDA_ERROR_NOT_SUPPORTED {
            return Err(CudaError::DmabufUnsupported {
                reason: "cuMemGetHandleForAddressRange: CUDA_ERROR_NOT_SUPPORTED".into(),
            });
        }
        check("cuMemGetHandleForAddressRange", r)?;
        if fd < 0 {
            return Err(CudaError::Driver {
                call: "cuMemGetHandleForAddressRange",
                code: 0,
                name: format!("returned fd {fd}"),
            });
        }
        // SAFETY: the driver just opened `fd` for us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Exports `[ptr, ptr + len)` of device memory as a dma-buf, finding its device from the pointer
/// (for memory a serving stack allocated). See [`Device::dmabuf_fd`].
pub fn dmabuf_fd(ptr: u64, len: usize) -> Result<OwnedFd, CudaError> {
    driver()?;
    let mut ordinal: c_int = -1;
    // SAFETY: the out-pointer is an int, as CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL writes; the driver
    // only looks the address up.
    check("cuPointerGetAttribute", unsafe {
        sys::cuPointerGetAttribute(
            (&mut ordinal as *mut c_int).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr,
        )
    })?;
    let ordinal = usize::try_from(ordinal).map_err(|_| CudaError::Driver {
        call: "cuPointerGetAttribute",
        code: 0,
        name: format!("device ordinal {ordinal}"),
    })?;
    Device::open(ordinal)?.dmabuf_fd(ptr, len)
}

enum Owner {
    /// Allocated by [`Device::alloc`]; freed on drop.
    Driver,
    /// Memory someone else allocated, kept alive by this value.
    Foreign(#[allow(dead_code)] Box<dyn Any + Send + Sync>),
}

/// Device memory: a pointer, a length and a device. Freed on drop (or, for memory registered with
/// [`DeviceBuffer::from_foreign`], its owner is dropped).
pub struct DeviceBuffer {
    device: Device,
    ptr: sys::CUdeviceptr,
    len: usize,
    alloc_len: usize,
    owner: Owner,
}

impl fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("ordinal", &self.device.ordinal())
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .finish()
    }
}

impl DeviceBuffer {
    /// Wraps device memory allocated elsewhere (a serving stack's tensor: `data_ptr`, `nbytes`,
    /// device), keeping `owner` alive as long as the buffer.
    ///
    /// # Safety
    ///
    /// `[ptr, ptr + len)` must be device memory of `device`, allocated and not freed for as long
    /// as `owner` lives, and nothing may access it in a way that races with the copies made
    /// through this buffer.
    pub unsafe fn from_foreign(
        device: &Device,
        ptr: u64,
        len: usize,
        owner: impl Any + Send + Sync,
    ) -> Self {
        Self {
            device: device.clone(),
            ptr,
            len,
            alloc_len: len,
            owner: Owner::Foreign(Box::new(owner)),
        }
    }

    /// Wraps device memory allocated elsewhere (a serving stack's tensor: `data_ptr`, `nbytes`,
    /// device ordinal), keeping `owner` alive as long as the buffer, after asking the driver that
    /// `[ptr, ptr + len)` lies inside one live allocation of plain device memory (not host,
    /// not managed) of device `ordinal`; otherwise [`CudaError::NotDeviceMemory`].
    ///
    /// Safe, unlike [`DeviceBuffer::from_foreign`]: the driver vouches for the range, and device
    /// memory is never Rust memory, so a caller whose `owner` does not in fact keep the memory
    /// allocated can corrupt device data (as any CUDA program can) but no host memory.
    pub fn from_device_ptr(
        ptr: u64,
        len: usize,
        ordinal: usize,
        owner: impl Any + Send + Sync,
    ) -> Result<Self, CudaError> {
        let device = Device::open(ordinal)?;
        device.bind()?;
        let not = |reason: String| CudaError::NotDeviceMemory {
            ptr,
            ordinal,
            reason,
        };
        let attr = |a: sys::CUpointer_attribute| -> Result<u32, CudaError> {
            let mut v: u32 = 0;
            // SAFETY: the three attributes asked for (memory type, is-managed, device ordinal)
            // each write one 32-bit integer, which `v` is; the driver only looks `ptr` up.
            let r = unsafe { sys::cuPointerGetAttribute((&mut v as *mut u32).cast(), a, ptr) };
            check("cuPointerGetAttribute", r).map_err(|e| not(e.to_string()))?;
            Ok(v)
        };
        use sys::CUpointer_attribute as P;
        let kind = attr(P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE)?;
        if kind != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
            return Err(not(format!("memory type {kind}, not CU_MEMORYTYPE_DEVICE")));
        }
        if attr(P::CU_POINTER_ATTRIBUTE_IS_MANAGED)? != 0 {
            return Err(not("managed (unified) memory".into()));
        }
        let on = attr(P::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL)?;
        if on as usize != ordinal {
            return Err(not(format!("it is on device {on}")));
        }
        let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: both are valid out-pointers; the driver only looks `ptr` up.
        check("cuMemGetAddressRange_v2", unsafe {
            sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr)
        })
        .map_err(|e| not(e.to_string()))?;
        match ptr.checked_add(len as u64) {
            Some(end) if end <= base.saturating_add(size as u64) => {}
            _ => {
                return Err(not(format!(
                    "[{ptr:#x}, +{len}) runs past its allocation [{base:#x}, +{size})"
                )))
            }
        }
        Ok(Self {
            device,
            ptr,
            len,
            alloc_len: len,
            owner: Owner::Foreign(Box::new(owner)),
        })
    }

    /// Its device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.device.ordinal()
    }

    /// Its device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Exports the whole buffer (its allocation, whole pages) as a dma-buf; see
    /// [`Device::dmabuf_fd`].
    pub fn dmabuf_fd(&self) -> Result<OwnedFd, CudaError> {
        let page = page_size();
        let len = self
            .alloc_len
            .max(1)
            .checked_next_multiple_of(page)
            .unwrap_or(self.alloc_len);
        self.device.dmabuf_fd(self.ptr, len)
    }

    fn at(&self, offset: usize, len: usize) -> Result<sys::CUdeviceptr, CudaError> {
        range_in(offset, len, self.len)?;
        Ok(self.ptr + offset as u64)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if !matches!(self.owner, Owner::Driver) {
            return;
        }
        let r = self.device.bind().and_then(|()| {
            // SAFETY: `ptr` came from cuMemAlloc in this context and is freed once, here. Device
            // work still using it could only touch device memory, never memory Rust owns.
            check("cuMemFree_v2", unsafe { sys::cuMemFree_v2(self.ptr) })
        });
        if let Err(e) = r {
            tracing::error!(ordinal = self.device.ordinal(), error = %e, "freeing device memory failed");
        }
    }
}

/// Page-locked host memory allocated by the driver: DMA-able by the GPU (fast async copies) and
/// registrable with a NIC. Derefs to `[u8]`.
pub struct PinnedBuf {
    device: Device,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `PinnedBuf` uniquely owns its allocation (like `Box<[u8]>`), and it was allocated
// portable, so any thread may use and free it.
unsafe impl Send for PinnedBuf {}
// SAFETY: shared references only allow reads through `&[u8]`; mutation needs `&mut PinnedBuf`.
unsafe impl Sync for PinnedBuf {}

impl Deref for PinnedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised (zeroed at allocation) bytes for the life
        // of `self`, and a copy in flight owns the buffer, so none writes it concurrently.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for PinnedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for PinnedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedBuf").field("len", &self.len).finish()
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        let r = self.device.bind().and_then(|()| {
            // SAFETY: `ptr` came from cuMemHostAlloc and is freed once, here; no copy is in
            // flight, since an `InFlight` owns its buffer until the copy is done.
            let r = unsafe { sys::cuMemFreeHost(self.ptr.as_ptr().cast()) };
            check("cuMemFreeHost", r)
        });
        if let Err(e) = r {
            tracing::error!(error = %e, "freeing pinned host memory failed");
        }
    }
}

/// A point in a stream's work: record it on a stream, then wait for it on the host or make another
/// stream wait for it.
pub struct Event {
    device: Device,
    raw: sys::CUevent,
}

// SAFETY: a CUevent is a driver handle usable from any thread (driver calls are thread-safe).
unsafe impl Send for Event {}
// SAFETY: every method is a thread-safe driver call on the handle.
unsafe impl Sync for Event {}

impl Event {
    /// Blocks until the work recorded before this event has finished (at once if never recorded).
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: the event is alive for the life of `self`.
        check("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(self.raw)
        })
    }

    /// Whether the work recorded before this event has finished.
    pub fn is_complete(&self) -> Result<bool, CudaError> {
        self.device.bind()?;
        // SAFETY: the event is alive for the life of `self`.
        let r = unsafe { sys::cuEventQuery(self.raw) };
        if r == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check("cuEventQuery", r).map(|()| true)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event is destroyed once, here; the driver releases it after pending work.
        let r = unsafe { sys::cuEventDestroy_v2(self.raw) };
        if let Err(e) = check("cuEventDestroy_v2", r) {
            tracing::error!(error = %e, "destroying a CUDA event failed");
        }
    }
}

/// A CUDA stream: copies enqueued on it run in order, asynchronously to the host.
pub struct Stream {
    device: Device,
    raw: sys::CUstream,
}

// SAFETY: a CUstream is a driver handle usable from any thread (driver calls are thread-safe).
unsafe impl Send for Stream {}
// SAFETY: every method is a thread-safe driver call on the handle.
unsafe impl Sync for Stream {}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: the stream is destroyed once, here; the driver lets enqueued work finish first,
        // and every host buffer that work touches is owned by an `InFlight` or the caller of an
        // unsafe `*_raw` copy.
        let r = unsafe { sys::cuStreamDestroy_v2(self.raw) };
        if let Err(e) = check("cuStreamDestroy_v2", r) {
            tracing::error!(error = %e, "destroying a CUDA stream failed");
        }
    }
}

/// A host↔device copy in flight. It owns its [`PinnedBuf`] until the copy is done: [`wait`]
/// returns it; dropping an `InFlight` waits; if waiting fails the buffer is leaked rather than
/// freed under the copy.
///
/// [`wait`]: InFlight::wait
#[must_use = "dropping an InFlight blocks until its copy is done"]
pub struct InFlight {
    buf: Option<PinnedBuf>,
    done: Event,
}

impl InFlight {
    /// Blocks until the copy is done and hands the host buffer back.
    pub fn wait(mut self) -> Result<PinnedBuf, CudaError> {
        let buf = self.buf.take();
        match self.done.synchronize() {
            Ok(()) => Ok(buf.expect("an InFlight holds its buffer until waited")),
            Err(e) => {
                std::mem::forget(buf);
                Err(e)
            }
        }
    }

    /// Whether the copy is done (then [`wait`](InFlight::wait) does not block).
    pub fn is_complete(&self) -> Result<bool, CudaError> {
        self.done.is_complete()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            if let Err(e) = self.done.synchronize() {
                tracing::error!(error = %e, "a copy could not be waited for; its host buffer leaks");
                std::mem::forget(buf);
            }
        }
    }
}

impl Stream {
    /// Its device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn same_device(&self, buf: &DeviceBuffer) -> Result<(), CudaError> {
        if buf.ordinal() != self.device.ordinal() {
            return Err(CudaError::WrongDevice {
                expected: self.device.ordinal(),
                found: buf.ordinal(),
            });
        }
        Ok(())
    }

    /// Tracks a copy just enqueued with `buf`: `done` is recorded after it. Where that fails the
    /// whole stream is waited for instead, and where even that fails the buffer is leaked.
    fn in_flight(&self, buf: PinnedBuf, done: Event) -> Result<InFlight, CudaError> {
        if let Err(e) = self.record(&done) {
            if self.synchronize().is_err() {
                tracing::error!(error = %e, "an untracked copy may still run; its host buffer leaks");
                std::mem::forget(buf);
            }
            return Err(e);
        }
        Ok(InFlight {
            buf: Some(buf),
            done,
        })
    }

    /// Enqueues a copy of `src[src_range]` to `dst` at `dst_offset`; the buffer travels with the
    /// copy and comes back from [`InFlight::wait`].
    pub fn copy_to_device(
        &self,
        src: PinnedBuf,
        src_range: Range<usize>,
        dst: &mut DeviceBuffer,
        dst_offset: usize,
    ) -> Result<InFlight, CudaError> {
        let len = src_range.end.saturating_sub(src_range.start);
        range_in(src_range.start, len, src.len())?;
        // Created first: once the copy is enqueued, `src` must not be dropped untracked.
        let done = self.device.event()?;
        // SAFETY: the range is inside `src`, which `in_flight` keeps until the copy's event has
        // completed (or leaks); a failed enqueue copies nothing, so dropping `src` then is sound.
        unsafe {
            self.copy_to_device_raw(src.as_ptr().add(src_range.start), len, dst, dst_offset)?;
        }
        self.in_flight(src, done)
    }

    /// Enqueues a copy of `len = dst_range.len()` bytes of `src` at `src_offset` into
    /// `dst[dst_range]`; the buffer comes back, filled, from [`InFlight::wait`].
    pub fn copy_from_device(
        &self,
        src: &DeviceBuffer,
        src_offset: usize,
        mut dst: PinnedBuf,
        dst_range: Range<usize>,
    ) -> Result<InFlight, CudaError> {
        let len = dst_range.end.saturating_sub(dst_range.start);
        range_in(dst_range.start, len, dst.len())?;
        let done = self.device.event()?;
        // SAFETY: as in `copy_to_device`.
        unsafe {
            let at = dst.as_mut_ptr().add(dst_range.start);
            self.copy_from_device_raw(src, src_offset, at, len)?;
        }
        self.in_flight(dst, done)
    }

    /// Enqueues a copy of `len` bytes from `src` at `src_offset` to `dst` at `dst_offset`, on one
    /// device or between two (a peer copy). Only device memory is touched, so nothing is held.
    pub fn copy_device(
        &self,
        src: &DeviceBuffer,
        src_offset: usize,
        dst: &mut DeviceBuffer,
        dst_offset: usize,
        len: usize,
    ) -> Result<(), CudaError> {
        let s = src.at(src_offset, len)?;
        let d = dst.at(dst_offset, len)?;
        self.device.bind()?;
        if src.ordinal() == dst.ordinal() {
            // SAFETY: both ranges are inside live allocations (checked above), the stream is alive.
            check("cuMemcpyDtoDAsync_v2", unsafe {
                sys::cuMemcpyDtoDAsync_v2(d, s, len, self.raw)
            })
        } else {
            // SAFETY: as above; each context is retained by its buffer's device.
            check("cuMemcpyPeerAsync", unsafe {
                sys::cuMemcpyPeerAsync(
                    d,
                    dst.device.inner.ctx,
                    s,
                    src.device.inner.ctx,
                    len,
                    self.raw,
                )
            })
        }
    }

    /// Enqueues a copy of `len` host bytes at `src` to `dst` at `dst_offset`.
    ///
    /// # Safety
    ///
    /// `[src, src + len)` must stay valid for reads, and unwritten, until the copy has finished
    /// (an event recorded after it has completed, or [`Stream::synchronize`] has returned).
    pub unsafe fn copy_to_device_raw(
        &self,
        src: *const u8,
        len: usize,
        dst: &mut DeviceBuffer,
        dst_offset: usize,
    ) -> Result<(), CudaError> {
        self.same_device(dst)?;
        let d = dst.at(dst_offset, len)?;
        self.device.bind()?;
        // SAFETY: the device range is checked; the host range is the caller's promise.
        check("cuMemcpyHtoDAsync_v2", unsafe {
            sys::cuMemcpyHtoDAsync_v2(d, src.cast(), len, self.raw)
        })
    }

    /// Enqueues a copy of `len` bytes of `src` at `src_offset` to host memory at `dst`.
    ///
    /// # Safety
    ///
    /// `[dst, dst + len)` must stay valid for writes, and otherwise unaccessed, until the copy
    /// has finished (an event recorded after it has completed, or [`Stream::synchronize`] has
    /// returned).
    pub unsafe fn copy_from_device_raw(
        &self,
        src: &DeviceBuffer,
        src_offset: usize,
        dst: *mut u8,
        len: usize,
    ) -> Result<(), CudaError> {
        self.same_device(src)?;
        let s = src.at(src_offset, len)?;
        self.device.bind()?;
        // SAFETY: the device range is checked; the host range is the caller's promise.
        check("cuMemcpyDtoHAsync_v2", unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst.cast(), s, len, self.raw)
        })
    }

    /// Records `event` after the work enqueued so far.
    pub fn record(&self, event: &Event) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: both handles are alive for the duration of the call.
        check("cuEventRecord", unsafe {
            sys::cuEventRecord(event.raw, self.raw)
        })
    }

    /// Makes later work on this stream wait for `event` (which may belong to another stream).
    pub fn wait_event(&self, event: &Event) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: both handles are alive for the duration of the call.
        check("cuStreamWaitEvent", unsafe {
            sys::cuStreamWaitEvent(self.raw, event.raw, 0)
        })
    }

    /// Blocks until all work enqueued so far has finished.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: the stream is alive for the duration of the call.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(self.raw)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device the device tests use, or `None` (printing why) where there is none. With
    /// `GENIE_CUDA_REQUIRE=1` (set by scripts/test-gpu.sh) a missing device fails instead.
    fn test_device() -> Option<Device> {
        let why = match devices() {
            Ok(_) => match Device::open(0) {
                Ok(d) => return Some(d),
                Err(e) => e,
            },
            Err(e) => e,
        };
        if std::env::var("GENIE_CUDA_REQUIRE").is_ok_and(|v| v == "1") {
            panic!("GENIE_CUDA_REQUIRE=1 but no CUDA device: {why}");
        }
        eprintln!("skipped: {why}");
        None
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn a_missing_library_is_no_driver() {
        let tried = vec!["libgenie-no-such-cuda.so.1".to_string()];
        match open_driver(&tried) {
            Err(CudaError::NoDriver { tried: t }) => assert_eq!(t, tried),
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("loaded a library that does not exist"),
        }
    }

    #[test]
    fn a_library_without_cuda_is_a_missing_symbol() {
        match open_driver(&["libc.so.6".to_string()]) {
            Err(CudaError::MissingSymbol { library, symbol }) => {
                assert_eq!(library, "libc.so.6");
                assert_eq!(symbol, "cuInit");
            }
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("libc passed for a CUDA driver"),
        }
    }

    /// Where no driver loads (this CI), every entry point says so with the same typed error.
    #[test]
    fn without_a_driver_every_call_is_a_typed_error() {
        if let Ok(d) = open_driver(&candidates()) {
            eprintln!("skipped: a CUDA driver is installed ({})", d.library);
            return;
        }
        let no_driver = |r: Result<(), CudaError>| match r {
            Err(CudaError::NoDriver { tried }) => {
                assert!(tried.iter().any(|t| t == "libcuda.so.1"), "{tried:?}");
                assert!(tried.iter().any(|t| t == "libcuda.so"), "{tried:?}");
            }
            other => panic!("expected NoDriver, got {other:?}"),
        };
        no_driver(devices().map(drop));
        no_driver(device_count().map(drop));
        no_driver(driver_version().map(drop));
        no_driver(Device::open(0).map(drop));
        no_driver(dmabuf_fd(0x20_0000, 0x20_0000).map(drop));
        no_driver(DeviceBuffer::from_device_ptr(0x20_0000, 4096, 0, ()).map(drop));
        let msg = devices().unwrap_err().to_string();
        assert!(msg.starts_with("no CUDA driver"), "{msg}");
    }

    #[test]
    fn ranges_are_checked_arithmetic() {
        assert_eq!(range_in(0, 8, 8), Ok(()));
        assert_eq!(range_in(8, 0, 8), Ok(()));
        assert!(range_in(1, 8, 8).is_err());
        assert!(range_in(usize::MAX, 2, 8).is_err());
    }

    // ---- device tests: skip cleanly without a driver or device ----

    #[test]
    fn device_list_and_nearest_nic() {
        let Some(_dev) = test_device() else { return };
        println!("driver {}", driver_version().unwrap());
        for d in devices().unwrap() {
            assert!(d.total_memory > 0);
            let nic = match d.nearest_rdma_device() {
                Ok(Some(a)) => format!("{} ({:?}, {} hops)", a.device.name, a.link, a.hops),
                Ok(None) => "none".into(),
                Err(e) => format!("error: {e}"),
            };
            println!("{d} nearest_rdma={nic}");
        }
    }

    #[test]
    fn host_device_round_trip_with_checksums() {
        let Some(dev) = test_device() else { return };
        let stream = dev.stream().unwrap();
        for len in [1usize, 8, 4097, 1 << 20, 8 << 20] {
            let want = pattern(len, len as u8);
            let mut host = dev.alloc_pinned(len).unwrap();
            assert!(host.iter().all(|&b| b == 0), "pinned memory starts zeroed");
            host.copy_from_slice(&want);
            let mut d = dev.alloc(len).unwrap();
            assert_eq!((d.len(), d.ordinal()), (len, 0));
            let host = stream
                .copy_to_device(host, 0..len, &mut d, 0)
                .unwrap()
                .wait()
                .unwrap();
            let back = dev.alloc_pinned(len).unwrap();
            let back = stream
                .copy_from_device(&d, 0, back, 0..len)
                .unwrap()
                .wait()
                .unwrap();
            assert_eq!(&back[..], &want[..], "len {len}");
            drop(host);
        }
    }

    #[test]
    fn device_to_device_and_offsets() {
        let Some(dev) = test_device() else { return };
        let stream = dev.stream().unwrap();
        let len = 3 << 20;
        let want = pattern(len, 7);
        let mut host = dev.alloc_pinned(len).unwrap();
        host.copy_from_slice(&want);
        let mut a = dev.alloc(len).unwrap();
        let mut b = dev.alloc(len).unwrap();
        let host = stream.copy_to_device(host, 0..len, &mut a, 0).unwrap();
        // Same stream: the device copy runs after the upload without a host wait.
        stream.copy_device(&a, 100, &mut b, 0, len - 100).unwrap();
        let host = host.wait().unwrap();
        let out = stream
            .copy_from_device(&b, 0, host, 0..len - 100)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(&out[..len - 100], &want[100..]);
        // A fresh allocation reads as zeros.
        let z = dev.alloc(4096).unwrap();
        let out = stream
            .copy_from_device(&z, 0, out, 0..4096)
            .unwrap()
            .wait()
            .unwrap();
        assert!(out[..4096].iter().all(|&x| x == 0));
    }

    #[test]
    fn out_of_bounds_copies_are_refused() {
        let Some(dev) = test_device() else { return };
        let stream = dev.stream().unwrap();
        let mut d = dev.alloc(64).unwrap();
        let e = stream
            .copy_to_device(dev.alloc_pinned(64).unwrap(), 0..64, &mut d, 1)
            .err();
        assert!(matches!(e, Some(CudaError::OutOfBounds { .. })), "{e:?}");
        let e = stream
            .copy_from_device(&d, 0, dev.alloc_pinned(8).unwrap(), 4..16)
            .err();
        assert!(matches!(e, Some(CudaError::OutOfBounds { .. })), "{e:?}");
        let s = dev.alloc(64).unwrap();
        let e = stream.copy_device(&s, 60, &mut d, 0, 8).err();
        assert!(matches!(e, Some(CudaError::OutOfBounds { .. })), "{e:?}");
    }

    #[test]
    fn events_order_two_streams() {
        let Some(dev) = test_device() else { return };
        let (s1, s2) = (dev.stream().unwrap(), dev.stream().unwrap());
        let len = 16 << 20;
        let mut host = dev.alloc_pinned(len).unwrap();
        host.copy_from_slice(&pattern(len, 3));
        let mut a = dev.alloc(len).unwrap();
        let mut b = dev.alloc(len).unwrap();
        let up = s1.copy_to_device(host, 0..len, &mut a, 0).unwrap();
        let uploaded = dev.event().unwrap();
        s1.record(&uploaded).unwrap();
        s2.wait_event(&uploaded).unwrap();
        s2.copy_device(&a, 0, &mut b, 0, len).unwrap();
        let done = dev.event().unwrap();
        s2.record(&done).unwrap();
        done.synchronize().unwrap();
        assert!(done.is_complete().unwrap());
        let host = up.wait().unwrap();
        let out = s2
            .copy_from_device(&b, 0, host, 0..len)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(&out[..], &pattern(len, 3)[..]);
        s1.synchronize().unwrap();
    }

    #[test]
    fn dmabuf_export_or_a_typed_refusal() {
        let Some(dev) = test_device() else { return };
        let buf = dev.alloc(4 << 20).unwrap();
        match buf.dmabuf_fd() {
            Ok(fd) => {
                use std::os::fd::AsRawFd;
                assert!(fd.as_raw_fd() >= 0);
                println!("dmabuf: exported fd {}", fd.as_raw_fd());
                // The free function finds the device from the pointer.
                dmabuf_fd(buf.ptr(), 4 << 20).unwrap();
            }
            Err(CudaError::DmabufUnsupported { reason }) => {
                println!("dmabuf: unsupported: {reason}")
            }
            Err(e) => panic!("dma-buf export failed: {e}"),
        }
        let e = dev.dmabuf_fd(buf.ptr() + 1, 4096).unwrap_err();
        assert!(
            matches!(
                e,
                CudaError::Unaligned {
                    what: "address",
                    ..
                }
            ),
            "{e}"
        );
        let e = dev.dmabuf_fd(buf.ptr(), 100).unwrap_err();
        assert!(
            matches!(e, CudaError::Unaligned { what: "length", .. }),
            "{e}"
        );
    }

    #[test]
    fn foreign_memory_keeps_its_owner_and_is_not_freed() {
        let Some(dev) = test_device() else { return };
        let real = Arc::new(dev.alloc(1 << 20).unwrap());
        let stream = dev.stream().unwrap();
        let want = pattern(4096, 9);
        {
            // SAFETY: `real` is device memory of `dev`, kept alive by the owner passed in.
            let mut view =
                unsafe { DeviceBuffer::from_foreign(&dev, real.ptr(), 4096, real.clone()) };
            assert_eq!(Arc::strong_count(&real), 2);
            let mut host = dev.alloc_pinned(4096).unwrap();
            host.copy_from_slice(&want);
            stream
                .copy_to_device(host, 0..4096, &mut view, 0)
                .unwrap()
                .wait()
                .unwrap();
        }
        assert_eq!(Arc::strong_count(&real), 1);
        let out = stream
            .copy_from_device(&real, 0, dev.alloc_pinned(4096).unwrap(), 0..4096)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(&out[..], &want[..]);
    }

    #[test]
    fn device_pointers_are_checked_with_the_driver() {
        let Some(dev) = test_device() else { return };
        let real = Arc::new(dev.alloc(1 << 20).unwrap());
        let view = DeviceBuffer::from_device_ptr(real.ptr() + 4096, 8192, 0, real.clone()).unwrap();
        assert_eq!((view.len(), view.ordinal()), (8192, 0));
        assert_eq!(Arc::strong_count(&real), 2);
        drop(view);
        assert_eq!(Arc::strong_count(&real), 1);
        let bad = |r: Result<DeviceBuffer, CudaError>| match r {
            Err(CudaError::NotDeviceMemory { reason, .. }) => println!("refused: {reason}"),
            other => panic!("expected NotDeviceMemory, got {other:?}"),
        };
        // Past the allocation (its whole 2 MiB granule), host memory, a wrong device ordinal.
        bad(DeviceBuffer::from_device_ptr(real.ptr(), 4 << 20, 0, ()));
        let host = [0u8; 64];
        bad(DeviceBuffer::from_device_ptr(
            host.as_ptr() as u64,
            64,
            0,
            (),
        ));
        bad(DeviceBuffer::from_device_ptr(0x10, 64, 0, ()));
        let pinned = dev.alloc_pinned(4096).unwrap();
        bad(DeviceBuffer::from_device_ptr(
            pinned.as_ptr() as u64,
            4096,
            0,
            (),
        ));
        if let Ok(other) = Device::open(1) {
            let o = other.alloc(4096).unwrap();
            bad(DeviceBuffer::from_device_ptr(o.ptr(), 4096, 0, ()));
        }
    }

    #[test]
    fn peer_copy_between_two_devices() {
        let Some(dev) = test_device() else { return };
        let Ok(other) = Device::open(1) else {
            eprintln!("skipped: one device only");
            return;
        };
        let stream = dev.stream().unwrap();
        let len = 1 << 20;
        let mut host = dev.alloc_pinned(len).unwrap();
        host.copy_from_slice(&pattern(len, 5));
        let mut a = dev.alloc(len).unwrap();
        let mut b = other.alloc(len).unwrap();
        let host = stream
            .copy_to_device(host, 0..len, &mut a, 0)
            .unwrap()
            .wait()
            .unwrap();
        stream.copy_device(&a, 0, &mut b, 0, len).unwrap();
        stream.synchronize().unwrap();
        let e = stream.copy_from_device(&b, 0, host, 0..len).err();
        assert!(matches!(e, Some(CudaError::WrongDevice { .. })), "{e:?}");
        let s2 = other.stream().unwrap();
        let out = s2
            .copy_from_device(&b, 0, other.alloc_pinned(len).unwrap(), 0..len)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(&out[..], &pattern(len, 5)[..]);
    }
}
