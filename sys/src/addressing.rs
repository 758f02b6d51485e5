//! How a queue pair addresses its peer, decided from recorded port attributes: pure functions, no
//! device, no verbs calls, so every decision can be replayed and unit-tested from a table.
//!
//! Two decisions, in the order a connection makes them:
//!
//! 1. [`choose_local`]: from our port's attributes ([`PortAttrs`], recorded by
//!    `verbs::Context::port_attrs`) and the operator's optional GID index, what we tell the peer
//!    ([`LocalAddress`]: link layer, LID, GID and its type and index, active MTU).
//!    - **InfiniBand** ports are addressed by LID (assigned by the subnet manager; a port without
//!      one cannot be used). Their GID (index 0, the port GID, unless the operator names another)
//!      is sent along but used only when a global route is needed.
//!    - **Ethernet** ports (RoCE) have no LIDs: every packet carries a GRH built from a GID. As
//!      perftest does, a RoCE v2 GID holding an IPv4-mapped address is preferred (routable over
//!      UDP/IP), then any other RoCE v2 GID (global IPv6 before link-local), then RoCE v1. Among
//!      equals the entry holding the address the side channel uses locally wins (the NIC's own
//!      address when the side channel runs over it), then the lowest index. Zero (unused) entries
//!      are never chosen.
//!    - A GID index given by the operator (`gid_index` in the cluster file, `-x` on `genie perf`)
//!      is taken as is, after checking that it exists and holds a GID; it also forces a GRH on
//!      InfiniBand.
//! 2. [`route`]: from our address and the peer's ([`RemoteAddress`], received in the handshake),
//!    the RTR attributes ([`Route`]): the destination LID, a GRH only when one is needed, and the
//!    path MTU, the smaller of both sides' active MTUs. On InfiniBand a GRH is needed when either
//!    side asked for one or the two GIDs' subnet prefixes differ (the peer is behind a router);
//!    the destination LID is then still the peer's (Genie does no path-record query; routed
//!    fabrics that need a router's LID must configure it through the subnet manager's SA).
//!    A peer on the other link layer (InfiniBand against Ethernet) or on the other RoCE version
//!    cannot be reached at all: [`AddressingError::LinkLayerMismatch`],
//!    [`AddressingError::RoceVersionMismatch`].
//!
//! ```
//! use genie_sys::addressing::*;
//! let port = PortAttrs {
//!     port: 1,
//!     link_layer: LinkLayer::Ethernet,
//!     active: true,
//!     lid: 0,
//!     active_mtu: 1024,
//!     gid_table_len: 4,
//!     gids: vec![
//!         GidEntry { index: 0, gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], kind: GidType::RoceV1 },
//!         GidEntry { index: 1, gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], kind: GidType::RoceV2 },
//!         GidEntry { index: 2, gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 7], kind: GidType::RoceV1 },
//!         GidEntry { index: 3, gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 7], kind: GidType::RoceV2 },
//!     ],
//! };
//! // RoCE v2 with the IPv4-mapped address, as perftest picks it.
//! assert_eq!(choose_local(&port, None, None).unwrap().sgid_index, 3);
//! // The operator's choice wins, once checked.
//! assert_eq!(choose_local(&port, Some(1), None).unwrap().sgid_index, 1);
//! assert!(choose_local(&port, Some(9), None).is_err());
//! ```

use std::fmt;

/// The link layer of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkLayer {
    /// InfiniBand: LID addressing, GRH only across subnets.
    InfiniBand,
    /// Ethernet (RoCE): GID addressing, a GRH on every packet.
    Ethernet,
}

impl LinkLayer {
    /// From the driver's `ibv_port_attr::link_layer`: `IBV_LINK_LAYER_UNSPECIFIED` (0, what old
    /// drivers report for InfiniBand ports) and `IBV_LINK_LAYER_INFINIBAND` (1) are InfiniBand,
    /// `IBV_LINK_LAYER_ETHERNET` (2) is Ethernet; anything else is `None`.
    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 | 1 => Some(Self::InfiniBand),
            2 => Some(Self::Ethernet),
            _ => None,
        }
    }

    /// The byte the handshake carries (1 InfiniBand, 2 Ethernet, as the driver numbers them).
    pub fn to_wire(self) -> u8 {
        match self {
            Self::InfiniBand => 1,
            Self::Ethernet => 2,
        }
    }

    /// The inverse of [`LinkLayer::to_wire`]; `None` for any other byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::InfiniBand),
            2 => Some(Self::Ethernet),
            _ => None,
        }
    }
}

