//! Genie's transport as a C library: `libgenie.so` / `libgenie.a` and one header,
//! `include/genie.h`, generated from this file by cbindgen (`tests/header.rs` fails when the
//! committed header differs; `GENIE_BLESS=1 cargo test -p genie-c --test header` rewrites it).
//!
//! # Conventions
//!
//! - Handles are opaque pointers (`genie_endpoint`, `genie_connection`, `genie_region`,
//!   `genie_op`, `genie_batch`), made by the library and released with their `*_free` call.
//! - Every call returns a `genie_status` (`GENIE_OK` is 0); on failure, `genie_last_error()`
//!   gives the message (per thread, valid until this thread's next failing call). Results come
//!   back through out-pointers.
//! - No Rust panic crosses the boundary: each entry point catches one and returns
//!   `GENIE_ERR_PANIC`.
//! - Timeouts are in milliseconds.
//!
//! # Thread safety
//!
//! Endpoint, connection and region handles may be used from any number of threads at once
//! (one connection may carry operations posted by several threads). An operation or batch handle
//! may be tested and waited on from any thread, even concurrently. A `*_free` call must not race
//! with any other use of the same handle, and the handle is invalid afterwards.
//!
//! # Memory
//!
//! A region is memory the transport allocates (`genie_region_alloc`; `genie_region_data` gives C
//! a pointer to those registered bytes) or the caller's own, registered in place
//! (`genie_region_register`); both are zero-copy. As with RDMA memory, do not touch a range
//! while a transfer that uses it is in flight; read what a peer wrote once its notification or
//! completion arrived. `genie_region_read`/`genie_region_write` copy under the region's lock.
//!
//! # Example
//!
//! `examples/loopback.c`: two endpoints on loopback, a write with a notification, a read back.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]
#![allow(non_camel_case_types)] // C type names

use genie_transport::{
    BackendChoice, Batch, Connection, Op, PollMode, Region, RegionAccess, RemoteRegion, Transfer,
    TransferKind, Transport, TransportConfig, TransportError,
};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A call's result: `GENIE_OK` (0) or one of the `GENIE_ERR_*` codes.
pub type genie_status = i32;

/// Success.
pub const GENIE_OK: genie_status = 0;
/// A null pointer, a bad enum value, an unparsable address or string, or another caller bug.
pub const GENIE_ERR_INVALID_ARGUMENT: genie_status = 1;
/// Authentication with the shared secret failed (the connection was refused).
pub const GENIE_ERR_AUTH: genie_status = 2;
/// The peer speaks another protocol version or broke the protocol.
pub const GENIE_ERR_PROTOCOL: genie_status = 3;
/// Wrong access key for the remote region (the connection is closed too).
pub const GENIE_ERR_BAD_KEY: genie_status = 4;
/// The access falls outside the remote region.
pub const GENIE_ERR_OUT_OF_BOUNDS: genie_status = 5;
/// The access falls outside the local region (nothing was sent).
pub const GENIE_ERR_LOCAL_OUT_OF_BOUNDS: genie_status = 6;
/// The remote region does not allow this kind of access.
pub const GENIE_ERR_ACCESS_DENIED: genie_status = 7;
/// The peer has no such region (never registered, or freed).
pub const GENIE_ERR_UNKNOWN_REGION: genie_status = 8;
/// The peer stopped responding within the peer timeout, or its socket failed.
pub const GENIE_ERR_PEER_DEAD: genie_status = 9;
/// The connection or the endpoint was closed before the operation completed.
pub const GENIE_ERR_CONNECTION_CLOSED: genie_status = 10;
/// A wait ran out of time; the operation may still complete later.
pub const GENIE_ERR_TIMEOUT: genie_status = 11;
/// A message larger than the endpoint's `max_message_size`.
pub const GENIE_ERR_MESSAGE_TOO_LARGE: genie_status = 12;
/// The caller's buffer is too small (the needed size is in the length out-pointer).
pub const GENIE_ERR_BUFFER_TOO_SMALL: genie_status = 13;
/// An operating-system call failed (the message names it).
pub const GENIE_ERR_IO: genie_status = 14;
/// Region memory could not be allocated.
pub const GENIE_ERR_ALLOC: genie_status = 15;
/// The requested backend cannot be used here.
pub const GENIE_ERR_BACKEND_UNAVAILABLE: genie_status = 16;
/// A bug inside the library (a caught panic); the handle involved may be unusable.
pub const GENIE_ERR_PANIC: genie_status = 17;
/// Any other error.
pub const GENIE_ERR_OTHER: genie_status = 18;
/// `genie_batch_result`: that transfer has not completed yet.
pub const GENIE_PENDING: genie_status = 19;

/// `genie_options.backend`: RDMA when built with it and a device exists, else TCP.
pub const GENIE_BACKEND_AUTO: u32 = 0;
/// `genie_options.backend`: TCP.
pub const GENIE_BACKEND_TCP: u32 = 1;
/// `genie_options.backend`: RDMA, or `GENIE_ERR_BACKEND_UNAVAILABLE`.
pub const GENIE_BACKEND_RDMA: u32 = 2;

/// Region access: peers may read and write.
pub const GENIE_ACCESS_READ_WRITE: u32 = 0;
/// Region access: peers may only read.
pub const GENIE_ACCESS_READ: u32 = 1;
/// Region access: peers may only write.
pub const GENIE_ACCESS_WRITE: u32 = 2;
/// Region access: no remote access (a local source or destination only).
pub const GENIE_ACCESS_LOCAL: u32 = 3;

/// `genie_region_alloc` flag: only descriptors from `genie_grant` reach the region.
pub const GENIE_REGION_PRIVATE: u32 = 1;

/// `genie_transfer.kind`: one-sided write.
pub const GENIE_TRANSFER_WRITE: u32 = 0;
/// `genie_transfer.kind`: one-sided write, then the notification `imm`.
pub const GENIE_TRANSFER_WRITE_NOTIFY: u32 = 1;
/// `genie_transfer.kind`: one-sided read.
pub const GENIE_TRANSFER_READ: u32 = 2;

