//! Device regions over TCP: staged through host buffers, chunked and pipelined, over real
//! loopback sockets. The "device" is [`HostStandIn`], whose copies really copy but only when
//! waited for (as an asynchronous GPU copy completes later), so a pipeline that sends a chunk
//! before its copy is done, or acknowledges a write before its last chunk reached the device,
//! shows up as wrong bytes. Every transfer is checked with a checksum and byte for byte; every
//! test ends by checking that no staging buffer or copy is left over.

use genie_transport::device::{StandInStats, STAGE_CHUNK, STAGE_DEPTH};
use genie_transport::{
    open, GpuDirect, HostStandIn, Region, RegionAccess, Transfer, TransferKind, Transport,
    TransportConfig, TransportError,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Sizes around the chunk boundaries, from 1 B to several MiB.
const SIZES: [usize; 10] = [
    1,
    7,
    4096,
    STAGE_CHUNK - 1,
    STAGE_CHUNK,
    STAGE_CHUNK + 1,
    2 * STAGE_CHUNK,
    3 * STAGE_CHUNK + 17,
    (STAGE_DEPTH + 2) * STAGE_CHUNK + 5,
    9 * STAGE_CHUNK - 3,
];

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            // xorshift: no period a chunk-aligned bug could hide in.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, the checksum the GPU check prints too.
fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn bytes(r: &Region, offset: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    r.read(offset, &mut out).unwrap();
    out
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if checksum(got) != checksum(want) {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!("{what}: checksum differs (first difference at byte {at:?})");
    }
}

struct Pair {
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    ab: Arc<dyn genie_transport::Connection>,
    ba: Arc<dyn genie_transport::Connection>,
}

fn pair() -> Pair {
    let a = open(TransportConfig::tcp()).unwrap();
    let b = open(TransportConfig::tcp()).unwrap();
    let ab = a.connect(b.local_addr()).unwrap();
    let ba = b.accept(WAIT).unwrap();
    Pair { a, b, ab, ba }
}

/// A stand-in device region of `len` bytes on `t`, and its counters.
fn device(t: &Arc<dyn Transport>, len: usize) -> (Region, Arc<StandInStats>) {
    let mem = HostStandIn::new(0, len).unwrap();
    let stats = mem.stats();
    let r = t
        .register_device(Arc::new(mem), RegionAccess::ReadWrite)
        .unwrap();
    assert!(r.is_device());
    assert_eq!(r.gpudirect(), Some(GpuDirect::Staged));
    (r, stats)
}

/// Every staging buffer and copy is released. The side that serves a read (or receives a
/// write) releases its buffer on its own I/O thread just after the last byte leaves, which can be
/// a moment after the initiator's operation completes, so the counters are given a bounded while
/// to settle; a real leak stays and fails.
fn no_leaks(stats: &[&Arc<StandInStats>], what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for s in stats {
        loop {
            let live = s.staging_live.load(Ordering::Relaxed);
            let copies = s.copies_in_flight.load(Ordering::Relaxed);
            if live == 0 && copies == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: staging buffers left {live}, copies left {copies}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Host,
    Device,
}

fn region(t: &Arc<dyn Transport>, kind: Kind, len: usize) -> (Region, Option<Arc<StandInStats>>) {
    match kind {
        Kind::Host => (t.alloc_region(len).unwrap(), None),
        Kind::Device => {
            let (r, s) = device(t, len);
            (r, Some(s))
        }
    }
}

/// Every mix of host and device memory on both sides, writes (with and without notification)
/// and reads, every size, at offsets that are not chunk-aligned.
#[test]
fn every_mix_of_host_and_device_regions_moves_intact() {
    let p = pair();
    let kinds = [Kind::Host, Kind::Device];
    for (i, &len) in SIZES.iter().enumerate() {
        for src_kind in kinds {
            for dst_kind in kinds {
                let what = format!("{len} B {src_kind:?}->{dst_kind:?}");
                let (lo, ro) = (3usize, 5usize);
                let (src, s1) = region(&p.a, src_kind, len + lo);
                let (dst, s2) = region(&p.b, dst_kind, len + ro);
                let (back, s3) = region(&p.a, dst_kind, len + 1);
                let want = pattern(len, (i * 4) as u64 + src_kind as u64 * 2 + dst_kind as u64);
                src.write(lo, &want).unwrap();
                let d = dst.descriptor();
                // Write with a notification: once it is received the bytes must be there.
                p.ab.write_notify(&src, lo, &d, ro as u64, len, 77)
                    .unwrap()
                    .wait(WAIT)
                    .unwrap();
                assert_eq!(p.ba.recv_notification(WAIT).unwrap(), 77);
                assert_same(&bytes(&dst, ro, len), &want, &format!("write {what}"));
                // Read it back into a third region of the destination's kind, at offset 1.
                p.ab.read(&back, 1, &d, ro as u64, len)
                    .unwrap()
                    .wait(WAIT)
                    .unwrap();
                assert_same(&bytes(&back, 1, len), &want, &format!("read {what}"));
                drop((src, dst, back));
                let stats: Vec<_> = [s1, s2, s3].into_iter().flatten().collect();
                no_leaks(&stats.iter().collect::<Vec<_>>(), &what);
            }
        }
    }
}

/// The pipeline really runs ahead: a multi-chunk staged transfer has several copies in flight
/// on each side, never more than its depth (plus the one just started on the receiving side).
#[test]
fn the_pipeline_overlaps_copies_and_stays_bounded() {
    let p = pair();
    let len = 12 * STAGE_CHUNK + 11;
    let (src, s_src) = device(&p.a, len);
    let (dst, s_dst) = device(&p.b, len);
    let want = pattern(len, 99);
    src.write(0, &want).unwrap();
    s_src.max_in_flight.store(0, Ordering::Relaxed);
    p.ab.write(&src, 0, &dst.descriptor(), 0, len)
        .unwrap()
        .wait(WAIT)
        .unwrap();
    assert_same(&bytes(&dst, 0, len), &want, "12-chunk device->device");
    let sent = s_src.max_in_flight.load(Ordering::Relaxed);
    let landed = s_dst.max_in_flight.load(Ordering::Relaxed);
    assert!(
        (2..=STAGE_DEPTH).contains(&sent),
        "sender had {sent} copies in flight at most"
    );
    assert!(
        (2..=STAGE_DEPTH + 1).contains(&landed),
        "receiver had {landed} copies in flight at most"
    );
    // 13 chunks each way: every one staged exactly once (plus the test's own staged write/read).
    assert_eq!(s_src.copies_to_host.load(Ordering::Relaxed), 13);
    drop((src, dst));
    no_leaks(&[&s_src, &s_dst], "pipeline");
}

/// A batch mixing host and device regions on both sides completes with every transfer intact.
#[test]
fn batches_mix_host_and_device_regions() {
    let p = pair();
    let len = 2 * STAGE_CHUNK + 333;
    let (hsrc, _) = region(&p.a, Kind::Host, len);
    let (dsrc, s1) = device(&p.a, len);
    let (hdst, _) = region(&p.b, Kind::Host, 2 * len);
    let (ddst, s2) = device(&p.b, 2 * len);
    let (w1, w2) = (pattern(len, 1), pattern(len, 2));
    hsrc.write(0, &w1).unwrap();
    dsrc.write(0, &w2).unwrap();
    let (hd, dd) = (hdst.descriptor(), ddst.descriptor());
    // h->d, d->d, d->h, h->h.
    let plan = [
        (&hsrc, &dd, 0u64),
        (&dsrc, &dd, len as u64),
        (&dsrc, &hd, 0),
        (&hsrc, &hd, len as u64),
    ];
    let transfers: Vec<Transfer<'_>> = plan
        .iter()
        .map(|&(local, remote, remote_offset)| Transfer {
            kind: TransferKind::Write,
            local,
            local_offset: 0,
            remote,
            remote_offset,
            len,
        })
        .collect();
    p.ab.post_batch(&transfers).unwrap().wait(WAIT).unwrap();
    assert_same(&bytes(&ddst, 0, len), &w1, "batch h->d");
    assert_same(&bytes(&ddst, len, len), &w2, "batch d->d");
    assert_same(&bytes(&hdst, 0, len), &w2, "batch d->h");
    assert_same(&bytes(&hdst, len, len), &w1, "batch h->h");
    drop((dsrc, ddst));
    no_leaks(&[&s1, &s2], "batch");
}

/// Remote access rules hold for device regions as for host ones, and a refused staged write
/// leaves the connection usable.
#[test]
fn device_regions_are_checked_like_host_regions() {
    let p = pair();
    let mem = HostStandIn::new(0, 4 * STAGE_CHUNK).unwrap();
    let stats = mem.stats();
    let ro =
        p.b.register_device(Arc::new(mem), RegionAccess::Read)
            .unwrap();
    let (src, s_src) = device(&p.a, 4 * STAGE_CHUNK);
    let d = ro.descriptor();
    let e =
        p.ab.write(&src, 0, &d, 0, 3 * STAGE_CHUNK)
            .unwrap()
            .wait(WAIT);
    assert!(
        matches!(e, Err(TransportError::AccessDenied { .. })),
        "{e:?}"
    );
    let e =
        p.ab.read(&src, 0, &d, 1, 4 * STAGE_CHUNK)
            .unwrap()
            .wait(WAIT);
    assert!(
        matches!(e, Err(TransportError::RegionOutOfBounds { .. })),
        "{e:?}"
    );
    // Still usable: a read of the read-only device region works.
    ro.write(10, b"still here").unwrap();
    p.ab.read(&src, 0, &d, 10, 10).unwrap().wait(WAIT).unwrap();
    assert_eq!(bytes(&src, 0, 10), b"still here");
    // Local bounds are checked before anything is staged.
    let e = p.ab.write(&src, 1, &d, 0, 4 * STAGE_CHUNK).err();
    assert!(
        matches!(e, Some(TransportError::LocalOutOfBounds { .. })),
        "{e:?}"
    );
    drop((ro, src));
    no_leaks(&[&stats, &s_src], "refusals");
}

/// Host-only accessors say so on a device region; the staged ones work; host regions are as
/// before.
#[test]
fn host_only_accessors_on_a_device_region() {
    let p = pair();
    let (r, stats) = device(&p.a, 100);
    let e = r.try_with(|b| b.len()).unwrap_err();
    assert!(matches!(e, TransportError::HostOnly { .. }), "{e}");
    assert!(r.try_with_mut(|_| ()).is_err());
    assert_eq!(r.with(|b| b.len()), 0, "a device region has no host bytes");
    assert_eq!(r.len(), 100);
    r.write(98, &[1, 2]).unwrap();
    assert_eq!(bytes(&r, 97, 3), vec![0, 1, 2]);
    assert!(matches!(
        r.write(99, &[1, 2]),
        Err(TransportError::LocalOutOfBounds { .. })
    ));
    let r = r.try_into_vec().unwrap_err();
    drop(r);
    let h = p.a.register(vec![5; 10]).unwrap();
    assert_eq!(h.try_with(|b| b.to_vec()).unwrap(), vec![5; 10]);
    assert_eq!(h.gpudirect(), None);
    no_leaks(&[&stats], "accessors");
}

/// Without a driver (or without the `cuda` feature) allocating device memory is a typed error,
/// and host regions work as before on the same endpoint.
#[test]
fn without_a_gpu_device_regions_are_a_typed_error_and_host_regions_work() {
    let p = pair();
    match p.a.alloc_device_region(0, 1 << 20) {
        Err(TransportError::DeviceUnavailable { reason }) => {
            assert!(reason.contains("cuda"), "{reason}");
            #[cfg(feature = "cuda")]
            panic!("the cuda feature is built in, yet: {reason}");
        }
        #[cfg(feature = "cuda")]
        Err(TransportError::Cuda(e)) => {
            use genie_sys::cuda::CudaError;
            assert!(
                matches!(e, CudaError::NoDriver { .. } | CudaError::NoDevice),
                "{e}"
            );
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(r) => {
            // A GPU machine: the region is real device memory.
            assert!(r.is_device());
            eprintln!("a GPU is present: {:?}", r.device());
            return;
        }
    }
    // A serving stack's tensor pointer: refused with the same typed error, its owner dropped.
    let owner = Arc::new(());
    let e =
        p.a.register_device_ptr(
            0x7f00_0000_0000,
            4096,
            0,
            Box::new(owner.clone()),
            RegionAccess::Read,
        )
        .unwrap_err();
    assert!(
        matches!(e, TransportError::DeviceUnavailable { .. }) || cfg!(feature = "cuda"),
        "{e}"
    );
    #[cfg(feature = "cuda")]
    assert!(
        matches!(
            e,
            TransportError::Cuda(genie_sys::cuda::CudaError::NoDriver { .. })
                | TransportError::Cuda(genie_sys::cuda::CudaError::NoDevice)
        ),
        "{e}"
    );
    assert_eq!(
        Arc::strong_count(&owner),
        1,
        "the owner of a refused pointer is released"
    );
    let src = p.a.register(pattern(5000, 3)).unwrap();
    let dst = p.b.alloc_region(5000).unwrap();
    p.ab.write(&src, 0, &dst.descriptor(), 0, 5000)
        .unwrap()
        .wait(WAIT)
        .unwrap();
    assert_same(
        &bytes(&dst, 0, 5000),
        &pattern(5000, 3),
        "host after no device",
    );
}

/// A peer that dies in the middle of a staged transfer: the operation fails with a typed error
/// within the wait, and once both endpoints are gone no staging buffer or copy is left over.
#[test]
fn a_peer_dying_mid_staged_transfer_fails_the_operation_and_leaks_nothing() {
    let p = pair();
    let len = 64 * STAGE_CHUNK;
    let (src, s_src) = device(&p.a, len);
    let (dst, s_dst) = device(&p.b, len);
    src.write(0, &pattern(len, 5)).unwrap();
    let op = p.ab.write(&src, 0, &dst.descriptor(), 0, len).unwrap();
    // Kill the target while the 64 MiB are on their way (or before they left).
    let Pair { a, b, ab, ba } = p;
    drop(ba);
    drop(b);
    match op.wait(WAIT) {
        Err(
            TransportError::ConnectionClosed { .. }
            | TransportError::PeerDead { .. }
            | TransportError::EndpointClosed,
        ) => {}
        other => panic!("expected the dead peer's error, got {other:?}"),
    }
    drop((ab, a, src, dst));
    no_leaks(&[&s_src, &s_dst], "dead peer");
}

/// Two connections staging at once into one device region (distinct halves) do not mix up.
#[test]
fn concurrent_staged_writes_from_two_peers() {
    let a = open(TransportConfig::tcp()).unwrap();
    let c = open(TransportConfig::tcp()).unwrap();
    let b = open(TransportConfig::tcp()).unwrap();
    let ab = a.connect(b.local_addr()).unwrap();
    let _ba = b.accept(WAIT).unwrap();
    let cb = c.connect(b.local_addr()).unwrap();
    let _bc = b.accept(WAIT).unwrap();
    let half = 5 * STAGE_CHUNK + 9;
    let (dst, s_dst) = device(&b, 2 * half);
    let (sa, s_a) = device(&a, half);
    let (sc, s_c) = device(&c, half);
    sa.write(0, &pattern(half, 10)).unwrap();
    sc.write(0, &pattern(half, 11)).unwrap();
    let d = dst.descriptor();
    let oa = ab.write(&sa, 0, &d, 0, half).unwrap();
    let oc = cb.write(&sc, 0, &d, half as u64, half).unwrap();
    oa.wait(WAIT).unwrap();
    oc.wait(WAIT).unwrap();
    assert_same(&bytes(&dst, 0, half), &pattern(half, 10), "from a");
    assert_same(&bytes(&dst, half, half), &pattern(half, 11), "from c");
    drop((dst, sa, sc));
    no_leaks(&[&s_dst, &s_a, &s_c], "two peers");
}

/// A device whose host→device copies start failing after `ok` of them (a device fault).
#[derive(Debug)]
struct Failing {
    inner: HostStandIn,
    ok: std::sync::atomic::AtomicUsize,
}

impl genie_transport::DeviceMemory for Failing {
    fn ordinal(&self) -> usize {
        self.inner.ordinal()
    }
    fn ptr(&self) -> u64 {
        self.inner.ptr()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn staging(&self, len: usize) -> genie_transport::Result<genie_transport::device::Staging> {
        self.inner.staging(len)
    }
    fn copy_to_host(
        &self,
        offset: usize,
        buf: genie_transport::device::Staging,
        len: usize,
    ) -> genie_transport::Result<genie_transport::device::CopyInFlight> {
        self.inner.copy_to_host(offset, buf, len)
    }
    fn copy_from_host(
        &self,
        buf: genie_transport::device::Staging,
        len: usize,
        offset: usize,
    ) -> genie_transport::Result<genie_transport::device::CopyInFlight> {
        let left = self.ok.load(Ordering::Relaxed);
        if left == 0 {
            return Err(TransportError::Device {
                what: "copy host to device",
                reason: "injected fault".into(),
            });
        }
        self.ok.store(left - 1, Ordering::Relaxed);
        self.inner.copy_from_host(buf, len, offset)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A device copy that fails on the receiving side closes that connection with the device's
/// typed error; the writer's operation fails; no staging buffer is left over.
#[test]
fn a_failing_device_copy_closes_the_connection_with_a_typed_error() {
    let p = pair();
    let len = 6 * STAGE_CHUNK;
    let inner = HostStandIn::new(0, len).unwrap();
    let stats = inner.stats();
    let failing = Failing {
        inner,
        ok: std::sync::atomic::AtomicUsize::new(2),
    };
    let dst =
        p.b.register_device(Arc::new(failing), RegionAccess::Write)
            .unwrap();
    let (src, s_src) = region(&p.a, Kind::Host, len);
    assert!(s_src.is_none());
    let e =
        p.ab.write(&src, 0, &dst.descriptor(), 0, len)
            .unwrap()
            .wait(WAIT);
    assert!(e.is_err(), "the write succeeded through a failing device");
    match p.ba.recv(WAIT) {
        Err(TransportError::Device { what, reason }) => {
            assert_eq!(
                (what, reason.as_str()),
                ("copy host to device", "injected fault")
            )
        }
        other => panic!("expected the device's error on the target, got {other:?}"),
    }
    let Pair { a, b, ab, ba } = p;
    drop((ab, ba, a, b, dst, src));
    no_leaks(&[&stats], "failing device");
}