impl fmt::Display for LinkLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InfiniBand => "InfiniBand",
            Self::Ethernet => "Ethernet (RoCE)",
        })
    }
}

/// The type of a GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GidType {
    /// An InfiniBand GID (subnet prefix + port GUID).
    Ib,
    /// RoCE v1: GRH over raw Ethernet (ethertype 0x8915), not routable over IP.
    RoceV1,
    /// RoCE v2: over UDP/IP (port 4791), routable.
    RoceV2,
}

impl GidType {
    /// From `ibv_query_gid_type` (`IBV_GID_TYPE_IB` 0, `_ROCE_V1` 1, `_ROCE_V2` 2); `None` for
    /// any other value.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Ib),
            1 => Some(Self::RoceV1),
            2 => Some(Self::RoceV2),
            _ => None,
        }
    }

    /// From `ibv_query_gid_type`, which reports the kernel's sysfs numbering: 0 is "IB or RoCE
    /// v1" (which one the port's link layer says), 1 is RoCE v2; anything else is `None`.
    pub fn from_sysfs(raw: u32, link_layer: LinkLayer) -> Option<Self> {
        match (raw, link_layer) {
            (0, LinkLayer::InfiniBand) => Some(Self::Ib),
            (0, LinkLayer::Ethernet) => Some(Self::RoceV1),
            (1, LinkLayer::Ethernet) => Some(Self::RoceV2),
            _ => None,
        }
    }

    /// The byte the handshake carries (the driver's number).
    pub fn to_wire(self) -> u8 {
        match self {
            Self::Ib => 0,
            Self::RoceV1 => 1,
            Self::RoceV2 => 2,
        }
    }

    /// The inverse of [`GidType::to_wire`]; `None` for any other byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        Self::from_raw(u32::from(b))
    }
}

impl fmt::Display for GidType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ib => "IB",
            Self::RoceV1 => "RoCE v1",
            Self::RoceV2 => "RoCE v2",
        })
    }
}

/// One entry of a port's GID table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidEntry {
    /// Its index in the table.
    pub index: u8,
    /// The GID (all zeros: an unused entry).
    pub gid: [u8; 16],
    /// Its type.
    pub kind: GidType,
}

/// What addressing needs to know of one port, as the driver reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortAttrs {
    /// The port number (from 1).
    pub port: u8,
    /// Its link layer.
    pub link_layer: LinkLayer,
    /// Whether its logical state is ACTIVE.
    pub active: bool,
    /// Its LID (InfiniBand; 0 when the subnet manager assigned none, and on Ethernet).
    pub lid: u16,
    /// Its active MTU in bytes.
    pub active_mtu: u32,
    /// Entries in the GID table (`gid_tbl_len`), readable or not.
    pub gid_table_len: u32,
    /// The entries that could be read, with their types (unused entries are all zeros).
    pub gids: Vec<GidEntry>,
}

/// What we tell the peer about our side of the connection (and use ourselves at RTR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddress {
    /// Our port's link layer.
    pub link_layer: LinkLayer,
    /// Our LID (0 on Ethernet).
    pub lid: u16,
    /// Our GID table index (the GRH's source GID).
    pub sgid_index: u8,
    /// The GID at that index (all zeros on an InfiniBand port without one).
    pub gid: [u8; 16],
    /// Its type.
    pub gid_type: GidType,
    /// Our active MTU in bytes.
    pub mtu: u32,
    /// We want a GRH even where LID routing would do (the operator named a GID index).
    pub global: bool,
}