/// Length of a descriptor's bytes (`genie_remote_encode`), the layout the Python package uses.
pub const GENIE_DESCRIPTOR_LEN: usize = 44;

/// How to open an endpoint. Fill it with `genie_options_init`, then change what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct genie_options {
    /// `GENIE_BACKEND_AUTO` (default), `_TCP` or `_RDMA`.
    pub backend: u32,
    /// Listen address "ip:port" (NUL-terminated); NULL: "127.0.0.1:0" (an ephemeral port).
    pub listen: *const c_char,
    /// Shared secret both sides must know (NUL-terminated); NULL: none.
    pub secret: *const c_char,
    /// RDMA device name (e.g. "rxe0"); NULL: the first usable one.
    pub device: *const c_char,
    /// A silent peer is declared dead after this long; 0: the default (2000 ms).
    pub peer_timeout_ms: u32,
    /// Nonzero: spin instead of sleeping while waiting (lowest latency, costs a core).
    pub busy_poll: u32,
    /// Largest message in bytes; 0: the default (64 KiB).
    pub max_message_size: u64,
}

/// A peer's region descriptor: what one-sided operations target. Get one from
/// `genie_region_descriptor` or `genie_grant` on the owning side, send its bytes
/// (`genie_remote_encode`) over any channel, decode them on the other side.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct genie_remote {
    /// The owning endpoint's id.
    pub endpoint: u64,
    /// The region's id within its endpoint.
    pub region: u64,
    /// Length in bytes.
    pub len: u64,
    /// Access key.
    pub key: u64,
    /// Address (RDMA); 0 for TCP.
    pub addr: u64,
}

/// One transfer of a batch (`genie_post_batch`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct genie_transfer {
    /// `GENIE_TRANSFER_WRITE`, `_WRITE_NOTIFY` or `_READ`.
    pub kind: u32,
    /// The notification value of a `GENIE_TRANSFER_WRITE_NOTIFY`.
    pub imm: u32,
    /// Offset in the local region.
    pub local_offset: u64,
    /// Offset in the remote region.
    pub remote_offset: u64,
    /// Bytes to move.
    pub len: u64,
}

/// An endpoint: registered regions, a listening address, the progress engine.
pub struct genie_endpoint {
    t: Arc<dyn Transport>,
    reason: CString,
}

/// A connection to one peer endpoint.
pub struct genie_connection {
    c: Arc<dyn Connection>,
    /// A message too large for the caller's last `genie_recv` buffer, kept for the next call.
    held: Mutex<Option<Vec<u8>>>,
}

/// Registered memory.
pub struct genie_region {
    r: Region,
}

/// One in-flight operation.
pub struct genie_op {
    op: Op,
}

/// Many transfers posted together.
pub struct genie_batch {
    b: Batch,
}

/// An error on its way to C: a status code and a message.
struct Error {
    code: genie_status,
    msg: String,
}

impl Error {
    fn invalid(msg: impl Into<String>) -> Self {
        Self {
            code: GENIE_ERR_INVALID_ARGUMENT,
            msg: msg.into(),
        }
    }
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        Self {
            code: code_of(&e),
            msg: chain(&e),
        }
    }
}

/// The status code of a transport error.
fn code_of(e: &TransportError) -> genie_status {
    use TransportError as E;
    match e {
        E::RegionOutOfBounds { .. } => GENIE_ERR_OUT_OF_BOUNDS,
        E::LocalOutOfBounds { .. } => GENIE_ERR_LOCAL_OUT_OF_BOUNDS,
        E::BadKey { .. } => GENIE_ERR_BAD_KEY,
        E::AccessDenied { .. } => GENIE_ERR_ACCESS_DENIED,
        E::UnknownRegion { .. } => GENIE_ERR_UNKNOWN_REGION,
        E::InvalidFrame { .. } | E::PeerMisbehaved { .. } | E::VersionMismatch { .. } => {
            GENIE_ERR_PROTOCOL
        }
        E::AuthFailed { .. } => GENIE_ERR_AUTH,
        E::PeerDead { .. } => GENIE_ERR_PEER_DEAD,
        E::ConnectionClosed { .. } | E::EndpointClosed => GENIE_ERR_CONNECTION_CLOSED,
        E::Timeout { .. } => GENIE_ERR_TIMEOUT,
        E::MessageTooLarge { .. } => GENIE_ERR_MESSAGE_TOO_LARGE,
        E::InvalidArgument(_) | E::ForeignDescriptor { .. } => GENIE_ERR_INVALID_ARGUMENT,
        E::Io { .. } => GENIE_ERR_IO,
        E::Alloc(_) => GENIE_ERR_ALLOC,
        E::BackendUnavailable { .. } => GENIE_ERR_BACKEND_UNAVAILABLE,
        _ => GENIE_ERR_OTHER,
    }
}

/// The message with its sources (e.g. the OS error under an `Io`).
fn chain(e: &TransportError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs one entry point: its result becomes a status code (and the thread's last error), and a
/// panic becomes `GENIE_ERR_PANIC` instead of unwinding into C.
fn entry(f: impl FnOnce() -> Result<(), Error>) -> genie_status {
    // AssertUnwindSafe: after a panic, the handles involved are only reachable through their
    // locks (poisoning is ignored by the transport's parking_lot/std wrappers), and the caller
    // is told the call failed; no broken invariant is observed as success.
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => GENIE_OK,
        Ok(Err(e)) => {
            set_last_error(e.msg);
            e.code
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!("internal error (panic): {what}"));
            GENIE_ERR_PANIC
        }
    }
}

/// A shared reference to the handle behind `p`, or an error naming `what` if it is null.
///
/// # Safety
/// `p` is null or a live handle of type `T` made by this library and not yet freed.
unsafe fn get<'a, T>(p: *const T, what: &str) -> Result<&'a T, Error> {
    // SAFETY: by this function's contract, a non-null `p` points to a live `T`.
    unsafe { p.as_ref() }.ok_or_else(|| Error::invalid(format!("{what} is NULL")))
}

