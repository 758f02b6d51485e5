//! The native module of the `genie` Python package (`genie._genie`): Genie's transport
//! (`genie-transport`) for Python serving stacks.
//!
//! The Python API mirrors the Rust one: an [`Endpoint`] (backend, listen address, secret, device)
//! registers [`Region`]s and makes [`Connection`]s; a connection posts one-sided writes and reads
//! (optionally with a 32-bit notification), batches of `(local_offset, remote_offset, length)`
//! triples, and two-sided messages; every operation returns a completion handle
//! ([`Completion`], [`BatchCompletion`]). Every call that can block releases the GIL, and waits
//! without a limit still answer Ctrl-C. Errors are the hierarchy in [`errors`].
//!
//! ```python
//! import genie, numpy as np
//! server, client = genie.Endpoint(backend="tcp"), genie.Endpoint(backend="tcp")
//! target = server.alloc(1 << 20)                 # registered; numpy view is zero-copy
//! conn = client.connect(server.address)
//! peer = server.accept(timeout=5)
//! src = client.register(np.arange(256, dtype=np.uint8))
//! conn.write(src, 0, target.descriptor(), 0, 256, notify=7).wait(5)
//! assert peer.recv_notification(5) == 7
//! assert bytes(memoryview(target)[:256]) == bytes(range(256))
//! ```
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

mod completion;
mod descriptor;
mod engine;
mod errors;
mod region;

use completion::{BatchCompletion, Completion, CopyBack};
use descriptor::{remote_of, PyRemoteRegion};
use errors::to_py;
use genie_transport::{
    BackendChoice, PollMode, RdmaConfig, Transfer, TransferKind, Transport, TransportConfig,
    TransportError,
};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use region::{parse_access, Region};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A wait without a limit wakes this often to let Python handle signals (Ctrl-C).
const SIGNAL_SLICE: Duration = Duration::from_millis(100);