impl LocalAddress {
    /// What the peer learns of us (the handshake's fields); also the remote side of a QP looped
    /// back to another QP of the same port.
    pub fn as_remote(&self) -> RemoteAddress {
        RemoteAddress {
            link_layer: self.link_layer,
            lid: self.lid,
            gid: self.gid,
            gid_type: self.gid_type,
            mtu: self.mtu,
            global: self.global,
        }
    }
}

/// What the peer told us in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddress {
    /// Its link layer.
    pub link_layer: LinkLayer,
    /// Its LID.
    pub lid: u16,
    /// Its GID.
    pub gid: [u8; 16],
    /// Its GID's type.
    pub gid_type: GidType,
    /// Its active MTU in bytes.
    pub mtu: u32,
    /// It wants a GRH.
    pub global: bool,
}

/// A global route header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grh {
    /// Our GID table index.
    pub sgid_index: u8,
    /// The peer's GID.
    pub dgid: [u8; 16],
    /// Hop limit (routers on the way decrement it).
    pub hop_limit: u8,
}

/// The address vector and path MTU of the RTR transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Destination LID (0 on RoCE, where it is unused).
    pub dlid: u16,
    /// The GRH, when packets carry one (always on RoCE).
    pub grh: Option<Grh>,
    /// Path MTU in bytes: the smaller of both sides' active MTUs.
    pub mtu: u32,
}

/// Hop limit of Genie's GRHs (as perftest's default).
pub const HOP_LIMIT: u8 = 64;

/// Why a port cannot be used, or a peer cannot be reached, with the addressing asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressingError {
    /// The operator's GID index is not in the port's table: pick one that `show_gids` lists.
    #[error("GID index {index} is out of range: port {port} has {table_len} GID table entries")]
    GidIndexOutOfRange {
        /// The index asked for.
        index: u8,
        /// The port.
        port: u8,
        /// Entries in its table.
        table_len: u32,
    },
    /// The operator's GID index exists but the driver did not report it (or its type).
    #[error("GID index {index} of port {port} could not be read")]
    GidUnreadable {
        /// The index asked for.
        index: u8,
        /// The port.
        port: u8,
    },
    /// The operator's GID index holds no GID (an unused entry): pick a populated one.
    #[error("GID index {index} of port {port} is empty (all zeros)")]
    ZeroGid {
        /// The index asked for.
        index: u8,
        /// The port.
        port: u8,
    },
    /// A RoCE port whose GID table has no usable entry: the netdev it is bound to has no address.
    #[error(
        "port {port} is RoCE but has no non-zero RoCE GID (does its netdev have an IP address?)"
    )]
    NoRoceGid {
        /// The port.
        port: u8,
    },
    /// An InfiniBand port without a LID: no subnet manager has configured it (start opensm).
    #[error("InfiniBand port {port} has no LID (is a subnet manager running?)")]
    NoLid {
        /// The port.
        port: u8,
    },
    /// The port is not ACTIVE.
    #[error("port {port} is not active")]
    PortNotActive {
        /// The port.
        port: u8,
    },
    /// The peer's port is on the other link layer: InfiniBand and Ethernet cannot talk.
    #[error("link layer mismatch: ours is {ours}, the peer's is {theirs}")]
    LinkLayerMismatch {
        /// Our link layer.
        ours: LinkLayer,
        /// The peer's.
        theirs: LinkLayer,
    },
    /// RoCE v1 and v2 packets are not interchangeable: both sides must use the same version
    /// (pick a GID index of the same type on both).
    #[error("RoCE version mismatch: our GID is {ours}, the peer's is {theirs}")]
    RoceVersionMismatch {
        /// Our GID's type.
        ours: GidType,
        /// The peer's.
        theirs: GidType,
    },
    /// The peer sent an address that cannot be used (a zero LID on InfiniBand, a zero GID where a
    /// GRH is needed, an MTU below 256).
    #[error("the peer's {0} is unusable")]
    BadRemote(&'static str),
    /// A global route is needed (forced, or the peer is in another subnet) but our port has no
    /// GID to put in the GRH.
    #[error("a global route is needed but our port has no GID")]
    NoLocalGid,
}

fn is_zero(gid: &[u8; 16]) -> bool {
    gid.iter().all(|&b| b == 0)
}