/// The out-pointer `p`, or an error naming `what` if it is null.
///
/// # Safety
/// `p` is null or valid for writes of a `T`.
unsafe fn out<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Error> {
    // SAFETY: by this function's contract, a non-null `p` is valid for writes of a `T`; it may
    // be uninitialized, so callers only assign through it (never read).
    unsafe { p.as_mut() }.ok_or_else(|| Error::invalid(format!("{what} is NULL")))
}

/// The NUL-terminated UTF-8 string at `p` (`None` for NULL).
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that lives for `'a`.
unsafe fn string<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Error> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null, and NUL-terminated and live for 'a by this function's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|_| Error::invalid(format!("{what} is not UTF-8")))
}

/// Moves `v` to the heap and hands C the pointer (freed by the matching `*_free`).
fn into_handle<T>(v: T) -> *mut T {
    Box::into_raw(Box::new(v))
}

/// Frees a handle made by [`into_handle`]; NULL is a no-op.
///
/// # Safety
/// `p` is null or a live handle from [`into_handle`] that no other thread is using.
unsafe fn free_handle<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: `p` came from `Box::into_raw` (into_handle) and is freed once, by contract.
        drop(unsafe { Box::from_raw(p) });
    }
}

fn timeout(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms))
}

fn access_of(a: u32) -> Result<RegionAccess, Error> {
    Ok(match a {
        GENIE_ACCESS_READ_WRITE => RegionAccess::ReadWrite,
        GENIE_ACCESS_READ => RegionAccess::Read,
        GENIE_ACCESS_WRITE => RegionAccess::Write,
        GENIE_ACCESS_LOCAL => RegionAccess::Local,
        other => return Err(Error::invalid(format!("unknown access {other}"))),
    })
}

fn usize_of(v: u64, what: &str) -> Result<usize, Error> {
    usize::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} does not fit in size_t")))
}

impl From<genie_remote> for RemoteRegion {
    fn from(r: genie_remote) -> Self {
        RemoteRegion {
            endpoint: r.endpoint,
            region: r.region,
            len: r.len,
            key: r.key,
            addr: r.addr,
        }
    }
}

impl From<RemoteRegion> for genie_remote {
    fn from(r: RemoteRegion) -> Self {
        genie_remote {
            endpoint: r.endpoint,
            region: r.region,
            len: r.len,
            key: r.key,
            addr: r.addr,
        }
    }
}

/// The message of this thread's last failed call ("" if none). Valid until this thread's next
/// failed call. Thread-safe (per thread).
#[no_mangle]
pub extern "C" fn genie_last_error() -> *const c_char {
    // `with` cannot fail here: the key is not being destroyed while its thread calls into C.
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// A static name for a status code (e.g. "GENIE_ERR_TIMEOUT"). Thread-safe.
#[no_mangle]
pub extern "C" fn genie_status_name(status: genie_status) -> *const c_char {
    match status {
        GENIE_OK => c"GENIE_OK",
        GENIE_ERR_INVALID_ARGUMENT => c"GENIE_ERR_INVALID_ARGUMENT",
        GENIE_ERR_AUTH => c"GENIE_ERR_AUTH",
        GENIE_ERR_PROTOCOL => c"GENIE_ERR_PROTOCOL",
        GENIE_ERR_BAD_KEY => c"GENIE_ERR_BAD_KEY",
        GENIE_ERR_OUT_OF_BOUNDS => c"GENIE_ERR_OUT_OF_BOUNDS",
        GENIE_ERR_LOCAL_OUT_OF_BOUNDS => c"GENIE_ERR_LOCAL_OUT_OF_BOUNDS",
        GENIE_ERR_ACCESS_DENIED => c"GENIE_ERR_ACCESS_DENIED",
        GENIE_ERR_UNKNOWN_REGION => c"GENIE_ERR_UNKNOWN_REGION",
        GENIE_ERR_PEER_DEAD => c"GENIE_ERR_PEER_DEAD",
        GENIE_ERR_CONNECTION_CLOSED => c"GENIE_ERR_CONNECTION_CLOSED",
        GENIE_ERR_TIMEOUT => c"GENIE_ERR_TIMEOUT",
        GENIE_ERR_MESSAGE_TOO_LARGE => c"GENIE_ERR_MESSAGE_TOO_LARGE",
        GENIE_ERR_BUFFER_TOO_SMALL => c"GENIE_ERR_BUFFER_TOO_SMALL",
        GENIE_ERR_IO => c"GENIE_ERR_IO",
        GENIE_ERR_ALLOC => c"GENIE_ERR_ALLOC",
        GENIE_ERR_BACKEND_UNAVAILABLE => c"GENIE_ERR_BACKEND_UNAVAILABLE",
        GENIE_ERR_PANIC => c"GENIE_ERR_PANIC",
        GENIE_PENDING => c"GENIE_PENDING",
        _ => c"GENIE_ERR_OTHER",
    }
    .as_ptr()
}

/// Fills `*options` with the defaults (auto backend, 127.0.0.1:0, no secret, 2000 ms peer
/// timeout, blocking waits, 64 KiB messages). Thread-safe.
///
/// # Safety
/// `options` is NULL or valid for writes of a `genie_options`.
#[no_mangle]
pub unsafe extern "C" fn genie_options_init(options: *mut genie_options) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let o = unsafe { out(options, "options") }?;
        *o = genie_options {
            backend: GENIE_BACKEND_AUTO,
            listen: std::ptr::null(),
            secret: std::ptr::null(),
            device: std::ptr::null(),
            peer_timeout_ms: 0,
            busy_poll: 0,
            max_message_size: 0,
        };
        Ok(())
    })
}