/// Runs `f(slice)` with the GIL released until it returns something other than a timeout, or
/// `timeout` seconds (`None`: no limit) have passed; between slices, Python handles signals.
pub(crate) fn wait_released<T, F>(py: Python<'_>, timeout: Option<f64>, mut f: F) -> PyResult<T>
where
    F: FnMut(Duration) -> genie_transport::Result<T> + Send,
    T: Send,
{
    let total = match timeout {
        None => None,
        Some(t) => Some(Duration::try_from_secs_f64(t).map_err(|_| {
            PyValueError::new_err(format!("timeout must be a non-negative number, not {t}"))
        })?),
    };
    let start = Instant::now();
    loop {
        let slice = match total {
            Some(t) => t.saturating_sub(start.elapsed()).min(SIGNAL_SLICE),
            None => SIGNAL_SLICE,
        };
        match py.detach(|| f(slice)) {
            Err(TransportError::Timeout { .. }) => {
                if let Some(t) = total {
                    if start.elapsed() >= t {
                        return Err(errors::timeout(py, t));
                    }
                }
                py.check_signals()?;
            }
            Ok(v) => return Ok(v),
            Err(e) => return Err(to_py(py, e)),
        }
    }
}

/// An endpoint: registered memory, a listening address, and the backend's progress engine.
///
/// `Endpoint(backend="auto", listen="127.0.0.1:0", secret=None, device=None, peer_timeout=2.0,
/// busy_poll=False, max_message_size=65536)`. `backend` is `"auto"` (RDMA when built with it and
/// a device exists, else TCP; `backend_reason` says why), `"tcp"` or `"rdma"`. With a `secret`,
/// both sides of every connection must know it. `busy_poll` spins instead of sleeping while
/// waiting (lowest latency; costs a core). The endpoint shuts down when it is garbage-collected.
#[pyclass(module = "genie", name = "Endpoint", frozen)]
pub struct Endpoint {
    t: Arc<dyn Transport>,
    reason: String,
}

#[pymethods]
impl Endpoint {
    #[new]
    #[pyo3(signature = (backend="auto", listen="127.0.0.1:0", secret=None, device=None,
                        peer_timeout=2.0, busy_poll=false, max_message_size=65536))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        backend: &str,
        listen: &str,
        secret: Option<String>,
        device: Option<String>,
        peer_timeout: f64,
        busy_poll: bool,
        max_message_size: usize,
    ) -> PyResult<Self> {
        let config = TransportConfig {
            backend: parse_backend(backend)?,
            listen: parse_addr(listen)?,
            secret,
            rdma: RdmaConfig {
                device,
                ..RdmaConfig::default()
            },
            peer_timeout: Duration::try_from_secs_f64(peer_timeout)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| PyValueError::new_err("peer_timeout must be positive seconds"))?,
            poll_mode: if busy_poll {
                PollMode::BusyPoll
            } else {
                PollMode::Blocking
            },
            max_message_size,
            ..TransportConfig::default()
        };
        let (t, sel) = py
            .detach(|| genie_transport::open_with_selection(config))
            .map_err(|e| to_py(py, e))?;
        Ok(Self {
            t,
            reason: sel.reason,
        })
    }

    /// The backend in use: "tcp" or "rdma".
    #[getter]
    fn backend(&self) -> String {
        self.t.backend().to_string()
    }

    /// Why this backend was chosen (e.g. "auto: RDMA not usable (...)").
    #[getter]
    fn backend_reason(&self) -> &str {
        &self.reason
    }

    /// The address peers connect to, "ip:port".
    #[getter]
    fn address(&self) -> String {
        self.t.local_addr().to_string()
    }

    /// The listening port.
    #[getter]
    fn port(&self) -> u16 {
        self.t.local_addr().port()
    }

    /// This endpoint's random identity.
    #[getter]
    fn endpoint_id(&self) -> u64 {
        self.t.endpoint_id()
    }

    /// Allocates and registers `nbytes` zeroed, page-aligned bytes that peers may access as
    /// `access` says ('rw', 'read', 'write', 'local'). The region exports its memory through the
    /// buffer protocol (zero-copy). `private=True`: only `Connection.grant` descriptors reach it.
    #[pyo3(signature = (nbytes, access="rw", private=false))]
    fn alloc(
        &self,
        py: Python<'_>,
        nbytes: usize,
        access: &str,
        private: bool,
    ) -> PyResult<Region> {
        let access = parse_access(access)?;
        let t = &self.t;
        let r = py
            .detach(|| {
                if private {
                    t.alloc_private_region(nbytes, access)
                } else {
                    t.alloc_region_with(nbytes, access)
                }
            })
            .map_err(|e| to_py(py, e))?;
        Ok(Region::owned(r))
    }

    /// Registers the caller's buffer (numpy array, bytearray, memoryview, any C-contiguous
    /// object with the buffer protocol), keeping the object alive. A writable buffer is
    /// registered in place (zero-copy). Refuses a non-contiguous buffer, and a read-only one when
    /// peers may write it (`access` 'rw' or 'write'), with a `BufferError`. See `Region`.
    #[pyo3(signature = (obj, access="rw"))]
    fn register(&self, obj: &Bound<'_, PyAny>, access: &str) -> PyResult<Region> {
        let access = parse_access(access)?;
        Region::register(obj, access, &*self.t)
    }

    /// Allocates `nbytes` of zeroed memory on GPU `device` as a region (a package built with the
    /// `cuda` feature, on a machine with a CUDA driver; otherwise a `GenieError` with `kind`
    /// 'device_unavailable' or 'cuda'). A device region moves with the same calls as host memory
    /// (over TCP staged through pinned host buffers); it exports no buffer: use `read`/`write`.
    #[pyo3(signature = (device, nbytes, access="rw"))]
    fn alloc_device(
        &self,
        py: Python<'_>,
        device: usize,
        nbytes: usize,
        access: &str,
    ) -> PyResult<Region> {
        let access = parse_access(access)?;
        let t = &self.t;
        let r = py
            .detach(|| t.alloc_device_region_with(device, nbytes, access))
            .map_err(|e| to_py(py, e))?;
        Ok(Region::owned(r))
    }

    /// Registers a CUDA tensor's memory in place: a contiguous `torch.Tensor` on a CUDA device,
    /// or any object with `data_ptr()`, `nbytes` and `device` (`.type == 'cuda'`, `.index`).
    /// The tensor is kept alive while the region or a transfer using it lives; the driver is
    /// asked that the range is device memory of that GPU. Errors as `alloc_device`.
    #[pyo3(signature = (tensor, access="rw"))]
    fn register_cuda(
        &self,
        py: Python<'_>,
        tensor: &Bound<'_, PyAny>,
        access: &str,
    ) -> PyResult<Region> {
        let access = parse_access(access)?;
        if let Ok(c) = tensor.call_method0("is_contiguous") {
            if !c.extract::<bool>()? {
                return Err(PyValueError::new_err(
                    "cannot register a non-contiguous tensor: pass tensor.contiguous()",
                ));
            }
        }
        let device = tensor.getattr("device")?;
        let kind: String = device.getattr("type")?.extract()?;
        if kind != "cuda" {
            return Err(PyValueError::new_err(format!(
                "register_cuda takes a CUDA tensor, not one on {kind:?} (use register)"
            )));
        }
        let index: Option<usize> = device.getattr("index")?.extract()?;
        let index = index.ok_or_else(|| {
            PyValueError::new_err("the tensor's device has no index (cuda:N expected)")
        })?;
        let ptr: u64 = tensor.call_method0("data_ptr")?.extract()?;
        let nbytes: usize = tensor.getattr("nbytes")?.extract()?;
        // Dropping a `Py` without the GIL only queues the decref (see `Region::register`).
        let owner: Box<dyn std::any::Any + Send + Sync> = Box::new(tensor.clone().unbind());
        let t = &self.t;
        let r = py
            .detach(|| t.register_device_ptr(ptr, nbytes, index, owner, access))
            .map_err(|e| to_py(py, e))?;
        Ok(Region::owned(r))
    }

    /// Connects to the endpoint at `address` ("ip:port"); the handshake (and the secret check)
    /// is bounded by the peer timeout. Releases the GIL.
    fn connect(&self, py: Python<'_>, address: &str) -> PyResult<Connection> {
        let addr = parse_addr(address)?;
        let t = &self.t;
        let c = py.detach(|| t.connect(addr)).map_err(|e| to_py(py, e))?;
        Ok(Connection { c })
    }

    /// The next incoming connection, waiting up to `timeout` seconds (`None`: no limit).
    /// A refused incoming attempt (e.g. a wrong secret) raises its error; the endpoint keeps
    /// listening. Releases the GIL.
    #[pyo3(signature = (timeout=None))]
    fn accept(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Connection> {
        let t = &self.t;
        let c = wait_released(py, timeout, |d| t.accept(d))?;
        Ok(Connection { c })
    }

    fn __repr__(&self) -> String {
        format!(
            "Endpoint(backend='{}', address='{}')",
            self.t.backend(),
            self.t.local_addr()
        )
    }
}

