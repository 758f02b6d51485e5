//! Registered memory regions: the local handle [`Region`], the remote descriptor
//! [`RemoteRegion`], and the per-endpoint [`RegionTable`] that checks remote accesses.
//!
//! A region's bytes are a [`SharedBuf`] (behind a read/write lock), so every local access is safe Rust: the
//! TCP progress thread holds the write lock while it reads an incoming payload from the socket
//! straight into the region, and callers use [`Region::read`]/[`Region::write`]/[`Region::with`]/
//! [`Region::with_mut`]. The buffer never moves or grows, so its address ([`Region::addr`]) stays
//! valid for a device registration (an RDMA memory region) for the region's whole life.
//!
//! A region may instead hold device (GPU) memory ([`crate::device`]): the same descriptor and
//! operations; [`Region::read`]/[`Region::write`] stage through host memory, and the host-only
//! accessors ([`Region::with`], [`Region::lock`], ...) see no bytes on it (see each).

use crate::config::Backend;
use crate::device::{self, DeviceMem, GpuDirect};
use crate::error::{Result, TransportError};
use genie_sys::mem::{SharedBuf, SharedRead, SharedWrite};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// Identity of an endpoint: random per endpoint, so descriptors of a restarted peer are not
/// mistaken for the old one's.
pub type EndpointId = u64;

/// What a peer needs to access one of our regions remotely. Serializable: send it over a
/// [`crate::Connection::send`] message or any side channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RemoteRegion {
    /// The endpoint that owns the region.
    pub endpoint: EndpointId,
    /// Region id, unique within its endpoint.
    pub region: u64,
    /// Length in bytes.
    pub len: u64,
    /// Access key: a random number for TCP, the rkey for RDMA.
    pub key: u64,
    /// Virtual address of the first byte for RDMA; 0 for TCP.
    pub addr: u64,
}

impl Region {
    /// What peers may do to this region.
    pub fn access(&self) -> RegionAccess {
        self.inner.access
    }

    /// Whether only per-connection grants reach this region
    /// ([`crate::Transport::alloc_private_region`]).
    pub fn is_private(&self) -> bool {
        self.inner.private
    }
}

/// What peers may do to a region with its descriptor. Grant only what the region is used for:
/// a landing region needs [`RegionAccess::Write`], a source [`RegionAccess::Read`]. On RDMA the
/// NIC enforces it (the memory registration's access flags); on TCP the target's progress thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RegionAccess {
    /// Peers may read and write (the default of [`crate::Transport::alloc_region`]).
    #[default]
    ReadWrite,
    /// Peers may only read (a source a peer pulls from).
    Read,
    /// Peers may only write (a landing region a peer pushes into).
    Write,
    /// No remote access at all: the region is only a local source or destination of our own
    /// transfers.
    Local,
}

impl RegionAccess {
    /// Whether a remote read is allowed.
    pub fn allows_read(self) -> bool {
        matches!(self, RegionAccess::ReadWrite | RegionAccess::Read)
    }
    /// Whether a remote write is allowed.
    pub fn allows_write(self) -> bool {
        matches!(self, RegionAccess::ReadWrite | RegionAccess::Write)
    }
}

/// A remote operation, as [`RegionTable::check_remote`] checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteOp {
    /// The peer reads the region.
    Read,
    /// The peer writes the region.
    Write,
}

/// A backend's registration of a region (e.g. an RDMA memory region). Dropped before the memory.
pub type Registration = Arc<dyn Any + Send + Sync>;

struct RegionInner {
    id: u64,
    len: usize,
    key: u64,
    access: RegionAccess,
    /// Reachable only through descriptors a connection granted ([`crate::Connection::grant`]).
    private: bool,
    endpoint: EndpointId,
    backend: Backend,
    remote_addr: u64,
    table: Weak<RegionTable>,
    // The registration (e.g. an RDMA MR) keeps its own `Arc` of the memory, so order is free.
    registration: Option<Registration>,
    /// Host memory; empty for a device region.
    mem: Arc<SharedBuf>,
    /// Device memory, for a device region, and how it reaches the network.
    device: Option<DeviceMem>,
    gpudirect: Option<GpuDirect>,
}

