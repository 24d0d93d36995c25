//! AToP fine-tuning steps (the trainer's own `FineTuner::step`), side by side with a PyTorch
//! reference of the step (`bench/reference/atop_step.py`) with the same settings.

use anyhow::{Result, bail};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::{
    alternate, random_classifier, reference_number, reference_script, run_reference, timed,
};
use crate::models::Arch;
use crate::purifier::{Purifier, PurifierConfig};
use crate::runtime::Precision;
use crate::train::atop::{
    AdversaryKind, AdversaryTarget, FineTuner, Reconstruction, TrainAtopConfig,
};
use crate::transforms::TransformConfig;

/// Image side of the timed steps (CIFAR).
const SIDE: i64 = 32;

#[derive(Debug, Clone)]
pub struct AtopBench {
    /// (row name, AToP settings): the loss weights, attack, optimizer, batch and precision.
    pub presets: Vec<(String, TrainAtopConfig)>,
    /// The purifier fine-tuned (freshly initialised, either kind) and the transform of presets
    /// without one.
    pub purifier: PurifierConfig,
    pub transform: TransformConfig,
    /// Timed steps per round (after `warmup` untimed ones).
    pub steps: usize,
    pub warmup: usize,
    /// Alternating rounds of atop and PyTorch timings; the medians are reported.
    pub rounds: usize,
    /// The frozen classifier (randomly initialised).
    pub classifier_arch: Arch,
    /// Time the PyTorch reference too (on the CPU only).
    pub reference: bool,
    pub device: Device,
}

#[derive(Debug, Serialize)]
pub struct AtopRow {
    pub preset: String,
    pub purifier: String,
    pub transform: String,
    pub adversary: String,
    pub precision: String,
    pub batch: usize,
    pub atop_steps_s: f64,
    pub pytorch_steps_s: Option<f64>,
    /// The median over rounds of atop / PyTorch, each round timing both sides back to back.
    pub ratio: Option<f64>,
    pub rounds: usize,
}

pub fn run(b: &AtopBench) -> Result<Vec<AtopRow>> {
    if b.steps == 0 {
        bail!("`steps` must be positive");
    }
    let device = b.device;
    let pcfg = &b.purifier;
    pcfg.validate()?;
    let mut rows = Vec::new();
    for (name, cfg) in &b.presets {
        let mut cfg = cfg.clone();
        if cfg.batch_size == 0 {
            bail!("{name}: `batch_size` 0: expected at least 1");
        }
        cfg.adversary.validate()?;
        let transform = cfg.transform.clone().unwrap_or_else(|| b.transform.clone());
        pcfg.check_images(SIDE, SIDE, &transform)?;
        let precision = cfg.precision.resolve(device);
        cfg.precision = precision;
        let n = cfg.batch_size as i64;
        let f = random_classifier(b.classifier_arch, device)?;
        let p = Purifier::new(pcfg.clone(), device)?;
        let mut tuner = FineTuner::new(&cfg, f, p, transform.clone())?;
        let x = Tensor::rand([n, 3, SIDE, SIDE], (Kind::Float, device));
        let y = Tensor::randint(10, [n], (Kind::Int64, device));
        let lr = cfg.generator_optimizer.lr;
        // The CE term on (epoch past the warm-up), as in the trainer's later epochs.
        let epoch = cfg.ce_after_epochs;
        tuner.step(&x, &y, epoch, (lr, lr))?;
        let reference = b.reference && device == Device::Cpu;
        let mut pytorch_side = || pytorch_step(&cfg, &transform, n, b);
        let timing = alternate(
            b.rounds,
            reference,
            &mut || {
                let mut failed = None;
                let secs = timed(device, b.warmup, b.steps, &mut || {
                    if let Err(e) = tuner.step(&x, &y, epoch, (lr, lr)) {
                        failed.get_or_insert(e);
                    }
                });
                match failed {
                    Some(e) => Err(e),
                    None => Ok(b.steps as f64 / secs),
                }
            },
            &mut pytorch_side,
        )?;
        rows.push(AtopRow {
            preset: name.clone(),
            purifier: pcfg.describe(),
            transform: transform.describe(),
            adversary: cfg.adversary.describe(),
            precision: format!("{precision:?}").to_lowercase(),
            batch: cfg.batch_size,
            atop_steps_s: timing.ours,
            pytorch_steps_s: timing.theirs,
            ratio: timing.ratio,
            rounds: b.rounds.max(1),
        });
    }
    Ok(rows)
}

fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

/// Steps/s of the PyTorch reference of the same AToP step: `cfg`'s attack, losses and
/// precision on `b`'s purifier (the GAN generator or the AE), `n` images.
fn pytorch_step(
    cfg: &TrainAtopConfig,
    transform: &TransformConfig,
    n: i64,
    b: &AtopBench,
) -> Result<f64> {
    let (steps, step_size, _) = cfg.adversary.schedule();
    let (script, mut cmd) = reference_script("atop_step.py");
    let work = b.purifier.resolution().work_size.map_or(SIDE, |w| w as i64);
    let attack = match cfg.adversary.attack {
        AdversaryKind::Fgsm => "fgsm",
        AdversaryKind::Pgd => "pgd",
    };
    let target = match cfg.adversary.target {
        AdversaryTarget::Classifier => "classifier",
        AdversaryTarget::Defended => "defended",
    };
    let reconstruction = match cfg.reconstruction {
        Reconstruction::Clean => "clean",
        Reconstruction::Adversarial => "adversarial",
    };
    // Each kind's network as the reference builds it.
    match &b.purifier {
        PurifierConfig::Gan(g) => {
            cmd.args(["--width", &g.width.to_string()])
                .args(["--stages", &g.stages.to_string()])
                .args(["--skips", flag(g.skips)])
                .args(["--group-norm", flag(g.group_norm)])
                .args(["--residual", flag(g.residual)])
                .args(["--disc-width", &g.disc_width.to_string()]);
            if !g.attention {
                cmd.arg("--no-attention");
            }
        }
        PurifierConfig::Ae(a) => {
            cmd.args(["--ae", &serde_json::to_string(a)?]);
        }
    }
    cmd.args(["--classifier", &b.classifier_arch.to_string()])
        .args(["--batch", &n.to_string()])
        .args(["--size", &SIDE.to_string()])
        .args(["--work-size", &work.to_string()])
        .args(["--sigma", &transform.sigma.to_string()])
        .args(["--grid", &transform.grid.to_string()])
        .args(["--holes", &transform.holes().to_string()])
        .args(["--attack", attack])
        .args(["--target", target])
        .args(["--eps", &cfg.adversary.eps.to_string()])
        .args(["--steps", &steps.to_string()])
        .args(["--step-size", &step_size.to_string()])
        .args(["--eot", &cfg.adversary.eot.to_string()])
        .args(["--fraction", &cfg.adversary.fraction.to_string()])
        .args(["--lam", &cfg.lambda.to_string()])
        .args(["--reconstruction", reconstruction])
        .args(["--gan-weight", &cfg.gan_weight.to_string()])
        .args(["--l1-weight", &cfg.l1_weight.to_string()])
        .args(["--lr", &cfg.generator_optimizer.lr.to_string()])
        .args(["--bf16", flag(cfg.precision == Precision::Bf16)])
        .args([
            "--attack-bf16",
            flag(cfg.adversary.precision.resolve(b.device) == Precision::Bf16),
        ])
        .args(["--timed", &b.steps.to_string()])
        .args(["--warmup", &b.warmup.to_string()])
        .args(["--threads", &crate::runtime::threads().to_string()]);
    let out = run_reference(&script, &mut cmd)?;
    reference_number(&script, &out, "steps_s")
}
