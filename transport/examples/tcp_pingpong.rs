//! Run with `cargo run --release -p genie-transport --example tcp_pingpong`.
//!
//! Two TCP endpoints on loopback: the server hands out a region descriptor in a message, the
//! client writes into it with a notification, reads it back, and times 1000 write round trips.
use genie_transport::{open, RemoteRegion, TransportConfig};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let wait = Duration::from_secs(5);
    let server = open(TransportConfig::tcp())?;
    let client = open(TransportConfig::tcp())?;

    // Connect; the server tells the client where it may write.
    let conn = client.connect(server.local_addr())?;
    let peer = server.accept(wait)?;
    let inbox = server.alloc_region(4096)?;
    peer.send(&serde_json::to_vec(&inbox.descriptor())?)?
        .wait(wait)?;
    let remote: RemoteRegion = serde_json::from_slice(&conn.recv(wait)?)?;

    // Write with a notification: when it arrives, the bytes are in place.
    let msg = client.register(b"ping".to_vec())?;
    conn.write_notify(&msg, 0, &remote, 0, 4, 1)?.wait(wait)?;
    assert_eq!(peer.recv_notification(wait)?, 1);
    inbox.with(|b| println!("server region holds {:?}", String::from_utf8_lossy(&b[..4])));

    // Read it back, then time write round trips.
    let back = client.alloc_region(4)?;
    conn.read(&back, 0, &remote, 0, 4)?.wait(wait)?;
    let start = Instant::now();
    for _ in 0..1000 {
        conn.write(&msg, 0, &remote, 0, 4)?.wait(wait)?;
    }
    println!(
        "1000 write round trips: {:.1} us each",
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
