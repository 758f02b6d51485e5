"""Fixtures: a peer process (tests/peer.py) over TCP on loopback, and a client endpoint."""

import json
import os
import selectors
import subprocess
import sys

import pytest

import genie

HERE = os.path.dirname(os.path.abspath(__file__))
# The backend under test: tcp (CI) or rdma (scripts/test-rdma.sh, inside the soft-RoCE VM).
BACKEND = os.environ.get("GENIE_TEST_BACKEND", "tcp")
# Bound for waits that only expire when something is broken; scripts/test-rdma.sh raises it in
# the soft-RoCE VM, whose emulated CPUs start a Python process in seconds, not milliseconds.
WAIT = float(os.environ.get("GENIE_TEST_WAIT", "10"))


class Peer:
    """A peer process and this process's connection to it."""

    def __init__(self, *args, connect=True, secret=None, peer_timeout=2.0):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "peer.py"), *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            self.address = self._line("ADDR")
        except BaseException:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
            raise
        self.ep = genie.Endpoint(backend=BACKEND, secret=secret, peer_timeout=peer_timeout)
        self.conn = self.ep.connect(self.address) if connect else None

    def _line(self, tag, timeout=WAIT):
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"peer printed no {tag} line within {timeout} s")
        line = self.proc.stdout.readline().split()
        assert line and line[0] == tag, line
        return line[1] if len(line) == 2 else line[1:]

    def call(self, **cmd):
        self.conn.send(json.dumps(cmd).encode()).wait(WAIT)
        return self.conn.recv(timeout=WAIT)

    def alloc(self, name, size, access="rw"):
        return genie.RemoteRegion.from_bytes(self.call(op="alloc", name=name, size=size, access=access))

    def sha(self, name, offset, length):
        return self.call(op="sha", name=name, offset=offset, length=length).decode()

    def close(self):
        if self.proc.poll() is None:
            try:
                if self.conn is not None and self.conn.alive:
                    self.conn.send(json.dumps({"op": "exit"}).encode()).wait(WAIT)
                self.proc.wait(timeout=5)
            except (genie.GenieError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


@pytest.fixture
def make_peer():
    made = []

    def make(*args, **kw):
        p = Peer(*args, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
