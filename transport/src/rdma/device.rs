//! Device regions on the RDMA backend: GPU memory registered with the NIC (GPUDirect RDMA), so
//! one-sided operations move it with no host copy; the connections post them like any region.
//!
//! The way is chosen by [`decide_gpudirect`]: a dma-buf registration
//! (`cuMemGetHandleForAddressRange` → `ibv_reg_dmabuf_mr`) where the GPU exports one and the
//! provider takes it, else a plain `ibv_reg_mr` of the device address where the peer-memory
//! module (`nvidia_peermem`) is loaded. This backend does not stage device memory through host
//! buffers, so where neither works registration fails with
//! [`TransportError::GpuDirectUnavailable`] naming why each way failed (a TCP endpoint stages).
//! The way used is logged and reported by [`Region::gpudirect`].

use super::Endpoint;
use crate::device::{decide_gpudirect, peermem_loaded, DeviceMem, GpuDirect, GpuDirectProbe};
use crate::error::Result;
use crate::region::{NewRegion, Region, RegionAccess};
use genie_sys::mem::SharedBuf;
use genie_sys::verbs;
use std::sync::Arc;

/// Registers device memory with the endpoint's protection domain (see the module docs).
pub(super) fn register(ep: &Endpoint, mem: DeviceMem, access: RegionAccess) -> Result<Region> {
    let new = |registration, key, remote_addr| NewRegion {
        mem: Arc::new(SharedBuf::from_vec(Vec::new())),
        key,
        remote_addr,
        registration,
        access,
        private: false,
    };
    if mem.is_empty() {
        // Nothing to register: zero-length transfers never touch memory.
        return Ok(ep
            .table
            .insert_device(mem, GpuDirect::Staged, new(None, None, 0)));
    }
    let remote = match access {
        RegionAccess::Read => verbs::RemoteAccess::Read,
        RegionAccess::Write => verbs::RemoteAccess::Write,
        RegionAccess::Local => verbs::RemoteAccess::None,
        _ => verbs::RemoteAccess::ReadWrite,
    };
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let mut probe = GpuDirectProbe {
        peermem_loaded: peermem_loaded(&modules),
        ..GpuDirectProbe::default()
    };
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut mr: Option<verbs::Mr> = None;
    #[cfg(feature = "cuda")]
    let choice = {
        use crate::device::CudaMemory;
        let cuda = mem.as_any().downcast_ref::<CudaMemory>();
        if let Some(c) = cuda {
            probe.cuda_memory = true;
            match c.with_buffer(|b| b.device().info()) {
                Ok(info) => {
                    probe.gpu_dmabuf = info.dmabuf;
                    probe.gpu_rdma = info.gpudirect_rdma;
                }
                Err(e) => tracing::warn!(error = %e, "querying the GPU for GPUDirect failed"),
            }
        }
        decide_gpudirect(&probe, |way| {
            let via = match way {
                GpuDirect::Dmabuf => verbs::DeviceRegistration::Dmabuf,
                GpuDirect::Peermem => verbs::DeviceRegistration::PeerMemory,
                GpuDirect::Staged => return Err("not a registration".into()),
            };
            let Some(c) = cuda else {
                return Err("not CUDA memory".into());
            };
            let keep = Box::new(Arc::clone(&mem));
            c.with_buffer(|b| ep.pd.register_device(b, via, remote, keep))
                .map(|m| mr = Some(m))
                .map_err(|e| chain(&e))
        })?
    };
    #[cfg(not(feature = "cuda"))]
    let choice = {
        let _ = (remote, &mut probe.cuda_memory);
        decide_gpudirect(&probe, |_| Err("built without the `cuda` feature".into()))?
    };
    for (way, why) in &choice.passed_over {
        tracing::info!(%way, reason = %why, "GPUDirect way not used");
    }
    tracing::info!(gpudirect = %choice.used, ordinal = mem.ordinal(), len = mem.len(), "device region registered");
    let Some(mr) = mr else {
        // Only a registration returns Ok here (`probe.staging` is false).
        return Err(crate::TransportError::GpuDirectUnavailable {
            tried: format!("{} chosen without a registration", choice.used),
        });
    };
    let (key, remote_addr) = (u64::from(mr.rkey()), mr.addr());
    Ok(ep.table.insert_device(
        mem,
        choice.used,
        new(Some(Arc::new(mr)), Some(key), remote_addr),
    ))
}

/// An error with its sources, for the decision's reasons.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use crate::config::{BackendChoice, RdmaConfig};
    use crate::{open, GpuDirect, HostStandIn, RegionAccess, TransportConfig, TransportError};
    use std::sync::Arc;

    /// An endpoint on the soft-RoCE harness's device; `None` where it set no `GENIE_RDMA_DEVICE`.
    fn endpoint() -> Option<Arc<dyn crate::Transport>> {
        let device = std::env::var("GENIE_RDMA_DEVICE").ok()?;
        Some(
            open(TransportConfig {
                backend: BackendChoice::Rdma,
                rdma: RdmaConfig {
                    device: Some(device),
                    ..RdmaConfig::default()
                },
                ..TransportConfig::default()
            })
            .unwrap(),
        )
    }

    /// Memory the NIC cannot reach (the host stand-in: no GPU, no dma-buf, no peer memory) is
    /// refused with the reason for each way, since this backend does not stage; an empty device
    /// region needs no registration; host regions of the same endpoint are unaffected.
    #[test]
    fn unreachable_device_memory_is_refused_with_every_reason() {
        let Some(t) = endpoint() else {
            eprintln!("skipped: GENIE_RDMA_DEVICE is not set (run under scripts/softroce.sh)");
            return;
        };
        let mem = Arc::new(HostStandIn::new(0, 1 << 20).unwrap());
        match t.register_device(mem, RegionAccess::ReadWrite) {
            Err(TransportError::GpuDirectUnavailable { tried }) => {
                assert!(tried.contains("dmabuf: not CUDA memory"), "{tried}");
                assert!(tried.contains("peermem: not CUDA memory"), "{tried}");
                assert!(
                    tried.contains("staged: this backend cannot stage"),
                    "{tried}"
                );
            }
            other => panic!("expected GpuDirectUnavailable, got {other:?}"),
        }
        let empty = Arc::new(HostStandIn::new(0, 0).unwrap());
        let r = t.register_device(empty, RegionAccess::ReadWrite).unwrap();
        assert_eq!((r.len(), r.gpudirect()), (0, Some(GpuDirect::Staged)));
        let h = t.register(vec![3; 64]).unwrap();
        assert!(h.registration().is_some());
        // Without a driver, allocating device memory says so on RDMA as on TCP.
        match t.alloc_device_region(0, 4096) {
            Err(TransportError::DeviceUnavailable { .. }) => {}
            #[cfg(feature = "cuda")]
            Err(TransportError::Cuda(_)) => {}
            Err(TransportError::GpuDirectUnavailable { tried }) => {
                eprintln!("a GPU without GPUDirect on this device: {tried}")
            }
            Err(e) => panic!("unexpected {e}"),
            Ok(r) => eprintln!("GPU memory registered on RDMA via {:?}", r.gpudirect()),
        }
    }
}
