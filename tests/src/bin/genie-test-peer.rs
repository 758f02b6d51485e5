//! A peer process for the transport fault tests: opens an endpoint with the configuration given as
//! JSON in the first argument, allocates a region of the size in the second argument, prints
//! `READY <addr>` on stdout, then sends the region's descriptor (JSON) as the first message on
//! every accepted connection, until killed.
use anyhow::Context;
use genie_transport::{open, TransportConfig};
use std::io::Write;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let config: TransportConfig = serde_json::from_str(
        &args
            .next()
            .context("usage: genie-test-peer CONFIG_JSON LEN")?,
    )?;
    let len: usize = args.next().context("missing region length")?.parse()?;
    let t = open(config)?;
    let region = t.alloc_region(len)?;
    let desc = serde_json::to_vec(&region.descriptor())?;
    println!("READY {}", t.local_addr());
    std::io::stdout().flush()?;
    let mut conns = Vec::new();
    loop {
        match t.accept(Duration::from_secs(3600)) {
            Ok(c) => {
                c.send(&desc)?.wait(Duration::from_secs(10))?;
                conns.push(c);
            }
            Err(e) => eprintln!("genie-test-peer: accept: {e}"),
        }
    }
}
