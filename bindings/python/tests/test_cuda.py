"""GPU memory from Python on a real GPU: torch CUDA tensors registered in place and device regions
from `Endpoint.alloc_device`, moved over the transport and checked against torch's own view.

Runs only where torch sees a CUDA device and the package was built with the `cuda` feature
(`MATURIN_PEP517_ARGS="--features cuda" pip install ./bindings/python`); skipped elsewhere, so in
CI. `GENIE_CUDA_REQUIRE=1` turns every such skip into a failure (a GPU machine's proof run).
"""

import hashlib
import os

import numpy as np
import pytest

import genie
from conftest import BACKEND
from conftest import WAIT

REQUIRE = os.environ.get("GENIE_CUDA_REQUIRE") == "1"


def _skip(why):
    if REQUIRE:
        pytest.fail(f"GENIE_CUDA_REQUIRE=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def torch():
    try:
        import torch
    except ImportError:
        _skip("torch is not installed")
    if not torch.cuda.is_available():
        _skip("torch sees no CUDA device")
    return torch


@pytest.fixture()
def pair(torch):
    """Two endpoints of this process and a connection between them; skips without `cuda`."""
    server, client = genie.Endpoint(backend=BACKEND), genie.Endpoint(backend=BACKEND)
    try:
        client.alloc_device(0, 16)
    except genie.GenieError as e:
        if e.kind == "device_unavailable":
            _skip(f"this package has no CUDA support ({e})")
        raise
    conn = client.connect(server.address)
    peer = server.accept(timeout=WAIT)
    return server, client, conn, peer


def sha(b):
    return hashlib.sha256(bytes(b)).hexdigest()


def random_bytes(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("size", [1, 4097, 1 << 20, 9 << 20])
def test_host_to_torch_tensor_lands_in_place(torch, pair, size):
    server, client, conn, peer = pair
    kv = torch.zeros(size + 5, dtype=torch.uint8, device="cuda:0")
    region = server.register_cuda(kv, access="write")
    assert len(region) == size + 5
    src = random_bytes(size, size)
    local = client.register(src)
    conn.write(local, 0, region.descriptor(), 5, size, notify=size & 0xFFFF).wait(WAIT)
    assert peer.recv_notification(timeout=WAIT) == size & 0xFFFF
    torch.cuda.synchronize()
    got = kv.cpu().numpy()
    assert sha(got[5:]) == sha(src)
    assert not got[:5].any()  # nothing before the offset was touched


@pytest.mark.parametrize("size", [3, 65536, 4 << 20])
def test_torch_tensor_to_device_region_and_back_to_host(torch, pair, size):
    server, client, conn, peer = pair
    # The source: a torch tensor on the GPU, filled by torch.
    src = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda:0")
    remote = server.register_cuda(src, access="read")
    # Device -> device: read the tensor into a device region of the other endpoint.
    dev = client.alloc_device(0, size + 1)
    conn.read(dev, 1, remote.descriptor(), 0, size).wait(WAIT)
    # Device -> host: write the device region into a host region of the server.
    back = genie.alloc_array(server, size, np.uint8)
    conn.write(dev, 1, genie.region_of(back).descriptor(), 0, size, notify=7).wait(WAIT)
    assert peer.recv_notification(timeout=WAIT) == 7
    assert sha(back) == sha(src.cpu().numpy())


def test_out_of_bounds_on_a_torch_tensor_is_refused_and_leaves_it_intact(torch, pair):
    server, client, conn, _ = pair
    kv = torch.full((4096,), 9, dtype=torch.uint8, device="cuda:0")
    region = server.register_cuda(kv, access="write")
    local = client.register(random_bytes(8192, 1))
    with pytest.raises(genie.OutOfBoundsError) as e:
        conn.write(local, 0, region.descriptor(), 1, 4096).wait(WAIT)
    assert e.value.kind == "region_out_of_bounds", e.value
    torch.cuda.synchronize()
    assert bool((kv == 9).all())
    # The connection still works after the refusal.
    conn.write(local, 0, region.descriptor(), 0, 4096).wait(WAIT)
    torch.cuda.synchronize()
    assert sha(kv.cpu().numpy()) == sha(random_bytes(8192, 1)[:4096])


def test_a_pointer_that_is_not_that_gpus_memory_is_refused(torch, pair):
    server = pair[0]
    host = torch.zeros(4096, dtype=torch.uint8).pin_memory()
    dev = torch.zeros(4096, dtype=torch.uint8, device="cuda:0")

    class Lying:
        def __init__(self, ptr, nbytes):
            self.device = torch.device("cuda:0")
            self.nbytes = nbytes
            self._ptr = ptr

        def data_ptr(self):
            return self._ptr

    # Pinned host memory posing as device memory, and a length past the tensor's allocation.
    for lie in (Lying(host.data_ptr(), 4096), Lying(dev.data_ptr(), 64 << 30)):
        with pytest.raises(genie.GenieError) as e:
            server.register_cuda(lie)
        assert e.value.kind == "cuda", e.value
    # The truth registers.
    assert len(server.register_cuda(Lying(dev.data_ptr(), 4096))) == 4096