impl Drop for RegionInner {
    fn drop(&mut self) {
        if let Some(t) = self.table.upgrade() {
            t.remove(self.id);
        }
    }
}

/// A local handle to a registered region. Cheap to clone (an `Arc`); the region stays registered
/// while any clone or any in-flight operation that uses it is alive, and is deregistered when the
/// last one drops (later remote accesses get [`TransportError::UnknownRegion`]).
#[derive(Clone)]
pub struct Region {
    inner: Arc<RegionInner>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("id", &self.inner.id)
            .field("len", &self.inner.len)
            .field("backend", &self.inner.backend)
            .finish()
    }
}

impl Region {
    /// Region id, unique within its endpoint.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// The backend that registered it.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// The endpoint that owns it.
    pub fn endpoint(&self) -> EndpointId {
        self.inner.endpoint
    }

    /// The access key a peer must present.
    pub fn key(&self) -> u64 {
        self.inner.key
    }

    /// The descriptor to hand to a peer: valid on every connection to this endpoint. A private
    /// region's own descriptor grants nothing; use [`crate::Connection::grant`].
    pub fn descriptor(&self) -> RemoteRegion {
        RemoteRegion {
            endpoint: self.inner.endpoint,
            region: self.inner.id,
            len: self.inner.len as u64,
            key: self.inner.key,
            addr: self.inner.remote_addr,
        }
    }

    /// Address of the first byte; stable for the region's life (for device registration). For a
    /// device region, its device address.
    pub fn addr(&self) -> usize {
        match &self.inner.device {
            None => self.inner.mem.addr(),
            Some(d) => d.ptr() as usize,
        }
    }

    /// Whether the region is device (GPU) memory.
    #[inline]
    pub fn is_device(&self) -> bool {
        self.inner.device.is_some()
    }

    /// The device memory of a device region.
    pub fn device(&self) -> Option<&DeviceMem> {
        self.inner.device.as_ref()
    }

    /// How a device region's bytes reach the network (`None` for host memory).
    pub fn gpudirect(&self) -> Option<GpuDirect> {
        self.inner.gpudirect
    }

    /// The backend's registration attached at creation (e.g. an RDMA MR), if any.
    pub fn registration(&self) -> Option<&Registration> {
        self.inner.registration.as_ref()
    }