/// Opens an endpoint; `*endpoint` receives its handle (free it with `genie_endpoint_free`).
/// Thread-safe.
///
/// # Safety
/// `options` is NULL (all defaults) or points to a `genie_options` whose strings are NULL or
/// NUL-terminated; `endpoint` is valid for writes of a pointer.
#[no_mangle]
pub unsafe extern "C" fn genie_endpoint_open(
    options: *const genie_options,
    endpoint: *mut *mut genie_endpoint,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let slot = unsafe { out(endpoint, "endpoint") }?;
        let mut config = TransportConfig::default();
        if !options.is_null() {
            // SAFETY: non-null, points to a `genie_options` by contract.
            let o = unsafe { get(options, "options") }?;
            config.backend = match o.backend {
                GENIE_BACKEND_AUTO => BackendChoice::Auto,
                GENIE_BACKEND_TCP => BackendChoice::Tcp,
                GENIE_BACKEND_RDMA => BackendChoice::Rdma,
                other => return Err(Error::invalid(format!("unknown backend {other}"))),
            };
            // SAFETY: the option strings are NULL or NUL-terminated, by contract.
            if let Some(l) = unsafe { string(o.listen, "listen") }? {
                config.listen = l
                    .parse()
                    .map_err(|_| Error::invalid(format!("listen {l:?} is not \"ip:port\"")))?;
            }
            // SAFETY: as above.
            config.secret = unsafe { string(o.secret, "secret") }?.map(str::to_owned);
            // SAFETY: as above.
            config.rdma.device = unsafe { string(o.device, "device") }?.map(str::to_owned);
            if o.peer_timeout_ms != 0 {
                config.peer_timeout = timeout(o.peer_timeout_ms);
            }
            if o.busy_poll != 0 {
                config.poll_mode = PollMode::BusyPoll;
            }
            if o.max_message_size != 0 {
                config.max_message_size = usize_of(o.max_message_size, "max_message_size")?;
            }
        }
        let (t, sel) = genie_transport::open_with_selection(config)?;
        let reason = CString::new(sel.reason.replace('\0', " ")).unwrap_or_default();
        *slot = into_handle(genie_endpoint { t, reason });
        Ok(())
    })
}

/// Frees the endpoint handle; the endpoint shuts down (its connections close, pending
/// operations fail with `GENIE_ERR_CONNECTION_CLOSED`) once no connection or region handle of it
/// is left. NULL is a no-op. Not thread-safe with other uses of this handle.
///
/// # Safety
/// `endpoint` is NULL or a live endpoint handle, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn genie_endpoint_free(endpoint: *mut genie_endpoint) -> genie_status {
    // SAFETY: forwarded from this function's contract.
    entry(|| unsafe {
        free_handle(endpoint);
        Ok(())
    })
}

/// Writes the endpoint's listening address ("ip:port", NUL-terminated) into `buf` of `cap`
/// bytes; `GENIE_ERR_BUFFER_TOO_SMALL` if it does not fit. Thread-safe.
///
/// # Safety
/// `endpoint` is a live endpoint handle; `buf` is valid for writes of `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn genie_endpoint_address(
    endpoint: *const genie_endpoint,
    buf: *mut c_char,
    cap: usize,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let ep = unsafe { get(endpoint, "endpoint") }?;
        if buf.is_null() {
            return Err(Error::invalid("buf is NULL"));
        }
        let s = ep.t.local_addr().to_string();
        if s.len() + 1 > cap {
            return Err(Error {
                code: GENIE_ERR_BUFFER_TOO_SMALL,
                msg: format!(
                    "the address needs {} bytes, the buffer has {cap}",
                    s.len() + 1
                ),
            });
        }
        // SAFETY: `buf` is valid for `cap` bytes and `s.len() + 1 <= cap`; `s` is a separate
        // allocation, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
            *buf.add(s.len()) = 0;
        }
        Ok(())
    })
}

/// The backend in use (`GENIE_BACKEND_TCP` or `_RDMA`) and why it was chosen (`*reason`: a
/// NUL-terminated string valid while the endpoint handle lives; either out-pointer may be NULL).
/// Thread-safe.
///
/// # Safety
/// `endpoint` is a live endpoint handle; `backend` and `reason` are NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_endpoint_backend(
    endpoint: *const genie_endpoint,
    backend: *mut u32,
    reason: *mut *const c_char,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let ep = unsafe { get(endpoint, "endpoint") }?;
        // SAFETY: forwarded from this function's contract.
        if let Ok(b) = unsafe { out(backend, "backend") } {
            *b = match ep.t.backend() {
                genie_transport::Backend::Tcp => GENIE_BACKEND_TCP,
                _ => GENIE_BACKEND_RDMA,
            };
        }
        // SAFETY: forwarded from this function's contract.
        if let Ok(r) = unsafe { out(reason, "reason") } {
            *r = ep.reason.as_ptr();
        }
        Ok(())
    })
}

/// Allocates and registers `len` zeroed, page-aligned bytes that peers may access as `access`
/// says (`GENIE_ACCESS_*`); `flags` may hold `GENIE_REGION_PRIVATE`. Free the handle with
/// `genie_region_free`. Thread-safe.
///
/// # Safety
/// `endpoint` is a live endpoint handle; `region` is valid for writes of a pointer.
#[no_mangle]
pub unsafe extern "C" fn genie_region_alloc(
    endpoint: *const genie_endpoint,
    len: usize,
    access: u32,
    flags: u32,
    region: *mut *mut genie_region,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let ep = unsafe { get(endpoint, "endpoint") }?;
        // SAFETY: forwarded from this function's contract.
        let slot = unsafe { out(region, "region") }?;
        let access = access_of(access)?;
        if flags & !GENIE_REGION_PRIVATE != 0 {
            return Err(Error::invalid(format!("unknown region flags {flags:#x}")));
        }
        let r = if flags & GENIE_REGION_PRIVATE != 0 {
            ep.t.alloc_private_region(len, access)?
        } else {
            ep.t.alloc_region_with(len, access)?
        };
        *slot = into_handle(genie_region { r });
        Ok(())
    })
}

