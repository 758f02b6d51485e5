//! Notifications: how a worker learns that a peer's tensor landed. A notification is the
//! immediate of a `write_notify`: the run's epoch above the transfer id, so that ones left
//! unread by a failed run are dropped. The [`Inbox`] polls the sending peers on the worker's
//! own thread.

use super::clock::{wall_us, WallClock};
use crate::control::terr;
use crate::error::{Result, RuntimeError};
use crate::kernels::tensor_from_bytes;
use crate::limits::{self};
use candle_core::Tensor;
use genie_scheduler::graph::TensorMeta;
use genie_transport::{Connection, Region, TransportError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a worker waiting on one sending peer looks whether its driver is still there.
pub(super) const DRIVER_CHECK: Duration = Duration::from_millis(100);

/// How long a worker waiting on several sending peers waits on one before looking at the
/// others.
pub(super) const PEER_SLICE: Duration = Duration::from_micros(200);

/// A tensor that landed from a peer.
pub(super) struct Arrival {
    pub(super) id: u32,
    pub(super) tensor: Tensor,
    pub(super) at_us: f64,
}

/// The transfers one sending peer still owes this run.
pub(super) struct Inbound {
    pub(super) peer: String,
    pub(super) conn: Arc<dyn Connection>,
    pub(super) region: Region,
    /// Transfer id → the tensor's metadata and its offset in the landing region; an entry
    /// goes when its notification arrives.
    pub(super) specs: HashMap<u32, (TensorMeta, u64)>,
}

/// Bits of a notification that carry the transfer id; the bits above carry the run's epoch.
pub(super) const TRANSFER_BITS: u32 = 16;

/// The epoch of run `run` in its notifications.
pub(super) fn epoch_of(run: u64) -> u32 {
    (run & ((1 << (32 - TRANSFER_BITS)) - 1)) as u32
}

/// The notification of transfer `tid` in a run of epoch `epoch`.
pub(super) fn notification(epoch: u32, tid: u32) -> u32 {
    epoch << TRANSFER_BITS | tid
}

/// A notification's epoch and transfer id.
pub(super) fn split_notification(imm: u32) -> (u32, u32) {
    (imm >> TRANSFER_BITS, imm & ((1 << TRANSFER_BITS) - 1))
}

/// The sending peers of a run, polled by the worker's own thread (no receiver threads: a
/// notification wakes the thread that computes on it).
pub(super) struct Inbox {
    pub(super) from: Vec<Inbound>,
    /// This run's epoch: notifications of other runs (left unread by a run that failed) are
    /// dropped, never taken for this run's transfers.
    pub(super) epoch: u32,
    /// Which peer to wait on next when several owe transfers.
    pub(super) turn: usize,
    /// The driver's connection: when it dies nobody wants the run any more (a peer that failed
    /// may never send what is due), so the wait ends.
    pub(super) driver: Option<Arc<dyn Connection>>,
    pub(super) t0: WallClock,
}

impl Inbox {
    /// The tensor of transfer `imm` from peer `k`, read out of the landing region; `None` for a
    /// notification of another run.
    fn take(&mut self, k: usize, imm: u32) -> Result<Option<Arrival>> {
        let (epoch, imm) = split_notification(imm);
        if epoch != self.epoch {
            tracing::debug!(
                peer = %self.from[k].peer,
                epoch,
                imm,
                "dropped a notification of an earlier run"
            );
            return Ok(None);
        }
        let at_us = wall_us(self.t0);
        let f = &mut self.from[k];
        let (meta, offset) = f
            .specs
            .remove(&imm)
            .ok_or_else(|| RuntimeError::BadMessage {
                worker: f.peer.clone(),
                reason: format!("notification {imm} names no transfer due in this run"),
            })?;
        // The plan placed the tensor inside the region; check anyway before allocating.
        let len = limits::checked_bytes(&meta)
            .and_then(|b| usize::try_from(b).ok())
            .filter(|&b| {
                usize::try_from(offset)
                    .ok()
                    .and_then(|o| o.checked_add(b))
                    .is_some_and(|end| end <= f.region.len())
            })
            .ok_or_else(|| RuntimeError::BadMessage {
                worker: f.peer.clone(),
                reason: format!("transfer {imm} of {meta} does not fit its landing region"),
            })?;
        let mut buf = vec![0u8; len];
        f.region
            .read(offset as usize, &mut buf)
            .map_err(|e| terr(&f.peer, e))?;
        Ok(Some(Arrival {
            id: imm,
            tensor: tensor_from_bytes(&meta, &buf)?,
            at_us,
        }))
    }

    /// A transfer that has landed, if any, without waiting.
    pub(super) fn try_next(&mut self) -> Result<Option<Arrival>> {
        for k in 0..self.from.len() {
            let f = &self.from[k];
            if f.specs.is_empty() {
                continue;
            }
            loop {
                match self.from[k].conn.try_recv_notification() {
                    Ok(Some(imm)) => match self.take(k, imm)? {
                        Some(a) => return Ok(Some(a)),
                        None => continue,
                    },
                    Ok(None) => break,
                    Err(e) => return Err(terr(&self.from[k].peer, e)),
                }
            }
        }
        Ok(None)
    }

    /// The next transfer to land, waiting up to `timeout`; `Ok(None)` when none landed in time.
    pub(super) fn next(&mut self, timeout: Duration) -> Result<Option<Arrival>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = self.try_next()? {
                return Ok(Some(a));
            }
            let due: Vec<usize> = (0..self.from.len())
                .filter(|&k| !self.from[k].specs.is_empty())
                .collect();
            if due.is_empty() {
                return Err(RuntimeError::Plan(
                    "no node is ready and no transfer is due".into(),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // One peer: sleep on its connection until the notification. Several: take turns,
            // a short slice each, so that none waits long behind another.
            let k = due[self.turn % due.len()];
            self.turn = self.turn.wrapping_add(1);
            if self.driver.as_ref().is_some_and(|d| !d.is_alive()) {
                return Err(RuntimeError::WorkerFailed {
                    worker: "driver".into(),
                    reason: "the driver's connection died during the run".into(),
                });
            }
            let slice = if due.len() == 1 {
                left.min(DRIVER_CHECK)
            } else {
                left.min(PEER_SLICE)
            };
            let f = &self.from[k];
            match f.conn.recv_notification(slice) {
                Ok(imm) => match self.take(k, imm)? {
                    Some(a) => return Ok(Some(a)),
                    None => continue,
                },
                Err(TransportError::Timeout { .. }) => continue,
                Err(e) => return Err(terr(&f.peer, e)),
            }
        }
    }
}
