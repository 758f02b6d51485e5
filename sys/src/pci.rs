//! PCI topology from sysfs, and which RDMA device sits closest to a GPU.
//!
//! GPUDirect RDMA is only fast when the NIC and the GPU share a PCIe switch: through the host bridge
//! or across sockets, peer-to-peer traffic is slow or refused. Like Mooncake's transfer engine (and
//! NCCL's `PIX/PXB/PHB/NODE/SYS` path types), Genie ranks the RDMA devices by where their PCIe paths
//! meet the GPU's:
//!
//! ```text
//! /sys/bus/pci/devices/0000:03:00.0  ─resolves to─►  /sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:08.0/0000:03:00.0   GPU
//! /sys/class/infiniband/mlx5_0/device ─resolves to─► /sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:10.0/0000:04:00.0   NIC
//!                                                                 └──────── shared: 3 components ─────────┘
//! ```
//!
//! The path is compared component by component (never character by character, so `0000:3b` and
//! `0000:3c` share nothing). The ranking, best first: the longest shared prefix (the deepest common
//! bridge), then the same NUMA node, then the fewest hops between the two, then the device name, so
//! the choice is deterministic. RDMA devices without a PCI parent (soft-RoCE `rxe0`, `siw0`) are not
//! candidates.
//!
//! Every function takes the sysfs root as a parameter ([`SYSFS`] on a real machine), so the tests
//! build fake trees in a temporary directory.
//!
//! ```
//! use std::path::Path;
//! use genie_sys::pci::{self, PciError};
//!
//! // A GPU's bus id as CUDA prints it (`cuda::DeviceInfo::pci_bus_id` gives it parsed).
//! let gpu = "00000000:3B:00.0".parse()?;
//! match pci::nearest_rdma_device(Path::new(pci::SYSFS), gpu) {
//!     Ok(Some(a)) => println!("{gpu}: use {} ({:?}, {} hops)", a.device.name, a.link, a.hops),
//!     Ok(None) => println!("{gpu}: no RDMA device with a PCI parent"),
//!     Err(PciError::NotFound { .. }) => println!("no PCI device {gpu} here"),
//!     Err(e) => return Err(e),
//! }
//! # Ok::<(), PciError>(())
//! ```

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The sysfs mount point of a real machine.
pub const SYSFS: &str = "/sys";

/// Errors reading the PCI topology.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PciError {
    /// A PCI address did not parse (expected `[domain:]bus:device.function` in hex).
    #[error("{raw:?} is not a PCI address (expected [domain:]bus:device.function)")]
    BadAddress {
        /// The text that did not parse.
        raw: String,
    },
    /// No PCI device with this address under the sysfs root.
    #[error("no PCI device {address} under {sysfs}")]
    NotFound {
        /// The address asked for.
        address: PciAddress,
        /// The sysfs root searched.
        sysfs: PathBuf,
    },
    /// A path resolved to something that is not a PCI device below `<sysfs>/devices`.
    #[error("{path} is not a PCI device under {sysfs}/devices")]
    NotPci {
        /// The resolved path.
        path: PathBuf,
        /// The sysfs root.
        sysfs: PathBuf,
    },
    /// Reading sysfs failed.
    #[error("reading {path} failed")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PciError + '_ {
    move |source| PciError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A PCI function address (`domain:bus:device.function`), as in `/sys/bus/pci/devices`.
