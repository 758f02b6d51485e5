"""Disaggregated prefill -> decode KV-cache transfer, as a serving stack does it with Genie.

The decode process owns a paged KV pool, a numpy array ``[layers, blocks, block_size, heads,
head_dim]`` in registered memory, and assigns blocks of it to a request. The prefill process
computes the request's KV layer by layer and writes each layer's blocks straight into the decode
pool (one batch of one-sided writes per layer, its last write carrying a notification with the
layer number). The decode process waits for each layer's notification, then checks that layer's
bytes, so it could start attending over layer 0 while later layers are still in flight.

Run ``python kv_transfer.py`` (starts both processes on loopback TCP), or the two roles yourself:
``python kv_transfer.py decode --listen 127.0.0.1:7000`` and
``python kv_transfer.py prefill --connect 127.0.0.1:7000``. Add ``--secret S`` to both to
authenticate the connection.
"""

import argparse
import json
import subprocess
import sys
import time

import numpy as np

import genie

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 12, 64, 16, 8, 64
DTYPE = np.float16
PROMPT_TOKENS = 100  # -> ceil(100 / 16) = 7 blocks of the pool
WAIT = 30.0


def request_kv(seed, layer, nblocks):
    """The KV that prefill computes for one layer of the request (deterministic, so decode can
    check it): ``[nblocks, block_size, heads, head_dim]``."""
    rng = np.random.default_rng(seed * 1000 + layer)
    return rng.standard_normal((nblocks, BLOCK_SIZE, HEADS, HEAD_DIM)).astype(DTYPE)


def decode(args):
    ep = genie.Endpoint(backend=args.backend, listen=args.listen, secret=args.secret)
    pool = genie.alloc_array(ep, (LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM), DTYPE, access="write")
    print(f"decode: pool {pool.shape} {pool.dtype} ({pool.nbytes >> 20} MiB) on {ep.backend} "
          f"({ep.backend_reason}), listening on {ep.address}", flush=True)
    print("ADDR", ep.address, flush=True)
    conn = ep.accept(timeout=WAIT)
    # The block table of the request: scattered blocks of the pool, as a paged allocator hands out.
    nblocks = -(-PROMPT_TOKENS // BLOCK_SIZE)
    block_ids = [int(b) for b in np.random.default_rng(7).choice(BLOCKS, nblocks, replace=False)]
    conn.send(json.dumps({
        "pool": genie.region_of(pool).descriptor().hex(),
        "block_ids": block_ids,
        "shape": list(pool.shape),
        "seed": args.seed,
    }).encode()).wait(WAIT)
    t0 = time.perf_counter()
    for layer in range(LAYERS):
        got = conn.recv_notification(timeout=WAIT)  # the GIL is free while we wait
        assert got == layer, f"notification {got}, expected layer {layer}"
        landed = pool[layer, block_ids]
        expect = request_kv(args.seed, layer, nblocks)
        assert np.array_equal(landed.view(np.uint16), expect.view(np.uint16)), f"layer {layer} differs"
        print(f"decode: layer {layer:2d} landed and checked "
              f"({len(block_ids)} blocks, {landed.nbytes} B) at {1e3 * (time.perf_counter() - t0):.2f} ms",
              flush=True)
    untouched = np.setdiff1d(np.arange(BLOCKS), block_ids)
    assert not pool[:, untouched].any(), "blocks outside the block table were written"
    conn.send(b"ok").wait(WAIT)
    print("decode: all layers landed intact; other blocks untouched", flush=True)


def prefill(args):
    ep = genie.Endpoint(backend=args.backend, secret=args.secret)
    conn = ep.connect(args.connect)
    info = json.loads(conn.recv(timeout=WAIT))
    pool = genie.RemoteRegion.from_bytes(bytes.fromhex(info["pool"]))
    layers, blocks, block_size, heads, head_dim = info["shape"]
    block_bytes = block_size * heads * head_dim * np.dtype(DTYPE).itemsize
    block_ids = info["block_ids"]
    # The request's KV on the prefill side: this process's own numpy array, registered.
    kv = np.zeros((layers, len(block_ids), block_size, heads, head_dim), DTYPE)
    src = ep.register(kv, access="local")
    batches = []
    for layer in range(layers):
        kv[layer] = request_kv(info["seed"], layer, len(block_ids))  # "compute" the layer
        base = layer * len(block_ids) * block_bytes
        triples = [(base + i * block_bytes, (layer * blocks + b) * block_bytes, block_bytes)
                   for i, b in enumerate(block_ids)]
        # Posted without waiting: the next layer computes while this one is on the wire.
        batches.append(conn.write_batch(src, pool, triples, notify=layer))
    for b in batches:
        b.wait(WAIT)
    assert conn.recv(timeout=WAIT) == b"ok"
    print(f"prefill: wrote {layers} layers x {len(block_ids)} blocks of {block_bytes} B", flush=True)


def both(args):
    cmd = [sys.executable, __file__, "decode", "--listen", "127.0.0.1:0", "--seed", str(args.seed),
           "--backend", args.backend] + (["--secret", args.secret] if args.secret else [])
    dec = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        addr = None
        for line in dec.stdout:
            if line.startswith("ADDR "):
                addr = line.split()[1]
                break
            print(line, end="")
        assert addr, "the decode process did not start"
        args.connect = addr
        prefill(args)
        for line in dec.stdout:
            print(line, end="")
        assert dec.wait(timeout=WAIT) == 0, "the decode process failed"
    finally:
        if dec.poll() is None:
            dec.kill()
    print("kv_transfer: OK")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", nargs="?", choices=["decode", "prefill", "both"], default="both")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--connect")
    ap.add_argument("--secret")
    ap.add_argument("--backend", default="tcp")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    {"decode": decode, "prefill": prefill, "both": both}[args.role](args)


if __name__ == "__main__":
    main()
