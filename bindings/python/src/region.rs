//! `genie.Region`: registered memory, either the endpoint's own (zero-copy through the buffer
//! protocol) or a caller's buffer (registered in place, or staged when read-only; see [`Region`]).

use crate::errors::to_py;
use genie_transport::{Region as TRegion, RegionAccess};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyMemoryView};
use std::ffi::{c_int, c_void};

/// Memory registered with an endpoint, which peers reach through its descriptor.
///
/// - From `Endpoint.alloc(n)`: the endpoint's own page-aligned memory, exported through the
///   buffer protocol, so `memoryview(region)` and `numpy.frombuffer(region, dtype)` are views of
///   the registered bytes themselves (zero-copy): remote writes land in the array.
/// - From `Endpoint.register(obj)`: the caller's buffer, kept alive (and, for a `bytearray`,
///   locked against resizing) while the region or any transfer using it lives. A writable buffer
///   is registered in place (zero-copy: remote writes land in the caller's array). A read-only
///   one (`bytes`, a read-only array; only with access 'read' or 'local') is *staged* through a
///   registered copy: a write from the region copies the written range in first, and `flush()`
///   copies it in before a peer reads it.
///
/// The registered bytes are shared with the transport like RDMA memory: do not touch a range
/// while a transfer that uses it is in flight; read what a peer wrote once its notification or
/// completion arrived.
#[pyclass(module = "genie", name = "Region", frozen)]
pub struct Region {
    pub(crate) inner: TRegion,
    pub(crate) staged: Option<Staged>,
    /// The caller's object of a region from `Endpoint.register`.
    caller: Option<Py<PyAny>>,
}

/// The caller's read-only buffer behind a staged region.
pub(crate) struct Staged {
    /// A byte view of the caller's object; holding the export keeps the object alive and its
    /// memory where it is.
    buf: PyBuffer<u8>,
}

/// Parses an access name.
pub(crate) fn parse_access(s: &str) -> PyResult<RegionAccess> {
    Ok(match s {
        "rw" | "read_write" => RegionAccess::ReadWrite,
        "r" | "read" => RegionAccess::Read,
        "w" | "write" => RegionAccess::Write,
        "local" => RegionAccess::Local,
        other => {
            return Err(PyValueError::new_err(format!(
                "access must be 'rw', 'read', 'write' or 'local', not {other:?}"
            )))
        }
    })
}

fn access_name(a: RegionAccess) -> &'static str {
    match a {
        RegionAccess::Read => "read",
        RegionAccess::Write => "write",
        RegionAccess::Local => "local",
        _ => "rw",
    }
}

impl Region {
    /// A region of the endpoint's own memory.
    pub(crate) fn owned(inner: TRegion) -> Self {
        Self {
            inner,
            staged: None,
            caller: None,
        }
    }