/// Registers `len` bytes of the caller's memory at `data` in place (zero-copy), which peers may
/// access as `access` says (`GENIE_ACCESS_*`). Free the handle with `genie_region_free`.
/// Thread-safe.
///
/// # Safety
/// `endpoint` is a live endpoint handle; `region` is valid for writes of a pointer; `data` is
/// NULL with `len` 0, or `len` initialised bytes of one allocation, readable and writable from
/// any thread, that stay allocated and in place until `genie_region_free` was called and every
/// operation that used the region completed. The transport writes into them when a peer writes
/// (as a NIC would): the caller does not touch a range while a transfer uses it.
#[no_mangle]
pub unsafe extern "C" fn genie_region_register(
    endpoint: *const genie_endpoint,
    data: *mut c_void,
    len: usize,
    access: u32,
    region: *mut *mut genie_region,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let ep = unsafe { get(endpoint, "endpoint") }?;
        // SAFETY: forwarded from this function's contract.
        let slot = unsafe { out(region, "region") }?;
        let access = access_of(access)?;
        if data.is_null() && len != 0 {
            return Err(Error::invalid("data is NULL"));
        }
        // SAFETY: by this function's contract, `[data, data + len)` is one allocation of
        // initialised bytes, readable and writable from any thread, that outlives the region and
        // every operation using it, which is as long as the owner (nothing to drop) is kept.
        let mem = unsafe {
            genie_sys::mem::SharedBuf::from_foreign(data.cast::<u8>(), len, Box::new(()))
        };
        *slot = into_handle(genie_region {
            r: ep.t.register_shared(mem, access)?,
        });
        Ok(())
    })
}

/// Frees the region handle; the region stays registered until in-flight operations that use it
/// complete. NULL is a no-op. Not thread-safe with other uses of this handle.
///
/// # Safety
/// `region` is NULL or a live region handle, not used again afterwards (pointers from
/// `genie_region_data` become invalid).
#[no_mangle]
pub unsafe extern "C" fn genie_region_free(region: *mut genie_region) -> genie_status {
    // SAFETY: forwarded from this function's contract.
    entry(|| unsafe {
        free_handle(region);
        Ok(())
    })
}

/// The registered bytes themselves: `*data` and `*len` (zero-copy; see the header's Memory
/// section for the rules of touching them). Valid until `genie_region_free`. Thread-safe.
///
/// # Safety
/// `region` is a live region handle; `data` and `len` are valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_region_data(
    region: *const genie_region,
    data: *mut *mut u8,
    len: *mut usize,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let r = unsafe { get(region, "region") }?;
        if r.r.is_device() {
            // Device memory is not host bytes: never hand its address out as if it were.
            return Err(Error::invalid(
                "the region is device memory; it has no host bytes",
            ));
        }
        // SAFETY: forwarded from this function's contract.
        *unsafe { out(data, "data") }? = r.r.addr() as *mut u8;
        // SAFETY: forwarded from this function's contract.
        *unsafe { out(len, "len") }? = r.r.len();
        Ok(())
    })
}

/// Copies `len` bytes from `src` into the region at `offset`, under the region's lock.
/// Thread-safe.
///
/// # Safety
/// `region` is a live region handle; `src` is valid for reads of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn genie_region_write(
    region: *const genie_region,
    offset: usize,
    src: *const c_void,
    len: usize,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let r = unsafe { get(region, "region") }?;
        if len == 0 {
            return Ok(());
        }
        if src.is_null() {
            return Err(Error::invalid("src is NULL"));
        }
        // SAFETY: `src` is non-null and valid for reads of `len` bytes by contract.
        let data = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) };
        r.r.write(offset, data)?;
        Ok(())
    })
}

/// Copies `len` bytes of the region at `offset` into `dst`, under the region's lock.
/// Thread-safe.
///
/// # Safety
/// `region` is a live region handle; `dst` is valid for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn genie_region_read(
    region: *const genie_region,
    offset: usize,
    dst: *mut c_void,
    len: usize,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let r = unsafe { get(region, "region") }?;
        if len == 0 {
            return Ok(());
        }
        if dst.is_null() {
            return Err(Error::invalid("dst is NULL"));
        }
        // SAFETY: `dst` is non-null and valid for writes of `len` bytes by contract, and it is
        // not the region's own memory under a lock we take (the caller's buffer).
        let out = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), len) };
        r.r.read(offset, out)?;
        Ok(())
    })
}

/// The region's descriptor, valid on every connection to its endpoint (a private region's
/// grants nothing: use `genie_grant`). Thread-safe.
///
/// # Safety
/// `region` is a live region handle; `remote` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_region_descriptor(
    region: *const genie_region,
    remote: *mut genie_remote,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let r = unsafe { get(region, "region") }?;
        // SAFETY: forwarded from this function's contract.
        *unsafe { out(remote, "remote") }? = r.r.descriptor().into();
        Ok(())
    })
}

/// Encodes a descriptor into `GENIE_DESCRIPTOR_LEN` bytes ("GNR1", then endpoint, region, len,
/// key, addr as little-endian u64), the format the Python package's descriptors use.
/// Thread-safe.
///
/// # Safety
/// `remote` points to a `genie_remote`; `buf` is valid for writes of `GENIE_DESCRIPTOR_LEN`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn genie_remote_encode(
    remote: *const genie_remote,
    buf: *mut u8,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let r = unsafe { get(remote, "remote") }?;
        if buf.is_null() {
            return Err(Error::invalid("buf is NULL"));
        }
        let bytes = encode(r);
        // SAFETY: `buf` is valid for `GENIE_DESCRIPTOR_LEN` bytes by contract; `bytes` is ours.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, GENIE_DESCRIPTOR_LEN) };
        Ok(())
    })
}

