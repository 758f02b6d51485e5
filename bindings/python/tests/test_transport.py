"""The `genie` Python package against a peer process over TCP on loopback."""

import hashlib
import os
import signal
import threading
import time

import numpy as np
import pytest

import genie
from conftest import BACKEND
from conftest import WAIT


def sha(b):
    return hashlib.sha256(b).hexdigest()


def random_bytes(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("size", [1, 7, 4096, 65537, 1 << 20, 64 << 20])
def test_integrity_write_and_read_back(peer, size):
    remote = peer.alloc("t", size + 3)
    # Registered caller memory (numpy) as the source, at an unaligned offset.
    src = np.zeros(size + 1, dtype=np.uint8)
    src[1:] = random_bytes(size, size)
    local = peer.ep.register(src)
    peer.conn.write(local, 1, remote, 3, size).wait(WAIT)
    assert peer.sha("t", 3, size) == sha(src[1:])
    # Read back into the endpoint's own memory (zero-copy numpy view) and into a bytearray.
    back = genie.alloc_array(peer.ep, size, np.uint8)
    peer.conn.read(genie.region_of(back), 0, remote, 3, size).wait(WAIT)
    assert sha(back) == sha(src[1:])
    if size <= 1 << 20:
        ba = bytearray(size)
        peer.conn.read(peer.ep.register(ba), 0, remote, 3, size).wait(WAIT)
        assert sha(ba) == sha(src[1:])


def test_remote_writes_land_in_a_numpy_array(peer):
    remote = peer.alloc("src", 1 << 16)
    expect = peer.call(op="fill", name="src", seed=5).decode()
    arr = genie.alloc_array(peer.ep, (16, 1024), np.float32)
    peer.conn.read(genie.region_of(arr), 0, remote, 0, arr.nbytes).wait(WAIT)
    assert sha(arr) == expect


def test_notifications_arrive_in_order(peer):
    remote = peer.alloc("t", 4096)
    local = peer.ep.alloc(4096)
    ops = [peer.conn.write(local, i, remote, i, 1, notify=i) for i in range(200)]
    for op in ops:
        op.wait(WAIT)
    assert peer.call(op="notifications", count=200) == str(list(range(200))).encode()


def test_batch_of_triples(peer):
    n, blk = 64, 4096
    remote = peer.alloc("t", n * blk)
    src = random_bytes(n * blk, 11)
    local = peer.ep.register(src)
    # Reverse the blocks: local block i lands in remote block n-1-i; one notification at the end.
    triples = [(i * blk, (n - 1 - i) * blk, blk) for i in range(n)]
    batch = peer.conn.write_batch(local, remote, triples, notify=99)
    batch.wait(WAIT)
    assert len(batch) == n and batch.status() == (0, n, 0) and batch.done()
    assert peer.call(op="notifications", count=1) == b"[99]"
    expect = src.reshape(n, blk)[::-1].tobytes()
    assert peer.sha("t", 0, n * blk) == sha(expect)
    # Read them back in one batch (a numpy (n, 3) array of triples works too).
    back = bytearray(n * blk)
    rb = peer.conn.read_batch(peer.ep.register(back), remote, np.array(triples)[:, [1, 0, 2]])
    rb.wait(WAIT)
    assert bytes(back) == src.tobytes()  # each block back where it came from


def test_batch_with_one_bad_transfer(peer):
    remote = peer.alloc("t", 4096)
    local = peer.ep.alloc(4096)
    batch = peer.conn.write_batch(local, remote, [(0, 0, 100), (0, 4090, 100), (0, 200, 100)])
    with pytest.raises(genie.OutOfBoundsError) as e:
        batch.wait(WAIT)
    assert e.value.index == 1 and e.value.kind == "region_out_of_bounds"
    assert batch.status() == (0, 2, 1)
    [(i, err)] = batch.errors()
    assert i == 1 and isinstance(err, genie.OutOfBoundsError)


def test_messages(peer):
    remote = peer.alloc("t", 10)
    assert len(remote) == 10 and remote.to_bytes() == bytes(remote)
    with pytest.raises(genie.MessageTooLargeError) as e:
        peer.conn.send(b"x" * (64 * 1024 + 1))
    assert e.value.kind == "message_too_large" and e.value.max == 64 * 1024


def test_typed_remote_access_errors(peer):
    remote = peer.alloc("t", 4096)
    wo = peer.alloc("wo", 4096, access="write")
    local = peer.ep.alloc(4096)
    d = bytearray(bytes(remote))
    with pytest.raises(genie.OutOfBoundsError) as e:
        peer.conn.write(local, 0, remote, 4000, 200).wait(WAIT)
    assert (e.value.region, e.value.offset, e.value.length, e.value.size) == (remote.region, 4000, 200, 4096)
    with pytest.raises(genie.OutOfBoundsError) as e:
        peer.conn.write(local, 4000, remote, 0, 200)
    assert e.value.kind == "local_out_of_bounds"
    with pytest.raises(genie.AccessDeniedError) as e:
        peer.conn.read(local, 0, wo, 0, 10).wait(WAIT)
    assert e.value.op == "read"
    unknown = bytearray(d)
    unknown[12:20] = (10**6).to_bytes(8, "little")
    with pytest.raises(genie.UnknownRegionError):
        peer.conn.write(local, 0, bytes(unknown), 0, 10).wait(WAIT)
    assert peer.conn.alive  # access violations leave the connection usable
    with pytest.raises(ValueError):
        peer.conn.write(local, 0, b"not a descriptor", 0, 10)
    bad = bytearray(d)
    bad[28] ^= 1
    with pytest.raises(genie.BadKeyError) as e:
        peer.conn.write(local, 0, bytes(bad), 0, 10).wait(WAIT)
    assert isinstance(e.value, genie.RemoteAccessError) and e.value.region == remote.region


def test_auth_error(make_peer):
    p = make_peer("--secret", "right", connect=False, secret="wrong")
    with pytest.raises(genie.AuthError) as e:
        p.ep.connect(p.address)
    assert e.value.kind == "auth_failed"
    assert p._line("ACCEPT")[0] == "AuthError"


def test_timeout_error(peer):
    t0 = time.monotonic()
    with pytest.raises(genie.TimeoutError) as e:
        peer.conn.recv_notification(timeout=0.05)
    assert isinstance(e.value, TimeoutError) and e.value.after == pytest.approx(0.05)
    assert time.monotonic() - t0 < 2


def test_killed_peer_fails_pending_work(make_peer):
    p = make_peer(peer_timeout=1.0)
    remote = p.alloc("t", 4096)
    p.proc.kill()
    p.proc.wait(timeout=WAIT)
    t0 = time.monotonic()
    with pytest.raises(genie.ConnectionClosedError):
        for _ in range(1000):  # the first writes may be accepted before the close is seen
            p.conn.write(p.ep.alloc(8), 0, remote, 0, 8).wait(WAIT)
    assert time.monotonic() - t0 < 1.0 + 1.0
    assert not p.conn.alive


def test_silent_peer_is_declared_dead_within_the_peer_timeout(make_peer):
    p = make_peer(peer_timeout=1.0)
    remote = p.alloc("t", 4096)
    local = p.ep.alloc(8)
    os.kill(p.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        # Refused at the post when the peer is already declared dead (a slow machine), else
        # failed while waiting.
        with pytest.raises(genie.PeerDeadError) as e:
            p.conn.write(local, 0, remote, 0, 8).wait(WAIT)
            p.conn.recv_notification(timeout=WAIT)
        took = time.monotonic() - t0
        assert e.value.kind == "peer_dead" and e.value.peer == p.address
        # Within the peer timeout plus scheduling slack (scaled with WAIT on slow machines).
        assert took < 1.0 * 1.5 + 0.5 + WAIT / 20, took
    finally:
        p.proc.kill()
        p.proc.wait(timeout=WAIT)


def test_buffer_checks():
    ep = genie.Endpoint(backend=BACKEND)
    a = np.zeros((8, 8), dtype=np.float32)
    with pytest.raises(BufferError, match="non-contiguous"):
        ep.register(a[:, ::2])
    with pytest.raises(BufferError, match="read-only"):
        ep.register(b"immutable")
    ro = ep.register(b"immutable", access="read")
    assert not ro.zero_copy and ro.obj == b"immutable"
    frozen = np.zeros(16, np.uint8)
    frozen.flags.writeable = False
    with pytest.raises(BufferError, match="read-only"):
        ep.register(frozen, access="write")
    with pytest.raises(TypeError):
        ep.register(12345)
    with pytest.raises(ValueError):
        ep.alloc(10, access="everything")
    # The registration keeps the object alive.
    r = ep.register(bytearray(b"abc"))
    assert r.obj == bytearray(b"abc") and len(r) == 3
    with pytest.raises(BufferError):
        r.obj.extend(b"d")  # exported: cannot be resized under the region


def test_read_into_read_only_registration_is_refused():
    server, client = genie.Endpoint(backend=BACKEND), genie.Endpoint(backend=BACKEND)
    target = server.alloc(64)
    conn = client.connect(server.address)
    server.accept(timeout=WAIT)
    ro = client.register(b"x" * 64, access="local")
    with pytest.raises(BufferError, match="read-only"):
        conn.read(ro, 0, target.descriptor(), 0, 8)


@pytest.mark.parametrize("busy", [False, True])
def test_waits_release_the_gil(busy):
    server = genie.Endpoint(backend=BACKEND, busy_poll=busy)
    client = genie.Endpoint(backend=BACKEND, busy_poll=busy)
    target = server.alloc(64)
    conn = client.connect(server.address)
    peer = server.accept(timeout=WAIT)
    got = []
    waiter = threading.Thread(target=lambda: got.append(peer.recv_notification(timeout=WAIT)))
    waiter.start()
    # While the other thread waits, this one keeps running Python code.
    count, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 0.2:
        count += 1
    assert count > 10_000 and waiter.is_alive()
    conn.write(client.alloc(8), 0, target.descriptor(), 0, 8, notify=5).wait(WAIT)
    waiter.join(WAIT)
    assert got == [5]


def test_select_backend_has_a_reason():
    backend, reason = genie.select_backend("auto")
    assert backend in ("tcp", "rdma") and reason.startswith("auto")
    ep = genie.Endpoint()
    assert ep.backend == backend and ep.backend_reason == reason
    with pytest.raises(ValueError):
        genie.Endpoint(backend="carrier-pigeon")


def test_private_region_is_reached_only_through_a_grant():
    server, client = genie.Endpoint(backend=BACKEND), genie.Endpoint(backend=BACKEND)
    private = server.alloc(64, private=True)
    conn = client.connect(server.address)
    peer = server.accept(timeout=WAIT)
    src = client.register(bytearray(b"g" * 64))
    other = client.connect(server.address)
    other_peer = server.accept(timeout=WAIT)  # noqa: F841  (dropping it would close it)
    with pytest.raises(genie.BadKeyError):
        other.write(src, 0, private.descriptor(), 0, 8).wait(WAIT)
    conn.write(src, 0, peer.grant(private), 0, 64).wait(WAIT)
    assert bytes(memoryview(private)) == b"g" * 64


def test_registered_numpy_array_is_zero_copy():
    server, client = genie.Endpoint(backend=BACKEND), genie.Endpoint(backend=BACKEND)
    kv = np.zeros((4, 256), dtype=np.float32)
    region = server.register(kv, access="write")
    assert region.zero_copy and region.obj is kv
    conn = client.connect(server.address)
    peer = server.accept(timeout=WAIT)
    src = client.register(np.arange(1024, dtype=np.float32))
    conn.write(src, 0, region.descriptor(), 0, len(src), notify=3).wait(WAIT)
    assert peer.recv_notification(timeout=WAIT) == 3
    assert np.array_equal(kv.ravel(), np.arange(1024, dtype=np.float32))  # no refresh: same memory
    del region  # the array outlives its registration
    assert kv[3, 255] == 1023


class _FakeCudaTensor:
    """What register_cuda reads from a torch CUDA tensor, without torch or a GPU."""

    def __init__(self, kind="cuda", index=0, contiguous=True):
        import types

        self.device = types.SimpleNamespace(type=kind, index=index)
        self.nbytes = 4096
        self._contiguous = contiguous

    def data_ptr(self):
        return 0x7F00_0000_0000

    def is_contiguous(self):
        return self._contiguous


def test_device_regions_without_a_gpu_raise_typed_errors():
    ep = genie.Endpoint(backend="tcp")
    tensor = _FakeCudaTensor()
    for call in (lambda: ep.register_cuda(tensor), lambda: ep.alloc_device(0, 4096)):
        with pytest.raises(genie.GenieError) as e:
            call()
        # No `cuda` feature, or no driver/GPU here (a GPU machine refuses the fake pointer).
        assert e.value.kind in ("device_unavailable", "cuda"), e.value
    with pytest.raises(ValueError):
        ep.register_cuda(_FakeCudaTensor(kind="cpu", index=None))
    with pytest.raises(ValueError):
        ep.register_cuda(_FakeCudaTensor(contiguous=False))
    # Host regions of the same endpoint are unaffected.
    assert len(ep.alloc(16)) == 16
