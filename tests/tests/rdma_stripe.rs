//! Striping over several RDMA queue pairs ("lanes", `rdma.qps`) and devices (`rdma.devices`):
//! data integrity with checksums, notifications and messages never ahead of the striped data
//! posted before them, and the configuration's refusals. Needs `GENIE_RDMA_DEVICE` and, for the
//! two-device cases, `GENIE_RDMA_DEVICE2` (a second rxe device; `scripts/test-rdma.sh` makes one
//! on a veth in its soft-RoCE session); without them the tests fail loudly.
#![cfg(feature = "rdma")]

use genie_tests::conformance::{crc, fill, pair, WAIT};
use genie_transport::{
    open, BackendChoice, RdmaConfig, Transfer, TransferKind, TransportConfig, TransportError,
};

fn device(var: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set: run through scripts/test-rdma.sh"))
}

fn lanes(qps: usize, devices: &[String]) -> TransportConfig {
    TransportConfig {
        backend: BackendChoice::Rdma,
        rdma: RdmaConfig {
            device: Some(device("GENIE_RDMA_DEVICE")),
            qps,
            devices: devices.to_vec(),
            ..RdmaConfig::default()
        },
        ..TransportConfig::default()
    }
}

/// Writes of sizes around the striping threshold and past the chunk size, at unaligned offsets,
/// then reads them back into another region: both checksums match the source.
fn integrity(make: &dyn Fn() -> TransportConfig) {
    let p = pair(make);
    const CAP: usize = 34 << 20;
    let src = p.a.alloc_region(CAP).unwrap();
    let back = p.a.alloc_region(CAP).unwrap();
    let dst = p.b.alloc_region(CAP).unwrap();
    let d = dst.descriptor();
    for (i, len) in [
        (256 << 10) - 1,
        256 << 10,
        (256 << 10) + 4097,
        (5 << 20) + 3,
        (33 << 20) + 1,
    ]
    .into_iter()
    .enumerate()
    {
        fill(&src, 100 + i as u64);
        let (so, dof) = (3, 5 + i);
        let want = crc(&src, so, len);
        p.ab.write(&src, so, &d, dof as u64, len)
            .unwrap()
            .wait(WAIT)
            .unwrap();
        assert_eq!(crc(&dst, dof, len), want, "write of {len} B");
        p.ab.read(&back, 7, &d, dof as u64, len)
            .unwrap()
            .wait(WAIT)
            .unwrap();
        assert_eq!(crc(&back, 7, len), want, "read of {len} B");
    }
}

#[test]
fn striped_transfers_keep_their_bytes_over_2_3_and_4_qps() {
    for qps in [2, 3, 4] {
        integrity(&|| lanes(qps, &[]));
    }
}

/// Two ends with different settings use the smaller (4 and 2: two lanes), and still agree.
#[test]
fn ends_with_different_qps_use_the_smaller() {
    let a = open(lanes(4, &[])).unwrap();
    let b = open(lanes(2, &[])).unwrap();
    let ab = a.connect(b.local_addr()).unwrap();
    let _ba = b.accept(WAIT).unwrap();
    let src = a.alloc_region(3 << 20).unwrap();
    let dst = b.alloc_region(3 << 20).unwrap();
    fill(&src, 9);
    ab.write(&src, 0, &dst.descriptor(), 0, 3 << 20)
        .unwrap()
        .wait(WAIT)
        .unwrap();
    assert_eq!(crc(&dst, 0, 3 << 20), crc(&src, 0, 3 << 20));
}