/// Decodes `len` bytes (exactly `GENIE_DESCRIPTOR_LEN`, from `genie_remote_encode` or the
/// Python package) into `*remote`. Thread-safe.
///
/// # Safety
/// `buf` is valid for reads of `len` bytes; `remote` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_remote_decode(
    buf: *const u8,
    len: usize,
    remote: *mut genie_remote,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let slot = unsafe { out(remote, "remote") }?;
        if buf.is_null() {
            return Err(Error::invalid("buf is NULL"));
        }
        // SAFETY: `buf` is non-null and valid for reads of `len` bytes by contract.
        let bytes = unsafe { std::slice::from_raw_parts(buf, len) };
        *slot = decode(bytes)?;
        Ok(())
    })
}

const MAGIC: &[u8; 4] = b"GNR1";

/// The descriptor's bytes (the layout of [`genie_remote_encode`]).
pub fn encode(r: &genie_remote) -> [u8; GENIE_DESCRIPTOR_LEN] {
    let mut out = [0u8; GENIE_DESCRIPTOR_LEN];
    out[..4].copy_from_slice(MAGIC);
    for (i, v) in [r.endpoint, r.region, r.len, r.key, r.addr]
        .into_iter()
        .enumerate()
    {
        out[4 + 8 * i..12 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    out
}

fn decode(b: &[u8]) -> Result<genie_remote, Error> {
    let b: &[u8; GENIE_DESCRIPTOR_LEN] = b.try_into().map_err(|_| {
        Error::invalid(format!(
            "a descriptor is {GENIE_DESCRIPTOR_LEN} bytes, got {}",
            b.len()
        ))
    })?;
    if &b[..4] != MAGIC {
        return Err(Error::invalid("not a Genie descriptor (bad magic)"));
    }
    let field = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[4 + 8 * i..12 + 8 * i]);
        u64::from_le_bytes(w)
    };
    Ok(genie_remote {
        endpoint: field(0),
        region: field(1),
        len: field(2),
        key: field(3),
        addr: field(4),
    })
}

fn connection(c: Arc<dyn Connection>) -> *mut genie_connection {
    into_handle(genie_connection {
        c,
        held: Mutex::new(None),
    })
}

/// Connects to the endpoint at `address` ("ip:port"); the handshake is bounded by the peer
/// timeout. Free the handle with `genie_connection_free`. Thread-safe.
///
/// # Safety
/// `endpoint` is a live endpoint handle; `address` is NUL-terminated; `conn` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_connect(
    endpoint: *const genie_endpoint,
    address: *const c_char,
    conn: *mut *mut genie_connection,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let ep = unsafe { get(endpoint, "endpoint") }?;
        // SAFETY: forwarded from this function's contract.
        let slot = unsafe { out(conn, "conn") }?;
        // SAFETY: forwarded from this function's contract.
        let a = unsafe { string(address, "address") }?
            .ok_or_else(|| Error::invalid("address is NULL"))?;
        let addr = a
            .parse()
            .map_err(|_| Error::invalid(format!("address {a:?} is not \"ip:port\"")))?;
        *slot = connection(ep.t.connect(addr)?);
        Ok(())
    })
}

/// Waits up to `timeout_ms` for the next incoming connection. A refused attempt (e.g. a wrong
/// secret) returns its error; the endpoint keeps listening. Thread-safe.
///
/// # Safety
/// `endpoint` is a live endpoint handle; `conn` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_accept(
    endpoint: *const genie_endpoint,
    timeout_ms: u32,
    conn: *mut *mut genie_connection,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let ep = unsafe { get(endpoint, "endpoint") }?;
        // SAFETY: forwarded from this function's contract.
        let slot = unsafe { out(conn, "conn") }?;
        *slot = connection(ep.t.accept(timeout(timeout_ms))?);
        Ok(())
    })
}

/// Closes the connection: pending operations fail with `GENIE_ERR_CONNECTION_CLOSED`. The handle
/// stays valid until `genie_connection_free`. Thread-safe.
///
/// # Safety
/// `conn` is a live connection handle.
#[no_mangle]
pub unsafe extern "C" fn genie_connection_close(conn: *const genie_connection) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        unsafe { get(conn, "conn") }?.c.close();
        Ok(())
    })
}

/// `*alive` = 1 while the connection is open, else 0. Thread-safe.
///
/// # Safety
/// `conn` is a live connection handle; `alive` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_connection_alive(
    conn: *const genie_connection,
    alive: *mut c_int,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let c = unsafe { get(conn, "conn") }?;
        // SAFETY: forwarded from this function's contract.
        *unsafe { out(alive, "alive") }? = c_int::from(c.c.is_alive());
        Ok(())
    })
}

/// Frees the connection handle, which closes the connection. NULL is a no-op. Not thread-safe
/// with other uses of this handle.
///
/// # Safety
/// `conn` is NULL or a live connection handle, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn genie_connection_free(conn: *mut genie_connection) -> genie_status {
    entry(|| {
        if !conn.is_null() {
            // SAFETY: a live handle by contract (the connection closes before it is freed).
            unsafe { get(conn, "conn") }?.c.close();
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { free_handle(conn) };
        Ok(())
    })
}

/// Posts one transfer and stores its handle.
///
/// # Safety
/// As the public entry points that call it: live handles, `op` valid for writes.
#[allow(clippy::too_many_arguments)] // the C entry points' arguments, plus the kind
unsafe fn post(
    conn: *const genie_connection,
    local: *const genie_region,
    local_offset: usize,
    remote: *const genie_remote,
    remote_offset: u64,
    len: usize,
    kind: TransferKind,
    op: *mut *mut genie_op,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from the caller's contract.
        let c = unsafe { get(conn, "conn") }?;
        // SAFETY: forwarded from the caller's contract.
        let l = unsafe { get(local, "local") }?;
        // SAFETY: forwarded from the caller's contract.
        let r: RemoteRegion = (*unsafe { get(remote, "remote") }?).into();
        // SAFETY: forwarded from the caller's contract.
        let slot = unsafe { out(op, "op") }?;
        let o = c.c.submit(Transfer {
            kind,
            local: &l.r,
            local_offset,
            remote: &r,
            remote_offset,
            len,
        })?;
        *slot = into_handle(genie_op { op: o });
        Ok(())
    })
}

