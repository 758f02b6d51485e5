//! The Python exception hierarchy and the mapping from [`TransportError`].
//!
//! ```text
//! GenieError(Exception)
//! ├── AuthError                 the peer's or our shared secret did not match (handshake refused)
//! ├── ProtocolError             version mismatch, malformed frame, misbehaving peer
//! ├── RemoteAccessError         the target refused a one-sided access; the connection stays usable
//! │   ├── BadKeyError           wrong access key (also closes the connection)
//! │   ├── OutOfBoundsError      outside the remote region (also raised for the local side)
//! │   ├── AccessDeniedError     the region does not allow this kind of access
//! │   └── UnknownRegionError    no such region (never registered, or dropped)
//! ├── ConnectionClosedError(ConnectionError)   closed by us, by the peer, or the endpoint shut down
//! │   └── PeerDeadError         no sign of life within the peer timeout
//! ├── TimeoutError(TimeoutError)               a wait ran out; the operation may still complete
//! ├── MessageTooLargeError      a message over the endpoint's `max_message_size`
//! ├── BackendUnavailableError   the requested backend cannot be used here
//! ├── KvPoolFullError           the engine's KV pool cannot hold a request now (need, free, pool)
//! ├── WorkerFailedError         a worker a request ran on failed (worker, reason)
//! ├── RequestFailedError        a request's run failed for another reason
//! └── EngineShutDownError       the engine shut down before the request finished
//! ```
//!
//! Every exception raised from a transport error carries the typed cause as attributes: `kind`
//! (the Rust variant in snake case, e.g. `"region_out_of_bounds"`) and the variant's fields
//! (`region`, `offset`, `length`, `size`, `peer`, `reason`, ...). Misuse detected before anything
//! reaches the transport raises Python's own `ValueError`, `TypeError` or `BufferError`.

use genie_transport::TransportError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// Name, parent (by index into [`CLASSES`], or `None` for `Exception`), the builtin to mix in,
/// and the docstring of each exception class.
const CLASSES: &[(&str, Option<usize>, Option<&str>, &str)] = &[
    (
        "GenieError",
        None,
        None,
        "Base of every error Genie raises.",
    ),
    (
        "AuthError",
        Some(0),
        None,
        "Authentication with the shared secret failed; the connection was refused.",
    ),
    (
        "ProtocolError",
        Some(0),
        None,
        "The peer speaks another protocol version or broke the protocol.",
    ),
    (
        "RemoteAccessError",
        Some(0),
        None,
        "The target refused a one-sided access; nothing was touched.",
    ),
    (
        "BadKeyError",
        Some(3),
        None,
        "Wrong access key for the remote region (the connection is closed too).",
    ),
    (
        "OutOfBoundsError",
        Some(3),
        None,
        "An access outside a region (remote, or `kind == 'local_out_of_bounds'`).",
    ),
    (
        "AccessDeniedError",
        Some(3),
        None,
        "The region does not allow this kind of remote access.",
    ),
    (
        "UnknownRegionError",
        Some(3),
        None,
        "The target has no such region (never registered, or dropped).",
    ),
    (
        "ConnectionClosedError",
        Some(0),
        Some("ConnectionError"),
        "The connection (or the endpoint) was closed before the operation completed.",
    ),
    (
        "PeerDeadError",
        Some(8),
        None,
        "The peer stopped responding within the peer timeout or its socket failed.",
    ),
    (
        "TimeoutError",
        Some(0),
        Some("TimeoutError"),
        "A wait ran out of time; the operation may still complete later.",
    ),
    (
        "MessageTooLargeError",
        Some(0),
        None,
        "A message larger than the endpoint's max_message_size.",
    ),
    (
        "BackendUnavailableError",
        Some(0),
        None,
        "The requested backend cannot be used on this machine.",
    ),
    (
        "KvPoolFullError",
        Some(0),
        None,
        "The engine's KV pool cannot hold the request's KV cache now (attributes need, free, pool).",
    ),
    (
        "WorkerFailedError",
        Some(0),
        None,
        "A worker the request ran on failed; its KV cache went with it (attributes worker, reason).",
    ),
    (
        "RequestFailedError",
        Some(0),
        None,
        "A run of the request failed for another reason (a kernel, a malformed graph).",
    ),
    (
        "EngineShutDownError",
        Some(0),
        None,
        "The engine shut down before the request finished.",
    ),
];

const GENIE: usize = 0;
const AUTH: usize = 1;
const PROTOCOL: usize = 2;
const BAD_KEY: usize = 4;
const OUT_OF_BOUNDS: usize = 5;
const ACCESS_DENIED: usize = 6;
const UNKNOWN_REGION: usize = 7;
const CLOSED: usize = 8;
const PEER_DEAD: usize = 9;
const TIMEOUT: usize = 10;
const TOO_LARGE: usize = 11;
const UNAVAILABLE: usize = 12;
const KV_POOL_FULL: usize = 13;
const WORKER_FAILED: usize = 14;
const REQUEST_FAILED: usize = 15;
const SHUT_DOWN: usize = 16;