fn parse_backend(s: &str) -> PyResult<BackendChoice> {
    match s {
        "auto" => Ok(BackendChoice::Auto),
        "tcp" => Ok(BackendChoice::Tcp),
        "rdma" => Ok(BackendChoice::Rdma),
        other => Err(PyValueError::new_err(format!(
            "backend must be 'auto', 'tcp' or 'rdma', not {other:?}"
        ))),
    }
}

fn parse_addr(s: &str) -> PyResult<SocketAddr> {
    s.parse().map_err(|_| {
        PyValueError::new_err(format!(
            "{s:?} is not a socket address (\"ip:port\", e.g. \"127.0.0.1:7000\")"
        ))
    })
}

/// The bytes of a message argument: `bytes`, or anything with a byte buffer.
fn message_bytes(data: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(b) = data.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    let buf = PyBuffer::<u8>::get(data)
        .map_err(|_| PyTypeError::new_err("a message is bytes or a bytes-like object"))?;
    buf.to_vec(data.py())
}

/// Parses `(local_offset, remote_offset, length)` triples.
fn triples(transfers: &Bound<'_, PyAny>) -> PyResult<Vec<(usize, u64, usize)>> {
    let mut out = Vec::new();
    for item in transfers.try_iter()? {
        let item = item?;
        let t = match item.extract::<(usize, u64, usize)>() {
            Ok(t) => t,
            Err(_) => match item.extract::<Vec<u64>>().ok().as_deref() {
                Some(&[a, b, c]) => (
                    usize::try_from(a).map_err(|_| PyValueError::new_err("offset too large"))?,
                    b,
                    usize::try_from(c).map_err(|_| PyValueError::new_err("length too large"))?,
                ),
                _ => {
                    return Err(PyTypeError::new_err(
                        "each transfer is a (local_offset, remote_offset, length) triple of \
                         non-negative integers",
                    ))
                }
            },
        };
        out.push(t);
    }
    Ok(out)
}

/// A connection to one peer endpoint. Operations on it are executed by the peer in submission
/// order; notifications and messages queue per connection until received. The connection closes
/// when `close()` is called or its last reference is dropped (keep the object from `accept()`).
#[pyclass(module = "genie", name = "Connection", frozen)]
pub struct Connection {
    c: Arc<dyn genie_transport::Connection>,
}