    /// Checks `obj` (C-contiguous; writable when peers may write it) and registers it: in place
    /// when writable, as a staged copy when read-only.
    pub(crate) fn register(
        obj: &Bound<'_, PyAny>,
        access: RegionAccess,
        t: &dyn genie_transport::Transport,
    ) -> PyResult<Self> {
        let py = obj.py();
        let mv = PyMemoryView::from(obj).map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "cannot register a {}: it does not support the buffer protocol (use a numpy \
                 array, bytearray or memoryview)",
                obj.get_type().name().map_or("?".into(), |n| n.to_string())
            ))
        })?;
        if !mv.getattr("c_contiguous")?.extract::<bool>()? {
            return Err(PyBufferError::new_err(
                "cannot register a non-contiguous buffer: its bytes are not one C-contiguous \
                 range (pass numpy.ascontiguousarray(x), or a contiguous slice)",
            ));
        }
        if mv.getattr("readonly")?.extract::<bool>()? && access.allows_write() {
            return Err(PyBufferError::new_err(format!(
                "cannot register a read-only buffer with access '{}': peers could write into \
                 it; register it with access='read' or 'local', or pass a writable buffer",
                access_name(access)
            )));
        }
        let readonly = mv.getattr("readonly")?.extract::<bool>()?;
        let bytes = mv.call_method1("cast", ("B",))?;
        let buf = PyBuffer::<u8>::get(&bytes)?;
        if readonly {
            let inner = t
                .register_with(buf.to_vec(py)?, access)
                .map_err(|e| to_py(py, e))?;
            return Ok(Self {
                inner,
                staged: Some(Staged { buf }),
                caller: Some(obj.clone().unbind()),
            });
        }
        let (ptr, len) = (buf.buf_ptr().cast::<u8>(), buf.len_bytes());
        buf.release(py);
        // The owner is the byte memoryview: it holds its own export of `obj`'s buffer, so the
        // memory stays allocated and in place (a bytearray cannot resize) while it lives.
        // Dropping a `Py` without the GIL (e.g. on the transport's progress thread, when an
        // operation in flight held the region last) only queues the decref, so no transport
        // thread ever waits for the GIL.
        let owner: Box<dyn std::any::Any + Send + Sync> = Box::new(bytes.unbind());
        // SAFETY: `ptr` and `len` describe the writable (checked), C-contiguous (checked) buffer
        // that `owner`'s export pins: one allocation of initialised bytes that is not freed,
        // moved or resized while `owner` lives, readable and writable from any thread (plain
        // process memory). The region keeps `owner` as long as it or any operation using it
        // lives. The caller accepts DMA-like access by the transport (the type's docs).
        let mem = unsafe { genie_sys::mem::SharedBuf::from_foreign(ptr, len, owner) };
        let inner = t.register_shared(mem, access).map_err(|e| to_py(py, e))?;
        Ok(Self {
            inner,
            staged: None,
            caller: Some(obj.clone().unbind()),
        })
    }

    /// Checks that the region can be the destination of a local read.
    pub(crate) fn check_read_target(&self) -> PyResult<()> {
        match &self.staged {
            Some(s) if s.buf.readonly() => Err(PyBufferError::new_err(
                "cannot read into a region registered from a read-only buffer",
            )),
            _ => Ok(()),
        }
    }

    /// Before a transfer reads `[off, off+len)` of the region: a staged region copies that range
    /// of the caller's buffer in.
    pub(crate) fn stage_in(&self, py: Python<'_>, off: usize, len: usize) -> PyResult<()> {
        let Some(s) = &self.staged else {
            return Ok(());
        };
        self.inner.check_local(off, len).map_err(|e| to_py(py, e))?;
        if len == 0 {
            return Ok(());
        }
        let src = s.buf.buf_ptr().cast::<u8>().cast_const();
        self.inner.with_mut(|dst| {
            if let Some(dst) = dst.get_mut(off..off + len) {
                // SAFETY: `src` is the start of the caller's `len_bytes()` bytes, which stay
                // allocated and in place while `s.buf` holds its buffer export; the region has
                // the same length and `off + len` is inside it (checked above), so the source
                // range is inside the buffer; `dst` is the region's own memory, a different
                // allocation, so the ranges do not overlap. The GIL is held (`py`).
                unsafe { std::ptr::copy_nonoverlapping(src.add(off), dst.as_mut_ptr(), len) }
            }
        });
        Ok(())
    }

    /// After a transfer wrote `[off, off+len)` of the region: a staged region copies that range
    /// out to the caller's buffer.
    pub(crate) fn stage_out(&self, py: Python<'_>, off: usize, len: usize) -> PyResult<()> {
        let Some(s) = &self.staged else {
            return Ok(());
        };
        self.inner.check_local(off, len).map_err(|e| to_py(py, e))?;
        self.check_read_target()?;
        if len == 0 {
            return Ok(());
        }
        let dst = s.buf.buf_ptr().cast::<u8>();
        self.inner.with(|src| {
            if let Some(src) = src.get(off..off + len) {
                // SAFETY: as in `stage_in`, with the roles swapped: `dst` is the caller's
                // writable buffer (checked not read-only), `off + len` lies inside it, and the
                // region's memory is a different allocation.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(off), len) }
            }
        });
        Ok(())
    }

    fn range(&self, offset: usize, length: Option<usize>) -> PyResult<(usize, usize)> {
        let len = match length {
            Some(l) => l,
            None => self.inner.len().checked_sub(offset).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "offset {offset} is past the region's {} bytes",
                    self.inner.len()
                ))
            })?,
        };
        Ok((offset, len))
    }
}

