//! Where tensors live and how many threads compute: `--device` and `--threads`, parsed once.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Result, bail};
use serde::Serialize;
use tch::Device;

static THREADS: AtomicUsize = AtomicUsize::new(0);
static EOT_BATCH: AtomicUsize = AtomicUsize::new(DEFAULT_EOT_BATCH);
static ALLOCATOR_TUNED: AtomicBool = AtomicBool::new(false);

/// Images in one stacked EOT pass unless `--eot-batch` says otherwise. Stacking saves the
/// per-pass overhead of small batches, but a large stack runs slower per image: APGD-EOT-20
/// through AirNet-32-64-128 ran level at 128 and 256 CIFAR images per pass and a quarter
/// slower at 1,024 (`docs/evaluation.md`).
pub const DEFAULT_EOT_BATCH: usize = 256;

/// At most this many images go through the model in one forward/backward when EOT draws of a
/// batch are stacked (a batch of n runs max(1, eot_batch / n) draws per pass): the memory knob
/// of EOT, as the batch size is of the attack.
pub fn eot_batch() -> usize {
    EOT_BATCH.load(Ordering::Relaxed)
}

/// Sets [`eot_batch`] (at least 1).
pub fn set_eot_batch(images: usize) {
    EOT_BATCH.store(images.max(1), Ordering::Relaxed);
}

/// Threads for CPU work (libtorch intra-op, decoding, data workers): `--threads`, else all cores.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Applies the thread count to this process and libtorch; returns it.
pub fn init_threads(requested: Option<usize>) -> usize {
    if let Some(n) = requested {
        THREADS.store(n.max(1), Ordering::Relaxed);
    }
    let n = threads();
    tch::set_num_threads(n as i32);
    n
}

/// Keeps freed tensor memory in the process instead of handing it back to the kernel after
/// every free. glibc's defaults return the top of the heap above 128 KiB and serve blocks above
/// a moving threshold (at most 32 MiB) by fresh `mmap`s, so each attack or training step
/// page-faults its activations in again: APGD-EOT-20 through AirNet-32-64-128 spent a quarter
/// of its time in the kernel, and 5 of its iterations ran 18.5 -> 24.4 img/s with these
/// settings (`docs/evaluation.md`).
/// Left alone when `GLIBC_TUNABLES` sets malloc options (the user's choice wins); returns
/// whether it applied (also in [`engine_info`], which `atop info` prints).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let tuned = !std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."))
        // SAFETY: mallopt only changes allocator parameters; called before the threads start.
        && unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
        };
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let tuned = false;
    ALLOCATOR_TUNED.store(tuned, Ordering::Relaxed);
    tuned
}

/// Arithmetic used for the forward pass: plain f32, or bf16 autocast (weights stay f32; matmuls
/// and convolutions run in bfloat16, reductions and losses in f32), on the CPU or CUDA. `auto`
/// is bf16 where the hardware computes it natively (CUDA; CPUs with AVX512-BF16 or AMX) and
/// f32 elsewhere: on a CPU without them bf16 is emulated and about 10x slower than f32
/// (measured on an AVX2-only EPYC: 608 s against 60 s for the same training run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    Auto,
}

/// Whether this CPU has native bfloat16 arithmetic (Linux /proc/cpuinfo flags).
pub fn cpu_has_bf16() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|t| {
                t.lines().filter(|l| l.starts_with("flags")).any(|l| {
                    l.split_whitespace()
                        .any(|f| f == "avx512_bf16" || f == "amx_bf16")
                })
            })
            .unwrap_or(false)
    })
}

impl Precision {
    /// `auto` made concrete for `device`.
    pub fn resolve(self, device: Device) -> Precision {
        match self {
            Precision::Auto if device.is_cuda() || cpu_has_bf16() => Precision::Bf16,
            Precision::Auto => Precision::F32,
            p => p,
        }
    }
}

/// Waits for the kernels queued on `device`, so that wall-clock time measures them (CUDA runs
/// asynchronously; a no-op on the CPU).
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

unsafe extern "C" {
    fn atop_autocast_enter(cuda: std::ffi::c_int, dtype: std::ffi::c_int) -> std::ffi::c_int;
    fn atop_autocast_exit(cuda: std::ffi::c_int, prev: std::ffi::c_int) -> std::ffi::c_int;
}

/// Runs `f` with autocast for `precision` on `device` (csrc/autocast.cpp).
pub fn autocast<T>(device: Device, precision: Precision, f: impl FnOnce() -> T) -> T {
    if precision.resolve(device) == Precision::F32 {
        return f();
    }
    let cuda = device.is_cuda() as std::ffi::c_int;
    // SAFETY: plain C functions without pointers; libtorch errors are caught on the C++ side.
    let prev = unsafe { atop_autocast_enter(cuda, 0) };
    assert!(
        prev >= 0,
        "libtorch refused to enable bf16 autocast on {device:?}"
    );
    let out = f();
    // SAFETY: as above.
    let rc = unsafe { atop_autocast_exit(cuda, prev) };
    assert!(rc == 0, "libtorch failed to leave autocast");
    out
}