    /// Checks that `[offset, offset+len)` lies inside the region.
    #[inline]
    pub fn check_local(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.len => Ok(()),
            _ => Err(self.out_of_bounds(offset, len)),
        }
    }

    #[cold]
    fn out_of_bounds(&self, offset: usize, len: usize) -> TransportError {
        TransportError::LocalOutOfBounds {
            region: self.inner.id,
            offset,
            len,
            size: self.inner.len,
        }
    }

    /// Copies `out.len()` bytes starting at `offset` into `out` (from a device region: staged
    /// through a host buffer, waiting for the copies).
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check_local(offset, out.len())?;
        if let Some(d) = &self.inner.device {
            return device::read_staged(d.as_ref(), offset, out);
        }
        let g = self.inner.mem.read();
        if let Some(src) = g.get(offset..offset + out.len()) {
            out.copy_from_slice(src);
        }
        Ok(())
    }

    /// Copies `data` into the region starting at `offset` (into a device region: staged through a
    /// host buffer, waiting for the copies).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_local(offset, data.len())?;
        if let Some(d) = &self.inner.device {
            return device::write_staged(d.as_ref(), offset, data);
        }
        let mut g = self.inner.mem.write();
        if let Some(dst) = g.get_mut(offset..offset + data.len()) {
            dst.copy_from_slice(data);
        }
        Ok(())
    }

    /// Runs `f` on the region's bytes under the read lock. A device region has no host bytes:
    /// `f` sees an empty slice (use [`Region::try_with`] to be told, or [`Region::read`]).
    pub fn with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&self.inner.mem.read())
    }

    /// Runs `f` on the region's bytes under the write lock. A device region has no host bytes:
    /// `f` sees an empty slice (use [`Region::try_with_mut`] to be told, or [`Region::write`]).
    pub fn with_mut<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        f(&mut self.inner.mem.write())
    }

    /// [`Region::with`], or [`TransportError::HostOnly`] on a device region.
    pub fn try_with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        self.host_only("try_with")?;
        Ok(self.with(f))
    }

    /// [`Region::with_mut`], or [`TransportError::HostOnly`] on a device region.
    pub fn try_with_mut<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> Result<R> {
        self.host_only("try_with_mut")?;
        Ok(self.with_mut(f))
    }

    fn host_only(&self, what: &'static str) -> Result<()> {
        match self.inner.device {
            None => Ok(()),
            Some(_) => Err(TransportError::HostOnly {
                region: self.inner.id,
                what,
            }),
        }
    }

    /// The read lock (for backends that stream from the region; empty for a device region).
    pub fn lock(&self) -> SharedRead<'_> {
        self.inner.mem.read()
    }

    /// The write lock (for backends that stream into the region; empty for a device region).
    pub fn lock_mut(&self) -> SharedWrite<'_> {
        self.inner.mem.write()
    }

    /// Gives back the caller's buffer of a region made by [`crate::Transport::register`], when this
    /// is the last handle (no clone, no in-flight operation). Otherwise returns the region unchanged.
    /// The region is deregistered. Regions from `alloc_region` and device regions are returned
    /// unchanged too.
    pub fn try_into_vec(self) -> std::result::Result<Vec<u8>, Region> {
        if self.is_device() || !self.inner.mem.is_vec() {
            return Err(self);
        }
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                // Drop the registration (and its hold on the memory) before handing the memory out.
                inner.registration = None;
                let mem =
                    std::mem::replace(&mut inner.mem, Arc::new(SharedBuf::from_vec(Vec::new())));
                // Only a registration could share the memory; if one is still kept elsewhere, copy.
                match Arc::try_unwrap(mem) {
                    Ok(m) => Ok(m.into_vec().unwrap_or_else(|m| m.read().to_vec())),
                    Err(m) => Ok(m.read().to_vec()),
                }
            }
            Err(inner) => Err(Region { inner }),
        }
    }

    /// Whether two handles name the same region.
    pub fn same(&self, other: &Region) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

/// An endpoint's table of live regions: creates regions and checks remote accesses.
///
/// The table holds weak references, so dropping the last [`Region`] handle deregisters it.
pub struct RegionTable {
    endpoint: EndpointId,
    backend: Backend,
    next_id: AtomicU64,
    map: RwLock<HashMap<u64, Weak<RegionInner>>>,
}

impl std::fmt::Debug for RegionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionTable")
            .field("endpoint", &self.endpoint)
            .field("regions", &self.map.read().len())
            .finish()
    }
}

/// Options for [`RegionTable::insert`] that a backend fills in.
pub struct NewRegion {
    /// The memory (a backend's registration may hold a clone).
    pub mem: Arc<SharedBuf>,
    /// Access key; `None` draws a random one.
    pub key: Option<u64>,
    /// Remote address to put in descriptors (RDMA); 0 for TCP.
    pub remote_addr: u64,
    /// The backend's registration, dropped before the memory.
    pub registration: Option<Registration>,
    /// What peers may do to it.
    pub access: RegionAccess,
    /// Whether only per-connection grants reach it (its own key grants nothing).
    pub private: bool,
}

impl RegionTable {
    /// A table for the endpoint `endpoint` of backend `backend`.
    pub fn new(endpoint: EndpointId, backend: Backend) -> Arc<Self> {
        Arc::new(Self {
            endpoint,
            backend,
            next_id: AtomicU64::new(1),
            map: RwLock::new(HashMap::new()),
        })
    }

    /// The endpoint's identity.
    pub fn endpoint(&self) -> EndpointId {
        self.endpoint
    }

