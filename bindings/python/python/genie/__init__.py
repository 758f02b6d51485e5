"""Genie's transport from Python.

An ``Endpoint`` (backend, listen address, secret, device) registers memory as ``Region``\\ s and
makes ``Connection``\\ s; a connection posts one-sided writes and reads between a local region and
a peer's region descriptor (bytes, or a parsed ``RemoteRegion``), optionally with a 32-bit
notification, batches of ``(local_offset, remote_offset, length)`` triples, and small messages.
Every operation returns a completion handle (``Completion.done()``, ``.wait(timeout)``); every
wait releases the GIL. Errors are ``GenieError`` subclasses that keep the typed cause in
attributes (``kind``, ``region``, ``offset``, ``peer``, ...).

Memory:

* ``Endpoint.alloc(n)`` / ``alloc_array(ep, shape, dtype)``: the endpoint's own registered
  memory, seen by numpy without a copy (remote writes land in the array itself).
* ``Endpoint.register(obj)``: a caller's C-contiguous buffer (numpy array, bytearray,
  memoryview; torch CPU tensors through ``.numpy()``), kept alive while registered; a writable
  one is registered in place (zero-copy), a read-only one staged through a copy (``Region``).

Example (two endpoints in one process)::

    import genie, numpy as np
    server, client = genie.Endpoint(backend="tcp"), genie.Endpoint(backend="tcp")
    kv = genie.alloc_array(server, (4, 1024), np.float16)   # registered, zero-copy
    conn = client.connect(server.address)
    peer = server.accept(timeout=5)
    src = client.register(np.ones((4, 1024), np.float16))
    conn.write(src, 0, genie.region_of(kv).descriptor(), 0, len(src), notify=1).wait(5)
    assert peer.recv_notification(5) == 1 and kv.sum() == 4096
"""

from ._genie import (  # noqa: F401  (re-exported)
    DESCRIPTOR_LEN,
    AccessDeniedError,
    AuthError,
    BackendUnavailableError,
    BadKeyError,
    BatchCompletion,
    Completion,
    Connection,
    ConnectionClosedError,
    Endpoint,
    Engine,
    EngineShutDownError,
    GenieError,
    KvPoolFullError,
    MessageTooLargeError,
    OutOfBoundsError,
    PeerDeadError,
    ProtocolError,
    Region,
    RemoteAccessError,
    RemoteRegion,
    RequestFailedError,
    RequestStream,
    TimeoutError,
    UnknownRegionError,
    WorkerFailedError,
    __version__,
    select_backend,
)

__all__ = [
    "DESCRIPTOR_LEN",
    "AccessDeniedError",
    "AuthError",
    "BackendUnavailableError",
    "BadKeyError",
    "BatchCompletion",
    "Completion",
    "Connection",
    "ConnectionClosedError",
    "Endpoint",
    "Engine",
    "EngineShutDownError",
    "GenieError",
    "KvPoolFullError",
    "MessageTooLargeError",
    "OutOfBoundsError",
    "PeerDeadError",
    "ProtocolError",
    "Region",
    "RemoteAccessError",
    "RemoteRegion",
    "RequestFailedError",
    "RequestStream",
    "TimeoutError",
    "UnknownRegionError",
    "WorkerFailedError",
    "alloc_array",
    "region_of",
    "select_backend",
]


def alloc_array(endpoint, shape, dtype, access="rw", private=False):
    """A numpy array of ``shape`` and ``dtype`` over newly registered memory of ``endpoint``
    (zero-copy: what peers write lands in the array). ``region_of(array)`` gives its Region."""
    import numpy as np

    dtype = np.dtype(dtype)
    count = 1
    for n in (shape if isinstance(shape, tuple) else (shape,)):
        count *= int(n)
    region = endpoint.alloc(count * dtype.itemsize, access=access, private=private)
    return np.frombuffer(region, dtype=dtype, count=count).reshape(shape)


def region_of(array):
    """The ``Region`` behind an array made by ``alloc_array`` (or any view of one)."""
    base = array
    while base is not None and not isinstance(base, Region):
        obj = getattr(base, "obj", None)  # memoryview
        base = obj if obj is not None else getattr(base, "base", None)
    if base is None:
        raise ValueError("not a view of a genie Region (make it with genie.alloc_array)")
    return base
