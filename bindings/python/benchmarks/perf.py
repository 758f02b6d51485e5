"""The transport's cost from Python, measured as `genie-perf` measures it from Rust.

Loopback TCP, both endpoints in this process, busy polling. Prints one line:
``py write8_median_us=<t> bw64k_mb_s=<b> native_write8_median_us=<n> paired_overhead_us=<o>``:

- ``write8_median_us``: median post -> completion time of an 8-byte write, one at a time
  (``conn.write(...).wait()``, the timestamps taken in Python around the two calls);
- ``native_write8_median_us``: the same loop in Rust inside this process, on the same
  connection, in 50 blocks alternating with the Python loop's; ``paired_overhead_us`` is the
  median over the blocks of (Python block median - Rust block median): the binding's own cost,
  which the machine's load moves far less than the absolute figures;
- ``bw64k_mb_s``: 64 KiB writes, up to 128 in flight, posted as batches of 32
  (``conn.write_batch``) with one handle each, as ``genie-perf --window 128`` posts them.

Usage: ``python perf.py [latency_iterations] [bandwidth_iterations]``.
"""

import collections
import statistics
import sys
import time

import genie
from genie._genie import _native_write_latency

WAIT = 30.0


def main():
    n_lat = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    n_bw = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    size, window = 65536, 128
    per = max(1, min(window // 4, 32))
    server = genie.Endpoint(backend="tcp", busy_poll=True)
    client = genie.Endpoint(backend="tcp", busy_poll=True)
    target = server.alloc(size * window)
    conn = client.connect(server.address)
    peer = server.accept(timeout=WAIT)  # noqa: F841  (kept open)
    remote = genie.RemoteRegion.from_bytes(target.descriptor())
    local = client.alloc(size * window)

    warm = min(max(n_lat // 10, 1), 100)
    clock, write = time.perf_counter_ns, conn.write
    for _ in range(warm):
        write(local, 0, remote, 0, 8).wait(WAIT)
    # Blocks of the Python loop alternate with blocks of the same loop run natively in Rust on
    # the same connection (`_native_write_latency`): both see the same machine load, so their
    # difference is what the binding costs even where the load moves the absolute figures.
    times, native, diffs, blocks = [], [], [], 50
    per_block = max(n_lat // blocks, 1)
    for _ in range(blocks):
        py_block = []
        for _ in range(per_block):
            t0 = clock()
            write(local, 0, remote, 0, 8).wait(WAIT)
            t1 = clock()
            py_block.append(t1 - t0)
        rust_block = _native_write_latency(conn, local, remote, 8, per_block)
        diffs.append(statistics.median(py_block) - statistics.median(rust_block))
        times += py_block
        native += rust_block
    lat_us = statistics.median(times) / 1e3
    native_us = statistics.median(native) / 1e3
    paired_us = statistics.median(diffs) / 1e3

    # Slot j % window for transfer j, as `genie-perf` does.
    flying, inflight, i = collections.deque(), 0, 0
    t0 = time.perf_counter()
    while i < n_bw:
        b = min(per, n_bw - i)
        while inflight + b > window and flying:
            done = flying.popleft()
            done.wait(WAIT)
            inflight -= len(done)
        triples = [((j % window) * size, (j % window) * size, size) for j in range(i, i + b)]
        flying.append(conn.write_batch(local, remote, triples))
        inflight += b
        i += b
    for batch in flying:
        batch.wait(WAIT)
    secs = time.perf_counter() - t0
    print(f"py write8_median_us={lat_us:.3f} bw64k_mb_s={size * n_bw / secs / 1e6:.1f} "
          f"native_write8_median_us={native_us:.3f} paired_overhead_us={paired_us:.3f}")


if __name__ == "__main__":
    main()
