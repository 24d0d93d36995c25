//! Purifier training steps on the resolution pipeline, side by side with their PyTorch twin,
//! and the cost of one whole-model attack step through it.

use anyhow::{Result, bail};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::{alternate, reference_number, reference_script, run_reference, timed};
use crate::models::pipeline::Pipeline;
use crate::models::{Arch, Model};
use crate::purifier::defended::Purify;
use crate::purifier::{GanConfig, Purifier};
use crate::runtime::Precision;
use crate::transforms::{TransformConfig, TransformKind};

/// One purifier to time: a row name, its architecture and its transform settings (timed
/// under RT2, the paper's main setting).
#[derive(Debug, Clone)]
pub struct Setup {
    pub name: String,
    pub purifier: GanConfig,
    pub transform: TransformConfig,
}

/// A purifier training preset as `atop bench purifier` times it: each kind beside its own
/// PyTorch twin (the GAN generator on the resolution pipeline, `purifier.py`; the AE's network,
/// `ae.py`).
#[derive(Debug, Clone)]
pub enum PresetSetup {
    Gan(Setup),
    Ae(AeSetup),
}

/// An AE network to time: its settings, the share of patches hidden, and the side it runs at
/// (its working size, or the images' side where it has none).
#[derive(Debug, Clone)]
pub struct AeSetup {
    pub name: String,
    pub config: crate::purifier::ae::AeConfig,
    pub mask_ratio: f64,
    pub work_size: Option<i64>,
}

/// The training preset `name`'s purifier and transform, to time.
pub fn preset_setup(name: &str) -> Result<PresetSetup> {
    use crate::purifier::PurifierConfig;
    let cfg = crate::train::purifier::TrainPurifierConfig::preset(name)?;
    Ok(match cfg.purifier {
        PurifierConfig::Gan(g) => PresetSetup::Gan(Setup {
            name: name.to_string(),
            purifier: g,
            transform: cfg.transform,
        }),
        PurifierConfig::Ae(a) => PresetSetup::Ae(AeSetup {
            name: name.to_string(),
            work_size: a.resolution().work_size.map(|s| s as i64),
            config: a,
            mask_ratio: cfg.transform.missing_rate,
        }),
    })
}

#[derive(Debug, Clone)]
pub struct PurifierBench {
    pub setups: Vec<Setup>,
    /// Images per training step.
    pub batch: usize,
    /// Image side (the classifier's input).
    pub size: i64,
    pub steps: usize,
    pub warmup: usize,
    /// Alternating rounds of atop and PyTorch timings; the medians are reported.
    pub rounds: usize,
    /// Images per whole-model attack step (0: no attack-step timing).
    pub attack_batch: usize,
    /// Timed whole-model attack steps (after one untimed).
    pub attack_steps: usize,
    /// The classifier behind the purifier in the attack step (randomly initialised).
    pub classifier_arch: Arch,
    /// Time the PyTorch twin too (on the CPU only).
    pub reference: bool,
    pub device: Device,
}

#[derive(Debug, Serialize)]
pub struct PurifierRow {
    pub name: String,
    pub purifier: String,
    pub transform: String,
    pub batch: usize,
    pub size: i64,
    pub work_size: i64,
    pub parameters: i64,
    pub atop_img_s: f64,
    pub pytorch_img_s: Option<f64>,
    /// The median over rounds of atop / PyTorch, each round timing both sides back to back.
    pub ratio: Option<f64>,
    pub rounds: usize,
    /// Seconds per image of one whole-model attack step (forward and input gradient through
    /// resize, transform, generator, resize and classifier), at `attack_batch`.
    pub attack_s_per_img: Option<f64>,
    pub attack_batch: usize,
}

