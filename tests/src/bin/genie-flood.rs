//! A hostile peer for the resource-bound checks of `scripts/test-hostile.sh`.
//!
//! ```text
//! genie-flood target CONFIG_JSON            # an endpoint that accepts and never reads
//! genie-flood flood ADDR DESC_JSON SECONDS  # floods it with messages, notifications and reads
//! ```
//!
//! The target prints `READY <addr> <descriptor JSON>` and then only accepts connections, never
//! taking a message or a notification: everything a peer sends must stay within the endpoint's
//! bounds (`max_inbound_queue`, `max_inbound_bytes`), with the flooder held by back-pressure. The
//! flooder keeps at most 256 operations in flight (64 KiB messages, 8-byte notifying writes and
//! 64 KiB reads, round robin) for SECONDS, reconnects if its connection dies, and prints one line
//! `flood ops=<n> completed=<n> failed=<n> reconnects=<n>`. Loopback only; the loop is bounded by
//! the time given.
use anyhow::{bail, Context};
use genie_transport::{open, RemoteRegion, TransportConfig};
use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const IN_FLIGHT: usize = 256;
const CHUNK: usize = 64 * 1024;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("target") => target(args.get(1).context("missing CONFIG_JSON")?),
        Some("flood") => {
            let addr: SocketAddr = args.get(1).context("missing ADDR")?.parse()?;
            let desc: RemoteRegion =
                serde_json::from_str(args.get(2).context("missing DESC_JSON")?)?;
            let secs: u64 = args.get(3).context("missing SECONDS")?.parse()?;
            flood(addr, desc, Duration::from_secs(secs.min(600)))
        }
        _ => bail!("usage: genie-flood target CONFIG_JSON | flood ADDR DESC_JSON SECONDS"),
    }
}

fn target(config: &str) -> anyhow::Result<()> {
    let config: TransportConfig = serde_json::from_str(config)?;
    let t = open(config)?;
    let region = t.alloc_region(1 << 20)?;
    println!(
        "READY {} {}",
        t.local_addr(),
        serde_json::to_string(&region.descriptor())?
    );
    std::io::stdout().flush()?;
    let mut conns = Vec::new();
    loop {
        // Accept and keep; never receive.
        if let Ok(c) = t.accept(Duration::from_secs(3600)) {
            conns.push(c);
        }
    }
}

fn flood(addr: SocketAddr, desc: RemoteRegion, run: Duration) -> anyhow::Result<()> {
    let t = open(TransportConfig::tcp())?;
    let src = t.alloc_region(CHUNK)?;
    let dst = t.alloc_region(CHUNK)?;
    let msg = vec![0x5a; CHUNK];
    let end = Instant::now() + run;
    let (mut ops, mut completed, mut failed, mut reconnects) = (0u64, 0u64, 0u64, 0u64);
    let mut conn = t.connect(addr)?;
    let mut in_flight = VecDeque::new();
    let read_len = CHUNK.min(desc.len as usize);
    while Instant::now() < end {
        if !conn.is_alive() {
            in_flight.clear();
            conn = t.connect(addr)?;
            reconnects += 1;
        }
        let op = match ops % 3 {
            0 => conn.send(&msg),
            1 => conn.write_notify(&src, 0, &desc, 0, 8, ops as u32),
            _ => conn.read(&dst, 0, &desc, 0, read_len),
        };
        ops += 1;
        match op {
            Ok(op) => in_flight.push_back(op),
            Err(_) => failed += 1,
        }
        while in_flight.len() >= IN_FLIGHT && Instant::now() < end {
            let Some(op) = in_flight.pop_front() else {
                break;
            };
            match op.wait(Duration::from_millis(200)) {
                Ok(()) => completed += 1,
                // Held by back-pressure: the operation is still pending; keep waiting for it.
                Err(genie_transport::TransportError::Timeout { .. }) => in_flight.push_front(op),
                Err(_) => failed += 1,
            }
        }
    }
    println!("flood ops={ops} completed={completed} failed={failed} reconnects={reconnects}");
    Ok(())
}
