//! Timings measured on this machine (`atop bench ...`): each bench times atop's step and,
//! where there is one, its reference in the same venv (`bench/reference/`: PyTorch,
//! torchattacks) back to back in alternating rounds, and returns rows the CLI prints.

pub mod attacks;
pub mod data;
pub mod finetune;
pub mod models;
pub mod purifier;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tch::Device;

use crate::runtime::synchronize;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Medians of side-by-side timings (rates: higher is faster).
struct Alternated {
    ours: f64,
    theirs: Option<f64>,
    /// The median of each round's ours / theirs.
    ratio: Option<f64>,
}

/// Times atop, then (with `reference`) the reference, back to back in each of `rounds`
/// rounds: the machine's speed drifts over minutes, so only pairs measured together compare.
fn alternate(
    rounds: usize,
    reference: bool,
    ours: &mut dyn FnMut() -> Result<f64>,
    theirs: &mut dyn FnMut() -> Result<f64>,
) -> Result<Alternated> {
    let (mut a, mut b, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let o = ours()?;
        a.push(o);
        if reference {
            let t = theirs()?;
            b.push(t);
            ratios.push(o / t);
        }
    }
    Ok(Alternated {
        ours: median(&a),
        theirs: reference.then(|| median(&b)),
        ratio: reference.then(|| median(&ratios)),
    })
}

/// Seconds for `steps` calls of `f` after `warmup` untimed ones (CUDA synchronised).
fn timed(device: Device, warmup: usize, steps: usize, f: &mut dyn FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    synchronize(device);
    let t = Instant::now();
    for _ in 0..steps {
        f();
    }
    synchronize(device);
    t.elapsed().as_secs_f64()
}

/// `bench/reference/<name>` and a command running it with the venv's Python.
fn reference_script(name: &str) -> (PathBuf, Command) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("bench/reference")
        .join(name);
    let mut cmd = Command::new(crate::runtime::venv_python());
    cmd.arg(&script);
    (script, cmd)
}

/// Runs a reference script; a failure to start or a non-zero exit is an error naming it.
fn run_reference(script: &Path, cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| {
        format!(
            "cannot run {} (run scripts/setup.sh, or set `no_reference`)",
            crate::runtime::venv_python().display()
        )
    })?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// The `key` number of a reference script's one-line JSON output.
fn reference_number(script: &Path, out: &Output, key: &str) -> Result<f64> {
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("unexpected output from {}: {line}", script.display()))?;
    v[key]
        .as_f64()
        .with_context(|| format!("no {key} from {}", script.display()))
}

/// A randomly initialised CIFAR-10 classifier (seed 0): both sides of a bench load its weights.
fn random_classifier(
    arch: crate::models::Arch,
    device: Device,
) -> Result<crate::models::Classifier> {
    use crate::models::{Classifier, ModelSpec, dataset_normalisation};
    let (mean, std) = dataset_normalisation(crate::data::DatasetKind::Cifar10);
    tch::manual_seed(0);
    Ok(Classifier::new(
        ModelSpec::new(arch, 10, mean, std)?,
        device,
    ))
}
