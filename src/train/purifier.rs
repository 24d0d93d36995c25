//! `atop train purifier`: pre-trains a purifier on clean images under a random transform
//! (paper section 3), each kind with its own loss ([`Purifier::own_terms`]). The GAN: per batch
//! one discriminator step (hinge loss on the clean image against the generator's x2) and one
//! generator step (-mean D(x2) + L1 of x1 and x2 to the clean image); the AE: one step on the L1
//! of its reconstruction. Either optionally + CE or KL of a frozen classifier on the purified
//! image (the authors' "-clean" variant). Adam (lr 1e-4, betas 0.5/0.999 by default).
//! Everything runs on the purifier's resolution pipeline ([`Purifier::pass`]): images resized
//! to the working size, the transform drawn and the purifier's losses computed there, the
//! guidance on the purified image at the classifier's size.
//!
//! Run folder (as for classifiers): config.json, metrics.jsonl, checkpoints/epoch-N/ (the
//! purifier checkpoint plus both optimizer states) behind last.json, samples/*.png. A killed
//! run resumes from its last epoch and reaches the same weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::adam::{Adam, AdamConfig};
use super::learner::{EpochSummary, Fitted, Losses, RunFolder, Step, Task};
use super::runlog;
use super::schedule::{Schedule, lr_at};
use super::setup::{self, EvalImages};
use crate::data::loader::{EpochIter, Loader};
use crate::data::subset::seeded_subset;
use crate::data::{DataConfig, Split};
use crate::figures::grid;
use crate::models::accuracy::count_correct;
use crate::models::checkpoint;
use crate::models::{Classifier, Model};
use crate::purifier::{self, Purifier, PurifierConfig, PurifierSidecar};
use crate::runtime::{Precision, autocast};
use crate::transforms::{TransformConfig, TransformKind};

pub use super::runlog::CONFIG;
const OPT_G: &str = "optimizer-generator.safetensors";
const OPT_D: &str = "optimizer-discriminator.safetensors";

/// Everything that defines a purifier pre-training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainPurifierConfig {
    pub data: DataConfig,
    #[serde(default)]
    pub purifier: PurifierConfig,
    #[serde(default)]
    pub transform: TransformConfig,
    pub epochs: usize,
    pub batch_size: usize,
    #[serde(default)]
    pub generator_optimizer: AdamConfig,
    #[serde(default)]
    pub discriminator_optimizer: AdamConfig,
    /// Weight of the reconstruction term (GAN: the L1 of x1 and of x2 against the clean image,
    /// in [-1,1]; AE: the L1 of its reconstruction on the same scale).
    #[serde(default = "one")]
    pub l1_weight: f64,
    /// Weight of the generator's GAN term -mean D(x2) (GAN purifier only: 0 for the AE).
    #[serde(default = "one")]
    pub gan_weight: f64,
    /// Weight of CE(y, f(purified)) with the frozen `classifier` (0 = off).
    #[serde(default)]
    pub ce_weight: f64,
    /// Weight of the logit-matching term KL(softmax f(x) || softmax f(purified)): the frozen
    /// classifier's own prediction on the clean image is the target (the "high-level
    /// representation guided" loss of Liao et al. 2018; 0 = off).
    #[serde(default)]
    pub kl_weight: f64,
    /// The classifier f for the CE and KL terms and for the per-epoch purified accuracy.
    #[serde(default)]
    pub classifier: Option<PathBuf>,
    /// Epochs of plain reconstruction before the CE and KL terms start (the authors used 2).
    #[serde(default)]
    pub ce_after_epochs: usize,
    /// Share of each batch given to the purifier without the transform, the image itself its
    /// target (the same loss terms, the discriminator's step on the transformed share only). A
    /// purifier that only ever sees transformed inputs alters clean ones: the CPU AE trained so
    /// scored 16 points below clean without a transform (docs/purifier.md). 0 = off.
    #[serde(default)]
    pub identity_fraction: f64,
    /// Data-dependent initialisation of the generator (every gated layer rescaled to unit
    /// pre-activation spread on a batch of transformed training images) instead of the
    /// reference implementation's He initialisation alone, under which a fresh generator's
    /// output barely depends on its input. Off by default: at 400 steps it did not raise purified
    /// accuracy (docs/purifier.md).
    #[serde(default)]
    pub data_init: bool,
    /// Learning-rate schedule of both optimizers over the whole run (peak: their `lr`).
    #[serde(default = "constant")]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub seed: u64,
    /// Random horizontal flips of the training images.
    #[serde(default = "yes")]
    pub flip: bool,
    #[serde(default)]
    pub train_subset: Option<usize>,
    /// Test images (a seeded subset) for the per-epoch PSNR, SSIM and purified accuracy.
    #[serde(default = "default_eval_subset")]
    pub eval_subset: usize,
    /// Write a sample grid every this many steps (0: only at the end of each epoch).
    #[serde(default)]
    pub sample_every: usize,
    #[serde(default)]
    pub precision: Precision,
}

