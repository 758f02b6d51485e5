//! Remote descriptors as bytes, so that they can travel over any side channel.
//!
//! | bytes  | field                        |
//! | ------ | ---------------------------- |
//! | 0..4   | magic `GNR1`                 |
//! | 4..12  | endpoint id (u64 LE)         |
//! | 12..20 | region id (u64 LE)           |
//! | 20..28 | length in bytes (u64 LE)     |
//! | 28..36 | access key (u64 LE)          |
//! | 36..44 | address (u64 LE; 0 for TCP)  |
//!
//! The C binding (`bindings/c`, `GENIE_DESCRIPTOR_LEN`) uses the same layout, so a descriptor
//! made in one language is accepted by the other.

use genie_transport::RemoteRegion;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyType};

/// Length of an encoded descriptor.
pub const LEN: usize = 44;
const MAGIC: &[u8; 4] = b"GNR1";

/// Encodes `d` in the layout of the module docs.
pub fn encode(d: &RemoteRegion) -> [u8; LEN] {
    let mut out = [0u8; LEN];
    out[..4].copy_from_slice(MAGIC);
    for (i, v) in [d.endpoint, d.region, d.len, d.key, d.addr]
        .into_iter()
        .enumerate()
    {
        out[4 + 8 * i..12 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decodes a descriptor; refuses anything but exactly [`LEN`] bytes with the magic.
pub fn decode(b: &[u8]) -> Result<RemoteRegion, String> {
    let b: &[u8; LEN] = b
        .try_into()
        .map_err(|_| format!("a descriptor is {LEN} bytes, got {}", b.len()))?;
    if &b[..4] != MAGIC {
        return Err("not a Genie descriptor (bad magic)".into());
    }
    let field = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[4 + 8 * i..12 + 8 * i]);
        u64::from_le_bytes(w)
    };
    Ok(RemoteRegion {
        endpoint: field(0),
        region: field(1),
        len: field(2),
        key: field(3),
        addr: field(4),
    })
}

/// A peer's region descriptor, parsed once (`RemoteRegion.from_bytes(b)`). Every method that
/// takes a remote region accepts this or the descriptor's bytes.
#[pyclass(module = "genie", name = "RemoteRegion", frozen)]
pub struct PyRemoteRegion {
    pub(crate) inner: RemoteRegion,
}

#[pymethods]
impl PyRemoteRegion {
    /// Parses a descriptor made by `Region.descriptor()` or `Connection.grant()`.
    #[classmethod]
    fn from_bytes(_cls: &Bound<'_, PyType>, data: &[u8]) -> PyResult<Self> {
        Ok(Self {
            inner: decode(data).map_err(PyValueError::new_err)?,
        })
    }

    /// The descriptor's bytes.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &encode(&self.inner))
    }

    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        self.to_bytes(py)
    }

    /// Length of the region in bytes.
    fn __len__(&self) -> usize {
        usize::try_from(self.inner.len).unwrap_or(usize::MAX)
    }

    /// The owning endpoint's id.
    #[getter]
    fn endpoint(&self) -> u64 {
        self.inner.endpoint
    }

    /// The region's id within its endpoint.
    #[getter]
    fn region(&self) -> u64 {
        self.inner.region
    }

    fn __repr__(&self) -> String {
        format!(
            "RemoteRegion(endpoint={:#x}, region={}, len={})",
            self.inner.endpoint, self.inner.region, self.inner.len
        )
    }
}

/// The descriptor named by `obj`: a `RemoteRegion` or its bytes.
pub fn remote_of(obj: &Bound<'_, PyAny>) -> PyResult<RemoteRegion> {
    if let Ok(r) = obj.cast::<PyRemoteRegion>() {
        return Ok(r.get().inner);
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return decode(b.as_bytes()).map_err(PyValueError::new_err);
    }
    let b: Vec<u8> = obj.extract().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(
            "a remote region is a genie.RemoteRegion or the bytes of a descriptor",
        )
    })?;
    decode(&b).map_err(PyValueError::new_err)
}
