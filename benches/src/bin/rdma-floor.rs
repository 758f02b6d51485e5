//! The floor under Genie's RDMA latency: perftest's `ib_read_lat` loop written directly on
//! `genie-sys` verbs (no transport layer: no validation, no locks, no operation handles). It runs
//! two looped-back QP pairs in this process, one sized as Genie's transport sizes its QPs (queue
//! depths, inline size; same path parameters), one as perftest's, alternating in blocks of 64
//! reads. It tells how much of Genie's latency is the transport layer (compare `rdma-perf
//! read_lat`) and how much is verbs called from this process (compare `ib_read_lat`).
//!
//! With `--transport`, the second arm is the same read through Genie's transport instead (two
//! endpoints of this process connected over loopback, busy polling): the two arms then tell what
//! the transport layer costs over raw verbs, both measured in the same process at the same time
//! (on soft-RoCE's emulated CPU, separate runs differ by more than that).
//!
//! With `--test write`, the two arms are `ib_write_lat`'s ping-pong (8 B writes, each side
//! spinning on its buffer until the peer's write lands, latency = half the round trip): over raw
//! verbs (inline, like the transport's small writes) and through Genie's transport, the two sides
//! of each on two threads, alternating in blocks of 64 round trips.
//!
//! Run inside soft-RoCE: `scripts/softroce.sh -- target/release/rdma-floor --size 8 --iters 1000`.
//! The last line is machine-readable:
//! `RESULT read_lat floor perftest_caps_us=<x> typical_us=<y>` (`typical_us`: Genie's QP sizes),
//! with `--transport`: `RESULT read_lat transport floor_us=<x> transport_us=<y>`, and with
//! `--test write`: `RESULT write_lat transport floor_us=<x> transport_us=<y>`.

use anyhow::{bail, ensure, Context as _, Result};
use genie_benches::spin_until;
use genie_sys::addressing::{choose_local, route};
use genie_sys::clock;
use genie_sys::mem::SharedBuf;
use genie_sys::verbs::{
    gid_of_ip, CompletionQueue, Context, Local, Mr, PathParams, ProtectionDomain, QpCaps,
    QpEndpoint, QueuePair, Rts, SendOp,
};
use genie_transport::{
    open, BackendChoice, Connection, PollMode, RdmaConfig, Region, RemoteRegion, Transport,
    TransportConfig,
};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

/// The longest any one wait (a completion, the peer's write, a connection) may take.
const WAIT: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    let (mut size, mut iters, mut with_transport, mut write) = (8usize, 1000usize, false, false);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--transport" {
            with_transport = true;
            continue;
        }
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--size" => size = v.parse()?,
            "--iters" => iters = v.parse()?,
            "--test" => match v.as_str() {
                "read" => write = false,
                "write" => write = true,
                _ => bail!("--test read|write"),
            },
            _ => {
                bail!("usage: rdma-floor [--size N] [--iters N] [--transport] [--test read|write]")
            }
        }
    }
    if size == 0 || iters == 0 {
        bail!("--size and --iters must be at least 1");
    }
    if write && size > 64 {
        bail!("--test write takes --size up to 64 (the inline size)");
    }
    let ctx = Context::open(std::env::var("GENIE_RDMA_DEVICE").ok().as_deref())?;
    let limits = ctx.limits();
    // Addressed as the transport addresses a loopback connection: the GID holding 127.0.0.1
    // first among RoCE v2 entries (rxe on `lo`), LID routing on InfiniBand.
    let local = choose_local(
        &ctx.port_attrs()?,
        None,
        Some(gid_of_ip(IpAddr::V4(Ipv4Addr::LOCALHOST))),
    )?;
    let pd = ctx.alloc_pd()?;
    let path = PathParams {
        route: route(&local, &local.as_remote())?,
        max_rd_atomic: limits.max_rd_atomic.clamp(1, 16),
        timeout: 14,
        retry_cnt: 7,
    };
    if write {
        let pair = Pair::new(&ctx, &pd, &path, (128, 32, 64), 168, true, 2 * size)?;
        return write_pingpong(pair, TransportArm::new(2 * size)?, size, iters);
    }
    // Two looped-back QP pairs: one sized as Genie's transport sizes its QPs (send queue 128,
    // receive queue 32, inline 64, one CQ of 168 with a completion channel), one as perftest's
    // ib_read_lat (depth 1, no inline, no channel), or with --transport a transport connection.
    // Blocks of 64 reads alternate between them, so both see the same machine (on soft-RoCE's
    // emulated CPU, runs drift by 2x).
    let mut genie = Pair::new(&ctx, &pd, &path, (128, 32, 64), 168, true, size)?;
    let mut second = if with_transport {
        Arm::Transport(TransportArm::new(size)?)
    } else {
        Arm::Verbs(Pair::new(&ctx, &pd, &path, (1, 1, 0), 2, false, size)?)
    };
    let warm = (iters / 10).clamp(1, 100);
    let mut wcs = Vec::with_capacity(32);
    let cal = clock::Calibration::start();
    let mut counts = [Vec::with_capacity(iters), Vec::with_capacity(iters)];
    for i in 0..2 * (iters + warm) {
        let k = (i / 64) % 2;
        let c0 = clock::cycles();
        let p = match (k, &mut second) {
            (0, _) => &mut genie,
            (_, Arm::Verbs(p)) => p,
            (_, Arm::Transport(t)) => {
                t.conn.read(&t.local, 0, &t.remote, 0, size)?.wait(WAIT)?;
                if i >= 2 * warm {
                    counts[k].push(clock::cycles().saturating_sub(c0));
                }
                continue;
            }
        };
        p.qp.post_send(
            i as u64,
            SendOp::Read {
                rkey: p.remote.rkey(),
                remote_addr: p.remote.addr(),
            },
            Local::Mr {
                mr: &p.local,
                offset: 0,
                len: size,
            },
            true,
        )?;
        poll_one(&p.cq, &mut wcs)?;
        if i >= 2 * warm {
            counts[k].push(clock::cycles().saturating_sub(c0));
        }
    }
    let rate = cal
        .finish()
        .context("the time-stamp counter does not advance")?;
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        rate.us(0, v[v.len() / 2])
    };
    let typical = median(&mut counts[0]);
    let other = median(&mut counts[1]);
    if with_transport {
        println!("# rdma-floor read_lat: genie-sys verbs and Genie's transport, interleaved, t_typical[usec]");
        println!(" #bytes  verbs       transport");
        println!(" {size:<7} {typical:<11.2} {other:.2}");
        println!("RESULT read_lat transport floor_us={typical:.3} transport_us={other:.3}");
        return Ok(());
    }
    let pt_caps = other;
    println!("# rdma-floor read_lat (genie-sys verbs, no transport layer), t_typical[usec]");
    println!(" #bytes  genie_caps  perftest_caps");
    println!(" {size:<7} {typical:<11.2} {pt_caps:.2}");
    println!("RESULT read_lat floor perftest_caps_us={pt_caps:.3} typical_us={typical:.3}");
    Ok(())
}

