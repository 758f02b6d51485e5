//! Device regions end to end: checked transfers and their speed beside host regions.
//!
//! `cargo run --release -p genie-transport --features cuda --example device_perf` (what
//! `scripts/gpu-check.sh` runs on a GPU machine; `-- --backend rdma` on an RDMA device, `--
//! --stand-in` to run the same code on host memory standing in for a GPU, anywhere).
//!
//! Two endpoints on loopback. For each size from 1 B to `--max-size` (default 256 MiB) it writes
//! (with a notification) host→device, device→host and device→device, and reads device→device,
//! comparing FNV-1a checksums of what landed with what was sent. Then it measures write
//! bandwidth host→host and device→device at `--bw-size` (default 64 MiB) and the round trip of
//! an 8-byte write on host and on device regions, in the same run, and ends with
//!
//! ```text
//! gpu device_bw_ratio_vs_host=<r> device_write8_us=<l> gpudirect=<dmabuf|peermem|staged>
//! ```
//!
//! Exit status: 0 done; 1 a check failed; 3 skipped (no GPU: the reason is printed; with
//! `GENIE_CUDA_REQUIRE=1` that is exit 1 instead); 4 the backend cannot carry device regions
//! (RDMA without GPUDirect: the reason is printed).

use genie_transport::{
    open, BackendChoice, Connection, HostStandIn, Region, RegionAccess, Transport, TransportConfig,
    TransportError,
};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(120);

struct Args {
    rdma: bool,
    stand_in: bool,
    max_size: usize,
    bw_size: usize,
    gpu: usize,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        rdma: false,
        stand_in: false,
        max_size: 256 << 20,
        bw_size: 64 << 20,
        gpu: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--backend" => match it.next().as_deref() {
                Some("tcp") => a.rdma = false,
                Some("rdma") => a.rdma = true,
                other => return Err(format!("--backend tcp|rdma, not {other:?}")),
            },
            "--stand-in" => a.stand_in = true,
            "--max-size" => a.max_size = num("--max-size")?.max(1),
            "--bw-size" => a.bw_size = num("--bw-size")?.max(8),
            "--gpu" => a.gpu = num("--gpu")?,
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    a.bw_size = a.bw_size.min(a.max_size.max(8));
    Ok(a)
}

/// `len` bytes derived from `seed` (splitmix64 words: fast, and no period a chunking bug could
/// hide in).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed;
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

type Res<T> = Result<T, TransportError>;

struct Bench {
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    ab: Arc<dyn Connection>,
    ba: Arc<dyn Connection>,
    stand_in: bool,
    gpu: usize,
}

impl Bench {
    fn device(&self, t: &Arc<dyn Transport>, len: usize) -> Res<Region> {
        if self.stand_in {
            t.register_device(
                Arc::new(HostStandIn::new(self.gpu, len)?),
                RegionAccess::ReadWrite,
            )
        } else {
            t.alloc_device_region(self.gpu, len)
        }
    }

    fn region(&self, t: &Arc<dyn Transport>, device: bool, len: usize) -> Res<Region> {
        if device {
            self.device(t, len)
        } else {
            t.alloc_region(len)
        }
    }

    /// One checked write (with notification) `src_dev`→`dst_dev` of `len` bytes and a read back
    /// into a region of `src_dev`'s kind; `Ok(false)` when bytes differ.
    fn check(&self, len: usize, src_dev: bool, dst_dev: bool, seed: u64) -> Res<bool> {
        let want = pattern(len, seed);
        let src = self.region(&self.a, src_dev, len)?;
        let dst = self.region(&self.b, dst_dev, len)?;
        src.write(0, &want)?;
        let d = dst.descriptor();
        self.ab.write_notify(&src, 0, &d, 0, len, 7)?.wait(WAIT)?;
        self.ba.recv_notification(WAIT)?;
        let mut got = vec![0u8; len];
        dst.read(0, &mut got)?;
        let written = fnv(&got) == fnv(&want);
        drop(src);
        let back = self.region(&self.a, src_dev, len)?;
        self.ab.read(&back, 0, &d, 0, len)?.wait(WAIT)?;
        back.read(0, &mut got)?;
        let read = fnv(&got) == fnv(&want);
        println!(
            "check {len:>10} B {}->{} write={} read={} fnv={:016x}",
            kind(src_dev),
            kind(dst_dev),
            ok(written),
            ok(read),
            fnv(&want)
        );
        Ok(written && read)
    }

    /// Write bandwidth in GB/s, `len` bytes per write, `src_dev`/`dst_dev` memory.
    fn bandwidth(&self, len: usize, dev: bool) -> Res<f64> {
        let src = self.region(&self.a, dev, len)?;
        let dst = self.region(&self.b, dev, len)?;
        let d = dst.descriptor();
        self.ab.write(&src, 0, &d, 0, len)?.wait(WAIT)?; // warm-up (staging pools, caches)
        let iters = ((1usize << 30) / len).clamp(4, 64);
        let t0 = Instant::now();
        let ops = (0..iters)
            .map(|_| self.ab.write(&src, 0, &d, 0, len))
            .collect::<Res<Vec<_>>>()?;
        for op in ops {
            op.wait(WAIT)?;
        }
        Ok((iters * len) as f64 / t0.elapsed().as_secs_f64() / 1e9)
    }

