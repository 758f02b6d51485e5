//! perftest-style measurements of Genie's transport, matching what `scripts/bench-rdma.sh` compares
//! against perftest in the same soft-RoCE session:
//!
//! - `write_lat`: the `ib_write_lat` method through Genie's transport: two endpoints in this
//!   process ping-pong `size`-byte RDMA writes, each side spinning on its region's memory until the
//!   peer's write has landed; the reported latency is half the round trip (like perftest);
//! - `read_lat`, `write_bw`: [`genie_benches::perf`] (post-to-completion time of one read, like
//!   `ib_read_lat`; bandwidth with `--window` writes in flight, like `ib_write_bw`'s tx depth).
//!
//! Run inside soft-RoCE: `scripts/softroce.sh -- target/release/rdma-perf write_lat --size 8`.
//! The last line is machine-readable: `RESULT <test> <mode> typical_us=<x>` or `bw_mb_s=<x>`.

use anyhow::{bail, ensure, Context, Result};
use genie_benches::perf::{self, PerfArgs, PerfRole, PerfTest};
use genie_benches::spin_until;
use genie_sys::clock;
use genie_transport::{open, BackendChoice, PollMode, RdmaConfig, TransportConfig};
use std::time::Duration;

struct Args {
    test: String,
    size: usize,
    iters: usize,
    window: usize,
    mode: PollMode,
    backend: BackendChoice,
}

fn parse() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let test = it.next().context("usage: rdma-perf write_lat|read_lat|write_bw [--size N] [--iters N] [--window N] [--mode blocking|busy] [--backend rdma|tcp]")?;
    let mut a = Args {
        test,
        size: 8,
        iters: 1000,
        window: 128,
        mode: PollMode::Blocking,
        backend: BackendChoice::Rdma,
    };
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--size" => a.size = v.parse()?,
            "--iters" => a.iters = v.parse()?,
            "--window" => a.window = v.parse()?,
            "--mode" => {
                a.mode = match v.as_str() {
                    "blocking" => PollMode::Blocking,
                    "busy" => PollMode::BusyPoll,
                    _ => bail!("--mode blocking|busy"),
                }
            }
            "--backend" => {
                a.backend = match v.as_str() {
                    "rdma" => BackendChoice::Rdma,
                    "tcp" => BackendChoice::Tcp,
                    _ => bail!("--backend rdma|tcp"),
                }
            }
            _ => bail!("unknown flag {flag}"),
        }
    }
    if a.iters == 0 || a.size == 0 || a.window == 0 {
        bail!("--size, --iters and --window must be at least 1");
    }
    Ok(a)
}

fn config(a: &Args) -> TransportConfig {
    TransportConfig {
        backend: a.backend,
        poll_mode: a.mode,
        rdma: RdmaConfig {
            device: std::env::var("GENIE_RDMA_DEVICE").ok(),
            ..RdmaConfig::default()
        },
        ..TransportConfig::default()
    }
}

fn mode_name(m: PollMode) -> &'static str {
    match m {
        PollMode::Blocking => "blocking",
        PollMode::BusyPoll => "busy",
    }
}

/// The `ib_write_lat` method: ping-pong writes, each side spinning on the last byte of its buffer.
fn write_lat(a: &Args) -> Result<()> {
    let wait = Duration::from_secs(30);
    let ta = open(config(a))?;
    let tb = open(config(a))?;
    // Each side sends from [0, size) and receives into [size, 2 size), like perftest's two buffers.
    let ra = ta.alloc_region(2 * a.size)?;
    let rb = tb.alloc_region(2 * a.size)?;
    let ab = ta.connect(tb.local_addr())?;
    let ba = tb.accept(wait)?;
    let (da, db) = (ra.descriptor(), rb.descriptor());
    let (size, last) = (a.size, 2 * a.size - 1);
    let warm = (a.iters / 10).clamp(1, 100);
    let total = a.iters + warm;
    // The peer: wait for ping i (last received byte == tag of i), answer with the same tag.
    // Like perftest's run_iter_lat_write, each side posts its write and then waits for that
    // write's own completion before spinning on its buffer again (off the critical path: the
    // completion comes with the peer's acknowledgement, before the peer can answer).
    let peer = std::thread::spawn(move || -> Result<()> {
        for i in 0..total {
            let tag = (i % 255) as u8 + 1;
            ensure!(
                spin_until(|| rb.with(|b| b[last]), tag, wait),
                "ping {i} never landed"
            );
            rb.with_mut(|b| b[size - 1] = tag);
            ba.write(&rb, 0, &da, size as u64, size)?.wait(wait)?;
        }
        Ok(())
    });
    // Round trips in time-stamp counter cycles, like perftest's `get_cycles()` (the OS clock
    // costs more than a spin step on soft-RoCE's emulated CPU, and the timestamp is taken on the
    // critical path, between the pong and the next ping).
    let cal = clock::Calibration::start();
    let mut rtts = Vec::with_capacity(a.iters);
    for i in 0..total {
        let tag = (i % 255) as u8 + 1;
        ra.with_mut(|b| b[size - 1] = tag);
        let start = clock::cycles();
        ab.write(&ra, 0, &db, size as u64, size)?.wait(wait)?;
        ensure!(
            spin_until(|| ra.with(|b| b[last]), tag, wait),
            "pong {i} never came"
        );
        if i >= warm {
            rtts.push(clock::cycles().saturating_sub(start));
        }
    }
    peer.join()
        .map_err(|_| anyhow::anyhow!("peer thread panicked"))??;
    let rate = cal
        .finish()
        .context("the time-stamp counter does not advance")?;
    rtts.sort_unstable();
    let us = |c: u64| rate.us(0, c) / 2.0;
    let typical = us(rtts[rtts.len() / 2]);
    let avg = rtts.iter().map(|c| us(*c)).sum::<f64>() / rtts.len() as f64;
    println!(
        "# genie write_lat (ping-pong, one-way = RTT/2), backend {}, mode {}",
        ta.backend(),
        mode_name(a.mode)
    );
    println!(" #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]");
    println!(
        " {:<6} {:<11} {:<14.2} {:<14.2} {:<16.2} {:.2}",
        a.size,
        a.iters,
        us(rtts[0]),
        us(rtts[rtts.len() - 1]),
        typical,
        avg
    );
    println!(
        "RESULT write_lat {} typical_us={typical:.3}",
        mode_name(a.mode)
    );
    Ok(())
}

fn via_perf(a: &Args, test: PerfTest) -> Result<perf::PerfRow> {
    let args = PerfArgs {
        config: config(a),
        tests: vec![test],
        sizes: vec![a.size],
        iterations: a.iters,
        window: a.window,
        role: PerfRole::Loopback,
        connections: 1,
    };
    let mut out = std::io::stdout();
    let rows = perf::run(&args, &mut out)?;
    rows.into_iter().next().context("perf returned no row")
}

fn main() -> Result<()> {
    let a = parse()?;
    match a.test.as_str() {
        "write_lat" => write_lat(&a)?,
        "read_lat" => {
            let r = via_perf(&a, PerfTest::Read)?;
            println!(
                "RESULT read_lat {} typical_us={:.3}",
                mode_name(a.mode),
                r.t_typical_us
            );
        }
        "write_bw" => {
            let r = via_perf(&a, PerfTest::Write)?;
            println!(
                "RESULT write_bw {} bw_mb_s={:.3}",
                mode_name(a.mode),
                r.bw_mb_s
            );
        }
        other => bail!("unknown test {other} (write_lat, read_lat, write_bw)"),
    }
    Ok(())
}
