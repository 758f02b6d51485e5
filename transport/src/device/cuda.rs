//! CUDA device memory as a region's memory: the [`DeviceMemory`] copier on a CUDA stream, with
//! pinned host staging buffers kept in a small pool per region.

use super::{CopyInFlight, DeviceMemory, PendingCopy, Staging, StagingBytes, STAGE_CHUNK};
use crate::error::{Result, TransportError};
use genie_sys::cuda::{Device, DeviceBuffer, InFlight, PinnedBuf, Stream};
use parking_lot::Mutex;
use std::any::Any;
use std::fmt;
use std::sync::{Arc, Weak};

/// Free staging buffers a region keeps for reuse (pinned allocations are slow).
const POOL_MAX: usize = 2 * super::STAGE_DEPTH;

type Pool = Mutex<Vec<PinnedBuf>>;

/// Device memory of one CUDA device ([`DeviceBuffer`]: allocated by [`CudaMemory::alloc`], or a
/// serving stack's tensor checked with the driver by [`DeviceBuffer::from_device_ptr`] and kept
/// alive by its owner),
/// with the stream its staging copies run on, in order.
pub struct CudaMemory {
    buf: Mutex<DeviceBuffer>,
    ptr: u64,
    len: usize,
    ordinal: usize,
    device: Device,
    stream: Stream,
    pool: Arc<Pool>,
}

impl fmt::Debug for CudaMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaMemory")
            .field("ordinal", &self.ordinal)
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .finish()
    }
}

impl CudaMemory {
    /// Allocates `len` zeroed bytes on GPU `gpu`.
    pub fn alloc(gpu: usize, len: usize) -> Result<Self> {
        let device = Device::open(gpu)?;
        let buf = device.alloc(len)?;
        Self::new(buf)
    }

    /// Takes device memory (freed, or its owner dropped, with the last region using it).
    pub fn new(buf: DeviceBuffer) -> Result<Self> {
        let device = buf.device().clone();
        let stream = device.stream()?;
        Ok(Self {
            ptr: buf.ptr(),
            len: buf.len(),
            ordinal: buf.ordinal(),
            buf: Mutex::new(buf),
            device,
            stream,
            pool: Arc::default(),
        })
    }

    /// Runs `f` on the device buffer (for a registration with the NIC).
    pub fn with_buffer<R>(&self, f: impl FnOnce(&DeviceBuffer) -> R) -> R {
        f(&self.buf.lock())
    }

    fn pinned(buf: Staging) -> Result<PinnedBuf> {
        match buf.downcast::<CudaStaging>() {
            Ok(mut s) => s.buf.take().ok_or(TransportError::Device {
                what: "staging",
                reason: "an empty staging buffer".into(),
            }),
            Err(_) => Err(TransportError::InvalidArgument(
                "a staging buffer of another device memory kind".into(),
            )),
        }
    }
}

/// A pinned staging buffer that goes back to its region's pool when dropped.
struct CudaStaging {
    buf: Option<PinnedBuf>,
    pool: Weak<Pool>,
}

impl Drop for CudaStaging {
    fn drop(&mut self) {
        let (Some(buf), Some(pool)) = (self.buf.take(), self.pool.upgrade()) else {
            return;
        };
        let mut free = pool.lock();
        if free.len() < POOL_MAX {
            free.push(buf);
        }
    }
}

impl StagingBytes for CudaStaging {
    fn bytes(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or(&[])
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().unwrap_or(&mut [])
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// A staging copy on the region's stream; dropping it waits (see [`InFlight`]).
struct CudaCopy {
    inflight: InFlight,
    pool: Weak<Pool>,
}

impl PendingCopy for CudaCopy {
    fn is_done(&mut self) -> Result<bool> {
        Ok(self.inflight.is_complete()?)
    }
    fn wait(self: Box<Self>) -> Result<Staging> {
        let CudaCopy { inflight, pool } = *self;
        let buf = inflight.wait()?;
        Ok(Staging::new(CudaStaging {
            buf: Some(buf),
            pool,
        }))
    }
}

impl DeviceMemory for CudaMemory {
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
        let reuse = {
            let mut free = self.pool.lock();
            free.iter()
                .position(|b| b.len() >= len)
                .map(|i| free.swap_remove(i))
        };
        let buf = match reuse {
            Some(b) => b,
            // Uniform chunk-sized buffers pool best; a larger request gets its own size.
            None => self.device.alloc_pinned(len.max(STAGE_CHUNK))?,
        };
        Ok(Staging::new(CudaStaging {
            buf: Some(buf),
            pool: Arc::downgrade(&self.pool),
        }))
    }
    fn copy_to_host(&self, offset: usize, buf: Staging, len: usize) -> Result<CopyInFlight> {
        let host = Self::pinned(buf)?;
        let inflight = self
            .stream
            .copy_from_device(&self.buf.lock(), offset, host, 0..len)?;
        Ok(CopyInFlight::new(CudaCopy {
            inflight,
            pool: Arc::downgrade(&self.pool),
        }))
    }
    fn copy_from_host(&self, buf: Staging, len: usize, offset: usize) -> Result<CopyInFlight> {
        let host = Self::pinned(buf)?;
        let inflight = self
            .stream
            .copy_to_device(host, 0..len, &mut self.buf.lock(), offset)?;
        Ok(CopyInFlight::new(CudaCopy {
            inflight,
            pool: Arc::downgrade(&self.pool),
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