#[pymethods]
impl Region {
    /// Length in bytes.
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// The region's id within its endpoint.
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id()
    }

    /// What peers may do to it: 'rw', 'read', 'write' or 'local'.
    #[getter]
    fn access(&self) -> &'static str {
        access_name(self.inner.access())
    }

    /// Whether the registered bytes are the memory Python sees (`Endpoint.alloc`, or a writable
    /// buffer given to `Endpoint.register`), as opposed to a staged copy of a read-only buffer.
    #[getter]
    fn zero_copy(&self) -> bool {
        self.staged.is_none()
    }

    /// The caller's object of a region from `Endpoint.register`, else `None`.
    #[getter]
    fn obj(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.caller.as_ref().map(|o| o.clone_ref(py))
    }

    /// The descriptor (bytes) a peer needs to access this region on any connection to this
    /// endpoint (a private region's grants nothing: use `Connection.grant`).
    fn descriptor<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &crate::descriptor::encode(&self.inner.descriptor()))
    }

    /// Staged regions: copies `[offset, offset+length)` of the caller's buffer into the
    /// registered memory (before a peer reads it). A no-op for zero-copy regions.
    #[pyo3(signature = (offset=0, length=None))]
    fn flush(&self, py: Python<'_>, offset: usize, length: Option<usize>) -> PyResult<()> {
        let (off, len) = self.range(offset, length)?;
        self.stage_in(py, off, len)
    }

    /// Staged regions: copies `[offset, offset+length)` of the registered memory out to the
    /// caller's buffer (after a peer wrote it). A no-op for zero-copy regions.
    #[pyo3(signature = (offset=0, length=None))]
    fn refresh(&self, py: Python<'_>, offset: usize, length: Option<usize>) -> PyResult<()> {
        let (off, len) = self.range(offset, length)?;
        self.stage_out(py, off, len)
    }

    /// A copy of `length` registered bytes at `offset` (taken under the region's lock).
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: usize,
        length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.inner
            .check_local(offset, length)
            .map_err(|e| to_py(py, e))?;
        PyBytes::new_with(py, length, |out| {
            self.inner.read(offset, out).map_err(|e| to_py(py, e))
        })
    }

    /// Copies `data` into the registered bytes at `offset` (under the region's lock).
    fn write(&self, py: Python<'_>, offset: usize, data: &[u8]) -> PyResult<()> {
        self.check_read_target()?;
        self.inner.write(offset, data).map_err(|e| to_py(py, e))
    }

    fn __repr__(&self) -> String {
        format!(
            "Region(id={}, len={}, access='{}', zero_copy={})",
            self.inner.id(),
            self.inner.len(),
            access_name(self.inner.access()),
            if self.staged.is_none() {
                "True"
            } else {
                "False"
            }
        )
    }

    /// The buffer protocol: a writable, one-dimensional byte view of a zero-copy region's
    /// registered memory.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("null Py_buffer"));
        }
        let me = slf.get();
        if me.staged.is_some() {
            return Err(PyBufferError::new_err(
                "a region staged from a read-only buffer exports no buffer of its own: use \
                 region.obj (the caller's object)",
            ));
        }
        if me.inner.is_device() {
            // Device memory is not host bytes: never export its address as a buffer.
            return Err(PyBufferError::new_err(
                "a device region has no host bytes to export: use region.read / region.write",
            ));
        }
        let len = isize::try_from(me.inner.len())
            .map_err(|_| PyBufferError::new_err("region too large for a buffer"))?;
        let buf = me.inner.addr() as *mut c_void;
        // SAFETY: `view` is non-null and CPython hands us a `Py_buffer` to fill for the duration
        // of this call. The exported memory is the region's allocation: it never moves or
        // shrinks, and stays allocated while `view.obj` (a new reference to this object, which
        // holds the region) lives, i.e. until the export is released. `format` points at a
        // static NUL-terminated string that consumers only read; `shape` and `strides` point
        // into the view itself, as CPython's own `PyBuffer_FillInfo` does. Concurrent access by
        // the transport follows the RDMA contract in the type's docs.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = buf;
            (*view).len = len;
            (*view).readonly = 0;
            (*view).itemsize = 1;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
                c"B".as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & ffi::PyBUF_ND == ffi::PyBUF_ND {
                &raw mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
                &raw mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }
}