fn one() -> f64 {
    1.0
}

fn constant() -> Schedule {
    Schedule::Constant
}

fn yes() -> bool {
    true
}

fn default_eval_subset() -> usize {
    500
}

/// Named presets (TOML files in `presets/`, compiled in).
pub const PRESETS: &[(&str, &str)] = &[
    (
        "purifier-demo",
        include_str!("../../presets/purifier-demo.toml"),
    ),
    (
        "purifier-cifar10-cpu",
        include_str!("../../presets/purifier-cifar10-cpu.toml"),
    ),
    (
        "purifier-cifar10-paper",
        include_str!("../../presets/purifier-cifar10-paper.toml"),
    ),
    (
        "purifier-ae-cifar10-cpu",
        include_str!("../../presets/purifier-ae-cifar10-cpu.toml"),
    ),
    (
        "purifier-ae-cifar10-paper",
        include_str!("../../presets/purifier-ae-cifar10-paper.toml"),
    ),
];

impl TrainPurifierConfig {
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text)
            .with_context(|| format!("{origin}: not a valid purifier training config"))
    }

    pub fn preset(name: &str) -> Result<Self> {
        runlog::preset(PRESETS, name, "purifier")
    }

    pub fn validate(&self) -> Result<()> {
        self.purifier.validate()?;
        self.purifier
            .check_gan_weight("gan_weight", self.gan_weight)?;
        if self.data_init {
            self.purifier.check_data_init()?;
        }
        self.transform.validate(None)?;
        self.generator_optimizer.validate("generator_optimizer")?;
        self.discriminator_optimizer
            .validate("discriminator_optimizer")?;
        setup::check_counts(self.epochs, self.batch_size)?;
        let f = self.identity_fraction;
        if !(0.0..1.0).contains(&f) {
            bail!("invalid setting identity_fraction = {f}: expected a share in [0, 1)");
        }
        setup::check_weights(&[
            ("l1_weight", self.l1_weight),
            ("gan_weight", self.gan_weight),
            ("ce_weight", self.ce_weight),
            ("kl_weight", self.kl_weight),
        ])?;
        if let Some(side) = self.data.image_size {
            let side = side as i64;
            self.purifier.check_images(side, side, &self.transform)?;
        }
        for (name, w) in [("ce_weight", self.ce_weight), ("kl_weight", self.kl_weight)] {
            if w > 0.0 && self.classifier.is_none() {
                bail!("{name} = {w} needs a classifier (set `classifier` to a checkpoint)");
            }
        }
        Ok(())
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurifierEpoch {
    pub epoch: usize,
    pub d_loss: f64,
    pub g_gan: f64,
    pub g_l1: f64,
    pub g_ce: f64,
    #[serde(default)]
    pub g_kl: f64,
    /// On the evaluation subset: purified against clean.
    pub psnr: f64,
    pub ssim: f64,
    /// Accuracy of the classifier on the purified evaluation images (if one is set), and on
    /// the clean ones.
    pub purified_acc: Option<f64>,
    pub clean_acc: Option<f64>,
    pub img_per_s: f64,
    pub seconds: f64,
}

impl runlog::EpochRecord for PurifierEpoch {
    fn epoch(&self) -> usize {
        self.epoch
    }
}

/// What a pre-training run did.
pub type PurifierSummary = Fitted<PurifierEpoch>;

/// Loads a run's saved settings (for `--resume`).
pub fn saved_config(run: &Path) -> Result<TrainPurifierConfig> {
    runlog::saved_config(run, "purifier")
}

pub fn default_out(cfg: &TrainPurifierConfig) -> PathBuf {
    PathBuf::from("runs").join(format!(
        "purifier-{}-{}-{}",
        cfg.data.dataset.as_str(),
        cfg.transform.kind,
        cfg.purifier.label()
    ))
}

/// The evaluation images and, with a classifier, its clean accuracy on them (computed once: the
/// classifier is frozen).
struct EvalSet {
    x: Tensor,
    y: Tensor,
    clean_acc: Option<f64>,
}

/// Pre-trains into `run`; with `resume`, continues from the run's latest checkpoint.
pub fn train(
    cfg: &TrainPurifierConfig,
    run: &Path,
    device: Device,
    resume: bool,
) -> Result<PurifierSummary> {
    cfg.validate()?;
    // What the run records: paths absolute.
    let owned = TrainPurifierConfig {
        classifier: cfg.classifier.as_deref().map(crate::folder::absolute),
        data: cfg.data.absolute(),
        ..cfg.clone()
    };
    let cfg = &owned;
    let folder = RunFolder::open(run, resume)?;
    let train_set = setup::subset(cfg.data.load(Split::Train)?, cfg.train_subset, cfg.seed)?;
    let test_set = cfg.data.load(Split::Test)?;
    cfg.purifier.check_images(
        train_set.height as i64,
        train_set.width as i64,
        &cfg.transform,
    )?;
    let EvalImages { x, y, indices } =
        setup::eval_images(&test_set, cfg.eval_subset, cfg.seed, device)?;
    let classifier_dir = cfg
        .classifier
        .as_deref()
        .map(checkpoint::resolve)
        .transpose()?;
    let checkpoints: Vec<(&str, &Path)> = classifier_dir
        .iter()
        .map(|d| ("classifier", d.as_path()))
        .collect();
    let inputs = setup::inputs(&train_set, &test_set, &checkpoints)?;
    let classifier = match &cfg.classifier {
        Some(path) => {
            let (mut c, _) = checkpoint::load(path, device)?;
            if c.spec.num_classes != train_set.num_classes() {
                bail!(
                    "classifier {} has {} classes, {} has {}",
                    path.display(),
                    c.spec.num_classes,
                    train_set.name,
                    train_set.num_classes()
                );
            }
            c.vs.freeze();
            Some(c)
        }
        None => None,
    };
    let clean_acc = classifier.as_ref().map(|f| {
        count_correct(f, &x, &y, EVAL_BATCH, device, cfg.precision) as f64
            / indices.len().max(1) as f64
    });
    let eval = EvalSet { x, y, clean_acc };
    tch::manual_seed(cfg.seed as i64);
    let p = Purifier::new(cfg.purifier.clone(), device)?;
    if cfg.data_init && !folder.has_checkpoint() {
        let n = train_set.len().min(CALIBRATION_IMAGES);
        let (cx, _) = train_set.tensors(&seeded_subset(train_set.len(), n, cfg.seed)?);
        p.normalise(&cx.to_kind(Kind::Float).to_device(device), &cfg.transform)?;
    }
    let opt_g = Adam::new(p.weights(), cfg.generator_optimizer);
    let opt_d = p
        .critic()
        .map(|d| Adam::new(d, cfg.discriminator_optimizer));
    let image_size = train_set.height as i64;
    let loader = setup::loader(
        Arc::new(train_set),
        cfg.batch_size,
        setup::flips(cfg.flip),
        cfg.seed,
    )?;
    let mut task = PurifierTask {
        cfg,
        device,
        p,
        opt_g,
        opt_d,
        loader,
        batches: None,
        classifier,
        eval,
        image_size,
    };
    folder.fit(cfg, &inputs, &mut task)
}

crate::losses! {
    /// A purifier step: the discriminator's hinge loss and the generator's terms.
    pub struct PurifierLosses { d_loss, g_gan, g_l1, g_ce, g_kl }
}

/// Pre-training of a purifier: one step of its network per batch (after the discriminator's,
/// for the GAN).
struct PurifierTask<'a> {
    cfg: &'a TrainPurifierConfig,
    device: Device,
    p: Purifier,
    opt_g: Adam,
    opt_d: Option<Adam>,
    loader: Loader,
    batches: Option<EpochIter>,
    classifier: Option<Classifier>,
    eval: EvalSet,
    image_size: i64,
}