fn is_ipv4_mapped(gid: &[u8; 16]) -> bool {
    gid[..10].iter().all(|&b| b == 0) && gid[10] == 0xff && gid[11] == 0xff
}

fn is_link_local(gid: &[u8; 16]) -> bool {
    gid[0] == 0xfe && gid[1] & 0xc0 == 0x80
}

fn subnet_prefix(gid: &[u8; 16]) -> [u8; 8] {
    let mut p = [0u8; 8];
    p.copy_from_slice(&gid[..8]);
    p
}

/// Our address on `port`: see the [module docs](self) for the rules. `gid_index` is the
/// operator's choice; `prefer` the GID of the local address the side channel uses (a tie-break
/// among RoCE GIDs of equal rank; ignored on InfiniBand).
pub fn choose_local(
    port: &PortAttrs,
    gid_index: Option<u8>,
    prefer: Option<[u8; 16]>,
) -> Result<LocalAddress, AddressingError> {
    let p = port.port;
    if !port.active {
        return Err(AddressingError::PortNotActive { port: p });
    }
    let chosen = match gid_index {
        Some(index) => {
            if u32::from(index) >= port.gid_table_len {
                return Err(AddressingError::GidIndexOutOfRange {
                    index,
                    port: p,
                    table_len: port.gid_table_len,
                });
            }
            let e = port
                .gids
                .iter()
                .find(|e| e.index == index)
                .ok_or(AddressingError::GidUnreadable { index, port: p })?;
            if is_zero(&e.gid) {
                return Err(AddressingError::ZeroGid { index, port: p });
            }
            Some(*e)
        }
        None => match port.link_layer {
            // The port GID: index 0 when set, else the first set entry (used only for a GRH).
            LinkLayer::InfiniBand => port
                .gids
                .iter()
                .filter(|e| !is_zero(&e.gid))
                .min_by_key(|e| (e.index != 0, e.index))
                .copied(),
            LinkLayer::Ethernet => Some(
                port.gids
                    .iter()
                    .filter(|e| !is_zero(&e.gid) && e.kind != GidType::Ib)
                    .min_by_key(|e| roce_rank(e, prefer))
                    .copied()
                    .ok_or(AddressingError::NoRoceGid { port: p })?,
            ),
        },
    };
    let lid = match port.link_layer {
        LinkLayer::InfiniBand if port.lid == 0 => return Err(AddressingError::NoLid { port: p }),
        LinkLayer::InfiniBand => port.lid,
        LinkLayer::Ethernet => 0,
    };
    let (sgid_index, gid, gid_type) = match chosen {
        Some(e) => (e.index, e.gid, e.kind),
        None => (0, [0; 16], GidType::Ib),
    };
    Ok(LocalAddress {
        link_layer: port.link_layer,
        lid,
        sgid_index,
        gid,
        gid_type,
        mtu: port.active_mtu,
        global: gid_index.is_some() && port.link_layer == LinkLayer::InfiniBand,
    })
}

/// Sort key of a RoCE GID entry: lower is better (see the module docs).
fn roce_rank(e: &GidEntry, prefer: Option<[u8; 16]>) -> (u8, u8, bool, u8) {
    let version = match e.kind {
        GidType::RoceV2 => 0,
        _ => 1,
    };
    let family = if is_ipv4_mapped(&e.gid) {
        0
    } else if !is_link_local(&e.gid) {
        1
    } else {
        2
    };
    (version, family, prefer != Some(e.gid), e.index)
}

