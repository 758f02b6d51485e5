"""The transport's cost from Python, measured as `genie perf` measures it from Rust.

Loopback TCP, both endpoints in this process, busy polling. Prints one line:
``py write8_median_us=<t> bw64k_mb_s=<b>``:

- ``write8_median_us``: median post -> completion time of an 8-byte write, one at a time
  (``conn.write(...).wait()``, the timestamps taken in Python around the two calls);
- ``bw64k_mb_s``: 64 KiB writes, up to 128 in flight, posted as batches of 32
  (``conn.write_batch``) with one handle each, as ``genie perf --window 128`` posts them.

Usage: ``python perf.py [latency_iterations] [bandwidth_iterations]``.
"""

import collections
import statistics
import sys
import time

import genie

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
    times = []
    for i in range(n_lat + warm):
        t0 = clock()
        write(local, 0, remote, 0, 8).wait(WAIT)
        t1 = clock()
        if i >= warm:
            times.append(t1 - t0)
    lat_us = statistics.median(times) / 1e3

    # Slot j % window for transfer j, as `genie perf` does.
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
    print(f"py write8_median_us={lat_us:.3f} bw64k_mb_s={size * n_bw / secs / 1e6:.1f}")


if __name__ == "__main__":
    main()
