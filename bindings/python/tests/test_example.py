"""The KV-transfer example runs end to end (two processes) and checks its own bytes."""

import os
import subprocess
import sys

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "kv_transfer.py")


def test_kv_transfer_example():
    out = subprocess.run([sys.executable, EXAMPLE, "--secret", "s3cret", "--backend", os.environ.get("GENIE_TEST_BACKEND", "tcp")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kv_transfer: OK" in out.stdout