    /// Median round trip of an 8-byte write, in µs.
    fn write8(&self, dev: bool) -> Res<f64> {
        let src = self.region(&self.a, dev, 8)?;
        let dst = self.region(&self.b, dev, 8)?;
        src.write(0, &[1, 2, 3, 4, 5, 6, 7, 8])?;
        let d = dst.descriptor();
        let mut us = Vec::with_capacity(2000);
        for i in 0..2200 {
            let t0 = Instant::now();
            self.ab.write(&src, 0, &d, 0, 8)?.wait(WAIT)?;
            if i >= 200 {
                us.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        us.sort_by(f64::total_cmp);
        Ok(us[us.len() / 2])
    }
}

fn kind(dev: bool) -> &'static str {
    if dev {
        "device"
    } else {
        "host"
    }
}

fn ok(b: bool) -> &'static str {
    if b {
        "ok"
    } else {
        "MISMATCH"
    }
}

/// Whether an allocation error means "no GPU here" (skip) rather than a failure.
fn no_gpu(e: &TransportError) -> bool {
    match e {
        TransportError::DeviceUnavailable { .. } => true,
        #[cfg(feature = "cuda")]
        TransportError::Cuda(c) => matches!(
            c,
            genie_sys::cuda::CudaError::NoDriver { .. }
                | genie_sys::cuda::CudaError::NoDevice
                | genie_sys::cuda::CudaError::DeviceNotFound { .. }
        ),
        _ => false,
    }
}

fn run(a: &Args) -> Res<ExitCode> {
    let config = TransportConfig {
        backend: if a.rdma {
            BackendChoice::Rdma
        } else {
            BackendChoice::Tcp
        },
        ..TransportConfig::default()
    };
    let server = open(config.clone())?;
    let client = open(config)?;
    let ab = client.connect(server.local_addr())?;
    let ba = server.accept(WAIT)?;
    let bench = Bench {
        a: client,
        b: server,
        ab,
        ba,
        stand_in: a.stand_in,
        gpu: a.gpu,
    };
    let backend = bench.a.backend();
    let probe = match bench.device(&bench.b, 1 << 20) {
        Ok(r) => r,
        Err(e) if no_gpu(&e) => {
            println!("skipped: no GPU: {e}");
            let require = std::env::var("GENIE_CUDA_REQUIRE").is_ok_and(|v| v == "1");
            return Ok(ExitCode::from(if require { 1 } else { 3 }));
        }
        Err(e @ TransportError::GpuDirectUnavailable { .. }) => {
            println!("unsupported: {backend} cannot carry device regions here: {e}");
            return Ok(ExitCode::from(4));
        }
        Err(e) => return Err(e),
    };
    let gpudirect = probe.gpudirect().map_or("none".into(), |g| g.to_string());
    println!(
        "backend={backend} device={} gpudirect={gpudirect}",
        if a.stand_in {
            "stand-in".to_string()
        } else {
            format!("cuda:{}", a.gpu)
        },
    );
    drop(probe);

    let mut sizes = vec![
        1usize,
        8,
        4097,
        (1 << 20) - 1,
        (1 << 20) + 1,
        (16 << 20) + 3,
    ];
    sizes.extend([64 << 20, 256 << 20]);
    sizes.retain(|&s| s < a.max_size);
    sizes.push(a.max_size);
    let mut all_ok = true;
    for (i, &len) in sizes.iter().enumerate() {
        for (j, (s, d)) in [(false, true), (true, false), (true, true)]
            .into_iter()
            .enumerate()
        {
            all_ok &= bench.check(len, s, d, (i * 3 + j) as u64)?;
        }
    }

    let host_bw = bench.bandwidth(a.bw_size, false)?;
    let dev_bw = bench.bandwidth(a.bw_size, true)?;
    let host_lat = bench.write8(false)?;
    let dev_lat = bench.write8(true)?;
    println!(
        "{:<8} {:>12} {:>14}",
        "memory", "write GB/s", "write 8 B us"
    );
    println!("{:<8} {:>12.3} {:>14.2}", "host", host_bw, host_lat);
    println!("{:<8} {:>12.3} {:>14.2}", "device", dev_bw, dev_lat);
    println!(
        "{backend} bw_size={} device_bw_ratio_vs_host={:.3} checks={}",
        a.bw_size,
        dev_bw / host_bw,
        if all_ok { "ok" } else { "FAILED" }
    );
    println!(
        "gpu device_bw_ratio_vs_host={:.3} device_write8_us={:.2} gpudirect={gpudirect}",
        dev_bw / host_bw,
        dev_lat
    );
    Ok(ExitCode::from(if all_ok { 0 } else { 1 }))
}

fn main() -> ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("device_perf: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&a) {
        Ok(code) => code,
        Err(e) => {
            println!("error: {e}");
            ExitCode::from(1)
        }
    }
}