/// Writes `len` bytes from `local` at `local_offset` to the peer's region `remote` at
/// `remote_offset`; `*op` receives the operation's handle (free it with `genie_op_free`).
/// Thread-safe.
///
/// # Safety
/// `conn` and `local` are live handles; `remote` points to a `genie_remote`; `op` is valid for
/// writes.
#[no_mangle]
pub unsafe extern "C" fn genie_write(
    conn: *const genie_connection,
    local: *const genie_region,
    local_offset: usize,
    remote: *const genie_remote,
    remote_offset: u64,
    len: usize,
    op: *mut *mut genie_op,
) -> genie_status {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        post(
            conn,
            local,
            local_offset,
            remote,
            remote_offset,
            len,
            TransferKind::Write,
            op,
        )
    }
}

/// Like `genie_write`, then delivers `imm` to the peer's notification queue once the data has
/// landed (in posting order). Thread-safe.
///
/// # Safety
/// As `genie_write`.
#[no_mangle]
pub unsafe extern "C" fn genie_write_notify(
    conn: *const genie_connection,
    local: *const genie_region,
    local_offset: usize,
    remote: *const genie_remote,
    remote_offset: u64,
    len: usize,
    imm: u32,
    op: *mut *mut genie_op,
) -> genie_status {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        post(
            conn,
            local,
            local_offset,
            remote,
            remote_offset,
            len,
            TransferKind::WriteNotify(imm),
            op,
        )
    }
}

/// Reads `len` bytes of the peer's region `remote` at `remote_offset` into `local` at
/// `local_offset`. Thread-safe.
///
/// # Safety
/// As `genie_write`.
#[no_mangle]
pub unsafe extern "C" fn genie_read(
    conn: *const genie_connection,
    local: *const genie_region,
    local_offset: usize,
    remote: *const genie_remote,
    remote_offset: u64,
    len: usize,
    op: *mut *mut genie_op,
) -> genie_status {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        post(
            conn,
            local,
            local_offset,
            remote,
            remote_offset,
            len,
            TransferKind::Read,
            op,
        )
    }
}

/// Posts `n` transfers between `local` and the peer's region `remote` in one call; `*batch`
/// receives one handle for all (free it with `genie_batch_free`). A transfer refused at posting
/// fails on its own. Thread-safe.
///
/// # Safety
/// `conn` and `local` are live handles; `remote` points to a `genie_remote`; `transfers` is
/// valid for reads of `n` `genie_transfer`s; `batch` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_post_batch(
    conn: *const genie_connection,
    local: *const genie_region,
    remote: *const genie_remote,
    transfers: *const genie_transfer,
    n: usize,
    batch: *mut *mut genie_batch,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let c = unsafe { get(conn, "conn") }?;
        // SAFETY: forwarded from this function's contract.
        let l = unsafe { get(local, "local") }?;
        // SAFETY: forwarded from this function's contract.
        let r: RemoteRegion = (*unsafe { get(remote, "remote") }?).into();
        // SAFETY: forwarded from this function's contract.
        let slot = unsafe { out(batch, "batch") }?;
        let list: &[genie_transfer] = if n == 0 {
            &[]
        } else if transfers.is_null() {
            return Err(Error::invalid("transfers is NULL"));
        } else {
            // SAFETY: non-null and valid for reads of `n` transfers by contract.
            unsafe { std::slice::from_raw_parts(transfers, n) }
        };
        let ts = list
            .iter()
            .map(|t| {
                Ok(Transfer {
                    kind: match t.kind {
                        GENIE_TRANSFER_WRITE => TransferKind::Write,
                        GENIE_TRANSFER_WRITE_NOTIFY => TransferKind::WriteNotify(t.imm),
                        GENIE_TRANSFER_READ => TransferKind::Read,
                        other => {
                            return Err(Error::invalid(format!("unknown transfer kind {other}")))
                        }
                    },
                    local: &l.r,
                    local_offset: usize_of(t.local_offset, "local_offset")?,
                    remote: &r,
                    remote_offset: t.remote_offset,
                    len: usize_of(t.len, "len")?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        *slot = into_handle(genie_batch {
            b: c.c.post_batch(&ts)?,
        });
        Ok(())
    })
}

/// A descriptor of our `region` valid on this connection only (the only way into a private
/// region). Thread-safe.
///
/// # Safety
/// `conn` and `region` are live handles; `remote` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_grant(
    conn: *const genie_connection,
    region: *const genie_region,
    remote: *mut genie_remote,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let c = unsafe { get(conn, "conn") }?;
        // SAFETY: forwarded from this function's contract.
        let r = unsafe { get(region, "region") }?;
        // SAFETY: forwarded from this function's contract.
        *unsafe { out(remote, "remote") }? = c.c.grant(&r.r)?.into();
        Ok(())
    })
}

/// Sends a message of `len` bytes (at most the endpoint's `max_message_size`); `*op` receives
/// its handle. The bytes are copied before the call returns. Thread-safe.
///
/// # Safety
/// `conn` is a live handle; `data` is valid for reads of `len` bytes; `op` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_send(
    conn: *const genie_connection,
    data: *const c_void,
    len: usize,
    op: *mut *mut genie_op,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let c = unsafe { get(conn, "conn") }?;
        // SAFETY: forwarded from this function's contract.
        let slot = unsafe { out(op, "op") }?;
        let msg: &[u8] = if len == 0 {
            &[]
        } else if data.is_null() {
            return Err(Error::invalid("data is NULL"));
        } else {
            // SAFETY: non-null and valid for reads of `len` bytes by contract.
            unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }
        };
        *slot = into_handle(genie_op { op: c.c.send(msg)? });
        Ok(())
    })
}

