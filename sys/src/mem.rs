//! Page-aligned heap buffers for registered memory regions.
//!
//! [`AlignedBuf`] is a zero-initialised, fixed-size byte buffer whose start is aligned to
//! [`PAGE_SIZE`]. Its address never changes for its whole life (it cannot grow), which is what
//! a memory registration (an RDMA MR) needs. It derefs to `[u8]`, so all access is safe.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: 4 KiB, the page size of the platforms Genie runs on.
pub const PAGE_SIZE: usize = 4096;

/// Why an [`AlignedBuf`] could not be allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// The requested length, rounded up to whole pages, does not fit the address space.
    #[error("cannot allocate {len} bytes: size overflows the address space")]
    TooLarge {
        /// The requested length in bytes.
        len: usize,
    },
    /// The allocator returned no memory.
    #[error("out of memory allocating {len} page-aligned bytes")]
    OutOfMemory {
        /// The requested length in bytes.
        len: usize,
    },
}

/// A zero-initialised heap buffer aligned to [`PAGE_SIZE`] with a fixed length and a stable address.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Box<[u8]>`); moving it to another
// thread moves that ownership, and `&AlignedBuf` only gives out `&[u8]`, which is `Sync`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads through `&[u8]`; mutation needs `&mut AlignedBuf`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes starting on a page boundary. `len == 0` is allowed (one page is
    /// reserved so that the address is still valid and unique).
    pub fn zeroed(len: usize) -> Result<Self, AllocError> {
        let size = len
            .max(1)
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(AllocError::TooLarge { len })?;
        let layout =
            Layout::from_size_align(size, PAGE_SIZE).map_err(|_| AllocError::TooLarge { len })?;
        // SAFETY: `layout` has a non-zero size (at least one page), as `alloc_zeroed` requires.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(AllocError::OutOfMemory { len })?;
        Ok(Self { ptr, len, layout })
    }

    /// The buffer's length in bytes (as requested, not rounded up).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has length zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of the first byte, for registering the buffer with a device. Stable until drop.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to an allocation of `layout.size() >= len` bytes that we own, all
        // initialised (allocated zeroed); the returned borrow is tied to `&self`, so the memory
        // cannot be freed or mutated through `self` while it lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees this is the only live borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed(self.layout)` and has not been freed.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .finish()
    }
}

/// Memory owned by someone else (a Python buffer, a serving stack's tensor), kept alive by an
/// owner object for as long as this value lives. Made only by [`SharedBuf::from_foreign`], whose
/// caller vouches for the memory.
pub struct ForeignBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Dropped after the last use of `ptr` (this value's own drop): keeps the memory alive.
    _owner: Box<dyn std::any::Any + Send + Sync>,
}

// SAFETY: `ForeignBuf` hands out the memory only as `&[u8]`/`&mut [u8]` tied to borrows of itself
// (behind `SharedBuf`'s lock); `from_foreign`'s contract makes the memory valid from any thread
// for the owner's life, and the owner itself is `Send + Sync`.
unsafe impl Send for ForeignBuf {}
// SAFETY: shared references only give `&[u8]` (reads); writes need `&mut ForeignBuf`.
unsafe impl Sync for ForeignBuf {}

impl Deref for ForeignBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `from_foreign`'s caller promised `len` initialised bytes at `ptr`, valid for
        // reads and writes while the owner (dropped after us) lives; the borrow is tied to `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for ForeignBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only borrow made through us.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for ForeignBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignBuf")
            .field("addr", &format_args!("{:#x}", self.ptr.as_ptr() as usize))
            .field("len", &self.len)
            .finish()
    }
}

/// Shareable bytes with a stable address: an [`AlignedBuf`], a caller's `Vec<u8>` or memory
/// owned elsewhere ([`ForeignBuf`]) behind a read/write lock.
///
/// Unlike a bare `Vec` or `&mut [u8]`, nothing can move, grow, shrink or replace the storage while
/// a `SharedBuf` exists: the lock only hands out `[u8]` slices. So its [`addr`](Self::addr) is
/// valid for its whole life, and a device registration that keeps an `Arc<SharedBuf>` (see
/// `verbs::ProtectionDomain::register`) can never outlive the memory it names.
#[derive(Debug)]
pub struct SharedBuf {
    storage: std::sync::RwLock<Storage>,
    addr: usize,
    len: usize,
}

#[derive(Debug)]
enum Storage {
    Aligned(AlignedBuf),
    Vec(Vec<u8>),
    Foreign(ForeignBuf),
}

impl Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Aligned(b) => b,
            Storage::Vec(v) => v,
            Storage::Foreign(f) => f,
        }
    }
}

impl DerefMut for Storage {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Storage::Aligned(b) => b,
            Storage::Vec(v) => v,
            Storage::Foreign(f) => f,
        }
    }
}

/// Shared access to a [`SharedBuf`]'s bytes (its read lock).
pub struct SharedRead<'a>(std::sync::RwLockReadGuard<'a, Storage>);