    /// Registers memory as a new region.
    pub fn insert(self: &Arc<Self>, new: NewRegion) -> Region {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let len = new.mem.len();
        let inner = Arc::new(RegionInner {
            id,
            len,
            key: new.key.unwrap_or_else(rand::random),
            access: new.access,
            private: new.private,
            endpoint: self.endpoint,
            backend: self.backend,
            remote_addr: new.remote_addr,
            table: Arc::downgrade(self),
            registration: new.registration,
            mem: new.mem,
            device: None,
            gpudirect: None,
        });
        self.map.write().insert(id, Arc::downgrade(&inner));
        Region { inner }
    }

    /// Registers device memory as a new region that reaches the network `via` (`new.mem` is
    /// ignored: a device region has no host bytes).
    pub fn insert_device(
        self: &Arc<Self>,
        device: DeviceMem,
        via: GpuDirect,
        new: NewRegion,
    ) -> Region {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::new(RegionInner {
            id,
            len: device.len(),
            key: new.key.unwrap_or_else(rand::random),
            access: new.access,
            private: new.private,
            endpoint: self.endpoint,
            backend: self.backend,
            remote_addr: new.remote_addr,
            table: Arc::downgrade(self),
            registration: new.registration,
            mem: Arc::new(SharedBuf::from_vec(Vec::new())),
            device: Some(device),
            gpudirect: Some(via),
        });
        self.map.write().insert(id, Arc::downgrade(&inner));
        Region { inner }
    }

    /// Registers device memory with the given remote access (a TCP region: staged transfers).
    pub fn register_device(self: &Arc<Self>, device: DeviceMem, access: RegionAccess) -> Region {
        self.insert_device(
            device,
            GpuDirect::Staged,
            NewRegion {
                mem: Arc::new(SharedBuf::from_vec(Vec::new())),
                key: None,
                remote_addr: 0,
                registration: None,
                access,
                private: false,
            },
        )
    }