pub fn run(b: &PurifierBench) -> Result<Vec<PurifierRow>> {
    if b.batch == 0 || b.steps == 0 || b.size <= 0 {
        bail!("`batch`, `steps` and `size` must be positive");
    }
    let device = b.device;
    let mut rows = Vec::new();
    for setup in &b.setups {
        let cfg = &setup.purifier;
        let transform = TransformConfig {
            kind: TransformKind::Rt2,
            ..setup.transform.clone()
        };
        cfg.validate()?;
        cfg.check_images(b.size, b.size, &transform)?;
        tch::manual_seed(0);
        let mut p = Purifier::new(cfg.clone().into(), device)?;
        let (n, s) = (b.batch as i64, b.size);
        let x = Tensor::rand([n, 3, s, s], (Kind::Float, device));
        // One generator training step as the trainer takes it (without the optimizer).
        let mut atop_side = || {
            let secs = timed(device, b.warmup, b.steps, &mut || {
                let pass = p.pass(&x, &transform);
                let own = p.own_terms(&pass, &pass.clean, false, Precision::F32);
                (own.l1 + (&pass.purified - &x).abs().mean(Kind::Float)).backward();
            });
            (b.batch * b.steps) as f64 / secs
        };
        let work = cfg.work_size.map_or(s, |w| w as i64);
        let reference = b.reference && device == Device::Cpu;
        let mut pytorch_side = || pytorch_step(cfg, &transform, work, b);
        let timing = alternate(
            b.rounds,
            reference,
            &mut || Ok(atop_side()),
            &mut pytorch_side,
        )?;
        let attack_s_per_img = (b.attack_batch > 0 && b.attack_steps > 0)
            .then(|| attack_step_seconds(&p, &transform, b))
            .transpose()?;
        rows.push(PurifierRow {
            name: setup.name.clone(),
            purifier: cfg.describe(),
            transform: transform.describe(),
            batch: b.batch,
            size: s,
            work_size: work,
            parameters: p.parameters().0,
            atop_img_s: timing.ours,
            pytorch_img_s: timing.theirs,
            ratio: timing.ratio,
            rounds: b.rounds.max(1),
            attack_s_per_img,
            attack_batch: b.attack_batch,
        });
    }
    Ok(rows)
}

/// img/s of the PyTorch twin of one purifier training step (bench/reference/purifier.py).
fn pytorch_step(
    cfg: &GanConfig,
    transform: &TransformConfig,
    work: i64,
    b: &PurifierBench,
) -> Result<f64> {
    let (script, mut cmd) = reference_script("purifier.py");
    cmd.arg("bench")
        .args(["--width", &cfg.width.to_string()])
        .args(["--stages", &cfg.stages.to_string()])
        .args(["--skips", &u8::from(cfg.skips).to_string()])
        .args(["--group-norm", &u8::from(cfg.group_norm).to_string()])
        .args(["--residual", &u8::from(cfg.residual).to_string()])
        .args(["--work-size", &work.to_string()])
        .args(["--sigma", &transform.sigma.to_string()])
        .args(["--grid", &transform.grid.to_string()])
        .args(["--holes", &transform.holes().to_string()])
        .args(["--batch", &b.batch.to_string()])
        .args(["--size", &b.size.to_string()])
        .args(["--steps", &b.steps.to_string()])
        .args(["--warmup", &b.warmup.to_string()])
        .args(["--threads", &crate::runtime::threads().to_string()]);
    if !cfg.attention {
        cmd.arg("--no-attention");
    }
    let out = run_reference(&script, &mut cmd)?;
    reference_number(&script, &out, "train_img_s")
}