/// Waits up to `timeout_ms` for the next message and copies it into `buf` (`cap` bytes);
/// `*len` receives its length. If it does not fit: `GENIE_ERR_BUFFER_TOO_SMALL`, `*len` is the
/// size needed, and the message is kept for the next call. Thread-safe.
///
/// # Safety
/// `conn` is a live handle; `buf` is valid for writes of `cap` bytes; `len` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_recv(
    conn: *const genie_connection,
    timeout_ms: u32,
    buf: *mut c_void,
    cap: usize,
    len: *mut usize,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let c = unsafe { get(conn, "conn") }?;
        // SAFETY: forwarded from this function's contract.
        let n = unsafe { out(len, "len") }?;
        let held = c.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        let msg = match held {
            Some(m) => m,
            None => c.c.recv(timeout(timeout_ms))?,
        };
        *n = msg.len();
        if msg.len() > cap {
            *c.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
            return Err(Error {
                code: GENIE_ERR_BUFFER_TOO_SMALL,
                msg: format!("the message needs {} bytes, the buffer has {cap}", *n),
            });
        }
        if !msg.is_empty() {
            if buf.is_null() {
                return Err(Error::invalid("buf is NULL"));
            }
            // SAFETY: `buf` is valid for `cap >= msg.len()` bytes by contract; `msg` is ours.
            unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), msg.len()) };
        }
        Ok(())
    })
}

/// Waits up to `timeout_ms` (0: only what is already queued) for the next notification;
/// notifications arrive in the order their writes were posted. Thread-safe.
///
/// # Safety
/// `conn` is a live handle; `imm` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_recv_notification(
    conn: *const genie_connection,
    timeout_ms: u32,
    imm: *mut u32,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let c = unsafe { get(conn, "conn") }?;
        // SAFETY: forwarded from this function's contract.
        let slot = unsafe { out(imm, "imm") }?;
        *slot = if timeout_ms == 0 {
            c.c.try_recv_notification()?
                .ok_or(TransportError::Timeout {
                    after: Duration::ZERO,
                })?
        } else {
            c.c.recv_notification(timeout(timeout_ms))?
        };
        Ok(())
    })
}

/// Never blocks: `*done` = 1 once the operation completed (then the return value is its result),
/// else 0 and `GENIE_OK`. Thread-safe.
///
/// # Safety
/// `op` is a live operation handle; `done` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_op_test(op: *const genie_op, done: *mut c_int) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let o = unsafe { get(op, "op") }?;
        // SAFETY: forwarded from this function's contract.
        let d = unsafe { out(done, "done") }?;
        match o.op.poll() {
            None => *d = 0,
            Some(r) => {
                *d = 1;
                r?;
            }
        }
        Ok(())
    })
}

/// Waits up to `timeout_ms` for the operation (spinning in busy-poll mode): its result, or
/// `GENIE_ERR_TIMEOUT` if it is still pending (it is not cancelled). Thread-safe.
///
/// # Safety
/// `op` is a live operation handle.
#[no_mangle]
pub unsafe extern "C" fn genie_op_wait(op: *const genie_op, timeout_ms: u32) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        unsafe { get(op, "op") }?.op.wait(timeout(timeout_ms))?;
        Ok(())
    })
}

/// Frees an operation handle (the operation itself goes on). NULL is a no-op. Not thread-safe
/// with other uses of this handle.
///
/// # Safety
/// `op` is NULL or a live operation handle, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn genie_op_free(op: *mut genie_op) -> genie_status {
    // SAFETY: forwarded from this function's contract.
    entry(|| unsafe {
        free_handle(op);
        Ok(())
    })
}

/// The batch's counts, never blocking; any out-pointer may be NULL. Thread-safe.
///
/// # Safety
/// `batch` is a live batch handle; the out-pointers are NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn genie_batch_status(
    batch: *const genie_batch,
    pending: *mut usize,
    ok: *mut usize,
    failed: *mut usize,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let s = unsafe { get(batch, "batch") }?.b.status();
        for (p, v) in [(pending, s.pending), (ok, s.ok), (failed, s.failed)] {
            // SAFETY: forwarded from this function's contract.
            if let Ok(slot) = unsafe { out(p, "count") } {
                *slot = v;
            }
        }
        Ok(())
    })
}

/// Waits up to `timeout_ms` for every transfer of the batch: `GENIE_OK`, the first failed
/// transfer's error (find which with `genie_batch_result`), or `GENIE_ERR_TIMEOUT`.
/// Thread-safe.
///
/// # Safety
/// `batch` is a live batch handle.
#[no_mangle]
pub unsafe extern "C" fn genie_batch_wait(
    batch: *const genie_batch,
    timeout_ms: u32,
) -> genie_status {
    entry(|| {
        // SAFETY: forwarded from this function's contract.
        let b = &unsafe { get(batch, "batch") }?.b;
        let s = b.wait(timeout(timeout_ms))?;
        if s.failed > 0 {
            for r in b.results().into_iter().flatten() {
                r?;
            }
        }
        Ok(())
    })
}

/// The result of transfer `index` of the batch: `GENIE_OK`, its error, or `GENIE_PENDING`.
/// Thread-safe.
///
/// # Safety
/// `batch` is a live batch handle.
#[no_mangle]
pub unsafe extern "C" fn genie_batch_result(
    batch: *const genie_batch,
    index: usize,
) -> genie_status {
    let mut pending = false;
    let status = entry(|| {
        // SAFETY: forwarded from this function's contract.
        let b = &unsafe { get(batch, "batch") }?.b;
        let op = b.ops().get(index).ok_or_else(|| {
            Error::invalid(format!("index {index} is past the batch's {}", b.len()))
        })?;
        match op.poll() {
            None => pending = true,
            Some(r) => r?,
        }
        Ok(())
    });
    if pending {
        GENIE_PENDING
    } else {
        status
    }
}

/// Frees a batch handle (its transfers go on). NULL is a no-op. Not thread-safe with other uses
/// of this handle.
///
/// # Safety
/// `batch` is NULL or a live batch handle, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn genie_batch_free(batch: *mut genie_batch) -> genie_status {
    // SAFETY: forwarded from this function's contract.
    entry(|| unsafe {
        free_handle(batch);
        Ok(())
    })
}