/// The RTR route from `local` to `remote`: see the [module docs](self).
pub fn route(local: &LocalAddress, remote: &RemoteAddress) -> Result<Route, AddressingError> {
    if local.link_layer != remote.link_layer {
        return Err(AddressingError::LinkLayerMismatch {
            ours: local.link_layer,
            theirs: remote.link_layer,
        });
    }
    if remote.mtu < 256 {
        return Err(AddressingError::BadRemote("MTU"));
    }
    let mtu = local.mtu.min(remote.mtu);
    let grh = Grh {
        sgid_index: local.sgid_index,
        dgid: remote.gid,
        hop_limit: HOP_LIMIT,
    };
    match local.link_layer {
        LinkLayer::Ethernet => {
            if is_zero(&remote.gid) {
                return Err(AddressingError::BadRemote("GID"));
            }
            let v2 = |t| t == GidType::RoceV2;
            if v2(local.gid_type) != v2(remote.gid_type) {
                return Err(AddressingError::RoceVersionMismatch {
                    ours: local.gid_type,
                    theirs: remote.gid_type,
                });
            }
            Ok(Route {
                dlid: 0,
                grh: Some(grh),
                mtu,
            })
        }
        LinkLayer::InfiniBand => {
            if remote.lid == 0 {
                return Err(AddressingError::BadRemote("LID"));
            }
            let other_subnet = !is_zero(&local.gid)
                && !is_zero(&remote.gid)
                && subnet_prefix(&local.gid) != subnet_prefix(&remote.gid);
            let global = local.global || remote.global || other_subnet;
            if global && is_zero(&local.gid) {
                return Err(AddressingError::NoLocalGid);
            }
            if global && is_zero(&remote.gid) {
                return Err(AddressingError::BadRemote("GID"));
            }
            Ok(Route {
                dlid: remote.lid,
                grh: global.then_some(grh),
                mtu,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(a: u8, b: u8, c: u8, d: u8) -> [u8; 16] {
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d]
    }

    fn v6(prefix: [u8; 8], iid: u8) -> [u8; 16] {
        let mut g = [0u8; 16];
        g[..8].copy_from_slice(&prefix);
        g[15] = iid;
        g
    }

    const LINK_LOCAL: [u8; 8] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0];
    const GLOBAL: [u8; 8] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1];
    const SUBNET_B: [u8; 8] = [0xfe, 0x80, 0, 0, 0, 0, 0, 2];

    fn entry(index: u8, gid: [u8; 16], kind: GidType) -> GidEntry {
        GidEntry { index, gid, kind }
    }

    /// A RoCE port as `show_gids` prints it on a NIC with an IPv6 link-local, a global IPv6 and
    /// two IPv4 addresses, each as v1 and v2, and an unused entry in the middle.
    fn roce_port() -> PortAttrs {
        use GidType::*;
        PortAttrs {
            port: 1,
            link_layer: LinkLayer::Ethernet,
            active: true,
            lid: 0,
            active_mtu: 4096,
            gid_table_len: 16,
            gids: vec![
                entry(0, v6(LINK_LOCAL, 1), RoceV1),
                entry(1, v6(LINK_LOCAL, 1), RoceV2),
                entry(2, v6(GLOBAL, 1), RoceV1),
                entry(3, v6(GLOBAL, 1), RoceV2),
                entry(4, [0; 16], RoceV2),
                entry(5, mapped(10, 0, 0, 7), RoceV1),
                entry(6, mapped(10, 0, 0, 7), RoceV2),
                entry(7, mapped(192, 168, 1, 7), RoceV1),
                entry(8, mapped(192, 168, 1, 7), RoceV2),
            ],
        }
    }

    fn ib_port(lid: u16) -> PortAttrs {
        PortAttrs {
            port: 1,
            link_layer: LinkLayer::InfiniBand,
            active: true,
            lid,
            active_mtu: 4096,
            gid_table_len: 128,
            gids: vec![
                entry(0, v6(LINK_LOCAL, 0x11), GidType::Ib),
                entry(1, [0; 16], GidType::Ib),
                entry(2, v6(SUBNET_B, 0x11), GidType::Ib),
            ],
        }
    }

    fn remote_of(l: &LocalAddress) -> RemoteAddress {
        l.as_remote()
    }

    #[test]
    fn roce_prefers_v2_ipv4_mapped_then_the_side_channel_address() {
        let p = roce_port();
        let a = choose_local(&p, None, None).unwrap();
        assert_eq!((a.sgid_index, a.gid_type), (6, GidType::RoceV2));
        assert_eq!((a.lid, a.global, a.mtu), (0, false, 4096));
        // Among IPv4-mapped v2 entries, the one holding the side channel's address.
        let a = choose_local(&p, None, Some(mapped(192, 168, 1, 7))).unwrap();
        assert_eq!(a.sgid_index, 8);
        // A preferred address only present as v1 does not beat a v2 entry.
        let mut q = p.clone();
        q.gids.retain(|e| e.index != 8);
        assert_eq!(
            choose_local(&q, None, Some(mapped(192, 168, 1, 7)))
                .unwrap()
                .sgid_index,
            6
        );
    }

    #[test]
    fn roce_falls_back_to_ipv6_v2_then_link_local_then_v1() {
        let mut p = roce_port();
        p.gids.retain(|e| !is_ipv4_mapped(&e.gid));
        assert_eq!(choose_local(&p, None, None).unwrap().sgid_index, 3);
        p.gids.retain(|e| e.index != 3);
        assert_eq!(choose_local(&p, None, None).unwrap().sgid_index, 1);
        p.gids.retain(|e| e.kind == GidType::RoceV1);
        let a = choose_local(&p, None, None).unwrap();
        assert_eq!((a.sgid_index, a.gid_type), (2, GidType::RoceV1));
    }

    #[test]
    fn roce_without_a_usable_gid_is_a_typed_error() {
        let mut p = roce_port();
        for e in &mut p.gids {
            e.gid = [0; 16];
        }
        assert_eq!(
            choose_local(&p, None, None),
            Err(AddressingError::NoRoceGid { port: 1 })
        );
        p.gids.clear();
        assert_eq!(
            choose_local(&p, None, None),
            Err(AddressingError::NoRoceGid { port: 1 })
        );
    }

    #[test]
    fn an_explicit_gid_index_is_validated() {
        let p = roce_port();
        let a = choose_local(&p, Some(5), None).unwrap();
        assert_eq!(
            (a.sgid_index, a.gid_type, a.gid),
            (5, GidType::RoceV1, mapped(10, 0, 0, 7))
        );
        assert!(
            !a.global,
            "RoCE always has a GRH; the flag is for InfiniBand"
        );
        assert_eq!(
            choose_local(&p, Some(16), None),
            Err(AddressingError::GidIndexOutOfRange {
                index: 16,
                port: 1,
                table_len: 16
            })
        );
        assert_eq!(
            choose_local(&p, Some(4), None),
            Err(AddressingError::ZeroGid { index: 4, port: 1 })
        );
        assert_eq!(
            choose_local(&p, Some(12), None),
            Err(AddressingError::GidUnreadable { index: 12, port: 1 })
        );
        let mut down = p.clone();
        down.active = false;
        assert_eq!(
            choose_local(&down, None, None),
            Err(AddressingError::PortNotActive { port: 1 })
        );
    }

    #[test]
    fn infiniband_uses_the_lid_and_no_grh_within_a_subnet() {
        let a = choose_local(&ib_port(7), None, Some(mapped(10, 0, 0, 7))).unwrap();
        assert_eq!(
            (a.link_layer, a.lid, a.sgid_index, a.global),
            (LinkLayer::InfiniBand, 7, 0, false)
        );
        let b = choose_local(&ib_port(9), None, None).unwrap();
        let r = route(&a, &remote_of(&b)).unwrap();
        assert_eq!(
            r,
            Route {
                dlid: 9,
                grh: None,
                mtu: 4096
            }
        );
        assert_eq!(
            choose_local(&ib_port(0), None, None),
            Err(AddressingError::NoLid { port: 1 })
        );
    }

    #[test]
    fn infiniband_uses_a_grh_across_subnets_or_when_forced() {
        let a = choose_local(&ib_port(7), None, None).unwrap();
        // The peer's port GID has another subnet prefix: behind a router.
        let mut b = remote_of(&choose_local(&ib_port(9), None, None).unwrap());
        b.gid = v6(SUBNET_B, 0x22);
        let r = route(&a, &b).unwrap();
        assert_eq!(r.dlid, 9);
        assert_eq!(
            r.grh,
            Some(Grh {
                sgid_index: 0,
                dgid: b.gid,
                hop_limit: HOP_LIMIT
            })
        );
        // Forced by our GID index, or by the peer's.
        let forced = choose_local(&ib_port(7), Some(2), None).unwrap();
        assert!(forced.global);
        let same = remote_of(&choose_local(&ib_port(9), None, None).unwrap());
        assert_eq!(route(&forced, &same).unwrap().grh.unwrap().sgid_index, 2);
        let r = route(&a, &remote_of(&forced)).unwrap();
        assert_eq!(r.grh.unwrap().sgid_index, 0, "the peer asked for a GRH");
        // A GRH with a zero GID on either side cannot work.
        let mut no_gid = same;
        no_gid.gid = [0; 16];
        no_gid.global = true;
        assert_eq!(route(&a, &no_gid), Err(AddressingError::BadRemote("GID")));
        no_gid.lid = 0;
        assert_eq!(route(&a, &no_gid), Err(AddressingError::BadRemote("LID")));
        assert_eq!(
            choose_local(&ib_port(7), Some(1), None),
            Err(AddressingError::ZeroGid { index: 1, port: 1 })
        );
    }

    #[test]
    fn route_takes_the_smaller_mtu_and_refuses_mismatches() {
        let a = choose_local(&roce_port(), None, None).unwrap();
        let mut b = remote_of(&a);
        b.mtu = 1024;
        let r = route(&a, &b).unwrap();
        assert_eq!((r.mtu, r.dlid), (1024, 0));
        assert_eq!(r.grh.unwrap().sgid_index, 6);
        b.mtu = 100;
        assert_eq!(route(&a, &b), Err(AddressingError::BadRemote("MTU")));
        // InfiniBand against Ethernet, both ways round.
        let ib = choose_local(&ib_port(7), None, None).unwrap();
        let e = route(&a, &remote_of(&ib)).unwrap_err();
        assert_eq!(
            e,
            AddressingError::LinkLayerMismatch {
                ours: LinkLayer::Ethernet,
                theirs: LinkLayer::InfiniBand
            }
        );
        assert!(e.to_string().contains("InfiniBand") && e.to_string().contains("Ethernet"));
        assert!(matches!(
            route(&ib, &remote_of(&a)),
            Err(AddressingError::LinkLayerMismatch { .. })
        ));
        // RoCE v1 against v2.
        let v1 = choose_local(&roce_port(), Some(5), None).unwrap();
        assert_eq!(
            route(&a, &remote_of(&v1)),
            Err(AddressingError::RoceVersionMismatch {
                ours: GidType::RoceV2,
                theirs: GidType::RoceV1
            })
        );
        let mut zero = remote_of(&a);
        zero.gid = [0; 16];
        assert_eq!(route(&a, &zero), Err(AddressingError::BadRemote("GID")));
    }

    #[test]
    fn raw_values_map_or_are_refused() {
        assert_eq!(LinkLayer::from_raw(0), Some(LinkLayer::InfiniBand));
        assert_eq!(LinkLayer::from_raw(2), Some(LinkLayer::Ethernet));
        assert_eq!(LinkLayer::from_raw(3), None);
        for l in [LinkLayer::InfiniBand, LinkLayer::Ethernet] {
            assert_eq!(LinkLayer::from_wire(l.to_wire()), Some(l));
        }
        assert_eq!(LinkLayer::from_wire(0), None);
        for t in [GidType::Ib, GidType::RoceV1, GidType::RoceV2] {
            assert_eq!(GidType::from_wire(t.to_wire()), Some(t));
        }
        assert_eq!(GidType::from_raw(3), None);
        // ibv_query_gid_type's sysfs numbering, as soft-RoCE (RoCE v2 only) reports it: 1.
        assert_eq!(
            GidType::from_sysfs(1, LinkLayer::Ethernet),
            Some(GidType::RoceV2)
        );
        assert_eq!(
            GidType::from_sysfs(0, LinkLayer::Ethernet),
            Some(GidType::RoceV1)
        );
        assert_eq!(
            GidType::from_sysfs(0, LinkLayer::InfiniBand),
            Some(GidType::Ib)
        );
        assert_eq!(GidType::from_sysfs(1, LinkLayer::InfiniBand), None);
        assert_eq!(GidType::from_sysfs(2, LinkLayer::Ethernet), None);
    }
}
