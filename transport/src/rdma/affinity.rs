//! NUMA affinity of RDMA devices: which further devices ([`crate::config::RdmaConfig::devices`])
//! a connection's lanes use first. A NIC on the node of the CPU that drives it avoids a hop over
//! the inter-socket link for every DMA, so devices on the opening thread's node go first. The
//! kernel says where a device sits (`/sys/class/infiniband/<dev>/device/numa_node`, -1 when it
//! does not know) and where a CPU sits (`/sys/devices/system/cpu/cpu<N>/node<M>`); where either is
//! unknown the configured order stands.

use std::path::Path;

/// The NUMA node of RDMA device `name`, when the kernel knows it.
pub(crate) fn device_node(name: &str) -> Option<i32> {
    // A name from the config: never let it walk out of the class directory.
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    let p = Path::new("/sys/class/infiniband")
        .join(name)
        .join("device/numa_node");
    parse_node(&std::fs::read_to_string(p).ok()?)
}

/// The NUMA node of the CPU this thread runs on now, when the kernel says.
pub(crate) fn current_node() -> Option<i32> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let cpu = cpu_of_stat(&stat)?;
    let dir = std::fs::read_dir(format!("/sys/devices/system/cpu/cpu{cpu}")).ok()?;
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok())
        .next()
}

/// A `numa_node` file's value; -1 (unknown) and garbage are `None`.
fn parse_node(s: &str) -> Option<i32> {
    s.trim().parse::<i32>().ok().filter(|n| *n >= 0)
}

/// The CPU field (39th) of a `/proc/.../stat` line; the command name (field 2, in parentheses)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
fn cpu_of_stat(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name, field 3 is the first: the CPU is field 39, the 37th here.
    rest.split_whitespace().nth(36)?.parse().ok()
}

/// Devices in lane order: those on node `here` first, the others after, each group in the
/// configured order. Unknown nodes (either side) change nothing.
pub(crate) fn order(devices: Vec<(String, Option<i32>)>, here: Option<i32>) -> Vec<String> {
    let (mut near, far): (Vec<_>, Vec<_>) = devices
        .into_iter()
        .partition(|(_, node)| here.is_some() && *node == here);
    near.extend(far);
    near.into_iter().map(|(n, _)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_on_this_node_go_first_in_configured_order() {
        let devs = |v: &[(&str, Option<i32>)]| {
            v.iter()
                .map(|(n, m)| (n.to_string(), *m))
                .collect::<Vec<_>>()
        };
        let d = devs(&[
            ("mlx5_0", Some(0)),
            ("mlx5_1", Some(1)),
            ("rxe0", None),
            ("mlx5_2", Some(1)),
        ]);
        assert_eq!(
            order(d.clone(), Some(1)),
            ["mlx5_1", "mlx5_2", "mlx5_0", "rxe0"]
        );
        assert_eq!(
            order(d.clone(), Some(0)),
            ["mlx5_0", "mlx5_1", "rxe0", "mlx5_2"]
        );
        assert_eq!(order(d, None), ["mlx5_0", "mlx5_1", "rxe0", "mlx5_2"]);
    }

    #[test]
    fn sysfs_values_parse() {
        assert_eq!(parse_node("1\n"), Some(1));
        assert_eq!(parse_node("-1\n"), None);
        assert_eq!(parse_node("x"), None);
        let mut fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        fields[39 - 3] = "7".into();
        let stat = format!("42 (a b) c)) {}", fields.join(" "));
        assert_eq!(cpu_of_stat(&stat), Some(7));
        assert_eq!(cpu_of_stat("garbage"), None);
        assert_eq!(device_node("../../etc"), None);
        // This machine: whatever it says, asking never fails.
        let _ = current_node();
    }
}