impl Task for PurifierTask<'_> {
    type Losses = PurifierLosses;
    type Record = PurifierEpoch;

    fn epochs(&self) -> usize {
        self.cfg.epochs
    }

    fn steps_per_epoch(&self) -> usize {
        self.loader.batches_per_epoch()
    }

    fn begin_epoch(&mut self, epoch: usize) {
        // The transforms draw from libtorch's generator: seeding it per epoch makes a resumed
        // run draw the same masks and noise as an uninterrupted one.
        tch::manual_seed(
            (self.cfg.seed as i64)
                .wrapping_mul(1_000_003)
                .wrapping_add(epoch as i64),
        );
        self.batches = Some(self.loader.epoch(epoch as u64));
    }

    fn step(&mut self, step: Step) -> Result<(PurifierLosses, usize)> {
        let (cfg, device, p) = (self.cfg, self.device, &mut self.p);
        let batch = self
            .batches
            .as_mut()
            .and_then(|b| b.next())
            .context("the batch iterator ended early")?;
        for (opt, peak) in [
            (Some(&mut self.opt_g), cfg.generator_optimizer.lr),
            (self.opt_d.as_mut(), cfg.discriminator_optimizer.lr),
        ] {
            let Some(opt) = opt else { continue };
            opt.set_lr(lr_at(
                cfg.schedule,
                peak,
                step.global,
                step.total,
                cfg.warmup_steps,
            ));
        }
        let x = batch.images.to_device(device);
        let y = batch.labels.to_device(device);
        // The batch's last `kept` images go through without the transform (identity_fraction).
        let n = x.size()[0];
        let kept = identity_count(cfg.identity_fraction, n);
        let x_t = x.narrow(0, 0, n - kept);
        // Resized to the working size, transformed and purified there; the reconstruction is
        // scored at the working size, the guidance at the classifier's.
        let pass = autocast(device, cfg.precision, || p.pass(&x_t, &cfg.transform));
        let gan = cfg.gan_weight > 0.0;
        let d_loss = if gan {
            critic_step(p, self.opt_d.as_mut(), &pass, &pass.clean, cfg.precision)
        } else {
            zero(device)
        };
        // The purifier's own terms (for the GAN: fool D, match the clean image), and
        // (optionally) keep f right.
        let purifier::OwnTerms {
            gan: mut g_gan,
            l1: mut g_l1,
        } = p.own_terms(&pass, &pass.clean, gan, cfg.precision);
        let mut purified = pass.purified.to_kind(Kind::Float);
        if kept > 0 {
            // Means over the whole batch: each share weighted by its images.
            let untransformed = TransformConfig::with_kind(TransformKind::None);
            let x_i = x.narrow(0, n - kept, kept);
            let pass_i = autocast(device, cfg.precision, || p.pass(&x_i, &untransformed));
            let own = p.own_terms(&pass_i, &pass_i.clean, gan, cfg.precision);
            let share = kept as f64 / n as f64;
            g_gan = g_gan * (1.0 - share) + own.gan * share;
            g_l1 = g_l1 * (1.0 - share) + own.l1 * share;
            purified = Tensor::cat(&[purified, pass_i.purified.to_kind(Kind::Float)], 0);
        }
        let guided = step.epoch >= cfg.ce_after_epochs;
        let (g_ce, g_kl) = match (&self.classifier, guided) {
            (Some(f), true) => guidance(f, cfg, &x, &y, &purified),
            _ => (zero(device), zero(device)),
        };
        let g_loss = &g_gan * cfg.gan_weight
            + &g_l1 * cfg.l1_weight
            + &g_ce * cfg.ce_weight
            + &g_kl * cfg.kl_weight;
        let losses = PurifierLosses {
            d_loss: d_loss.double_value(&[]),
            g_gan: g_gan.double_value(&[]),
            g_l1: g_l1.double_value(&[]),
            g_ce: g_ce.double_value(&[]),
            g_kl: g_kl.double_value(&[]),
        };
        // A non-finite term stops the run (the loop names it); no G step on it.
        if losses.terms().iter().all(|(_, v)| v.is_finite()) {
            self.opt_g.zero_grad();
            g_loss.backward();
            self.opt_g.step();
        }
        Ok((losses, batch.indices.len()))
    }

    fn after_step(&mut self, run: &Path, step: Step) -> Result<()> {
        let every = self.cfg.sample_every;
        if every > 0 && (step.global + 1).is_multiple_of(every) {
            write_samples(
                &self.p,
                self.cfg,
                &self.eval.x,
                &run.join(format!("samples/step-{:07}.png", step.global + 1)),
            )?;
        }
        Ok(())
    }

    fn progress(&self, m: &PurifierLosses) -> String {
        format!("D {:.3} L1 {:.3}", m.d_loss, m.g_l1)
    }

    fn end_epoch(&mut self, run: &Path, e: EpochSummary<PurifierLosses>) -> Result<PurifierEpoch> {
        write_samples(
            &self.p,
            self.cfg,
            &self.eval.x,
            &run.join(format!("samples/epoch-{:04}.png", e.epoch)),
        )?;
        let q = evaluate(
            &self.p,
            &self.cfg.transform,
            self.classifier.as_ref(),
            &self.eval,
            self.cfg.precision,
        )?;
        let l = e.losses;
        Ok(PurifierEpoch {
            epoch: e.epoch,
            d_loss: l.d_loss,
            g_gan: l.g_gan,
            g_l1: l.g_l1,
            g_ce: l.g_ce,
            g_kl: l.g_kl,
            psnr: q.psnr,
            ssim: q.ssim,
            purified_acc: q.purified_acc,
            clean_acc: q.clean_acc,
            img_per_s: e.img_per_s,
            seconds: e.started.elapsed().as_secs_f64(),
        })
    }

    fn describe(&self, m: &PurifierEpoch) -> String {
        format!(
            "D {:.3} G gan {:.3} L1 {:.3} CE {:.3} KL {:.3} | PSNR {:.2} dB SSIM {:.3}{} | {:.0} img/s, {:.0} s",
            m.d_loss,
            m.g_gan,
            m.g_l1,
            m.g_ce,
            m.g_kl,
            m.psnr,
            m.ssim,
            match (m.purified_acc, m.clean_acc) {
                (Some(p), Some(c)) => format!(
                    " | accuracy purified {:.2}% clean {:.2}%",
                    100.0 * p,
                    100.0 * c
                ),
                _ => String::new(),
            },
            m.img_per_s,
            m.seconds
        )
    }

    fn save(&self, dir: &Path, epoch: usize, step: usize) -> Result<()> {
        let cfg = self.cfg;
        let mut sidecar = PurifierSidecar::new(cfg.purifier.clone(), cfg.transform.clone());
        sidecar.dataset = Some(cfg.data.dataset.as_str().to_string());
        sidecar.image_size = Some(self.image_size);
        sidecar.epoch = Some(epoch);
        sidecar.step = Some(step);
        sidecar.config = serde_json::to_value(cfg)?;
        save_state(dir, &self.p, &sidecar, &self.opt_g, self.opt_d.as_ref())
    }

    fn restore(&mut self, dir: &Path) -> Result<()> {
        restore_state(dir, &mut self.p, &mut self.opt_g, self.opt_d.as_mut())
    }

    fn divergence_hint(&self) -> &'static str {
        "Lower the learning rates or the gan_weight."
    }
}