///
/// Parses the spellings that drivers print: `0000:3b:00.0` (sysfs), `00000000:3B:00.0` (NVML,
/// CUDA) and `3b:00.0` (domain 0); displays the sysfs spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl FromStr for PciAddress {
    type Err = PciError;

    fn from_str(s: &str) -> Result<Self, PciError> {
        let bad = || PciError::BadAddress { raw: s.to_owned() };
        let hex = |t: &str, max_digits: usize| {
            if t.is_empty() || t.len() > max_digits || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(t, 16).map_err(|_| bad())
        };
        let (rest, function) = s.trim().rsplit_once('.').ok_or_else(bad)?;
        let mut parts = rest.rsplitn(3, ':');
        let device = hex(parts.next().ok_or_else(bad)?, 2)?;
        let bus = hex(parts.next().ok_or_else(bad)?, 2)?;
        let domain = match parts.next() {
            Some(d) => hex(d, 8)?,
            None => 0,
        };
        let function = hex(function, 1)?;
        if device >= 32 || function >= 8 {
            return Err(bad());
        }
        Ok(Self {
            domain,
            bus: u8::try_from(bus).map_err(|_| bad())?,
            device: u8::try_from(device).map_err(|_| bad())?,
            function: u8::try_from(function).map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// A PCI device and where it sits in the PCIe tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// Its address.
    pub address: PciAddress,
    /// The PCIe path from the host bridge down: `["pci0000:00", "0000:00:01.0", ..., "<address>"]`.
    pub path: Vec<String>,
    /// Its NUMA node (`None` where sysfs says -1 or nothing).
    pub numa_node: Option<u32>,
}

impl PciDevice {
    /// Looks up the device with this address under `sysfs` (`<sysfs>/bus/pci/devices/<address>`).
    pub fn from_sysfs(sysfs: &Path, address: PciAddress) -> Result<Self, PciError> {
        let link = sysfs.join("bus/pci/devices").join(address.to_string());
        match link.canonicalize() {
            Ok(resolved) => Self::from_resolved(sysfs, &resolved),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(PciError::NotFound {
                address,
                sysfs: sysfs.to_owned(),
            }),
            Err(e) => Err(io_err(&link)(e)),
        }
    }

    /// Reads the device at a path that resolves into `<sysfs>/devices` (a `device` link).
    fn from_resolved(sysfs: &Path, resolved: &Path) -> Result<Self, PciError> {
        let not_pci = || PciError::NotPci {
            path: resolved.to_owned(),
            sysfs: sysfs.to_owned(),
        };
        let devices = sysfs.join("devices");
        let devices = devices.canonicalize().map_err(io_err(&devices))?;
        let rel = resolved.strip_prefix(&devices).map_err(|_| not_pci())?;
        let path: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        // The first component is the host bridge (`pci0000:00`), every later one a PCI function.
        let (root, functions) = path.split_first().ok_or_else(not_pci)?;
        if !root.starts_with("pci") || functions.is_empty() {
            return Err(not_pci());
        }
        let address: PciAddress = functions
            .last()
            .ok_or_else(not_pci)?
            .parse()
            .map_err(|_| not_pci())?;
        let numa_file = resolved.join("numa_node");
        let numa_node = match std::fs::read_to_string(&numa_file) {
            Ok(s) => s
                .trim()
                .parse::<i64>()
                .ok()
                .and_then(|n| u32::try_from(n).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&numa_file)(e)),
        };
        Ok(Self {
            address,
            path,
            numa_node,
        })
    }

    /// How many leading components of the two PCIe paths are equal.
    pub fn shared_depth(&self, other: &PciDevice) -> usize {
        self.path
            .iter()
            .zip(&other.path)
            .take_while(|(a, b)| a == b)
            .count()
    }
}

/// An RDMA device with a PCI parent (an entry of `/sys/class/infiniband`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaDevice {
    /// Its verbs name (`mlx5_0`).
    pub name: String,
    /// The PCI function behind it.
    pub pci: PciDevice,
}