/// `auto | cpu | cuda | cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("unknown device '{s}': expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl DeviceSpec {
    /// The libtorch device; CUDA asked for but not usable is an error, not a silent fallback.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceSpec::Auto => Ok(Device::cuda_if_available()),
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(i) => {
                let n = tch::Cuda::device_count() as usize;
                if n == 0 {
                    bail!(
                        "`device` cuda:{i}: libtorch sees no CUDA device (use `device` cpu or auto)"
                    );
                }
                if i >= n {
                    bail!(
                        "`device` cuda:{i}: only {n} CUDA device(s) visible (cuda:0..cuda:{})",
                        n - 1
                    );
                }
                Ok(Device::Cuda(i))
            }
        }
    }
}

/// The Python of the venv that scripts/setup.sh made (reference scripts run with it):
/// `$ATOP_VENV_PYTHON`, else `$ATOP_VENV/bin/python`, else `~/.cache/atop/venv/bin/python`.
pub fn venv_python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("ATOP_VENV_PYTHON") {
        return p.into();
    }
    let venv = std::env::var_os("ATOP_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/atop/venv")
        });
    venv.join("bin/python")
}

/// The CPU's model name (Linux /proc/cpuinfo), else the architecture: every speed and every
/// run time depends on it, so reports name it.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The folder of the `libtorch_cpu.so` mapped into this process (Linux's /proc/self/maps),
/// else the one the build linked against.
fn loaded_libtorch() -> String {
    std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|maps| {
            maps.lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .find(|p| p.ends_with("/libtorch_cpu.so"))
                .and_then(|p| std::path::Path::new(p).parent())
                .map(|d| d.display().to_string())
        })
        .unwrap_or_else(|| env!("ATOP_LIBTORCH_LIB").to_string())
}

/// What this build links and what it can see; `atop info` prints it.
#[derive(Debug, Serialize)]
pub struct EngineInfo {
    pub atop_version: &'static str,
    pub torch_version: &'static str,
    /// The folder of the libtorch this process loaded, which is not the build's when a binary
    /// runs on another machine.
    pub libtorch_lib: String,
    pub cuda_available: bool,
    pub cuda_devices: i64,
    pub cudnn_available: bool,
    pub threads: usize,
    pub cpu: String,
    /// Whether [`tune_allocator`] set glibc's malloc thresholds in this process.
    pub allocator_tuned: bool,
}

pub fn engine_info() -> EngineInfo {
    EngineInfo {
        atop_version: env!("CARGO_PKG_VERSION"),
        torch_version: env!("ATOP_TORCH_VERSION"),
        libtorch_lib: loaded_libtorch(),
        cuda_available: tch::Cuda::is_available(),
        cuda_devices: tch::Cuda::device_count(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        threads: threads(),
        cpu: cpu_model(),
        allocator_tuned: ALLOCATOR_TUNED.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("auto".parse(), Ok(DeviceSpec::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!(
            "cuda:x"
                .parse::<DeviceSpec>()
                .unwrap_err()
                .contains("cuda:x")
        );
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn bf16_autocast_runs_convolutions_in_bf16_and_restores_f32() {
        let x = tch::Tensor::rand([2, 3, 8, 8], (tch::Kind::Float, Device::Cpu));
        let w = tch::Tensor::rand([4, 3, 3, 3], (tch::Kind::Float, Device::Cpu));
        let conv = |x: &tch::Tensor| x.conv2d(&w, None::<tch::Tensor>, [1, 1], [1, 1], [1, 1], 1);
        let y = autocast(Device::Cpu, Precision::Bf16, || conv(&x));
        assert_eq!(y.kind(), tch::Kind::BFloat16);
        let f = conv(&x);
        assert_eq!(f.kind(), tch::Kind::Float);
        let diff = (y.to_kind(tch::Kind::Float) - &f)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff > 0.0 && diff < 0.1, "bf16 differs from f32 by {diff}");
        assert_eq!(
            autocast(Device::Cpu, Precision::F32, || conv(&x)).kind(),
            tch::Kind::Float
        );
    }

    #[test]
    fn cpu_always_resolves_and_missing_cuda_is_an_error() {
        assert_eq!(DeviceSpec::Cpu.resolve().unwrap(), Device::Cpu);
        if tch::Cuda::device_count() == 0 {
            let err = DeviceSpec::Cuda(0).resolve().unwrap_err().to_string();
            assert!(err.contains("no CUDA device"), "{err}");
            assert_eq!(DeviceSpec::Auto.resolve().unwrap(), Device::Cpu);
        }
    }
}