/// The discriminator's hinge step on a pass against `reference` (the clean images at the
/// working size, in [0,1]), where the purifier has a discriminator; its loss (zero without one).
pub(crate) fn critic_step(
    p: &mut Purifier,
    opt_d: Option<&mut Adam>,
    pass: &purifier::Pass,
    reference: &Tensor,
    precision: Precision,
) -> Tensor {
    match (p.critic_loss(pass, reference, precision), opt_d) {
        (Some(d_loss), Some(opt_d)) => {
            opt_d.zero_grad();
            d_loss.backward();
            opt_d.step();
            d_loss
        }
        _ => zero(reference.device()),
    }
}

/// A purifier training checkpoint: the purifier (weights and `sidecar`) and both Adam states.
pub(crate) fn save_state(
    dir: &Path,
    p: &Purifier,
    sidecar: &PurifierSidecar,
    opt_g: &Adam,
    opt_d: Option<&Adam>,
) -> Result<()> {
    p.save(dir, sidecar)?;
    crate::io::write_safetensors(&dir.join(OPT_G), &opt_g.state())?;
    match opt_d {
        Some(opt_d) => crate::io::write_safetensors(&dir.join(OPT_D), &opt_d.state()),
        None => Ok(()),
    }
}

/// Loads what [`save_state`] wrote.
pub(crate) fn restore_state(
    dir: &Path,
    p: &mut Purifier,
    opt_g: &mut Adam,
    opt_d: Option<&mut Adam>,
) -> Result<()> {
    p.load_weights(dir)?;
    for (opt, file) in [(Some(opt_g), OPT_G), (opt_d, OPT_D)] {
        let Some(opt) = opt else { continue };
        opt.load_state(checkpoint::read_tensors(&dir.join(file))?)
            .with_context(|| format!("{}", dir.join(file).display()))?;
    }
    Ok(())
}

