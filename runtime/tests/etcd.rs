//! Membership in a real etcd on loopback (feature `etcd`): join, leave, lease expiry after a
//! worker process is SIGKILLed, etcd restarted underneath, etcd unreachable at start.
//!
//! Each test starts its own `etcd` (Debian's `etcd-server`; `scripts/deps.sh` installs it) on
//! free loopback ports with a temporary data directory, killed when the test ends. Without the
//! binary the tests say so and pass, except under CI (`CI=true`), where that is a failure.

use genie_runtime::cluster::{DeviceKind, Role};
use genie_runtime::membership::{
    Discovery, Member, MemberEvent, MemberWatch, MembershipConfig, Registration,
};
use genie_runtime::RuntimeError;
use genie_transport::Backend;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(2);
/// What a lease may take past its TTL to be noticed expired (etcd checks expiry every 500 ms;
/// the watch adds its own delivery).
const SLACK: Duration = Duration::from_secs(3);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A one-member etcd on loopback, killed (and its data removed) on drop.
struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts etcd, or `None` (with the reason printed) where the binary is missing outside CI.
    fn start(tag: &str) -> Option<Self> {
        let present = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !present {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "the `etcd` binary is missing under CI: scripts/test.sh installs it (etcd-server)"
            );
            eprintln!("skipped: no `etcd` binary (Debian: apt-get install etcd-server)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("genie-etcd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut etcd = Self {
            child: None,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
        };
        etcd.launch();
        Some(etcd)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn config(&self, cluster: &str) -> MembershipConfig {
        let mut cfg = MembershipConfig::new(vec![self.url()], cluster);
        cfg.ttl = TTL;
        cfg.connect_timeout = Duration::from_secs(2);
        cfg.request_timeout = Duration::from_secs(2);
        cfg
    }

    /// Starts the process for the first time and waits (bounded) until it answers. Its ports
    /// were free when picked, but another test's socket may take one before etcd binds it: then
    /// etcd exits at once saying so, and it starts again on fresh ports (three tries at most).
    fn launch(&mut self) {
        for _ in 0..2 {
            if self.launch_once() {
                return;
            }
            self.client_port = free_port();
            self.peer_port = free_port();
        }
        assert!(self.launch_once(), "etcd found its ports taken three times");
    }

    /// [`Etcd::launch`] on the ports chosen; `false` when etcd exited because one was taken.
    fn launch_once(&mut self) -> bool {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut cfg = self.config("probe");
            cfg.connect_timeout = Duration::from_millis(500);
            if Discovery::connect(&cfg).is_ok() {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            let log = || std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
            if exited && log().contains("address already in use") {
                self.child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within 20 s; its log: {}",
                log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills etcd, optionally wipes what it stored (leases and keys), and starts it again on
    /// the same ports (the clients know them).
    fn restart(&mut self, wipe: bool) {
        self.kill();
        if wipe {
            std::fs::remove_dir_all(self.dir.join("data")).unwrap();
        }
        assert!(
            self.launch_once(),
            "etcd's ports were taken while it was down"
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `genie worker` process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn member(name: &str, role: Role) -> Member {
    Member {
        name: name.into(),
        address: SocketAddr::from(([127, 0, 0, 1], free_port())),
        backend: Backend::Tcp,
        devices: vec![DeviceKind::Cpu],
        role,
    }
}

/// The next event within `limit`, failing the test otherwise.
fn expect_event(watch: &MemberWatch, limit: Duration, what: &str) -> MemberEvent {
    watch
        .next(limit)
        .unwrap_or_else(|| panic!("no event within {limit:?}: expected {what}"))
}

/// A 2-layer GPT-2 of width 64 and the given context, seeded weights: quick on any worker.
fn tiny_gpt2(context: usize) -> genie_scheduler::builders::Gpt2Config {
    genie_scheduler::builders::Gpt2Config {
        layers: 2,
        hidden: 64,
        heads: 2,
        vocab: 256,
        context,
        ..Default::default()
    }
}

/// Waits (30 s at most) for `name`'s join as the watch's next event.
fn expect_join(watch: &MemberWatch, name: &str) {
    match expect_event(watch, Duration::from_secs(30), name) {
        MemberEvent::Joined(m) => assert_eq!(m.name, name),
        other => panic!("expected {name} to join, got {other:?}"),
    }
}

/// Polls `f` every 100 ms until it holds, for at most `limit`.
fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `genie worker --etcd` for `name` on a free loopback port.
fn worker_process(etcd: &Etcd, cluster: &str, name: &str, role: &str, secret: &PathBuf) -> Proc {
    let listen = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_genie"))
        .args(["worker", "--etcd", &etcd.url(), "--cluster-name", cluster])
        .args(["--name", name, "--role", role, "--listen", &listen])
        .args(["--lease-ttl-secs", &TTL.as_secs().to_string()])
        .arg("--secret-file")
        .arg(secret)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

fn secret_file(etcd: &Etcd, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = etcd.dir.join("cluster.secret");
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Every value stored under `prefix`, read with the client directly.
fn raw_values(etcd: &Etcd, prefix: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([etcd.url()], None)
            .await
            .unwrap();
        let opts = etcd_client::GetOptions::new().with_prefix();
        let resp = c.get(prefix, Some(opts)).await.unwrap();
        resp.kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .collect()
    })
}

#[test]
fn join_is_listed_and_watched_and_an_orderly_leave_is_seen_at_once() {
    let Some(etcd) = Etcd::start("join") else {
        return;
    };
    let cfg = etcd.config("join");
    let discovery = Discovery::connect(&cfg).unwrap();
    assert!(matches!(
        discovery.cluster(None, false),
        Err(RuntimeError::NoMembers { .. })
    ));
    let watch = discovery.watch().unwrap();
    assert!(watch.initial.is_empty());

    let a = member("a", Role::Prefill);
    let b = member("b", Role::Decode);
    let ra = Registration::start(&cfg, &a).unwrap();
    let rb = Registration::start(&cfg, &b).unwrap();
    assert_eq!(ra.key(), "/genie/join/workers/a");
    let mut joined = vec![];
    for _ in 0..2 {
        match expect_event(&watch, Duration::from_secs(5), "a join") {
            MemberEvent::Joined(m) => joined.push(m),
            other => panic!("expected a join, got {other:?}"),
        }
    }
    joined.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(joined, vec![a.clone(), b.clone()]);

    // Listed as a cluster a driver connects to: sorted by name, roles kept.
    let cluster = discovery.cluster(None, false).unwrap();
    let names: Vec<&str> = cluster.workers.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(cluster.workers[0].role, Role::Prefill);
    assert_eq!(cluster.workers[1].address, b.address);
    // Another cluster's prefix sees none of them.
    let other = Discovery::connect(&etcd.config("join2")).unwrap();
    assert!(other.members().unwrap().is_empty());

    // An orderly stop revokes the lease: the leave is seen well before the TTL.
    let t0 = Instant::now();
    ra.stop().unwrap();
    assert_eq!(
        expect_event(&watch, TTL, "a's leave"),
        MemberEvent::Left { name: "a".into() }
    );
    assert!(t0.elapsed() < TTL, "{:?}", t0.elapsed());
    assert_eq!(discovery.members().unwrap(), vec![b.clone()]);
    // A re-join (new details) is reported as a join.
    let a2 = member("a", Role::Both);
    let _ra2 = Registration::start(&cfg, &a2).unwrap();
    assert_eq!(
        expect_event(&watch, Duration::from_secs(5), "a's re-join"),
        MemberEvent::Joined(a2)
    );
    drop(rb);
    assert_eq!(
        expect_event(&watch, TTL, "b's leave on drop"),
        MemberEvent::Left { name: "b".into() }
    );
}

#[test]
fn a_sigkilled_worker_process_leaves_when_its_lease_expires() {
    let Some(etcd) = Etcd::start("kill") else {
        return;
    };
    let cfg = etcd.config("kill");
    let secret = "not-for-etcd-6b1d0c5e";
    let file = secret_file(&etcd, secret);
    let discovery = Discovery::connect(&cfg).unwrap();
    let watch = discovery.watch().unwrap();
    let mut proc = worker_process(&etcd, "kill", "w1", "decode", &file);
    let m = match expect_event(&watch, Duration::from_secs(30), "the worker's join") {
        MemberEvent::Joined(m) => m,
        other => panic!("expected a join, got {other:?}"),
    };
    assert_eq!(m.name, "w1");
    assert_eq!(m.role, Role::Decode);
    assert_eq!(m.backend, Backend::Tcp);
    assert!(m.address.ip().is_loopback() && m.address.port() != 0);
    // What etcd holds says where the worker is, never the secret.
    let values = raw_values(&etcd, &cfg.prefix());
    assert_eq!(values.len(), 1);
    assert!(!values[0].contains(secret), "{}", values[0]);
    // The lease is kept alive: still listed after two TTLs.
    std::thread::sleep(2 * TTL);
    assert_eq!(discovery.members().unwrap(), vec![m.clone()]);
    assert!(watch.next(Duration::ZERO).is_none());

    // SIGKILL: no deregistration; the lease runs out.
    let t0 = Instant::now();
    proc.0.kill().unwrap();
    proc.0.wait().unwrap();
    assert_eq!(
        expect_event(&watch, TTL + SLACK, "the killed worker's leave"),
        MemberEvent::Left { name: "w1".into() }
    );
    eprintln!("leave seen {:?} after SIGKILL (TTL {TTL:?})", t0.elapsed());
    assert!(discovery.members().unwrap().is_empty());
}

#[test]
fn workers_register_again_after_etcd_restarts_without_its_data() {
    let Some(mut etcd) = Etcd::start("restart") else {
        return;
    };
    let cfg = etcd.config("restart");
    let file = secret_file(&etcd, "restart-secret");
    let a = member("a", Role::Prefill);
    let ra = Registration::start(&cfg, &a).unwrap();
    let mut proc = worker_process(&etcd, "restart", "w1", "both", &file);
    let listed = |names: &[&str]| {
        let Ok(d) = Discovery::connect(&cfg) else {
            return false;
        };
        d.members()
            .is_ok_and(|ms| ms.iter().map(|m| m.name.as_str()).eq(names.iter().copied()))
    };
    eventually(Duration::from_secs(30), "a and w1 listed", || {
        listed(&["a", "w1"])
    });
    let lease = ra.lease_id();

    // etcd comes back empty (a new member, a lost disk): both register again by themselves.
    etcd.restart(true);
    eventually(
        TTL + Duration::from_secs(10),
        "a and w1 listed again after the restart",
        || listed(&["a", "w1"]),
    );
    assert!(ra.registrations() >= 2, "{}", ra.registrations());
    assert_ne!(ra.lease_id(), lease);
    assert!(
        proc.0.try_wait().unwrap().is_none(),
        "the worker process exited when etcd restarted"
    );
    // The new registrations are kept alive, not one-offs.
    std::thread::sleep(2 * TTL);
    assert!(listed(&["a", "w1"]));

    // etcd restarted with its data: the records are there, and stay.
    etcd.restart(false);
    eventually(
        TTL + Duration::from_secs(10),
        "listed after a restart that kept the data",
        || listed(&["a", "w1"]),
    );
    std::thread::sleep(2 * TTL);
    assert!(listed(&["a", "w1"]));
    ra.stop().unwrap();
}

#[test]
fn a_watch_follows_etcd_through_a_restart() {
    let Some(mut etcd) = Etcd::start("watch") else {
        return;
    };
    let cfg = etcd.config("watch");
    let a = member("a", Role::Both);
    let _ra = Registration::start(&cfg, &a).unwrap();
    let discovery = Discovery::connect(&cfg).unwrap();
    let watch = discovery.watch().unwrap();
    assert_eq!(watch.initial, vec![a.clone()]);
    etcd.restart(true);
    // A worker that registers on the new etcd is reported, whatever else the watch saw
    // (`a` may be seen leaving and joining again around its re-registration).
    let _rb = Registration::start(&cfg, &member("b", Role::Both)).unwrap();
    let deadline = Instant::now() + TTL + Duration::from_secs(10);
    let mut seen_b = false;
    while !seen_b {
        let left = deadline.saturating_duration_since(Instant::now());
        match expect_event(&watch, left, "b's join after the restart") {
            MemberEvent::Joined(m) if m.name == "b" => seen_b = true,
            _ => {}
        }
    }
    eventually(Duration::from_secs(10), "a and b listed", || {
        discovery
            .members()
            .is_ok_and(|ms| ms.len() == 2 && ms[0] == a)
    });
}

#[test]
fn unreachable_etcd_is_a_quick_typed_error() {
    // Nothing listens on this port (bound, then released).
    let url = format!("http://127.0.0.1:{}", free_port());
    let mut cfg = MembershipConfig::new(vec![url.clone()], "none");
    cfg.connect_timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let e = Registration::start(&cfg, &member("a", Role::Both))
        .err()
        .expect("registered with no etcd");
    assert!(matches!(e, RuntimeError::EtcdUnreachable { .. }), "{e:?}");
    assert!(e.to_string().contains(&url), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(matches!(
        Discovery::connect(&cfg),
        Err(RuntimeError::EtcdUnreachable { .. })
    ));

    // The command line says so and exits.
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_genie"))
        .args(["worker", "--etcd", &url, "--cluster-name", "none"])
        .args([
            "--name",
            "w0",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unreachable"), "{stderr}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[test]
fn workers_found_in_etcd_serve_a_model_and_a_new_one_is_used_without_a_restart() {
    use genie_runtime::driver::Driver;
    use genie_runtime::models::{generate, prompt};
    use genie_runtime::plan::Placement;
    use genie_runtime::proto::WeightSpec;
    use genie_scheduler::graph::Graph;

    let Some(etcd) = Etcd::start("serve") else {
        return;
    };
    let cfg = etcd.config("serve");
    let secret = "serve-secret-0a9f";
    let file = secret_file(&etcd, secret);
    let discovery = Discovery::connect(&cfg).unwrap();
    let watch = discovery.watch().unwrap();
    let model = tiny_gpt2(64);
    let p = prompt(8, model.vocab);
    let joined = |name: &str| expect_join(&watch, name);

    let _w0 = worker_process(&etcd, "serve", "w0", "prefill", &file);
    joined("w0");
    // A driver without the secret is refused by the worker (etcd did not give it away).
    let keyless = discovery.cluster(None, false).unwrap();
    assert!(Driver::connect(&keyless, WeightSpec::Seeded(3)).is_err());
    let one_worker = discovery.cluster(Some(secret.into()), false).unwrap();
    assert_eq!(one_worker.workers.len(), 1);
    let mut d = Driver::connect(&one_worker, WeightSpec::Seeded(3)).unwrap();
    let one = |g: &Graph| Ok(Placement::single(g));
    let reference = generate(&mut d, &model, &p, 3, 0, one, one).unwrap();
    drop(d); // the session ends; the worker serves on

    // w1 joins the running cluster; w0 learns of it at the next driver's Setup.
    let _w1 = worker_process(&etcd, "serve", "w1", "decode", &file);
    joined("w1");
    let two_workers = discovery.cluster(Some(secret.into()), false).unwrap();
    assert_eq!(two_workers.workers.len(), 2);
    let mut d = Driver::connect(&two_workers, WeightSpec::Seeded(3)).unwrap();
    let two = |g: &Graph| Placement::by_layer(g, 2, model.layers);
    let split = generate(&mut d, &model, &p, 3, 1, two, two).unwrap();
    assert_eq!(split.tokens, reference.tokens);
    assert!(split.prefill.counters.bytes_moved > 0);
    drop(d);

    // etcd gone: the workers serve on with the cluster they had (a driver that has its list).
    let mut etcd = etcd;
    etcd.kill();
    let mut d = Driver::connect(&two_workers, WeightSpec::Seeded(3)).unwrap();
    let again = generate(&mut d, &model, &p, 3, 2, two, two).unwrap();
    assert_eq!(again.tokens, reference.tokens);
    etcd.restart(false);
    eventually(
        Duration::from_secs(15),
        "both listed after etcd is back",
        || discovery.members().is_ok_and(|ms| ms.len() == 2),
    );

    // Shut down by the driver, both deregister at once.
    d.shutdown().unwrap();
    // (Around etcd's restart the watch may have reported a worker leaving and joining again.)
    let deadline = Instant::now() + TTL + SLACK;
    let mut left = vec![];
    while left.len() < 2 {
        let wait = deadline.saturating_duration_since(Instant::now());
        match expect_event(&watch, wait, "a leave after the shutdown") {
            MemberEvent::Left { name } => left.push(name),
            MemberEvent::Joined(m) => left.retain(|n| n != &m.name),
        }
    }
    left.sort();
    assert_eq!(left, ["w0", "w1"]);
}

#[test]
fn an_engine_follows_the_membership_through_a_killed_worker_and_a_new_one() {
    use genie_runtime::engine::{Engine, EngineConfig, EngineError, Request};
    use genie_runtime::models::prompt;
    use genie_runtime::proto::WeightSpec;

    let Some(etcd) = Etcd::start("follow") else {
        return;
    };
    let cfg = etcd.config("follow");
    let secret = "follow-secret-77c2";
    let file = secret_file(&etcd, secret);
    let discovery = Discovery::connect(&cfg).unwrap();
    let watch = discovery.watch().unwrap();
    let model = tiny_gpt2(512);
    let p = prompt(8, model.vocab);
    let joined = |name: &str| expect_join(&watch, name);

    // Nobody registered yet: a typed error, not an engine without workers.
    let none = Engine::discover(
        &cfg,
        (Some(secret.into()), false),
        WeightSpec::Seeded(3),
        EngineConfig::disaggregated(model.clone()),
    );
    assert!(
        matches!(none, Err(RuntimeError::NoMembers { .. })),
        "{none:?}"
    );

    let _w0 = worker_process(&etcd, "follow", "w0", "both", &file);
    joined("w0");
    let mut w1 = worker_process(&etcd, "follow", "w1", "decode", &file);
    joined("w1");
    let engine = Engine::discover(
        &cfg,
        (Some(secret.into()), false),
        WeightSpec::Seeded(3),
        EngineConfig::disaggregated(model.clone()),
    )
    .unwrap();
    // Prefill on w0 (role both), decode on w1 (role decode): the KV cache crosses.
    let reference = engine
        .submit(Request::greedy(p.clone(), 6))
        .unwrap()
        .wait()
        .unwrap();
    assert!(reference.timings.kv_bytes > 0, "{:?}", reference.timings);

    // w1 is SIGKILLed while a long request decodes on it: the request fails naming it.
    let mut long = engine.submit(Request::greedy(p.clone(), 480)).unwrap();
    long.next(Duration::from_secs(30)).unwrap();
    w1.0.kill().unwrap();
    w1.0.wait().unwrap();
    let failed = long.wait().expect_err("w1 died under it");
    match &failed {
        EngineError::WorkerFailed { worker, .. } => assert_eq!(worker, "w1", "{failed}"),
        other => panic!("expected WorkerFailed naming w1, got {other:?}"),
    }

    // Its lease expires; the engine then serves on w0 alone (prefill and decode together).
    // Until the engine has seen the leave, a request may still fail naming w1 (a reconnection
    // to the cluster that still lists it runs into the driver's connect timeout first).
    assert_eq!(
        expect_event(&watch, TTL + SLACK, "w1's leave"),
        MemberEvent::Left { name: "w1".into() }
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let alone = loop {
        match engine.submit(Request::greedy(p.clone(), 6)).unwrap().wait() {
            Ok(done) => break done,
            Err(EngineError::WorkerFailed { worker, reason }) if worker == "w1" => {
                assert!(
                    Instant::now() < deadline,
                    "still failing on w1 after 90 s: {reason}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(other) => panic!("unexpected failure on w0 alone: {other:?}"),
        }
    };
    assert_eq!(alone.tokens, reference.tokens);
    assert_eq!(alone.timings.kv_bytes, 0, "co-located on w0");

    // w2 registers as a decode worker: used without a restart (the KV cache crosses again).
    let _w2 = worker_process(&etcd, "follow", "w2", "decode", &file);
    joined("w2");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let done = engine
            .submit(Request::greedy(p.clone(), 6))
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(done.tokens, reference.tokens);
        if done.timings.kv_bytes > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "w2 not used 15 s after it joined"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    engine.shutdown().unwrap();
}
