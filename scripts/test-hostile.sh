#!/usr/bin/env bash
# Hostile drivers, accept starvation and healing against real `genie worker` processes
# (issue 15). Loopback only; every case is bounded in count and time.
#
# Runs runtime/examples/hostile.rs, which:
#   - sends an authenticated worker (under `prlimit --as`) requests no honest driver sends:
#     a huge parameter, a KV cache of layer u32::MAX, shape products that overflow, checkpoints
#     that are /dev/zero, a FIFO or outside the model directory, a placement on worker
#     usize::MAX, inputs of the wrong shape, a 3-million-input Concat; each must be refused
#     with a typed Failed reply within 5 s and the worker must go on serving;
#   - opens 50 idle or dripping sockets and 100 connections that never say hello on a worker's
#     port; a real driver must still be served within 5 s;
#   - SIGKILLs (then restarts) and SIGSTOPs (then resumes) a worker of three: the run in flight
#     fails naming it within the peer timeout + 1 s, the next generation succeeds.
# More cases (a transport flood, ...) belong in runtime/tests/hostile_cases/mod.rs and the
# example's list; the summary counts them.
#
# The last line printed is the summary:
#   hostile cases=<n> refused_typed=<n> crashed=<n> hung=<n> max_rss_mb=<x> heal_ok=<1|0>
# and the script fails unless cases == refused_typed, crashed=0, hung=0, heal_ok=1.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p genie-runtime --bin genie --example hostile
target_dir="${CARGO_TARGET_DIR:-target}"
timeout 600 "$target_dir/release/examples/hostile" "$target_dir/release/genie"