static TYPES: PyOnceLock<Vec<Py<PyType>>> = PyOnceLock::new();

/// Creates the exception classes (once) and adds them to `m`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let types = TYPES.get_or_try_init(py, || create(py))?;
    for ((name, ..), ty) in CLASSES.iter().zip(types) {
        m.add(*name, ty.bind(py))?;
    }
    Ok(())
}

fn create(py: Python<'_>) -> PyResult<Vec<Py<PyType>>> {
    let builtins = py.import("builtins")?;
    let type_ = builtins.getattr("type")?;
    let mut out: Vec<Py<PyType>> = Vec::with_capacity(CLASSES.len());
    for (name, parent, mixin, doc) in CLASSES {
        let mut bases = vec![match parent {
            Some(i) => out[*i].bind(py).clone().into_any(),
            None => builtins.getattr("Exception")?,
        }];
        if let Some(b) = mixin {
            bases.push(builtins.getattr(*b)?);
        }
        let ns = PyDict::new(py);
        ns.set_item("__module__", "genie")?;
        ns.set_item("__doc__", *doc)?;
        let ty = type_.call1((*name, PyTuple::new(py, bases)?, ns))?;
        out.push(ty.cast_into::<PyType>()?.unbind());
    }
    Ok(out)
}

fn class(py: Python<'_>, i: usize) -> PyResult<Bound<'_, PyType>> {
    let types = TYPES.get_or_try_init(py, || create(py))?;
    Ok(types[i].bind(py).clone())
}

/// The Python exception for `e`, with `kind` and the variant's fields as attributes.
pub fn to_py(py: Python<'_>, e: TransportError) -> PyErr {
    match build(py, &e) {
        Ok(err) => err,
        Err(failed) => failed,
    }
}

fn build(py: Python<'_>, e: &TransportError) -> PyResult<PyErr> {
    use TransportError as E;
    let mut attrs: Vec<(&str, Py<PyAny>)> = Vec::new();
    let mut put = |k: &'static str, v: Py<PyAny>| attrs.push((k, v));
    let peer_str = |p: &Option<std::net::SocketAddr>| p.map(|a| a.to_string());
    let (i, kind) = match e {
        E::RegionOutOfBounds {
            region,
            offset,
            len,
            size,
        } => {
            put("region", region.into_pyobject(py)?.into_any().unbind());
            put("offset", offset.into_pyobject(py)?.into_any().unbind());
            put("length", len.into_pyobject(py)?.into_any().unbind());
            put("size", size.into_pyobject(py)?.into_any().unbind());
            (OUT_OF_BOUNDS, "region_out_of_bounds")
        }
        E::LocalOutOfBounds {
            region,
            offset,
            len,
            size,
        } => {
            put("region", region.into_pyobject(py)?.into_any().unbind());
            put("offset", offset.into_pyobject(py)?.into_any().unbind());
            put("length", len.into_pyobject(py)?.into_any().unbind());
            put("size", size.into_pyobject(py)?.into_any().unbind());
            (OUT_OF_BOUNDS, "local_out_of_bounds")
        }
        E::BadKey { region } => {
            put("region", region.into_pyobject(py)?.into_any().unbind());
            (BAD_KEY, "bad_key")
        }
        E::AccessDenied { region, op } => {
            put("region", region.into_pyobject(py)?.into_any().unbind());
            put("op", op.into_pyobject(py)?.into_any().unbind());
            (ACCESS_DENIED, "access_denied")
        }
        E::UnknownRegion { region } => {
            put("region", region.into_pyobject(py)?.into_any().unbind());
            (UNKNOWN_REGION, "unknown_region")
        }
        E::InvalidFrame { peer, .. } => {
            put(
                "peer",
                peer_str(peer).into_pyobject(py)?.into_any().unbind(),
            );
            (PROTOCOL, "invalid_frame")
        }
        E::PeerMisbehaved { peer, what } => {
            put(
                "peer",
                peer_str(peer).into_pyobject(py)?.into_any().unbind(),
            );
            put("reason", what.into_pyobject(py)?.into_any().unbind());
            (PROTOCOL, "peer_misbehaved")
        }
        E::VersionMismatch { peer, .. } => {
            put(
                "peer",
                peer_str(peer).into_pyobject(py)?.into_any().unbind(),
            );
            (PROTOCOL, "version_mismatch")
        }
        E::AuthFailed { peer, reason } => {
            put(
                "peer",
                peer_str(peer).into_pyobject(py)?.into_any().unbind(),
            );
            put("reason", reason.into_pyobject(py)?.into_any().unbind());
            (AUTH, "auth_failed")
        }
        E::PeerDead { peer, reason } => {
            put(
                "peer",
                peer.to_string().into_pyobject(py)?.into_any().unbind(),
            );
            put("reason", reason.into_pyobject(py)?.into_any().unbind());
            (PEER_DEAD, "peer_dead")
        }
        E::ConnectionClosed { peer } => {
            put(
                "peer",
                peer.to_string().into_pyobject(py)?.into_any().unbind(),
            );
            (CLOSED, "connection_closed")
        }
        E::EndpointClosed => (CLOSED, "endpoint_closed"),
        E::Timeout { after } => {
            put(
                "after",
                after.as_secs_f64().into_pyobject(py)?.into_any().unbind(),
            );
            (TIMEOUT, "timeout")
        }
        E::MessageTooLarge { len, max } => {
            put("length", len.into_pyobject(py)?.into_any().unbind());
            put("max", max.into_pyobject(py)?.into_any().unbind());
            (TOO_LARGE, "message_too_large")
        }
        E::ForeignDescriptor { .. } => (GENIE, "foreign_descriptor"),
        E::InvalidArgument(_) => (GENIE, "invalid_argument"),
        E::Io { call, .. } => {
            put("call", call.into_pyobject(py)?.into_any().unbind());
            (GENIE, "io")
        }
        E::Alloc(_) => (GENIE, "alloc"),
        E::BackendUnavailable { backend, reason } => {
            put(
                "backend",
                backend.to_string().into_pyobject(py)?.into_any().unbind(),
            );
            put("reason", reason.into_pyobject(py)?.into_any().unbind());
            (UNAVAILABLE, "backend_unavailable")
        }
        E::DeviceUnavailable { reason } => {
            put("reason", reason.into_pyobject(py)?.into_any().unbind());
            (GENIE, "device_unavailable")
        }
        E::GpuDirectUnavailable { tried } => {
            put("reason", tried.into_pyobject(py)?.into_any().unbind());
            (GENIE, "gpudirect_unavailable")
        }
        E::Device { .. } => (GENIE, "device"),
        #[cfg(feature = "cuda")]
        E::Cuda(_) => (GENIE, "cuda"),
        E::HostOnly { region, .. } => {
            put("region", region.into_pyobject(py)?.into_any().unbind());
            (GENIE, "host_only")
        }
        _ => (GENIE, "other"),
    };
    let err = PyErr::from_type(class(py, i)?, error_chain(e));
    let value = err.value(py);
    value.setattr("kind", kind)?;
    for (k, v) in attrs {
        value.setattr(k, v)?;
    }
    Ok(err)
}

/// The Python exception for an engine error: `ValueError` for a malformed request, the
/// `TimeoutError` of this hierarchy for a wait that ran out, else the engine's own classes with
/// the variant's fields as attributes.
pub fn engine(e: genie_runtime::engine::EngineError) -> PyErr {
    use genie_runtime::engine::EngineError as E;
    Python::attach(|py| {
        let built = (|| -> PyResult<PyErr> {
            let mut attrs: Vec<(&str, Py<PyAny>)> = Vec::new();
            let (i, kind) = match &e {
                E::InvalidRequest(m) => {
                    return Ok(pyo3::exceptions::PyValueError::new_err(m.clone()))
                }
                E::Timeout(after) => return Ok(timeout(py, *after)),
                E::KvPoolFull { need, free, pool } => {
                    attrs.push(("need", need.into_pyobject(py)?.into_any().unbind()));
                    attrs.push(("free", free.into_pyobject(py)?.into_any().unbind()));
                    attrs.push(("pool", pool.into_pyobject(py)?.into_any().unbind()));
                    (KV_POOL_FULL, "kv_pool_full")
                }
                E::WorkerFailed { worker, reason } => {
                    attrs.push(("worker", worker.into_pyobject(py)?.into_any().unbind()));
                    attrs.push(("reason", reason.into_pyobject(py)?.into_any().unbind()));
                    (WORKER_FAILED, "worker_failed")
                }
                E::ShutDown => (SHUT_DOWN, "shut_down"),
                _ => (REQUEST_FAILED, "request_failed"),
            };
            let err = PyErr::from_type(class(py, i)?, e.to_string());
            let value = err.value(py);
            value.setattr("kind", kind)?;
            for (k, v) in attrs {
                value.setattr(k, v)?;
            }
            Ok(err)
        })();
        built.unwrap_or_else(|failed| failed)
    })
}

/// The message with its sources (e.g. the OS error under an `Io`).
fn error_chain(e: &TransportError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// A `TimeoutError` for a wait of `after` seconds that ran out.
pub fn timeout(py: Python<'_>, after: std::time::Duration) -> PyErr {
    to_py(py, TransportError::Timeout { after })
}
