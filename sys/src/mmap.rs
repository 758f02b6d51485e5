//! Read-only memory-mapped files (checkpoints): the pages are read from the file when first
//! touched, so a multi-gigabyte safetensors file costs no copy to open.

use std::fs::File;
use std::ops::Deref;
use std::path::Path;

/// A whole file mapped read-only. Derefs to its bytes.
///
/// The mapping is private and read-only. If another process truncates or rewrites the file
/// while it is mapped, reads may see the new bytes or fault (SIGBUS): checkpoints are files
/// nobody writes while a model runs, the same assumption every mmap-based loader makes.
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: the map is read-only and private and owned by the returned value, which hands
        // out only `&[u8]` borrowed from it; the file is not written through this process. A
        // concurrent writer of the file elsewhere is outside Rust's model (see the type's doc).
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(Self { map })
    }
}

impl Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_file_and_refuses_a_missing_one() {
        let path = std::env::temp_dir().join(format!("genie-mmap-{}", std::process::id()));
        std::fs::write(&path, b"hello").unwrap();
        let m = MappedFile::open(&path).unwrap();
        assert_eq!(&*m, b"hello");
        drop(m);
        std::fs::remove_file(&path).unwrap();
        assert!(MappedFile::open(&path).is_err());
    }
}
