//! The C entry points called as C would: status codes, `genie_last_error`, NULL handling, the
//! descriptor bytes, a message larger than the caller's buffer, batches.

use genie::*;
use std::ffi::CStr;
use std::ptr::{null, null_mut};

fn last_error() -> String {
    // SAFETY: genie_last_error returns a NUL-terminated string valid until the next failing call.
    unsafe { CStr::from_ptr(genie_last_error()) }
        .to_string_lossy()
        .into_owned()
}

struct Pair {
    server: *mut genie_endpoint,
    client: *mut genie_endpoint,
    conn: *mut genie_connection,
    peer: *mut genie_connection,
}

fn pair() -> Pair {
    // SAFETY: every pointer passed is a live local or a handle the library just returned.
    unsafe {
        let mut o = std::mem::zeroed::<genie_options>();
        assert_eq!(genie_options_init(&mut o), GENIE_OK);
        o.backend = GENIE_BACKEND_TCP;
        let (mut server, mut client) = (null_mut(), null_mut());
        assert_eq!(genie_endpoint_open(&o, &mut server), GENIE_OK);
        assert_eq!(genie_endpoint_open(&o, &mut client), GENIE_OK);
        let mut addr = [0 as std::ffi::c_char; 64];
        assert_eq!(
            genie_endpoint_address(server, addr.as_mut_ptr(), 64),
            GENIE_OK
        );
        assert_eq!(
            genie_endpoint_address(server, addr.as_mut_ptr(), 3),
            GENIE_ERR_BUFFER_TOO_SMALL
        );
        assert_eq!(
            genie_endpoint_address(server, addr.as_mut_ptr(), 64),
            GENIE_OK
        );
        let (mut conn, mut peer) = (null_mut(), null_mut());
        assert_eq!(genie_connect(client, addr.as_ptr(), &mut conn), GENIE_OK);
        assert_eq!(genie_accept(server, 10_000, &mut peer), GENIE_OK);
        Pair {
            server,
            client,
            conn,
            peer,
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // SAFETY: the handles are live and freed once.
        unsafe {
            genie_connection_free(self.conn);
            genie_connection_free(self.peer);
            genie_endpoint_free(self.client);
            genie_endpoint_free(self.server);
        }
    }
}

#[test]
fn null_handles_are_refused_with_a_message() {
    // SAFETY: NULL is what is being tested; the library must refuse it.
    unsafe {
        assert_eq!(
            genie_endpoint_open(null(), null_mut()),
            GENIE_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("NULL"), "{}", last_error());
        assert_eq!(genie_op_wait(null(), 0), GENIE_ERR_INVALID_ARGUMENT);
        assert_eq!(genie_op_free(null_mut()), GENIE_OK);
        let name = CStr::from_ptr(genie_status_name(GENIE_ERR_TIMEOUT));
        assert_eq!(name.to_str().unwrap(), "GENIE_ERR_TIMEOUT");
    }
}

#[test]
fn descriptor_bytes_round_trip_and_refuse_garbage() {
    let d = genie_remote {
        endpoint: 1,
        region: 2,
        len: 3,
        key: u64::MAX,
        addr: 5,
    };
    let mut buf = [0u8; GENIE_DESCRIPTOR_LEN];
    let mut back = genie_remote::default();
    // SAFETY: live locals of the sizes the calls expect.
    unsafe {
        assert_eq!(genie_remote_encode(&d, buf.as_mut_ptr()), GENIE_OK);
        assert_eq!(
            genie_remote_decode(buf.as_ptr(), buf.len(), &mut back),
            GENIE_OK
        );
        assert_eq!(back, d);
        assert_eq!(
            genie_remote_decode(buf.as_ptr(), 43, &mut back),
            GENIE_ERR_INVALID_ARGUMENT
        );
        buf[0] = b'X';
        assert_eq!(
            genie_remote_decode(buf.as_ptr(), 44, &mut back),
            GENIE_ERR_INVALID_ARGUMENT
        );
    }
}

#[test]
fn messages_notifications_and_batches() {
    let p = pair();
    // SAFETY: live handles from `pair` and the library, live locals.
    unsafe {
        // A message larger than the buffer is kept for the next call.
        let mut op = null_mut();
        assert_eq!(
            genie_send(p.conn, b"hello".as_ptr().cast(), 5, &mut op),
            GENIE_OK
        );
        assert_eq!(genie_op_wait(op, 10_000), GENIE_OK);
        genie_op_free(op);
        let (mut small, mut big, mut n) = ([0u8; 2], [0u8; 16], 0usize);
        assert_eq!(
            genie_recv(p.peer, 10_000, small.as_mut_ptr().cast(), 2, &mut n),
            GENIE_ERR_BUFFER_TOO_SMALL
        );
        assert_eq!(n, 5);
        assert_eq!(
            genie_recv(p.peer, 10_000, big.as_mut_ptr().cast(), 16, &mut n),
            GENIE_OK
        );
        assert_eq!(&big[..n], b"hello");
        let mut imm = 0u32;
        assert_eq!(
            genie_recv_notification(p.peer, 0, &mut imm),
            GENIE_ERR_TIMEOUT
        );

        // A batch of three, the middle one out of bounds, the last with a notification.
        let (mut target, mut src) = (null_mut(), null_mut());
        assert_eq!(
            genie_region_alloc(p.server, 4096, GENIE_ACCESS_WRITE, 0, &mut target),
            GENIE_OK
        );
        assert_eq!(
            genie_region_alloc(p.client, 4096, GENIE_ACCESS_LOCAL, 0, &mut src),
            GENIE_OK
        );
        assert_eq!(
            genie_region_alloc(p.client, 1, 99, 0, &mut src),
            GENIE_ERR_INVALID_ARGUMENT
        );
        let mut remote = genie_remote::default();
        assert_eq!(genie_region_descriptor(target, &mut remote), GENIE_OK);
        let t = |kind, imm, remote_offset, len| genie_transfer {
            kind,
            imm,
            local_offset: 0,
            remote_offset,
            len,
        };
        let ts = [
            t(GENIE_TRANSFER_WRITE, 0, 0, 100),
            t(GENIE_TRANSFER_WRITE, 0, 4000, 200),
            t(GENIE_TRANSFER_WRITE_NOTIFY, 9, 200, 100),
        ];
        let mut batch = null_mut();
        assert_eq!(
            genie_post_batch(p.conn, src, &remote, ts.as_ptr(), 3, &mut batch),
            GENIE_OK
        );
        assert_eq!(genie_batch_wait(batch, 10_000), GENIE_ERR_OUT_OF_BOUNDS);
        let (mut pending, mut ok, mut failed) = (9, 9, 9);
        assert_eq!(
            genie_batch_status(batch, &mut pending, &mut ok, &mut failed),
            GENIE_OK
        );
        assert_eq!((pending, ok, failed), (0, 2, 1));
        assert_eq!(genie_batch_result(batch, 1), GENIE_ERR_OUT_OF_BOUNDS);
        assert_eq!(genie_batch_result(batch, 2), GENIE_OK);
        assert_eq!(genie_batch_result(batch, 3), GENIE_ERR_INVALID_ARGUMENT);
        assert_eq!(genie_recv_notification(p.peer, 10_000, &mut imm), GENIE_OK);
        assert_eq!(imm, 9);
        // A read of a write-only region is refused, typed.
        let mut op = null_mut();
        assert_eq!(genie_read(p.conn, src, 0, &remote, 0, 8, &mut op), GENIE_OK);
        assert_eq!(genie_op_wait(op, 10_000), GENIE_ERR_ACCESS_DENIED);
        assert!(last_error().contains("read"), "{}", last_error());
        genie_op_free(op);
        genie_batch_free(batch);
        genie_region_free(src);
        genie_region_free(target);
    }
}