/// Seconds per image of one whole-model attack step: the input gradient of the classifier's
/// loss through the defended model, at a small batch.
fn attack_step_seconds(
    p: &Purifier,
    transform: &TransformConfig,
    b: &PurifierBench,
) -> Result<f64> {
    let (s, device) = (b.size, b.device);
    let (mean, std) = crate::models::dataset_normalisation(crate::data::DatasetKind::Cifar10);
    let spec = crate::models::ModelSpec::new(b.classifier_arch, 10, mean, std)?;
    let classifier = crate::models::Classifier::new(spec, device);
    let pipeline = Pipeline {
        stages: vec![Box::new(Purify {
            purifier: p,
            transform: transform.clone(),
        })],
        model: &classifier,
    };
    let xa = Tensor::rand([b.attack_batch as i64, 3, s, s], (Kind::Float, device));
    let ya = Tensor::zeros([b.attack_batch as i64], (Kind::Int64, device));
    let secs = timed(device, 1, b.attack_steps, &mut || {
        let xa = xa.detach().set_requires_grad(true);
        let loss = pipeline.logits(&xa).cross_entropy_for_logits(&ya);
        let _ = Tensor::run_backward(&[loss], &[&xa], false, false);
    });
    Ok(secs / (b.attack_batch * b.attack_steps) as f64)
}

/// The AE purifier's network (one training step: the visible patches of noisy images, the
/// reconstruction of every patch, its squared error to the clean images, backward), side by
/// side with its PyTorch twin (`bench/reference/ae.py bench`).
#[derive(Debug, Clone)]
pub struct AeBench {
    pub setup: AeSetup,
    pub batch: usize,
    /// Image side where the setup has no working size.
    pub size: i64,
    pub steps: usize,
    pub warmup: usize,
    pub rounds: usize,
    pub reference: bool,
    pub device: Device,
}

#[derive(Debug, Serialize)]
pub struct AeRow {
    pub name: String,
    pub purifier: String,
    pub batch: usize,
    pub size: i64,
    pub parameters: i64,
    pub atop_img_s: f64,
    pub pytorch_img_s: Option<f64>,
    /// The median over rounds of atop / PyTorch, each round timing both sides back to back.
    pub ratio: Option<f64>,
    pub rounds: usize,
}

pub fn run_ae(b: &AeBench) -> Result<AeRow> {
    use crate::purifier::ae::{AeNet, random_keep, visible};
    if b.batch == 0 || b.steps == 0 {
        bail!("`batch` and `steps` must be positive");
    }
    let device = b.device;
    let (c, mask_ratio) = (&b.setup.config, b.setup.mask_ratio);
    let size = b.setup.work_size.unwrap_or(b.size);
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(device);
    let net = AeNet::new(&vs.root(), c, size)?;
    let n = b.batch as i64;
    let x = Tensor::rand([n, 3, size, size], (Kind::Float, device));
    let noisy = (&x + x.randn_like() * 0.25).clamp(0.0, 1.0);
    let keep = random_keep(n, net.patches(), visible(net.patches(), mask_ratio), device);
    let mut ours = || {
        let secs = timed(device, b.warmup, b.steps, &mut || {
            (net.forward(&noisy, &keep) - &x)
                .square()
                .mean(Kind::Float)
                .backward();
        });
        Ok((b.batch * b.steps) as f64 / secs)
    };
    let mut theirs = || {
        let (script, mut cmd) = reference_script("ae.py");
        cmd.arg("bench")
            .args(["--config", &serde_json::to_string(c)?])
            .args(["--mask-ratio", &mask_ratio.to_string()])
            .args(["--batch", &b.batch.to_string()])
            .args(["--size", &size.to_string()])
            .args(["--steps", &b.steps.to_string()])
            .args(["--warmup", &b.warmup.to_string()])
            .args(["--threads", &crate::runtime::threads().to_string()]);
        let out = run_reference(&script, &mut cmd)?;
        reference_number(&script, &out, "train_img_s")
    };
    let timing = alternate(
        b.rounds,
        b.reference && device == Device::Cpu,
        &mut ours,
        &mut theirs,
    )?;
    Ok(AeRow {
        name: b.setup.name.clone(),
        purifier: format!("{} with {mask_ratio} of the patches hidden", c.describe()),
        batch: b.batch,
        size,
        parameters: vs.variables().values().map(|t| t.numel() as i64).sum(),
        atop_img_s: timing.ours,
        pytorch_img_s: timing.theirs,
        ratio: timing.ratio,
        rounds: b.rounds.max(1),
    })
}
