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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn too_large_is_an_error() {
        assert!(matches!(
            AlignedBuf::zeroed(usize::MAX),
            Err(AllocError::TooLarge { .. })
        ));
    }
}