/// Images of an `n`-image batch that skip the transform: the nearest whole number to
/// `fraction * n`, leaving at least one transformed image.
fn identity_count(fraction: f64, n: i64) -> i64 {
    ((fraction * n as f64).round() as i64).clamp(0, (n - 1).max(0))
}

fn zero(device: Device) -> Tensor {
    Tensor::zeros([], (Kind::Float, device))
}

/// The classifier-guidance terms on the purified images (zero where their weight is 0): CE
/// against the labels, and KL from the frozen classifier's own prediction on the clean images.
fn guidance(
    f: &Classifier,
    cfg: &TrainPurifierConfig,
    clean: &Tensor,
    labels: &Tensor,
    purified: &Tensor,
) -> (Tensor, Tensor) {
    let device = clean.device();
    let logits = autocast(device, cfg.precision, || f.logits(purified)).to_kind(Kind::Float);
    let ce = if cfg.ce_weight > 0.0 {
        logits.cross_entropy_for_logits(labels)
    } else {
        zero(device)
    };
    let kl = if cfg.kl_weight > 0.0 {
        kl_to_clean_prediction(f, clean, &logits, cfg.precision)
    } else {
        zero(device)
    };
    (ce, kl)
}

/// KL(f(clean) || softmax(logits)), mean over the batch: the frozen classifier's prediction on
/// the clean images as the target (no gradient), `logits` (f on the purified images) as the
/// student through which the gradient flows.
pub(crate) fn kl_to_clean_prediction(
    f: &Classifier,
    clean: &Tensor,
    logits: &Tensor,
    precision: Precision,
) -> Tensor {
    let teacher = tch::no_grad(|| {
        autocast(clean.device(), precision, || f.logits(clean))
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float)
    });
    (teacher.exp() * (&teacher - logits.log_softmax(-1, Kind::Float)))
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float)
}

