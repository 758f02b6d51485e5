"""The other process of the pytest suite: a genie endpoint driven by JSON commands.

Run as ``python peer.py [--secret S] [--peer-timeout T]``; prints ``ADDR ip:port`` and accepts one
connection. Each message on it is a JSON command; the reply is a message (bytes or JSON):

- ``{"op": "alloc", "name", "size", "access"}`` -> the region's descriptor (bytes)
- ``{"op": "sha", "name", "offset", "length"}`` -> sha256 hex of that range
- ``{"op": "fill", "name", "seed"}`` -> fills the region with seeded random bytes; sha256 hex
- ``{"op": "notifications", "count", "timeout"}`` -> the next ``count`` notifications (JSON list)
- ``{"op": "exit"}`` -> leaves (no reply)
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np

import genie

BACKEND = os.environ.get("GENIE_TEST_BACKEND", "tcp")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--secret")
    ap.add_argument("--peer-timeout", type=float, default=2.0)
    args = ap.parse_args()
    ep = genie.Endpoint(backend=BACKEND, secret=args.secret, peer_timeout=args.peer_timeout)
    print("ADDR", ep.address, flush=True)
    try:
        conn = ep.accept(timeout=30)
    except genie.GenieError as e:
        print("ACCEPT", type(e).__name__, e.kind, flush=True)
        return
    regions = {}
    while True:
        try:
            cmd = json.loads(conn.recv(timeout=60))
        except genie.GenieError:
            return
        op = cmd["op"]
        if op == "alloc":
            r = ep.alloc(cmd["size"], access=cmd.get("access", "rw"))
            regions[cmd["name"]] = r
            conn.send(r.descriptor()).wait(10)
        elif op == "sha":
            view = memoryview(regions[cmd["name"]])
            off, n = cmd["offset"], cmd["length"]
            conn.send(hashlib.sha256(view[off : off + n]).hexdigest().encode()).wait(10)
        elif op == "fill":
            r = regions[cmd["name"]]
            a = np.frombuffer(r, dtype=np.uint8)
            a[:] = np.random.default_rng(cmd["seed"]).integers(0, 256, len(a), dtype=np.uint8)
            conn.send(hashlib.sha256(a).hexdigest().encode()).wait(10)
        elif op == "notifications":
            got = [conn.recv_notification(timeout=cmd.get("timeout", 10)) for _ in range(cmd["count"])]
            conn.send(json.dumps(got).encode()).wait(10)
        elif op == "exit":
            return
        else:
            print("unknown command", cmd, file=sys.stderr, flush=True)
            return


if __name__ == "__main__":
    main()