/// `ib_write_lat`'s ping-pong, alternating in blocks of 64 round trips between raw verbs (`pair`)
/// and Genie's transport (`t`). Each side sends from `[0, size)` of its buffer into `[size, 2 size)`
/// of the peer's, waits for its write's completion, and spins on the last byte it receives.
fn write_pingpong(mut pair: Pair, t: TransportArm, size: usize, iters: usize) -> Result<()> {
    let last = 2 * size - 1;
    let warm = (iters / 10).clamp(1, 100);
    let total = 2 * (iters + warm);
    let tag = |i: usize| (i % 255) as u8 + 1;
    let arm = |i: usize| (i / 64) % 2;
    let (a_desc, b_desc) = (t.local.descriptor(), t.remote);
    let Pair {
        qp,
        _peer: peer_qp,
        cq,
        _peer_cq: peer_cq,
        local: a_mr,
        remote: b_mr,
    } = &mut pair;
    let verbs_write = |qp: &mut QueuePair<Rts>,
                       cq: &CompletionQueue,
                       from: &Mr,
                       to: &Mr,
                       wcs: &mut Vec<genie_sys::verbs::Completion>|
     -> Result<()> {
        let bytes = from.mem().read();
        qp.post_send(
            0,
            SendOp::Write {
                rkey: to.rkey(),
                remote_addr: to.addr() + size as u64,
            },
            Local::Inline(&bytes[..size]),
            true,
        )?;
        drop(bytes);
        poll_one(cq, wcs)
    };
    let cal = clock::Calibration::start();
    let mut counts = [Vec::with_capacity(iters), Vec::with_capacity(iters)];
    std::thread::scope(|s| -> Result<()> {
        // The peer (side B): wait for ping i, answer with the same tag.
        let peer = s.spawn(|| -> Result<()> {
            let mut wcs = Vec::with_capacity(32);
            for i in 0..total {
                let tg = tag(i);
                if arm(i) == 0 {
                    ensure!(
                        spin_until(|| b_mr.mem().read()[last], tg, WAIT),
                        "ping never landed"
                    );
                    b_mr.mem().write()[size - 1] = tg;
                    verbs_write(peer_qp, peer_cq, b_mr, a_mr, &mut wcs)?;
                } else {
                    ensure!(
                        spin_until(|| t.b_region.with(|b| b[last]), tg, WAIT),
                        "ping never landed"
                    );
                    t.b_region.with_mut(|b| b[size - 1] = tg);
                    t.accepted
                        .write(&t.b_region, 0, &a_desc, size as u64, size)?
                        .wait(WAIT)?;
                }
            }
            Ok(())
        });
        let mut wcs = Vec::with_capacity(32);
        for i in 0..total {
            let (tg, k) = (tag(i), arm(i));
            let c0;
            if k == 0 {
                a_mr.mem().write()[size - 1] = tg;
                c0 = clock::cycles();
                verbs_write(qp, cq, a_mr, b_mr, &mut wcs)?;
                ensure!(
                    spin_until(|| a_mr.mem().read()[last], tg, WAIT),
                    "pong never landed"
                );
            } else {
                t.local.with_mut(|b| b[size - 1] = tg);
                c0 = clock::cycles();
                t.conn
                    .write(&t.local, 0, &b_desc, size as u64, size)?
                    .wait(WAIT)?;
                ensure!(
                    spin_until(|| t.local.with(|b| b[last]), tg, WAIT),
                    "pong never landed"
                );
            }
            if i >= 2 * warm {
                counts[k].push(clock::cycles().saturating_sub(c0));
            }
        }
        peer.join()
            .map_err(|_| anyhow::anyhow!("peer thread panicked"))?
    })?;
    let rate = cal
        .finish()
        .context("the time-stamp counter does not advance")?;
    let one_way = |v: &mut Vec<u64>| {
        v.sort_unstable();
        rate.us(0, v[v.len() / 2]) / 2.0
    };
    let (verbs, transport) = (one_way(&mut counts[0]), one_way(&mut counts[1]));
    println!("# rdma-floor write_lat (ping-pong, one-way = RTT/2): genie-sys verbs and Genie's transport, interleaved, t_typical[usec]");
    println!(" #bytes  verbs       transport");
    println!(" {size:<7} {verbs:<11.2} {transport:.2}");
    println!("RESULT write_lat transport floor_us={verbs:.3} transport_us={transport:.3}");
    Ok(())
}