const EVAL_BATCH: usize = 250;
/// Training images for the generator's data-dependent initialisation.
const CALIBRATION_IMAGES: usize = 64;

/// Purification quality on a fixed set of images.
#[derive(Debug, Clone, Serialize)]
pub struct Quality {
    pub psnr: f64,
    pub ssim: f64,
    pub purified_acc: Option<f64>,
    pub clean_acc: Option<f64>,
}

/// Mean PSNR/SSIM of purified against clean images, and the classifier's accuracy on the
/// purified ones, in batches of [`EVAL_BATCH`] (under no_grad).
fn evaluate(
    p: &Purifier,
    transform: &TransformConfig,
    classifier: Option<&Classifier>,
    eval: &EvalSet,
    precision: Precision,
) -> Result<Quality> {
    let n = eval.x.size()[0];
    let (mut psnr, mut ssim, mut hit) = (0.0, 0.0, 0i64);
    tch::no_grad(|| {
        for start in (0..n).step_by(EVAL_BATCH) {
            let len = (n - start).min(EVAL_BATCH as i64);
            let x = eval.x.narrow(0, start, len);
            let out =
                autocast(p.device(), precision, || p.purify(&x, transform)).to_kind(Kind::Float);
            psnr += purifier::psnr(&out, &x).sum(Kind::Double).double_value(&[]);
            ssim += purifier::ssim(&out, &x).sum(Kind::Double).double_value(&[]);
            if let Some(f) = classifier {
                let y = eval.y.narrow(0, start, len);
                hit += count_correct(f, &out, &y, EVAL_BATCH, p.device(), precision);
            }
        }
    });
    let n = n.max(1) as f64;
    Ok(Quality {
        psnr: psnr / n,
        ssim: ssim / n,
        purified_acc: classifier.map(|_| hit as f64 / n),
        clean_acc: eval.clean_acc,
    })
}