impl Deref for SharedRead<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// Exclusive access to a [`SharedBuf`]'s bytes (its write lock).
pub struct SharedWrite<'a>(std::sync::RwLockWriteGuard<'a, Storage>);

impl Deref for SharedWrite<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for SharedWrite<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl SharedBuf {
    /// `len` zeroed, page-aligned bytes.
    pub fn zeroed(len: usize) -> Result<Self, AllocError> {
        Ok(Self::new(Storage::Aligned(AlignedBuf::zeroed(len)?)))
    }

    /// Takes over the caller's buffer (no copy); [`into_vec`](Self::into_vec) gives it back.
    pub fn from_vec(v: Vec<u8>) -> Self {
        Self::new(Storage::Vec(v))
    }

    /// Wraps `len` bytes at `ptr` that `owner` keeps alive (zero-copy registration of a caller's
    /// buffer); `owner` is dropped when the last user of the bytes (a region, a registration, an
    /// operation in flight) is gone.
    ///
    /// # Safety
    ///
    /// For as long as `owner` lives: `ptr` is non-null and `[ptr, ptr + len)` is one allocation
    /// of initialised bytes, valid for reads and writes from any thread, not freed or moved.
    /// Other code may touch these bytes only as the buffer's owner expects of a device doing
    /// DMA (the transport writes into them when a peer writes): the caller accepts that.
    pub unsafe fn from_foreign(
        ptr: *mut u8,
        len: usize,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Self {
        let (ptr, len) = match NonNull::new(ptr) {
            Some(p) => (p, len),
            None => (NonNull::dangling(), 0),
        };
        Self::new(Storage::Foreign(ForeignBuf {
            ptr,
            len,
            _owner: owner,
        }))
    }

    fn new(storage: Storage) -> Self {
        let (addr, len) = (storage.as_ptr() as usize, storage.len());
        Self {
            storage: std::sync::RwLock::new(storage),
            addr,
            len,
        }
    }

    /// Address of the first byte; fixed for the buffer's life. (For an empty `Vec` it is a
    /// dangling, never-dereferenced address.)
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the bytes came from [`from_vec`](Self::from_vec).
    pub fn is_vec(&self) -> bool {
        matches!(*self.read().0, Storage::Vec(_))
    }

    /// Shared access (a panic of another holder does not poison it: the bytes are plain data).
    pub fn read(&self) -> SharedRead<'_> {
        SharedRead(
            self.storage
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Exclusive access.
    pub fn write(&self) -> SharedWrite<'_> {
        SharedWrite(
            self.storage
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The caller's `Vec` back (for a buffer made by [`from_vec`](Self::from_vec)); otherwise the
    /// buffer unchanged.
    pub fn into_vec(self) -> Result<Vec<u8>, Self> {
        let (addr, len) = (self.addr, self.len);
        match self
            .storage
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Storage::Vec(v) => Ok(v),
            s @ (Storage::Aligned(_) | Storage::Foreign(_)) => Err(Self {
                storage: std::sync::RwLock::new(s),
                addr,
                len,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_memory_is_shared_not_copied_and_its_owner_lives_as_long() {
        let owner = std::sync::Arc::new(std::sync::Mutex::new(vec![1u8; 64]));
        let ptr = owner.lock().unwrap().as_mut_ptr();
        // SAFETY: the Vec behind `owner` is neither resized nor freed while the clone given as
        // owner lives; the test touches it only through the SharedBuf until that is dropped.
        let b = unsafe { SharedBuf::from_foreign(ptr, 64, Box::new(owner.clone())) };
        assert_eq!(b.addr(), ptr as usize);
        b.write()[3] = 9;
        assert_eq!(b.read()[3], 9);
        assert_eq!(std::sync::Arc::strong_count(&owner), 2);
        assert!(b.into_vec().is_err());
        assert_eq!(std::sync::Arc::strong_count(&owner), 1);
        assert_eq!(owner.lock().unwrap()[3], 9);
    }

    #[test]
    fn aligned_zeroed_and_writable() {
        for len in [0usize, 1, 4095, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len).unwrap();
            assert_eq!(b.len(), len);
            assert_eq!(b.addr() % PAGE_SIZE, 0);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                b[len - 1] = 7;
                assert_eq!(b[len - 1], 7);
            }
        }
    }

    #[test]
    fn shared_buf_keeps_its_address() {
        let b = SharedBuf::from_vec(vec![1, 2, 3]);
        let a = b.addr();
        b.write()[1] = 9;
        assert_eq!(&*b.read(), &[1, 9, 3]);
        assert_eq!(b.addr(), a);
        assert!(b.is_vec());
        assert_eq!(b.into_vec().unwrap(), vec![1, 9, 3]);
        let z = SharedBuf::zeroed(5000).unwrap();
        assert_eq!(z.addr() % PAGE_SIZE, 0);
        assert_eq!(z.len(), 5000);
        assert!(!z.is_vec());
        assert!(z.into_vec().is_err());
    }

    #[test]
    fn too_large_is_an_error() {
        assert!(matches!(
            AlignedBuf::zeroed(usize::MAX),
            Err(AllocError::TooLarge { .. })
        ));
    }
}