    /// Allocates a zeroed, page-aligned region of `len` bytes that peers may read and write.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<Region> {
        self.alloc_with(len, RegionAccess::ReadWrite)
    }

    /// Allocates a zeroed, page-aligned region of `len` bytes with the given remote access.
    pub fn alloc_with(self: &Arc<Self>, len: usize, access: RegionAccess) -> Result<Region> {
        self.alloc_scoped(len, access, false)
    }

    /// Allocates a zeroed, page-aligned region; `private`: reachable only through grants.
    pub fn alloc_scoped(
        self: &Arc<Self>,
        len: usize,
        access: RegionAccess,
        private: bool,
    ) -> Result<Region> {
        let mem = Arc::new(SharedBuf::zeroed(len)?);
        Ok(self.insert(NewRegion {
            mem,
            key: None,
            remote_addr: 0,
            registration: None,
            access,
            private,
        }))
    }

    /// Registers the caller's buffer; peers may read and write it.
    pub fn register(self: &Arc<Self>, buf: Vec<u8>) -> Region {
        self.register_with(buf, RegionAccess::ReadWrite)
    }

    /// Registers the caller's buffer with the given remote access.
    pub fn register_with(self: &Arc<Self>, buf: Vec<u8>, access: RegionAccess) -> Region {
        self.register_shared(SharedBuf::from_vec(buf), access)
    }

    /// Registers `mem` (e.g. memory owned elsewhere, [`SharedBuf::from_foreign`]) with the given
    /// remote access.
    pub fn register_shared(self: &Arc<Self>, mem: SharedBuf, access: RegionAccess) -> Region {
        self.insert(NewRegion {
            mem: Arc::new(mem),
            key: None,
            remote_addr: 0,
            registration: None,
            access,
            private: false,
        })
    }

    fn remove(&self, id: u64) {
        let mut m = self.map.write();
        // A region with this id is only ever inserted once, but check it is really dead.
        if m.get(&id).is_some_and(|w| w.strong_count() == 0) {
            m.remove(&id);
        }
    }

    /// Checks a remote access before any memory is touched: the region exists, the key matches,
    /// the region allows `op` (`None`: only existence and key, as a region query asks) and
    /// `[offset, offset+len)` is inside it. Returns the region on success.
    pub fn check_remote(
        &self,
        region: u64,
        key: u64,
        op: Option<RemoteOp>,
        offset: u64,
        len: u64,
    ) -> Result<Region> {
        self.check_remote_granted(region, key, None, op, offset, len)
    }

    /// [`RegionTable::check_remote`] on a connection that granted `granted` as the key of
    /// `region` (see [`crate::Connection::grant`]): that key matches too, and it is the only one
    /// that matches a private region.
    pub fn check_remote_granted(
        &self,
        region: u64,
        key: u64,
        granted: Option<u64>,
        op: Option<RemoteOp>,
        offset: u64,
        len: u64,
    ) -> Result<Region> {
        let inner = self
            .map
            .read()
            .get(&region)
            .and_then(Weak::upgrade)
            .ok_or(TransportError::UnknownRegion { region })?;
        let r = Region { inner };
        let endpoint_key_ok = !r.inner.private && r.key() == key;
        if !endpoint_key_ok && granted != Some(key) {
            return Err(TransportError::BadKey { region });
        }
        let access = r.inner.access;
        match op {
            Some(RemoteOp::Read) if !access.allows_read() => {
                return Err(TransportError::AccessDenied { region, op: "read" })
            }
            Some(RemoteOp::Write) if !access.allows_write() => {
                return Err(TransportError::AccessDenied {
                    region,
                    op: "write",
                })
            }
            _ => {}
        }
        let size = r.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(r),
            _ => Err(TransportError::RegionOutOfBounds {
                region,
                offset,
                len,
                size,
            }),
        }
    }

    /// Number of live regions.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    /// Whether no region is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_checks_and_deregistration() {
        let t = RegionTable::new(7, Backend::Tcp);
        let r = t.alloc(100).unwrap();
        let d = r.descriptor();
        assert_eq!(d.endpoint, 7);
        assert!(t.check_remote(d.region, d.key, None, 0, 100).is_ok());
        assert!(matches!(
            t.check_remote(d.region, d.key ^ 1, None, 0, 1),
            Err(TransportError::BadKey { .. })
        ));
        assert!(matches!(
            t.check_remote(d.region, d.key, None, 99, 2),
            Err(TransportError::RegionOutOfBounds {
                offset: 99,
                len: 2,
                size: 100,
                ..
            })
        ));
        assert!(matches!(
            t.check_remote(d.region, d.key, None, u64::MAX, 2),
            Err(TransportError::RegionOutOfBounds { .. })
        ));
        assert!(matches!(
            t.check_remote(999, d.key, None, 0, 1),
            Err(TransportError::UnknownRegion { region: 999 })
        ));
        drop(r);
        assert!(matches!(
            t.check_remote(d.region, d.key, None, 0, 1),
            Err(TransportError::UnknownRegion { .. })
        ));
        assert!(t.is_empty());
    }

    #[test]
    fn register_and_get_back() {
        let t = RegionTable::new(1, Backend::Tcp);
        let r = t.register(vec![1, 2, 3]);
        r.write(1, &[9]).unwrap();
        let c = r.clone();
        let r = r.try_into_vec().unwrap_err();
        drop(c);
        assert_eq!(r.try_into_vec().unwrap(), vec![1, 9, 3]);
        assert!(t.is_empty());
    }

    #[test]
    fn local_bounds() {
        let t = RegionTable::new(1, Backend::Tcp);
        let r = t.alloc(10).unwrap();
        let mut b = [0u8; 4];
        assert!(r.read(6, &mut b).is_ok());
        assert!(matches!(
            r.read(7, &mut b),
            Err(TransportError::LocalOutOfBounds { .. })
        ));
        assert!(matches!(
            r.write(usize::MAX, &b),
            Err(TransportError::LocalOutOfBounds { .. })
        ));
    }
}