/// Lists the RDMA devices under `sysfs` that have a PCI parent, sorted by name. A machine without
/// `<sysfs>/class/infiniband` has none (an empty list, not an error).
pub fn rdma_devices(sysfs: &Path) -> Result<Vec<RdmaDevice>, PciError> {
    let class = sysfs.join("class/infiniband");
    let entries = match std::fs::read_dir(&class) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&class)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(&class))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Soft-RoCE and siw devices have no `device` link, or one that is not a PCI function.
        let Ok(resolved) = entry.path().join("device").canonicalize() else {
            continue;
        };
        match PciDevice::from_resolved(sysfs, &resolved) {
            Ok(pci) => out.push(RdmaDevice { name, pci }),
            Err(PciError::NotPci { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// How a NIC reaches a GPU over PCIe, best first (NCCL's path types in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum PciLink {
    /// Both sit below one PCIe bridge under the host bridge: a switch or a root port (`PIX`/`PXB`).
    /// Where GPUDirect RDMA runs at full speed.
    PcieSwitch,
    /// They meet at the host bridge (root complex) (`PHB`).
    HostBridge,
    /// Different host bridges on the same NUMA node (`NODE`).
    NumaNode,
    /// Different NUMA nodes: traffic crosses the CPU interconnect (`SYS`).
    System,
}

/// Where one RDMA device stands relative to a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Affinity {
    /// The RDMA device.
    pub device: RdmaDevice,
    /// How it reaches the GPU.
    pub link: PciLink,
    /// Leading PCIe path components shared with the GPU (0: different host bridges).
    pub shared_depth: usize,
    /// PCIe hops from one to the other through their deepest common point.
    pub hops: usize,
}

fn affinity(gpu: &PciDevice, device: RdmaDevice) -> Affinity {
    let shared_depth = gpu.shared_depth(&device.pci);
    let hops = (gpu.path.len() - shared_depth) + (device.pci.path.len() - shared_depth);
    let link = match shared_depth {
        0 if gpu.numa_node == device.pci.numa_node => PciLink::NumaNode,
        0 => PciLink::System,
        1 => PciLink::HostBridge,
        _ => PciLink::PcieSwitch,
    };
    Affinity {
        device,
        link,
        shared_depth,
        hops,
    }
}

/// Ranks every RDMA device by its PCIe closeness to the GPU at `gpu` (for instance a CUDA device's
/// PCI bus id), best first: deepest shared path, then same NUMA node, then fewest hops, then name.
pub fn rank_rdma_devices(sysfs: &Path, gpu: PciAddress) -> Result<Vec<Affinity>, PciError> {
    let gpu = PciDevice::from_sysfs(sysfs, gpu)?;
    let mut ranked: Vec<Affinity> = rdma_devices(sysfs)?
        .into_iter()
        .map(|d| affinity(&gpu, d))
        .collect();
    ranked.sort_by(|a, b| {
        b.shared_depth
            .cmp(&a.shared_depth)
            .then(a.link.cmp(&b.link))
            .then(a.hops.cmp(&b.hops))
            .then(a.device.name.cmp(&b.device.name))
    });
    Ok(ranked)
}

/// The RDMA device closest to the GPU at `gpu` (see [`rank_rdma_devices`]), or `None` where the
/// machine has no RDMA device with a PCI parent.
pub fn nearest_rdma_device(sysfs: &Path, gpu: PciAddress) -> Result<Option<Affinity>, PciError> {
    Ok(rank_rdma_devices(sysfs, gpu)?.into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fake sysfs tree in a temporary directory, removed on drop.
    struct FakeSysfs {
        root: PathBuf,
    }

    impl FakeSysfs {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let root = std::env::temp_dir().join(format!(
                "genie-sysfs-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(root.join("devices")).unwrap();
            std::fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
            Self { root }
        }

        /// Adds a PCI function at `chain` (`pci0000:00/0000:00:01.0/...`), linked from
        /// `bus/pci/devices` as the real kernel does, with a relative link.
        fn pci(&self, chain: &str, numa: i32) -> &Self {
            let dir = self.root.join("devices").join(chain);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("numa_node"), format!("{numa}\n")).unwrap();
            let name = chain.rsplit('/').next().unwrap();
            let link = self.root.join("bus/pci/devices").join(name);
            if !link.exists() {
                symlink(format!("../../../devices/{chain}"), link).unwrap();
            }
            self
        }

        /// Adds an RDMA device whose `device` link points at the PCI function `chain`.
        fn nic(&self, name: &str, chain: &str, numa: i32) -> &Self {
            self.pci(chain, numa);
            let dir = self.root.join("class/infiniband").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            symlink(format!("../../../devices/{chain}"), dir.join("device")).unwrap();
            self
        }

        /// Adds a soft-RoCE device: no PCI parent.
        fn virtual_nic(&self, name: &str) -> &Self {
            let dir = self.root.join("devices/virtual/infiniband").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::create_dir_all(self.root.join("class/infiniband")).unwrap();
            symlink(
                format!("../../devices/virtual/infiniband/{name}"),
                self.root.join("class/infiniband").join(name),
            )
            .unwrap();
            self
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    /// A two-socket box: GPU0 and mlx5_0 under one switch, mlx5_1 on another root port of the same
    /// host bridge, mlx5_2 on another host bridge of socket 0, mlx5_3 on socket 1, rxe0 virtual.
    fn two_socket() -> FakeSysfs {
        let t = FakeSysfs::new();
        t.pci(
            "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:08.0/0000:03:00.0",
            0,
        )
        .nic(
            "mlx5_0",
            "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:10.0/0000:04:00.0",
            0,
        )
        .nic("mlx5_1", "pci0000:00/0000:00:03.0/0000:05:00.0", 0)
        .nic("mlx5_2", "pci0000:20/0000:20:01.0/0000:21:00.0", 0)
        .nic("mlx5_3", "pci0000:80/0000:80:01.0/0000:81:00.0", 1)
        .virtual_nic("rxe0")
        .pci("pci0000:80/0000:80:02.0/0000:82:00.0", 1);
        t
    }

    #[test]
    fn addresses_parse_in_every_spelling() {
        let want = PciAddress {
            domain: 0,
            bus: 0x3b,
            device: 0,
            function: 0,
        };
        for s in [
            "0000:3b:00.0",
            "00000000:3B:00.0",
            "3b:00.0",
            " 0000:3B:00.0\n",
        ] {
            assert_eq!(addr(s), want, "{s}");
        }
        assert_eq!(addr("00000000:3B:00.0").to_string(), "0000:3b:00.0");
        assert_eq!(addr("10000:e1:1f.7").to_string(), "10000:e1:1f.7");
        for bad in [
            "",
            "3b:00",
            "0000:3b:20.0",
            "0000:3b:00.8",
            "0000:3bb:00.0",
            "x:3b:00.0",
            "0:0:3b:00.0",
            "000000000:3b:00.0",
            "0000:3b:00.0.1",
        ] {
            assert!(
                matches!(bad.parse::<PciAddress>(), Err(PciError::BadAddress { .. })),
                "{bad:?} parsed"
            );
        }
    }

    #[test]
    fn nic_under_the_gpus_switch_wins() {
        let t = two_socket();
        let ranked = rank_rdma_devices(&t.root, addr("0000:03:00.0")).unwrap();
        let names: Vec<&str> = ranked.iter().map(|a| a.device.name.as_str()).collect();
        assert_eq!(names, ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]);
        let links: Vec<PciLink> = ranked.iter().map(|a| a.link).collect();
        assert_eq!(
            links,
            [
                PciLink::PcieSwitch,
                PciLink::HostBridge,
                PciLink::NumaNode,
                PciLink::System
            ]
        );
        assert_eq!(ranked[0].shared_depth, 3);
        assert_eq!(ranked[0].hops, 4);
        assert_eq!(ranked[0].device.pci.address, addr("0000:04:00.0"));
        assert_eq!(ranked[0].device.pci.numa_node, Some(0));
    }

    #[test]
    fn across_host_bridges_the_same_numa_node_wins() {
        let t = two_socket();
        let best = nearest_rdma_device(&t.root, addr("0000:82:00.0"))
            .unwrap()
            .unwrap();
        assert_eq!(best.device.name, "mlx5_3");
        assert_eq!(best.link, PciLink::HostBridge);
        let ranked = rank_rdma_devices(&t.root, addr("0000:82:00.0")).unwrap();
        assert_eq!(ranked[1].link, PciLink::System);
    }

    #[test]
    fn paths_compare_by_component_not_by_character() {
        let t = FakeSysfs::new();
        // `0000:00:01.1` shares a character prefix with `0000:00:01.0` but not a bridge; the NIC
        // on the GPU's own root port must win although its name sorts last.
        t.pci("pci0000:00/0000:00:01.0/0000:10:00.0", 0)
            .nic("a_nic", "pci0000:00/0000:00:01.1/0000:11:00.0", 0)
            .nic("z_nic", "pci0000:00/0000:00:01.0/0000:10:00.1", 0);
        let ranked = rank_rdma_devices(&t.root, addr("0000:10:00.0")).unwrap();
        assert_eq!(ranked[0].device.name, "z_nic");
        assert_eq!(ranked[0].shared_depth, 2);
        assert_eq!(ranked[1].shared_depth, 1);
    }

    #[test]
    fn equal_candidates_are_ordered_by_name_and_unknown_numa_matches_unknown() {
        let t = FakeSysfs::new();
        t.pci("pci0000:00/0000:00:01.0/0000:01:00.0", -1)
            .nic("mlx5_1", "pci0000:40/0000:40:01.0/0000:41:00.0", -1)
            .nic("mlx5_0", "pci0000:60/0000:60:01.0/0000:61:00.0", -1);
        let ranked = rank_rdma_devices(&t.root, addr("0000:01:00.0")).unwrap();
        assert_eq!(ranked[0].device.name, "mlx5_0");
        assert_eq!(ranked[0].link, PciLink::NumaNode);
        assert_eq!(ranked[0].device.pci.numa_node, None);
    }

    #[test]
    fn virtual_devices_are_not_candidates_and_no_class_means_none() {
        let t = FakeSysfs::new();
        t.pci("pci0000:00/0000:00:01.0/0000:01:00.0", 0)
            .virtual_nic("rxe0");
        assert!(rdma_devices(&t.root).unwrap().is_empty());
        assert!(nearest_rdma_device(&t.root, addr("0000:01:00.0"))
            .unwrap()
            .is_none());
        let bare = FakeSysfs::new();
        bare.pci("pci0000:00/0000:00:02.0", 0);
        assert!(rdma_devices(&bare.root).unwrap().is_empty());
    }

    #[test]
    fn a_missing_gpu_is_a_typed_error() {
        let t = two_socket();
        let err = nearest_rdma_device(&t.root, addr("0000:99:00.0")).unwrap_err();
        assert!(
            matches!(err, PciError::NotFound { address, .. } if address == addr("0000:99:00.0")),
            "{err}"
        );
    }

    /// The real sysfs of whatever machine runs the tests: listing must not fail.
    #[test]
    fn real_sysfs_lists_without_error() {
        for d in rdma_devices(Path::new(SYSFS)).unwrap() {
            assert_eq!(d.pci.path.last().unwrap(), &d.pci.address.to_string());
        }
    }
}