/// Rows: clean, transformed (holes shown grey), the GAN's coarse x1, purified, for 8 evaluation images,
/// all at the classifier's resolution.
fn write_samples(p: &Purifier, cfg: &TrainPurifierConfig, x: &Tensor, path: &Path) -> Result<()> {
    // Eight images spread over the (class-ordered) evaluation subset.
    let n = x.size()[0];
    let pick: Vec<i64> = (0..n.min(8)).map(|i| i * n / n.min(8)).collect();
    let x = x.index_select(0, &Tensor::from_slice(&pick).to_device(x.device()));
    let pass = tch::no_grad(|| p.pass(&x, &cfg.transform));
    let mut rows = vec![("clean", x.shallow_clone()), ("transformed", pass.shown())];
    rows.extend(pass.intermediate());
    rows.push(("purified", pass.purified.shallow_clone()));
    grid::save_tensor_rows(&rows, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_validates() {
        for (name, _) in PRESETS {
            let mut cfg = TrainPurifierConfig::preset(name).unwrap();
            if cfg.ce_weight + cfg.kl_weight > 0.0 {
                // The classifier is given on the command line.
                cfg.classifier = Some("classifier".into());
            }
            cfg.validate()
                .unwrap_or_else(|e| panic!("preset {name}: {e}"));
        }
    }

    #[test]
    fn identity_share_leaves_a_transformed_image_and_bad_shares_are_refused() {
        assert_eq!(identity_count(0.0, 64), 0);
        assert_eq!(identity_count(0.25, 64), 16);
        assert_eq!(identity_count(0.25, 10), 3);
        assert_eq!(identity_count(0.99, 4), 3);
        assert_eq!(identity_count(0.5, 1), 0);
        let mut cfg = TrainPurifierConfig::preset("purifier-demo").unwrap();
        for bad in [-0.1, 1.0, f64::NAN] {
            cfg.identity_fraction = bad;
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains("identity_fraction"), "{e}");
        }
    }
}