/// Each round posts a striped write of fresh bytes and, without waiting, a notification (a
/// small write with an immediate, a striped write with one, a batch ending in one) or a message
/// saying so; the receiver checks the data the moment it sees the notification or message. With
/// the first lane's notification sent at once, the peer would see it while the other lanes'
/// parts are still in flight.
fn notifications_follow_striped_data(make: &dyn Fn() -> TransportConfig) {
    const LEN: usize = 6 << 20;
    let p = pair(make);
    let src = p.a.alloc_region(LEN).unwrap();
    let flag = p.a.alloc_region(64).unwrap();
    let dst = p.b.alloc_region(LEN).unwrap();
    let note = p.b.alloc_region(64).unwrap();
    let (d, n) = (dst.descriptor(), note.descriptor());
    for round in 0..24u32 {
        fill(&src, 1000 + u64::from(round));
        let want = crc(&src, 0, LEN);
        let mut ops = Vec::new();
        match round % 4 {
            0 => {
                ops.push(p.ab.write(&src, 0, &d, 0, LEN).unwrap());
                ops.push(p.ab.write_notify(&flag, 0, &n, 0, 8, round).unwrap());
            }
            1 => {
                ops.push(p.ab.write(&src, 0, &d, 0, LEN).unwrap());
                ops.push(p.ab.send(&round.to_le_bytes()).unwrap());
            }
            2 => ops.push(p.ab.write_notify(&src, 0, &d, 0, LEN, round).unwrap()),
            _ => {
                let t = |kind, local, len, remote| Transfer {
                    kind,
                    local,
                    local_offset: 0,
                    remote,
                    remote_offset: 0,
                    len,
                };
                let b =
                    p.ab.post_batch(&[
                        t(TransferKind::Write, &src, LEN, &d),
                        t(TransferKind::WriteNotify(round), &flag, 64, &n),
                    ])
                    .unwrap();
                let st = b.wait(WAIT).unwrap();
                assert_eq!(st.failed, 0, "round {round}: batch");
            }
        }
        let seen = if round % 4 == 1 {
            let m = p.ba.recv(WAIT).unwrap();
            u32::from_le_bytes(m.try_into().expect("a 4-byte message"))
        } else {
            p.ba.recv_notification(WAIT).unwrap()
        };
        // Checked before anything else: the data must be there already.
        let got = crc(&dst, 0, LEN);
        assert_eq!(seen, round);
        assert_eq!(
            got, want,
            "round {round}: the notification came before the data"
        );
        for op in ops {
            op.wait(WAIT).unwrap();
        }
    }
}

#[test]
fn notifications_and_messages_follow_striped_data() {
    notifications_follow_striped_data(&|| lanes(2, &[]));
    notifications_follow_striped_data(&|| lanes(4, &[]));
}

/// A private region is reached through a memory window bound to the first lane's QP: a large
/// transfer to it is not striped, and works.
#[test]
fn a_granted_private_region_is_reached_on_the_first_lane() {
    let p = pair(&|| lanes(2, &[]));
    let src = p.a.alloc_region(2 << 20).unwrap();
    let private =
        p.b.alloc_private_region(2 << 20, genie_transport::RegionAccess::ReadWrite)
            .unwrap();
    let d = p.ba.grant(&private).unwrap();
    fill(&src, 5);
    p.ab.write(&src, 1, &d, 2, (2 << 20) - 8)
        .unwrap()
        .wait(WAIT)
        .unwrap();
    assert_eq!(crc(&private, 2, (2 << 20) - 8), crc(&src, 1, (2 << 20) - 8));
}

/// Two devices: lanes alternate between the endpoint's device and the further one (each region
/// registered on both, the peer's key for each lane from the region check).
#[test]
fn striped_over_two_devices() {
    let second = vec![device("GENIE_RDMA_DEVICE2")];
    integrity(&|| lanes(2, &second));
    integrity(&|| lanes(3, &second));
    notifications_follow_striped_data(&|| lanes(2, &second));
}

#[test]
fn bad_lane_settings_are_refused_with_typed_errors() {
    for (qps, devices, says) in [
        (0, vec![], "rdma.qps = 0"),
        (9, vec![], "must be 1 to 8"),
        (1, vec!["rxe9".to_string()], "at least 2"),
    ] {
        match open(lanes(qps, &devices)) {
            Err(TransportError::InvalidArgument(m)) => assert!(m.contains(says), "{m}"),
            other => panic!("qps {qps}, devices {devices:?}: {other:?}"),
        }
    }
    match open(lanes(2, &["no-such-nic".to_string()])) {
        Err(TransportError::BackendUnavailable { reason, .. }) => {
            assert!(reason.contains("no-such-nic"), "{reason}")
        }
        other => panic!("an unknown further device: {other:?}"),
    }
}
