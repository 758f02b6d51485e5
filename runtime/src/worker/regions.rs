//! Region negotiation: per link, the receiver's private landing region (granted to the
//! sender's connection alone) and the sender's local staging region, kept across runs while
//! big enough and announced with a `Regions` message only when a link grows.

use super::mesh::same_conn;
use super::Worker;
use crate::control::{send_msg, terr, SETUP_TIMEOUT};
use crate::error::{Result, RuntimeError};
use crate::plan::ExecPlan;
use crate::proto::{self, Msg};
use genie_transport::{Connection, Region, RegionAccess, RemoteRegion};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// Size of a run's landing (and staging) region for a link carrying `bytes`: rounded up to a
/// power of two so that growing transfers (a naive decode's K/V) reuse it for many runs. Both
/// ends compute it from the same plan, so both know without asking whether the receiver
/// allocates a new region (and sends its descriptor) or both reuse the last one.
pub(crate) fn region_size(bytes: u64) -> u64 {
    bytes
        .max(64)
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX)
}

pub(super) type Staging = HashMap<usize, (Region, RemoteRegion, Arc<dyn Connection>)>;

impl Worker {
    /// Forgets the regions of every link whose connection changed since they were set up: the
    /// peer at the other end (restarted, or reconnected) knows none of them.
    pub(super) fn sync_links(&mut self) {
        let conns: Vec<(usize, Arc<dyn Connection>)> = self
            .peers
            .conns
            .lock()
            .iter()
            .map(|(j, c)| (*j, c.clone()))
            .collect();
        for (j, conn) in conns {
            if self.links.get(&j).is_some_and(|l| same_conn(l, &conn)) {
                continue;
            }
            self.landing.remove(&j);
            self.staging.remove(&j);
            self.remote_landing.remove(&j);
            self.links.insert(j, conn);
        }
    }

    /// Applies a message from receiving peer `j`: only `Regions` (its landing region for us)
    /// travels on peer connections.
    pub(super) fn apply_regions(&mut self, j: usize, peer: &str, bytes: &[u8]) -> Result<()> {
        match proto::decode(bytes, peer)? {
            (Msg::Regions { region, .. }, _) => {
                self.remote_landing.insert(j, region);
                Ok(())
            }
            (other, _) => Err(RuntimeError::BadMessage {
                worker: peer.to_string(),
                reason: format!("expected a landing region, got {other:?}"),
            }),
        }
    }

    /// The landing regions of this run's sending peers `senders`: the kept one where big
    /// enough, else a new one whose descriptor is sent to that peer.
    pub(super) fn landing_regions(
        &mut self,
        run: u64,
        plan: &ExecPlan,
        senders: &BTreeSet<usize>,
    ) -> Result<HashMap<usize, Region>> {
        let me = self.me;
        let mut landing: HashMap<usize, Region> = HashMap::new();
        for &src in senders {
            let size = region_size(plan.link_bytes.get(&(src, me)).copied().unwrap_or(0));
            if let Some((region, have)) = self.landing.get(&src) {
                if *have >= size {
                    landing.insert(src, region.clone());
                    continue;
                }
            }
            let peer = self.peer_name(src);
            // Least privilege: the sending peer only ever writes into its landing region, and
            // only over its own connection (a private region, granted to that connection alone).
            let region = self
                .endpoint
                .alloc_private_region(size as usize, RegionAccess::Write)
                .map_err(|e| terr(&self.name, e))?;
            let conn = self.peer(src)?;
            let granted = conn.grant(&region).map_err(|e| terr(&peer, e))?;
            send_msg(
                &*conn,
                &peer,
                &Msg::Regions {
                    run,
                    region: granted,
                },
                &[],
            )?;
            self.landing.insert(src, (region.clone(), size));
            landing.insert(src, region);
        }
        Ok(landing)
    }

    /// Per receiving peer in `receivers`: our staging region, its landing region for us (waiting
    /// for its descriptor when the one we know is too small) and its connection.
    pub(super) fn staging_regions(
        &mut self,
        plan: &ExecPlan,
        receivers: &BTreeSet<usize>,
    ) -> Result<Staging> {
        let me = self.me;
        let mut staging: Staging = HashMap::new();
        for &dst in receivers {
            let conn = self.peer(dst)?;
            let peer = self.peer_name(dst);
            let size = region_size(plan.link_bytes.get(&(me, dst)).copied().unwrap_or(0));
            // The peer's landing region: apply the descriptors it sent (this run's, or ones a
            // failed run left unread), then wait for one while what we know is too small (the
            // peer sends one in this run exactly then: it sizes the region from the same plan).
            while let Some(bytes) = conn.try_recv().map_err(|e| terr(&peer, e))? {
                self.apply_regions(dst, &peer, &bytes)?;
            }
            let deadline = Instant::now() + SETUP_TIMEOUT;
            let remote = loop {
                if let Some(r) = self.remote_landing.get(&dst).filter(|r| r.len >= size) {
                    break *r;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let bytes = conn.recv(left).map_err(|e| terr(&peer, e))?;
                self.apply_regions(dst, &peer, &bytes)?;
            };
            let local = match self.staging.get(&dst) {
                Some((local, have)) if *have >= size => local.clone(),
                _ => {
                    // Only our own writes read it: no remote access at all.
                    let local = self
                        .endpoint
                        .alloc_region_with(size as usize, RegionAccess::Local)
                        .map_err(|e| terr(&self.name, e))?;
                    self.staging.insert(dst, (local.clone(), size));
                    local
                }
            };
            staging.insert(dst, (local, remote, conn));
        }
        Ok(staging)
    }
}