impl Connection {
    fn batch(
        &self,
        py: Python<'_>,
        local: &Bound<'_, Region>,
        remote: &Bound<'_, PyAny>,
        transfers: &Bound<'_, PyAny>,
        kind: TransferKind,
        notify: Option<u32>,
    ) -> PyResult<BatchCompletion> {
        let r = local.get();
        let remote = remote_of(remote)?;
        let list = triples(transfers)?;
        let read = kind == TransferKind::Read;
        if read {
            r.check_read_target()?;
        } else {
            for &(lo, _, len) in &list {
                r.stage_in(py, lo, len)?;
            }
        }
        let last = list.len().saturating_sub(1);
        let ts: Vec<Transfer<'_>> = list
            .iter()
            .enumerate()
            .map(|(i, &(lo, ro, len))| Transfer {
                kind: match notify {
                    Some(imm) if i == last => TransferKind::WriteNotify(imm),
                    _ => kind,
                },
                local: &r.inner,
                local_offset: lo,
                remote: &remote,
                remote_offset: ro,
                len,
            })
            .collect();
        let batch = self.c.post_batch(&ts).map_err(|e| to_py(py, e))?;
        let copy_back = (read && r.staged.is_some()).then(|| {
            CopyBack::new(
                local.clone().unbind(),
                list.iter().map(|&(lo, _, len)| (lo, len)).collect(),
            )
        });
        Ok(BatchCompletion::new(batch, copy_back))
    }
}

#[pymethods]
impl Connection {
    /// Writes `length` bytes from `local[local_offset:]` to the peer's region `remote` (a
    /// `RemoteRegion` or descriptor bytes) at `remote_offset`. With `notify` (a 32-bit value),
    /// the peer's `recv_notification()` returns it once the data has landed.
    #[pyo3(signature = (local, local_offset, remote, remote_offset, length, notify=None))]
    #[allow(clippy::too_many_arguments)] // the Python signature, as Rust's `write_notify`
    fn write(
        &self,
        py: Python<'_>,
        local: &Bound<'_, Region>,
        local_offset: usize,
        remote: &Bound<'_, PyAny>,
        remote_offset: u64,
        length: usize,
        notify: Option<u32>,
    ) -> PyResult<Completion> {
        let r = local.get();
        r.stage_in(py, local_offset, length)?;
        let remote = remote_of(remote)?;
        let op = match notify {
            None => self
                .c
                .write(&r.inner, local_offset, &remote, remote_offset, length),
            Some(imm) => {
                self.c
                    .write_notify(&r.inner, local_offset, &remote, remote_offset, length, imm)
            }
        }
        .map_err(|e| to_py(py, e))?;
        Ok(Completion::new(op, None))
    }

    /// Reads `length` bytes of the peer's region `remote` at `remote_offset` into
    /// `local[local_offset:]`.
    fn read(
        &self,
        py: Python<'_>,
        local: &Bound<'_, Region>,
        local_offset: usize,
        remote: &Bound<'_, PyAny>,
        remote_offset: u64,
        length: usize,
    ) -> PyResult<Completion> {
        let r = local.get();
        r.check_read_target()?;
        let remote = remote_of(remote)?;
        let op = self
            .c
            .read(&r.inner, local_offset, &remote, remote_offset, length)
            .map_err(|e| to_py(py, e))?;
        let copy_back = r
            .staged
            .is_some()
            .then(|| CopyBack::new(local.clone().unbind(), vec![(local_offset, length)]));
        Ok(Completion::new(op, copy_back))
    }

    /// Writes many ranges of `local` to `remote` in one call: `transfers` is an iterable of
    /// `(local_offset, remote_offset, length)` triples. With `notify`, the last write carries
    /// the notification, which the peer receives after every write of the batch has landed.
    #[pyo3(signature = (local, remote, transfers, notify=None))]
    fn write_batch(
        &self,
        py: Python<'_>,
        local: &Bound<'_, Region>,
        remote: &Bound<'_, PyAny>,
        transfers: &Bound<'_, PyAny>,
        notify: Option<u32>,
    ) -> PyResult<BatchCompletion> {
        self.batch(py, local, remote, transfers, TransferKind::Write, notify)
    }

    /// Reads many ranges of `remote` into `local` in one call (see `write_batch`).
    fn read_batch(
        &self,
        py: Python<'_>,
        local: &Bound<'_, Region>,
        remote: &Bound<'_, PyAny>,
        transfers: &Bound<'_, PyAny>,
    ) -> PyResult<BatchCompletion> {
        self.batch(py, local, remote, transfers, TransferKind::Read, None)
    }