/// Spins on the CQ (like perftest) until one completion, which must be a success; [`WAIT`] at
/// most. The clock is read once per 1024 polls, never before the first (the transport's waits do
/// the same, and a clock read on the measured path would cost this arm alone).
fn poll_one(cq: &CompletionQueue, wcs: &mut Vec<genie_sys::verbs::Completion>) -> Result<()> {
    let mut deadline = clock::SpinDeadline::every(WAIT, 1024);
    loop {
        wcs.clear();
        if cq.poll(wcs, 1)? > 0 {
            return match wcs[0].status {
                Ok(()) => Ok(()),
                Err(e) => bail!("work request failed: {e}"),
            };
        }
        if deadline.passed() {
            bail!("no completion within {WAIT:?}");
        }
    }
}

/// The second arm: perftest-sized verbs, or Genie's transport.
enum Arm {
    Verbs(Pair),
    Transport(TransportArm),
}

/// A connection between two busy-polling RDMA endpoints of this process (`conn` from the first,
/// `accepted` on the second), with a region on each (`local` on the first, `b_region` on the
/// second, whose descriptor is `remote`).
struct TransportArm {
    // Field order is drop order: the connections before their endpoints.
    conn: Arc<dyn Connection>,
    accepted: Arc<dyn Connection>,
    local: Region,
    remote: RemoteRegion,
    b_region: Region,
    _endpoints: [Arc<dyn Transport>; 2],
}

impl TransportArm {
    fn new(size: usize) -> Result<Self> {
        let config = TransportConfig {
            backend: BackendChoice::Rdma,
            poll_mode: PollMode::BusyPoll,
            rdma: RdmaConfig {
                device: std::env::var("GENIE_RDMA_DEVICE").ok(),
                ..RdmaConfig::default()
            },
            ..TransportConfig::default()
        };
        let (ta, tb) = (open(config.clone())?, open(config)?);
        let (local, remote) = (ta.alloc_region(size)?, tb.alloc_region(size)?);
        let conn = ta.connect(tb.local_addr())?;
        let accepted = tb.accept(WAIT)?;
        Ok(Self {
            conn,
            accepted,
            local,
            remote: remote.descriptor(),
            b_region: remote,
            _endpoints: [ta, tb],
        })
    }
}

/// A QP looped back to a second QP of this process, with a local and a remote buffer.
struct Pair {
    // Field order is drop order: QPs before their CQs and registrations.
    qp: QueuePair<Rts>,
    _peer: QueuePair<Rts>,
    cq: CompletionQueue,
    _peer_cq: CompletionQueue,
    local: Mr,
    remote: Mr,
}

impl Pair {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ctx: &Context,
        pd: &ProtectionDomain,
        path: &PathParams,
        (send, recv, inline): (u32, u32, u32),
        cqe: u32,
        channel: bool,
        size: usize,
    ) -> Result<Self> {
        let caps = QpCaps {
            max_send_wr: send,
            max_recv_wr: recv,
            max_inline_data: inline,
        };
        let (cq, peer_cq) = (ctx.create_cq(cqe, channel)?, ctx.create_cq(cqe, channel)?);
        let qa = pd.create_rc_qp(&cq, &cq, caps)?;
        let qb = pd.create_rc_qp(&peer_cq, &peer_cq, caps)?;
        let end = |qpn| QpEndpoint { qpn, psn: 1 };
        let (ea, eb) = (end(qa.qpn()), end(qb.qpn()));
        Ok(Pair {
            qp: qa.to_rtr(1, &eb, path)?.to_rts(1, path)?,
            _peer: qb.to_rtr(1, &ea, path)?.to_rts(1, path)?,
            cq,
            _peer_cq: peer_cq,
            local: pd.register(Arc::new(SharedBuf::zeroed(size)?))?,
            remote: pd.register(Arc::new(SharedBuf::zeroed(size)?))?,
        })
    }
}
