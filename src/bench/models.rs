//! Classifier inference and training img/s, side by side with PyTorch.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};

use super::{random_classifier, reference_script, run_reference, timed};
use crate::models::{Arch, Stem};
use crate::runtime::Precision;

#[derive(Debug, Clone)]
pub struct ModelBench {
    /// Architectures to time (each with `batch` images of its native size).
    pub arch: Vec<String>,
    pub batch: usize,
    /// Timed steps per measurement (after `warmup` untimed ones).
    pub steps: usize,
    pub warmup: usize,
    /// Time the PyTorch side too (on the CPU only).
    pub reference: bool,
    /// Input side (default: 32, or 64 for -imagenet architectures).
    pub image_size: Option<i64>,
    pub precision: Precision,
    pub device: Device,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ModelTiming {
    pub arch: String,
    #[serde(default)]
    pub precision: String,
    pub batch: usize,
    pub threads: usize,
    pub infer_img_s: f64,
    pub train_img_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ModelRow {
    pub atop: ModelTiming,
    pub pytorch: Option<ModelTiming>,
    pub infer_ratio: Option<f64>,
    pub train_ratio: Option<f64>,
}

pub fn run(b: &ModelBench) -> Result<Vec<ModelRow>> {
    let threads = crate::runtime::threads();
    let device = b.device;
    let mut rows = Vec::new();
    for name in &b.arch {
        let arch: Arch = name.parse().map_err(anyhow::Error::msg)?;
        let side = b.image_size.unwrap_or(match arch {
            Arch::ResNet {
                stem: Stem::Imagenet,
                ..
            } => 64,
            _ => 32,
        });
        let model = random_classifier(arch, device)?;
        let x = Tensor::rand([b.batch as i64, 3, side, side], (Kind::Float, device));
        let y = Tensor::randint(10, [b.batch as i64], (Kind::Int64, device));
        let mut opt = tch::nn::Sgd {
            momentum: 0.9,
            dampening: 0.0,
            wd: 5e-4,
            nesterov: false,
        }
        .build(&model.vs, 0.01)?;
        let p = b.precision.resolve(device);
        let t_inf = timed(device, b.warmup, b.steps, &mut || {
            let _ =
                tch::no_grad(|| crate::runtime::autocast(device, p, || model.forward_t(&x, false)));
        });
        let t_train = timed(device, b.warmup, b.steps, &mut || {
            let loss = crate::runtime::autocast(device, p, || {
                model.forward_t(&x, true).cross_entropy_for_logits(&y)
            });
            opt.backward_step(&loss);
        });
        let n = (b.batch * b.steps) as f64;
        let ours = ModelTiming {
            arch: name.clone(),
            precision: format!("{p:?}").to_lowercase(),
            batch: b.batch,
            threads,
            infer_img_s: n / t_inf,
            train_img_s: n / t_train,
        };
        let reference = if !b.reference || device != Device::Cpu {
            None
        } else {
            Some(pytorch_timing(name, b, threads)?)
        };
        rows.push(ModelRow {
            infer_ratio: reference.as_ref().map(|r| ours.infer_img_s / r.infer_img_s),
            train_ratio: reference.as_ref().map(|r| ours.train_img_s / r.train_img_s),
            atop: ours,
            pytorch: reference,
        });
    }
    Ok(rows)
}

/// Runs bench/reference/bench_models.py with the venv's PyTorch on the same settings.
fn pytorch_timing(arch: &str, b: &ModelBench, threads: usize) -> Result<ModelTiming> {
    let (script, mut cmd) = reference_script("bench_models.py");
    cmd.args(["--arch", arch])
        .args(["--batch", &b.batch.to_string()])
        .args(["--steps", &b.steps.to_string()])
        .args(["--warmup", &b.warmup.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(b.image_size.map(|s| format!("--image-size={s}")))
        .args([
            "--precision",
            if b.precision.resolve(Device::Cpu) == Precision::Bf16 {
                "bf16"
            } else {
                "f32"
            },
        ]);
    let out = run_reference(&script, &mut cmd)?;
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim())
        .with_context(|| format!("unexpected output from {}: {line}", script.display()))
}