    /// A descriptor (bytes) of our `region` valid on this connection only (the only way into a
    /// private region).
    fn grant<'py>(
        &self,
        py: Python<'py>,
        region: &Bound<'_, Region>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let d = self
            .c
            .grant(&region.get().inner)
            .map_err(|e| to_py(py, e))?;
        Ok(PyBytes::new(py, &descriptor::encode(&d)))
    }

    /// Sends a message (bytes-like, at most the endpoint's `max_message_size`).
    fn send(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<Completion> {
        let msg = message_bytes(data)?;
        let op = self.c.send(&msg).map_err(|e| to_py(py, e))?;
        Ok(Completion::new(op, None))
    }

    /// The next message, waiting up to `timeout` seconds (`None`: no limit). Releases the GIL.
    #[pyo3(signature = (timeout=None))]
    fn recv<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyBytes>> {
        let c = &self.c;
        let m = wait_released(py, timeout, |d| c.recv(d))?;
        Ok(PyBytes::new(py, &m))
    }

    /// The next message if one is queued, else `None`.
    fn try_recv<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let m = self.c.try_recv().map_err(|e| to_py(py, e))?;
        Ok(m.map(|m| PyBytes::new(py, &m)))
    }

    /// The next notification value, waiting up to `timeout` seconds (`None`: no limit).
    /// Notifications arrive in the order their writes were posted. Releases the GIL.
    #[pyo3(signature = (timeout=None))]
    fn recv_notification(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<u32> {
        let c = &self.c;
        wait_released(py, timeout, |d| c.recv_notification(d))
    }

    /// The next notification if one is queued, else `None`.
    fn try_recv_notification(&self, py: Python<'_>) -> PyResult<Option<u32>> {
        self.c.try_recv_notification().map_err(|e| to_py(py, e))
    }

    /// Whether the connection is open.
    #[getter]
    fn alive(&self) -> bool {
        self.c.is_alive()
    }

    /// The peer's address, "ip:port".
    #[getter]
    fn peer_address(&self) -> String {
        self.c.peer_addr().to_string()
    }

    /// The peer endpoint's id.
    #[getter]
    fn peer_endpoint(&self) -> u64 {
        self.c.peer_endpoint()
    }

    /// The backend carrying this connection.
    #[getter]
    fn backend(&self) -> String {
        self.c.backend().to_string()
    }

    /// Closes the connection; pending operations fail with `ConnectionClosedError`.
    fn close(&self) {
        self.c.close();
    }

    fn __repr__(&self) -> String {
        format!(
            "Connection(peer='{}', backend='{}', alive={})",
            self.c.peer_addr(),
            self.c.backend(),
            self.c.is_alive()
        )
    }
}

/// Which backend `Endpoint(backend=..., device=...)` would get, and why, without opening one:
/// `(backend, reason)`.
#[pyfunction]
#[pyo3(signature = (backend="auto", device=None))]
fn select_backend(backend: &str, device: Option<String>) -> PyResult<(String, String)> {
    let config = TransportConfig {
        backend: parse_backend(backend)?,
        rdma: RdmaConfig {
            device,
            ..RdmaConfig::default()
        },
        ..TransportConfig::default()
    };
    Python::attach(|py| {
        let s = genie_transport::select_backend(&config).map_err(|e| to_py(py, e))?;
        Ok((s.backend.to_string(), s.reason))
    })
}

/// Benchmark support for `benchmarks/perf.py`: the same loop as Python's, in Rust, on the same
/// connection: `n` writes of `length` bytes, each waited for before the next (GIL released), and
/// the post -> completion time of each in nanoseconds. Measured in alternation with the Python
/// loop, it is the baseline that tells what the binding itself costs under the same load.
#[pyfunction]
fn _native_write_latency(
    py: Python<'_>,
    conn: &Bound<'_, Connection>,
    local: &Bound<'_, Region>,
    remote: &Bound<'_, PyAny>,
    length: usize,
    n: usize,
) -> PyResult<Vec<u64>> {
    let c = &conn.get().c;
    let local = &local.get().inner;
    let remote = remote_of(remote)?;
    py.detach(|| {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            c.write(local, 0, &remote, 0, length)?
                .wait(Duration::from_secs(30))?;
            out.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        Ok(out)
    })
    .map_err(|e| to_py(py, e))
}

#[pymodule]
fn _genie(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Endpoint>()?;
    m.add_class::<Connection>()?;
    m.add_class::<engine::Engine>()?;
    m.add_class::<engine::RequestStream>()?;
    m.add_class::<Region>()?;
    m.add_class::<PyRemoteRegion>()?;
    m.add_class::<Completion>()?;
    m.add_class::<BatchCompletion>()?;
    m.add_function(wrap_pyfunction!(select_backend, m)?)?;
    m.add_function(wrap_pyfunction!(_native_write_latency, m)?)?;
    errors::register(m)?;
    m.add("DESCRIPTOR_LEN", descriptor::LEN)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
