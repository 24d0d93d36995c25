//! `atop train atop`: AToP fine-tuning (Lin et al. 2024, Algorithm 1, Eq. 9). A pre-trained
//! purifier g is trained through a frozen classifier f on adversarial inputs:
//!
//!   L_g = L_df(x') + lambda * CE(y, f(g(t(x')))),   L_df = -gan * mean D(x2') + |r - x1'| + |r - x2'|
//!
//! with x' = x + delta adversarial and r the reconstruction target (the clean image, or x' as in
//! the authors' notebooks), at the purifier's working size. D is updated every step with the
//! hinge loss; the generator's GAN term sees the live x2' (the released code detached it). How
//! x' is made is a setting: FGSM or PGD-k against f alone (the authors' code) or against the
//! whole defended model f(g(t(.))) with exact gradients and EOT (the paper's equation).
//!
//! After every epoch, on a fixed seeded subset of test images: the defended model's clean
//! accuracy, its robust accuracy under a fast whole-model attack (PGD with EOT, exact gradients)
//! and under the classifier-only transfer attack (PGD on f alone, then the defended model),
//! labelled as such; `curves.png` plots them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::adam::{Adam, AdamConfig};
use super::ema::Ema;
use super::learner::{EpochSummary, Losses, RunFolder, Step, Task};
use super::purifier::{adversarial_terms, kl_to_clean_prediction, restore_state, save_state};
use super::runlog;
use super::schedule::{Schedule, lr_at};
use crate::attacks::grad::{GradStats, evaluate as gradient};
use crate::attacks::loss;
use crate::attacks::runner::{Runner, RunnerConfig};
use crate::attacks::{AttackName, AttackSettings, Budget, Norm};
use crate::data::augment::Augment;
use crate::data::loader::{EpochIter, Loader, LoaderConfig};
use crate::data::subset::seeded_subset;
use crate::data::{DataConfig, Split};
use crate::figures::{grid, plot};
use crate::models::accuracy::count_correct;
use crate::models::checkpoint;
use crate::models::pipeline::Pipeline;
use crate::models::{Classifier, Model};
use crate::purifier::defended::{Defence, defended};
use crate::purifier::{self, GanPurifier, PurifierSidecar};
use crate::runtime::{Precision, autocast};
use crate::transforms::TransformConfig;

/// What the generator reconstructs (the released code has both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Reconstruction {
    /// The clean image (the authors' logged run; atop's default).
    #[default]
    Clean,
    /// The adversarial input x' itself (the released notebooks; the printed equation).
    Adversarial,
}

/// The attack that makes x' for training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AdversaryKind {
    /// One step of eps (the authors' code).
    #[default]
    Fgsm,
    /// `steps` projected steps of `step_size` from a random start.
    Pgd,
}

/// Which model the training attack differentiates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AdversaryTarget {
    /// The classifier alone, on the clean image (the authors' code).
    #[default]
    Classifier,
    /// The whole defended model f(g(t(.))) with exact gradients and EOT (the paper's Eq. 9).
    Defended,
}

/// How x' is made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdversaryConfig {
    pub attack: AdversaryKind,
    pub target: AdversaryTarget,
    /// Linf budget.
    pub eps: f64,
    /// PGD iterations (FGSM: one step of eps).
    pub steps: usize,
    /// PGD step size (default: 2.5 * eps / steps, Madry et al.).
    pub step_size: Option<f64>,
    /// Gradient samples averaged per step against the defended model.
    pub eot: usize,
    /// Share of each batch made adversarial; the rest stays clean (mixed batches, as in
    /// Goodfellow et al. 2015), so the generator keeps seeing the images it must not spoil.
    /// 1 = every image is x' (Eq. 9).
    pub fraction: f64,
    /// Arithmetic of the attack's passes: f32, or bf16 autocast (as the generator's training
    /// step may use) for a faster x'. The per-epoch evaluation attacks in f32 whatever this is.
    pub precision: Precision,
}

impl Default for AdversaryConfig {
    fn default() -> Self {
        AdversaryConfig {
            attack: AdversaryKind::Fgsm,
            target: AdversaryTarget::Classifier,
            eps: crate::attacks::defaults::EPS,
            steps: 10,
            step_size: None,
            eot: 1,
            fraction: 1.0,
            precision: Precision::F32,
        }
    }
}

impl AdversaryConfig {
    pub fn validate(&self) -> Result<()> {
        Budget::new(Norm::Linf, self.eps).context("adversary.eps")?;
        if self.attack == AdversaryKind::Pgd && self.steps == 0 {
            bail!("adversary.steps = 0: PGD needs at least one step");
        }
        if self.eot == 0 {
            bail!("adversary.eot = 0: expected at least 1 gradient sample per step");
        }
        crate::attacks::check_caps("adversary", self.steps, self.eot)?;
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            bail!(
                "adversary.fraction = {}: expected a share of the batch in (0, 1]",
                self.fraction
            );
        }
        if let Some(s) = self.step_size
            && !(s.is_finite() && s > 0.0)
        {
            bail!("adversary.step_size = {s}: expected a positive number");
        }
        Ok(())
    }

    /// (steps, step size, random start) of the attack.
    pub fn schedule(&self) -> (usize, f64, bool) {
        match self.attack {
            AdversaryKind::Fgsm => (1, self.eps, false),
            AdversaryKind::Pgd => (
                self.steps,
                self.step_size
                    .unwrap_or(2.5 * self.eps / self.steps.max(1) as f64),
                true,
            ),
        }
    }

    /// How many of `n` images a batch makes adversarial (at least one; the first ones of
    /// the shuffled batch).
    pub fn adversarial_count(&self, n: i64) -> i64 {
        ((self.fraction * n as f64 + 0.5).floor() as i64).clamp(1, n.max(1))
    }

    pub fn describe(&self) -> String {
        let share = if self.fraction < 1.0 {
            format!(
                ", on {:.0} % of each batch (the rest clean)",
                100.0 * self.fraction
            )
        } else {
            String::new()
        };
        let arithmetic = match self.precision {
            Precision::F32 => "",
            Precision::Bf16 => ", in bf16 autocast",
            Precision::Auto => ", in bf16 autocast where the hardware has it",
        };
        format!("{}{share}{arithmetic}", self.describe_attack())
    }

    fn describe_attack(&self) -> String {
        let (steps, size, _) = self.schedule();
        let what = match self.attack {
            AdversaryKind::Fgsm => "FGSM".to_string(),
            AdversaryKind::Pgd => format!("PGD-{steps} (step {size:.5})"),
        };
        match self.target {
            AdversaryTarget::Classifier => {
                format!(
                    "{what} at Linf {:.5} against the classifier alone",
                    self.eps
                )
            }
            AdversaryTarget::Defended => format!(
                "{what} at Linf {:.5} against the whole defended model (exact gradients, EOT {})",
                self.eps, self.eot
            ),
        }
    }
}

/// The per-epoch evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AtopEvalConfig {
    /// Seeded test images.
    pub subset: usize,
    /// Linf budget of both attacks.
    pub eps: f64,
    /// PGD iterations (step eps/4, random start) of both attacks.
    pub steps: usize,
    /// EOT samples of the whole-model attack.
    pub eot: usize,
    pub batch_size: usize,
}

impl Default for AtopEvalConfig {
    fn default() -> Self {
        AtopEvalConfig {
            subset: 256,
            eps: crate::attacks::defaults::EPS,
            steps: 10,
            eot: 4,
            batch_size: 64,
        }
    }
}

/// Everything that defines an AToP fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainAtopConfig {
    /// The frozen classifier f (a checkpoint folder, file in it, or training run).
    #[serde(default)]
    pub classifier: Option<PathBuf>,
    /// The pre-trained purifier g.
    #[serde(default)]
    pub purifier: Option<PathBuf>,
    /// The training data (default: the purifier's).
    #[serde(default)]
    pub data: Option<DataConfig>,
    /// The random transform t (default: the one the purifier was trained with).
    #[serde(default)]
    pub transform: Option<TransformConfig>,
    pub epochs: usize,
    pub batch_size: usize,
    /// Weight of CE(y, f(g(t(x')))) (paper: 0.1; the authors' CIFAR-10 notebooks: 0.05).
    #[serde(default = "default_lambda")]
    pub lambda: f64,
    #[serde(default)]
    pub reconstruction: Reconstruction,
    /// Epochs of plain reconstruction on x' before the CE term starts (the authors: 2).
    #[serde(default)]
    pub ce_after_epochs: usize,
    /// Weight of KL(f(x) || f(g(t(x')))), the frozen classifier's own prediction on the clean
    /// image as a soft target (as TRADES keeps clean predictions); 0 (default) is Eq. 9 as
    /// published. Starts with the CE term (`ce_after_epochs`).
    #[serde(default)]
    pub kl_weight: f64,
    /// Weight of each L1 term.
    #[serde(default = "one")]
    pub l1_weight: f64,
    /// Weight of the generator's GAN term (0 also skips the discriminator).
    #[serde(default = "one")]
    pub gan_weight: f64,
    /// Adam, the paper's lr 1e-4 and betas (0.5, 0.999) by default.
    #[serde(default)]
    pub generator_optimizer: AdamConfig,
    #[serde(default)]
    pub discriminator_optimizer: AdamConfig,
    #[serde(default = "constant")]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub adversary: AdversaryConfig,
    #[serde(default)]
    pub eval: AtopEvalConfig,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "yes")]
    pub flip: bool,
    #[serde(default)]
    pub train_subset: Option<usize>,
    /// Write a sample grid every this many steps (0: after each epoch only).
    #[serde(default)]
    pub sample_every: usize,
    #[serde(default)]
    pub precision: Precision,
    /// Fine-tune a wider generator than the pre-trained one: its weights copied into the first
    /// channels of a generator of this width, the extra channels starting at zero, so the
    /// pipeline computes the same function at step 0 with more capacity to learn the new task
    /// (None: the purifier's own width).
    #[serde(default)]
    pub widen: Option<usize>,
    /// Decay of an exponential moving average of the generator's weights, updated after every
    /// step; the checkpoints then export the average (the live weights are kept beside it for
    /// resuming) and the per-epoch evaluation measures both. 0 (default): no average.
    #[serde(default)]
    pub ema_decay: f64,
}

fn default_lambda() -> f64 {
    0.1
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

fn constant() -> Schedule {
    Schedule::Constant
}

/// Named presets (TOML files in `presets/`, compiled in).
pub const PRESETS: &[(&str, &str)] = &[
    ("atop-demo", include_str!("../../presets/atop-demo.toml")),
    (
        "atop-cifar10-cpu",
        include_str!("../../presets/atop-cifar10-cpu.toml"),
    ),
    (
        "atop-cifar10-paper",
        include_str!("../../presets/atop-cifar10-paper.toml"),
    ),
];

impl TrainAtopConfig {
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).with_context(|| format!("{origin}: not a valid AToP training config"))
    }

    pub fn preset(name: &str) -> Result<Self> {
        runlog::preset(PRESETS, name, "AToP")
    }

    /// Checks every setting that needs no file; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.classifier.is_none() {
            bail!("no classifier: set classifier = \"CKPT\" or pass --classifier");
        }
        if self.purifier.is_none() {
            bail!("no purifier: set purifier = \"CKPT\" or pass --purifier (a pre-trained one)");
        }
        if self.epochs == 0 {
            bail!("invalid setting epochs = 0: expected at least 1");
        }
        if self.batch_size == 0 {
            bail!("invalid setting batch_size = 0: expected at least 1");
        }
        for (name, w) in [
            ("lambda", self.lambda),
            ("kl_weight", self.kl_weight),
            ("l1_weight", self.l1_weight),
            ("gan_weight", self.gan_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                bail!("invalid setting {name} = {w}: expected a non-negative number");
            }
        }
        self.generator_optimizer.validate("generator_optimizer")?;
        self.discriminator_optimizer
            .validate("discriminator_optimizer")?;
        self.adversary.validate()?;
        if let Some(t) = &self.transform {
            t.validate(None)?;
        }
        let e = &self.eval;
        Budget::new(Norm::Linf, e.eps).context("eval.eps")?;
        for (name, v) in [
            ("eval.subset", e.subset),
            ("eval.steps", e.steps),
            ("eval.eot", e.eot),
            ("eval.batch_size", e.batch_size),
        ] {
            if v == 0 {
                bail!("invalid setting {name} = 0: expected at least 1");
            }
        }
        crate::attacks::check_caps("eval", e.steps, e.eot)?;
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!(
                "invalid setting ema_decay = {}: expected a number in [0, 1) (0: no weight average)",
                self.ema_decay
            );
        }
        if let Some(w) = self.widen
            && (w < 4 || !w.is_multiple_of(4) || w > purifier::MAX_WIDTH)
        {
            bail!(
                "invalid setting widen = {w}: expected a generator width, a multiple of 4 up to {}",
                purifier::MAX_WIDTH
            );
        }
        Ok(())
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AtopEpoch {
    pub epoch: usize,
    pub lr: f64,
    /// Mean training terms: discriminator hinge loss, generator GAN, L1, CE and KL terms, and
    /// the defended model's accuracy on the training x'.
    pub d_loss: f64,
    pub g_gan: f64,
    pub g_l1: f64,
    pub g_ce: f64,
    /// Absent from runs written before the KL term existed.
    #[serde(default)]
    pub g_kl: f64,
    pub train_adv_acc: f64,
    /// On the evaluation subset: the classifier alone on clean images, the defended model on
    /// clean images, under the whole-model attack, and under the classifier-only transfer attack.
    pub clean_acc: f64,
    pub defended_clean_acc: f64,
    pub robust_acc: f64,
    pub transfer_acc: f64,
    /// With a weight average (`ema_decay`), the fields above measure the averaged generator
    /// (the one the checkpoint exports) and these the live one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<Accuracies>,
    pub img_per_s: f64,
    pub seconds: f64,
}

/// With a weight average: the live generator's weights and the average's update count, beside
/// the checkpoint's (averaged) `generator.safetensors`. Naming this file as a purifier
/// (`--purifier RUN/checkpoints/epoch-N/generator-live.safetensors`) loads the live weights.
const LIVE_GENERATOR: &str = "generator-live.safetensors";

/// The per-epoch evaluation of one generator.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Accuracies {
    pub defended_clean_acc: f64,
    pub robust_acc: f64,
    pub transfer_acc: f64,
}

impl runlog::EpochRecord for AtopEpoch {
    fn epoch(&self) -> usize {
        self.epoch
    }
}

#[derive(Debug, Serialize)]
pub struct AtopSummary {
    pub run: PathBuf,
    pub epochs: usize,
    pub resumed_from_epoch: Option<usize>,
    pub adversary: String,
    pub evaluation: String,
    pub last: Option<AtopEpoch>,
    pub seconds: f64,
    pub checkpoint: PathBuf,
}

pub fn saved_config(run: &Path) -> Result<TrainAtopConfig> {
    runlog::saved_config(run, "AToP")
}

pub fn default_out(cfg: &TrainAtopConfig) -> PathBuf {
    let name = |p: &Option<PathBuf>| {
        p.as_ref()
            .and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    PathBuf::from("runs").join(format!(
        "atop-{}-{}-{:?}-lambda{}",
        name(&cfg.purifier),
        name(&cfg.classifier),
        cfg.adversary.attack,
        cfg.lambda
    ))
}

crate::losses! {
    /// An AToP step.
    pub struct AtopLosses {
        d_loss,
        g_gan,
        g_l1,
        g_ce,
        /// Absent from runs written before the KL term existed.
        #[serde(default)]
        g_kl,
        adv_acc,
    }
}

/// Fine-tunes into `run`; with `resume`, continues from the run's latest checkpoint. Every
/// input is checked before the first step.
pub fn train(
    cfg: &TrainAtopConfig,
    run: &Path,
    device: Device,
    resume: bool,
) -> Result<AtopSummary> {
    cfg.validate()?;
    let folder = RunFolder::open(run, resume)?;
    let (classifier_path, purifier_path) = (
        cfg.classifier.clone().unwrap_or_default(),
        cfg.purifier.clone().unwrap_or_default(),
    );
    let (f, f_sidecar) = checkpoint::load(&classifier_path, device)?;
    let pdir = purifier::resolve(&purifier_path)?;
    let (p, mut p_sidecar) = purifier::load(&purifier_path, device)?;
    if p_sidecar.epoch.unwrap_or(0) == 0 {
        bail!(
            "{}: not a pre-trained purifier (its description records no training epoch): pre-train it with atop train purifier first",
            pdir.display()
        );
    }
    // Widened before anything measures it; the checkpoints then describe the wider generator.
    let p = match cfg.widen {
        Some(w) => p.widened(w).with_context(|| pdir.display().to_string())?,
        None => p,
    };
    p_sidecar.purifier = p.config.clone();
    let data = match &cfg.data {
        Some(d) => d.clone(),
        None => p_sidecar.data_config().with_context(|| {
            format!(
                "{} does not say which data it was trained on: set data in the config",
                pdir.display()
            )
        })?,
    };
    // The classifier and the purifier must serve the same data.
    if let (Some(a), Some(b)) = (&f_sidecar.dataset, &p_sidecar.dataset)
        && a != b
    {
        bail!(
            "the classifier {} was trained for {a}, the purifier {} for {b}",
            classifier_path.display(),
            pdir.display()
        );
    }
    let mut train_set = data.load(Split::Train)?;
    let test_set = data.load(Split::Test)?;
    if train_set.num_classes() != f.spec.num_classes {
        bail!(
            "the classifier {} has {} classes, {} has {}",
            classifier_path.display(),
            f.spec.num_classes,
            train_set.name,
            train_set.num_classes()
        );
    }
    let side = train_set.height as i64;
    if let Some(s) = p_sidecar.image_size
        && s != side
    {
        bail!(
            "the purifier {} was trained on {s} px images, the data here is {side} px",
            pdir.display()
        );
    }
    if let Some(n) = cfg.train_subset {
        train_set = train_set.select(&seeded_subset(train_set.len(), n, cfg.seed)?);
    }
    let transform = cfg
        .transform
        .clone()
        .unwrap_or_else(|| p_sidecar.transform.clone());
    p.config.check_images(side, side, &transform)?;
    // The effective settings, with every default resolved, are what the run records.
    let mut cfg = cfg.clone();
    cfg.data = Some(data);
    cfg.transform = Some(transform.clone());

    let eval_idx = seeded_subset(
        test_set.len(),
        cfg.eval.subset.min(test_set.len()),
        cfg.seed,
    )?;
    let (ex, ey) = test_set.tensors(&eval_idx);
    let eval = EvalSet {
        x: ex.to_kind(Kind::Float).to_device(device),
        y: ey.to_device(device),
        indices: eval_idx.clone(),
    };
    // Measured, not assumed: the training attack must get gradients from its model.
    check_adversary(&f, &p, &transform, &cfg.adversary, &eval)?;

    let train_set = Arc::new(train_set);
    let augment = if cfg.flip {
        Augment::CropFlip { pad: 0 }
    } else {
        Augment::None
    };
    let loader = Loader::new(
        train_set.clone(),
        LoaderConfig::train(cfg.batch_size, augment, cfg.seed),
    );
    if loader.batches_per_epoch() == 0 {
        bail!(
            "batch_size {} is larger than the {} training images",
            cfg.batch_size,
            train_set.len()
        );
    }
    let clean_acc = count_correct(
        &f,
        &eval.x,
        &eval.y,
        cfg.eval.batch_size,
        device,
        Precision::F32,
    ) as f64
        / eval_idx.len().max(1) as f64;
    let mut task = AtopTask {
        tuner: FineTuner::new(&cfg, f, p, transform)?,
        device,
        sidecar: p_sidecar,
        loader,
        batches: None,
        eval,
        clean_acc,
        lr: 0.0,
    };
    let fitted = folder.fit(&cfg, &mut task)?;
    Ok(AtopSummary {
        run: fitted.run,
        epochs: fitted.epochs,
        resumed_from_epoch: fitted.resumed_from_epoch,
        adversary: cfg.adversary.describe(),
        evaluation: eval_description(&cfg.eval),
        last: fitted.last,
        seconds: fitted.seconds,
        checkpoint: fitted.checkpoint,
    })
}

fn eval_description(e: &AtopEvalConfig) -> String {
    format!(
        "{} seeded test images; whole-model PGD-{} (step eps/4, random start) x EOT {} with exact gradients at Linf {:.5}, then selective EOT at the same budget on the points PGD left (the iterate that fooled most of its draws; each image judged on one fresh seeded draw); transfer: the same PGD against the classifier alone, scored on the defended model; robust = the defended model right on the clean and the attacked images",
        e.subset, e.steps, e.eot, e.eps
    )
}

struct EvalSet {
    x: Tensor,
    y: Tensor,
    /// Their indices in the test split.
    indices: Vec<usize>,
}

/// One gradient evaluation of the training attack on a few evaluation images: an error if the
/// gradients are zero or not finite (the attack could not move x').
fn check_adversary(
    f: &Classifier,
    p: &GanPurifier,
    transform: &TransformConfig,
    adv: &AdversaryConfig,
    eval: &EvalSet,
) -> Result<()> {
    let n = eval.x.size()[0].min(4);
    let (x, y) = (eval.x.narrow(0, 0, n), eval.y.narrow(0, 0, n));
    let defence = Defence {
        transform: Some(transform.clone()),
        ..Default::default()
    };
    let (h, w) = (x.size()[2], x.size()[3]);
    let whole = defended(f, Some((p, transform)), &defence, (h, w))?;
    let model: &dyn Model = match adv.target {
        AdversaryTarget::Classifier => f,
        AdversaryTarget::Defended => &whole,
    };
    let mut stats = GradStats::default();
    autocast(x.device(), adv.precision, || {
        gradient(model, &x, &y, &|z| loss::ce(z, &y), 1, &mut stats)
    });
    if stats.zero + stats.non_finite >= stats.evaluations.max(1) {
        bail!(
            "the training attack ({}) cannot run on its model: {} of {} input gradients are zero or not finite",
            adv.describe(),
            stats.zero + stats.non_finite,
            stats.evaluations
        );
    }
    Ok(())
}

/// The fine-tuning itself: the frozen classifier, the purifier and its optimizers, and one step
/// of Algorithm 1 on a batch.
pub struct FineTuner<'a> {
    pub cfg: &'a TrainAtopConfig,
    pub f: Classifier,
    pub p: GanPurifier,
    pub transform: TransformConfig,
    pub opt_g: Adam,
    pub opt_d: Adam,
    /// The generator's weight average (with `ema_decay` > 0).
    pub ema: Option<Ema>,
}

impl<'a> FineTuner<'a> {
    /// Freezes `f` (no gradient into its weights; it always runs in evaluation mode).
    pub fn new(
        cfg: &'a TrainAtopConfig,
        mut f: Classifier,
        p: GanPurifier,
        transform: TransformConfig,
    ) -> Result<Self> {
        f.vs.freeze();
        let opt_g = Adam::new(&p.g_vs, cfg.generator_optimizer);
        let opt_d = Adam::new(&p.d_vs, cfg.discriminator_optimizer);
        let ema = if cfg.ema_decay > 0.0 {
            Some(Ema::new(&p.g_vs, cfg.ema_decay)?)
        } else {
            None
        };
        Ok(FineTuner {
            cfg,
            f,
            p,
            transform,
            opt_g,
            opt_d,
            ema,
        })
    }

    /// Runs `f` on the generator the run exports: the weight average if there is one.
    pub fn with_exported<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.ema {
            Some(ema) => ema.with_average(&self.p.g_vs, f),
            None => f(),
        }
    }

    /// The defended model f(down(g(t(up(.))))) on the current generator, for images of h x w.
    pub fn defended(&self, (h, w): (i64, i64)) -> Result<Pipeline<'_>> {
        let defence = Defence {
            transform: Some(self.transform.clone()),
            ..Default::default()
        };
        defended(&self.f, Some((&self.p, &self.transform)), &defence, (h, w))
    }

    /// x' for a batch: the configured attack on f alone or on the whole defended model (its
    /// current generator, fresh transforms), last iterate.
    pub fn adversarial(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let adv = &self.cfg.adversary;
        let (steps, size, random_start) = adv.schedule();
        let whole = self.defended((x.size()[2], x.size()[3]))?;
        let (model, eot): (&dyn Model, usize) = match adv.target {
            AdversaryTarget::Classifier => (&self.f, 1),
            AdversaryTarget::Defended => (&whole, adv.eot),
        };
        let norm = Norm::Linf;
        let mut a = if random_start {
            norm.random_start(x, adv.eps)
        } else {
            x.copy()
        };
        let mut stats = GradStats::default();
        autocast(x.device(), adv.precision, || {
            for _ in 0..steps {
                let e = gradient(model, &a, y, &|z| loss::ce(z, y), eot, &mut stats);
                a = norm.project(&(&a + norm.direction(&e.grad) * size), x, adv.eps);
            }
        });
        Ok(a.detach())
    }

    /// The training batch: x' for the first `adversary.fraction` of the images, the rest clean.
    pub fn mixed(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let n = x.size()[0];
        let k = self.cfg.adversary.adversarial_count(n);
        if k >= n {
            return self.adversarial(x, y);
        }
        let adv = self.adversarial(&x.narrow(0, 0, k), &y.narrow(0, 0, k))?;
        Ok(Tensor::cat(&[adv, x.narrow(0, k, n - k)], 0))
    }

    /// One step of Algorithm 1 on clean images `x` with labels `y`: x' is made, D takes a hinge
    /// step, G a step on Eq. 9 (the CE term only from `ce_after_epochs` on). `lr_g`/`lr_d` are
    /// this step's learning rates. A step whose loss terms are not finite leaves G unchanged.
    pub fn step(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        epoch: usize,
        lr: (f64, f64),
    ) -> Result<AtopLosses> {
        let cfg = self.cfg;
        let device = x.device();
        self.opt_g.set_lr(lr.0);
        self.opt_d.set_lr(lr.1);
        let x_adv = self.mixed(x, y)?;
        let p = &mut self.p;
        let transform = &self.transform;
        let pass = autocast(device, cfg.precision, || p.pass(&x_adv, transform));
        let masks = &pass.masks;
        let copies = pass.drawn.masks.len() as i64;
        let reference = match cfg.reconstruction {
            Reconstruction::Clean => p.config.resolution().to_work(x),
            Reconstruction::Adversarial => pass.clean.shallow_clone(),
        };
        let target = (reference * 2.0 - 1.0).repeat([copies, 1, 1, 1]);
        let (x1, x2) = (pass.x1.to_kind(Kind::Float), pass.x2.to_kind(Kind::Float));
        let zero = || Tensor::zeros([], (Kind::Float, device));
        let (d_loss, g_gan) = if cfg.gan_weight > 0.0 {
            adversarial_terms(p, &mut self.opt_d, &target, &x2, masks, cfg.precision)
        } else {
            (zero(), zero())
        };
        let g_l1 =
            (&x1 - &target).abs().mean(Kind::Float) + (&x2 - &target).abs().mean(Kind::Float);
        // Gradients flow through the frozen classifier (eval mode, no weight gradients) into g.
        let f = &self.f;
        let logits = autocast(device, cfg.precision, || {
            f.logits(&pass.purified.to_kind(Kind::Float))
        })
        .to_kind(Kind::Float);
        let guided = epoch >= cfg.ce_after_epochs;
        let g_ce = if guided && cfg.lambda > 0.0 {
            logits.cross_entropy_for_logits(y)
        } else {
            zero()
        };
        let g_kl = if guided && cfg.kl_weight > 0.0 {
            kl_to_clean_prediction(f, x, &logits, cfg.precision)
        } else {
            zero()
        };
        let adv_acc = logits
            .argmax(-1, false)
            .eq_tensor(y)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        let g_loss = &g_gan * cfg.gan_weight
            + &g_l1 * cfg.l1_weight
            + &g_ce * cfg.lambda
            + &g_kl * cfg.kl_weight;
        let losses = AtopLosses {
            d_loss: d_loss.double_value(&[]),
            g_gan: g_gan.double_value(&[]),
            g_l1: g_l1.double_value(&[]),
            g_ce: g_ce.double_value(&[]),
            g_kl: g_kl.double_value(&[]),
            adv_acc,
        };
        if losses.terms().iter().all(|(_, v)| v.is_finite()) {
            self.opt_g.zero_grad();
            g_loss.backward();
            self.opt_g.step();
            if let Some(ema) = &mut self.ema {
                ema.update(&p.g_vs);
            }
        }
        p.d_vs.unfreeze();
        Ok(losses)
    }
}

struct AtopTask<'a> {
    tuner: FineTuner<'a>,
    device: Device,
    /// The pre-trained purifier's description (kept, with the fine-tuning recorded).
    sidecar: PurifierSidecar,
    loader: Loader,
    batches: Option<EpochIter>,
    eval: EvalSet,
    clean_acc: f64,
    lr: f64,
}

impl AtopTask<'_> {
    /// Defended clean accuracy, whole-model robust accuracy and transfer accuracy on the
    /// evaluation subset, with seeded randomness (the same draws every epoch). As in `atop
    /// attack`, a point counts as robust only if the defended model also classified its clean
    /// image correctly.
    fn evaluate(&self) -> Result<Accuracies> {
        let t = &self.tuner;
        let e = &t.cfg.eval;
        let (x, y) = (&self.eval.x, &self.eval.y);
        let whole = t.defended((x.size()[2], x.size()[3]))?;
        let mut settings = AttackSettings::new(Budget::new(Norm::Linf, e.eps)?);
        settings.steps = Some(e.steps);
        let run = |model: &dyn Model, eot: usize, attacks: Vec<AttackName>| {
            let mut settings = settings.clone();
            settings.eot = eot;
            Runner {
                model,
                config: RunnerConfig {
                    attacks,
                    settings,
                    batch_size: e.batch_size,
                    seed: t.cfg.seed,
                    model: model.describe(),
                    data: "AToP evaluation subset".into(),
                },
                state_dir: None,
            }
            .run(x, y, &self.eval.indices)
        };
        let whole_report = run(
            &whole,
            e.eot,
            vec![AttackName::Pgd, AttackName::SelectiveEot],
        )?;
        let transfer = run(&t.f, 1, vec![AttackName::Pgd])?;
        // The transferred images on the defended model, where it classified the clean image
        // correctly (one draw each, seeded).
        tch::manual_seed(t.cfg.seed as i64 ^ 0x5eed);
        // (the runner hands its images back on the CPU)
        let on_adv = tch::no_grad(|| whole.logits(&transfer.x_adv.to_device(y.device())))
            .argmax(-1, false)
            .eq_tensor(y);
        let on_adv = Vec::<bool>::try_from(on_adv.to_device(Device::Cpu))?;
        let kept = whole_report
            .records
            .iter()
            .zip(&on_adv)
            .filter(|(r, ok)| r.clean_pred == r.label && **ok)
            .count();
        let n = self.eval.indices.len().max(1) as f64;
        Ok(Accuracies {
            defended_clean_acc: whole_report.clean_accuracy,
            robust_acc: whole_report.robust_accuracy,
            transfer_acc: kept as f64 / n,
        })
    }

    /// Rows: clean, adversarial (training attack), transformed, purified, at the classifier's
    /// resolution, for 8 evaluation images.
    fn write_samples(&self, path: &Path) -> Result<()> {
        let n = self.eval.x.size()[0];
        let k = n.min(8);
        let pick: Vec<i64> = (0..k).map(|i| i * n / k).collect();
        let idx = Tensor::from_slice(&pick).to_device(self.device);
        let (x, y) = (
            self.eval.x.index_select(0, &idx),
            self.eval.y.index_select(0, &idx),
        );
        let adv = self.tuner.adversarial(&x, &y)?;
        let pass = tch::no_grad(|| self.tuner.p.pass(&adv, &self.tuner.transform));
        grid::save_tensor_rows(
            &[
                ("clean", x.shallow_clone()),
                ("adversarial", adv.shallow_clone()),
                ("transformed", pass.shown()),
                ("purified", pass.purified.shallow_clone()),
            ],
            path,
        )
    }
}

impl Task for AtopTask<'_> {
    type Losses = AtopLosses;
    type Record = AtopEpoch;

    fn epochs(&self) -> usize {
        self.tuner.cfg.epochs
    }

    fn steps_per_epoch(&self) -> usize {
        self.loader.batches_per_epoch()
    }

    fn begin_epoch(&mut self, epoch: usize) {
        // Transforms and attack starts draw from libtorch's generator: seeded per epoch, so a
        // resumed run draws what an uninterrupted one does.
        tch::manual_seed(
            (self.tuner.cfg.seed as i64)
                .wrapping_mul(1_000_033)
                .wrapping_add(epoch as i64),
        );
        self.batches = Some(self.loader.epoch(epoch as u64));
    }

    fn step(&mut self, step: Step) -> Result<(AtopLosses, usize)> {
        let cfg = self.tuner.cfg;
        let batch = self
            .batches
            .as_mut()
            .and_then(|b| b.next())
            .context("the batch iterator ended early")?;
        let lr = |peak: f64| {
            lr_at(
                cfg.schedule,
                peak,
                step.global,
                step.total,
                cfg.warmup_steps,
            )
        };
        self.lr = lr(cfg.generator_optimizer.lr);
        let x = batch.images.to_device(self.device);
        let y = batch.labels.to_device(self.device);
        let losses = self.tuner.step(
            &x,
            &y,
            step.epoch,
            (self.lr, lr(cfg.discriminator_optimizer.lr)),
        )?;
        Ok((losses, batch.indices.len()))
    }

    fn after_step(&mut self, run: &Path, step: Step) -> Result<()> {
        let every = self.tuner.cfg.sample_every;
        if every > 0 && (step.global + 1).is_multiple_of(every) {
            self.write_samples(&run.join(format!("samples/step-{:07}.png", step.global + 1)))?;
        }
        Ok(())
    }

    fn progress(&self, m: &AtopLosses) -> String {
        format!(
            "L1 {:.3} CE {:.3} acc(x') {:.1}%",
            m.g_l1,
            m.g_ce,
            100.0 * m.adv_acc
        )
    }

    fn end_epoch(&mut self, run: &Path, e: EpochSummary<AtopLosses>) -> Result<AtopEpoch> {
        let t = &self.tuner;
        t.with_exported(|| {
            self.write_samples(&run.join(format!("samples/epoch-{:04}.png", e.epoch)))
        })?;
        let exported = t.with_exported(|| self.evaluate())?;
        let live = match t.ema {
            Some(_) => Some(self.evaluate()?),
            None => None,
        };
        let l = e.losses;
        Ok(AtopEpoch {
            epoch: e.epoch,
            lr: self.lr,
            d_loss: l.d_loss,
            g_gan: l.g_gan,
            g_l1: l.g_l1,
            g_ce: l.g_ce,
            g_kl: l.g_kl,
            train_adv_acc: l.adv_acc,
            clean_acc: self.clean_acc,
            defended_clean_acc: exported.defended_clean_acc,
            robust_acc: exported.robust_acc,
            transfer_acc: exported.transfer_acc,
            live,
            img_per_s: e.img_per_s,
            seconds: e.started.elapsed().as_secs_f64(),
        })
    }

    fn describe(&self, m: &AtopEpoch) -> String {
        let (which, live) = match &m.live {
            Some(a) => (
                " (weight average)",
                format!(
                    " | live weights: clean {:.1}%, whole-model PGD {:.1}%, transfer {:.1}%",
                    100.0 * a.defended_clean_acc,
                    100.0 * a.robust_acc,
                    100.0 * a.transfer_acc
                ),
            ),
            None => ("", String::new()),
        };
        format!(
            "D {:.3} G gan {:.3} L1 {:.3} CE {:.3} KL {:.3} acc(x') {:.1}% | defended{which}: clean {:.1}%, whole-model PGD {:.1}%, transfer {:.1}% (classifier alone {:.1}%){live} | {:.1} img/s, {:.0} s",
            m.d_loss,
            m.g_gan,
            m.g_l1,
            m.g_ce,
            m.g_kl,
            100.0 * m.train_adv_acc,
            100.0 * m.defended_clean_acc,
            100.0 * m.robust_acc,
            100.0 * m.transfer_acc,
            100.0 * m.clean_acc,
            m.img_per_s,
            m.seconds
        )
    }

    fn save(&self, dir: &Path, epoch: usize, step: usize) -> Result<()> {
        let t = &self.tuner;
        let mut sidecar = self.sidecar.clone();
        sidecar.transform = t.transform.clone();
        sidecar.epoch = Some(sidecar.epoch.unwrap_or(0) + epoch);
        sidecar.step = Some(sidecar.step.unwrap_or(0) + step);
        sidecar.fine_tuning = Some(serde_json::to_value(t.cfg)?);
        // The average is the checkpoint's generator (what --purifier RUN loads); the live
        // weights go beside it for resuming.
        t.with_exported(|| save_state(dir, &t.p, &sidecar, &t.opt_g, &t.opt_d))?;
        if let Some(ema) = &t.ema {
            crate::io::write_safetensors(&dir.join(LIVE_GENERATOR), &ema.live_state(&t.p.g_vs))?;
        }
        Ok(())
    }

    fn restore(&mut self, dir: &Path) -> Result<()> {
        let t = &mut self.tuner;
        restore_state(dir, &mut t.p, &mut t.opt_g, &mut t.opt_d)?;
        if let Some(ema) = &mut t.ema {
            ema.restore(&t.p.g_vs, &dir.join(LIVE_GENERATOR))?;
        }
        Ok(())
    }

    fn finish(&mut self, run: &Path) -> Result<()> {
        write_curves(run)
    }

    fn divergence_hint(&self) -> &'static str {
        "Lower the learning rates, lambda or the gan_weight."
    }
}

/// `curves.png`: the defended model's clean, whole-model robust and transfer accuracy per epoch.
pub fn write_curves(run: &Path) -> Result<()> {
    let m: Vec<AtopEpoch> = runlog::read(run)?;
    let series = |name: &str, f: &dyn Fn(&AtopEpoch) -> f64| plot::Series {
        name: name.into(),
        points: m.iter().map(|e| (e.epoch as f64, 100.0 * f(e))).collect(),
    };
    let chart = plot::line_chart(
        "accuracy (%)",
        "epoch",
        &[
            series("defended, clean", &|e| e.defended_clean_acc),
            series("defended, whole-model PGD+EOT", &|e| e.robust_acc),
            series("defended, transfer (classifier-only PGD)", &|e| {
                e.transfer_acc
            }),
        ],
    );
    grid::save_png(&chart, &run.join("curves.png"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_validates() {
        for (name, _) in PRESETS {
            let mut cfg = TrainAtopConfig::preset(name).unwrap();
            cfg.classifier = Some("c".into());
            cfg.purifier = Some("p".into());
            cfg.validate()
                .unwrap_or_else(|e| panic!("preset {name}: {e}"));
        }
    }

    fn snapshot(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.detach().copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// How many of the variables in `before` (a [`snapshot`]) differ in `vs` now.
    fn moved(before: &[(String, Tensor)], vs: &tch::nn::VarStore) -> usize {
        before
            .iter()
            .zip(snapshot(vs).iter())
            .filter(|((_, a), (_, b))| !a.equal(b))
            .count()
    }

    /// A small random classifier and generator, for steps in unit tests.
    fn tiny_models() -> (Classifier, GanPurifier) {
        use crate::models::{Arch, ModelSpec, dataset_normalisation};
        use crate::purifier::PurifierConfig;
        let (mean, std) = dataset_normalisation(crate::data::DatasetKind::Cifar10);
        let arch: Arch = "wrn-10-1".parse().unwrap();
        let f = Classifier::new(ModelSpec::new(arch, 10, mean, std).unwrap(), Device::Cpu);
        let p = GanPurifier::new(
            PurifierConfig {
                width: 4,
                disc_width: 4,
                attention: false,
                skips: true,
                ..Default::default()
            },
            Device::Cpu,
        )
        .unwrap();
        (f, p)
    }

    /// The authors' training attack: FGSM on the classifier alone.
    fn classifier_fgsm() -> AdversaryConfig {
        AdversaryConfig {
            attack: AdversaryKind::Fgsm,
            target: AdversaryTarget::Classifier,
            ..Default::default()
        }
    }

    /// 8 random CIFAR-sized images and labels.
    fn random_batch() -> (Tensor, Tensor) {
        (
            Tensor::rand([8, 3, 32, 32], (Kind::Float, Device::Cpu)),
            Tensor::randint(10, [8], (Kind::Int64, Device::Cpu)),
        )
    }

    #[test]
    fn a_mixed_batch_attacks_its_share_and_keeps_the_rest_clean() {
        tch::manual_seed(3);
        let mut cfg = TrainAtopConfig::preset("atop-demo").unwrap();
        cfg.adversary = AdversaryConfig {
            attack: AdversaryKind::Pgd,
            target: AdversaryTarget::Defended,
            steps: 1,
            fraction: 0.3,
            ..Default::default()
        };
        assert_eq!(cfg.adversary.adversarial_count(10), 3);
        assert_eq!(cfg.adversary.adversarial_count(1), 1);
        assert!(cfg.adversary.describe().contains("30 % of each batch"));
        let (f, p) = tiny_models();
        let tuner = FineTuner::new(&cfg, f, p, TransformConfig::default()).unwrap();
        let x = Tensor::rand([10, 3, 32, 32], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [10], (Kind::Int64, Device::Cpu));
        let mixed = tuner.mixed(&x, &y).unwrap();
        assert_eq!(mixed.size(), x.size());
        assert!(
            mixed.narrow(0, 3, 7).equal(&x.narrow(0, 3, 7)),
            "the clean share changed"
        );
        let d = (mixed.narrow(0, 0, 3) - x.narrow(0, 0, 3)).abs();
        let per_image = d.amax([1, 2, 3], false);
        for i in 0..3 {
            let m = per_image.double_value(&[i]);
            assert!(m > 0.0 && m <= cfg.adversary.eps + 1e-6, "image {i}: {m}");
        }
    }

    #[test]
    fn the_classifier_stays_frozen_and_its_gradient_reaches_the_purifier() {
        tch::manual_seed(7);
        let mut cfg = TrainAtopConfig::preset("atop-demo").unwrap();
        // Only the CE term through f: if g changes, the gradient went through the classifier.
        cfg.l1_weight = 0.0;
        cfg.gan_weight = 0.0;
        cfg.lambda = 1.0;
        cfg.adversary = AdversaryConfig {
            attack: AdversaryKind::Pgd,
            target: AdversaryTarget::Defended,
            steps: 2,
            ..Default::default()
        };
        let (f, p) = tiny_models();
        let (f0, g0) = (snapshot(&f.vs), snapshot(&p.g_vs));
        // Batch-norm statistics are variables too: a training-mode pass would move them.
        assert!(f0.iter().any(|(k, _)| k.contains("running_mean")));
        let mut tuner = FineTuner::new(&cfg, f, p, TransformConfig::default()).unwrap();
        let x = Tensor::rand([8, 3, 32, 32], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [8], (Kind::Int64, Device::Cpu));
        for _ in 0..2 {
            let l = tuner.step(&x, &y, 5, (1e-2, 1e-2)).unwrap();
            assert!(l.g_ce > 0.0 && l.g_ce.is_finite(), "{l:?}");
        }
        for ((k, a), (_, b)) in f0.iter().zip(snapshot(&tuner.f.vs).iter()) {
            assert!(a.equal(b), "classifier variable {k} changed");
        }
        assert!(
            moved(&g0, &tuner.p.g_vs) > 0,
            "no generator weight moved: the CE gradient did not reach g"
        );
        // x' stays within the budget and the image range.
        let adv = tuner.adversarial(&x, &y).unwrap();
        let d = (&adv - &x).abs().max().double_value(&[]);
        assert!(d <= cfg.adversary.eps + 1e-6, "{d}");
        assert!(adv.min().double_value(&[]) >= 0.0 && adv.max().double_value(&[]) <= 1.0);
    }

    #[test]
    fn a_bf16_training_attack_stays_in_budget_and_follows_the_f32_one() {
        let mut cfg = TrainAtopConfig::preset("atop-demo").unwrap();
        cfg.adversary = AdversaryConfig {
            attack: AdversaryKind::Pgd,
            target: AdversaryTarget::Defended,
            steps: 1,
            ..Default::default()
        };
        let mut x_adv = |precision| {
            cfg.adversary.precision = precision;
            tch::manual_seed(12);
            let (f, p) = tiny_models();
            let tuner = FineTuner::new(&cfg, f, p, TransformConfig::default()).unwrap();
            let (x, y) = random_batch();
            tch::manual_seed(13);
            (
                tuner.adversarial(&x, &y).unwrap(),
                x,
                cfg.adversary.describe(),
            )
        };
        let (full, x, _) = x_adv(Precision::F32);
        let (half, _, described) = x_adv(Precision::Bf16);
        assert!(described.contains("bf16"), "{described}");
        assert_eq!(half.kind(), Kind::Float);
        let d = (&half - &x).abs().max().double_value(&[]);
        assert!(d <= cfg.adversary.eps + 1e-6, "{d}");
        assert!(half.min().double_value(&[]) >= 0.0 && half.max().double_value(&[]) <= 1.0);
        // Same random start and transforms: the steps differ only where bf16 flips a
        // gradient's sign.
        let same = (&full - &x).sign().eq_tensor(&(&half - &x).sign());
        let agree = same
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(agree > 0.7 && agree < 1.0, "sign agreement {agree}");
    }

    #[test]
    fn the_kl_term_trains_g_toward_the_classifiers_clean_prediction() {
        tch::manual_seed(11);
        let mut cfg = TrainAtopConfig::preset("atop-demo").unwrap();
        cfg.l1_weight = 0.0;
        cfg.gan_weight = 0.0;
        cfg.lambda = 0.0;
        cfg.adversary = classifier_fgsm();
        let (x, y) = random_batch();
        let (f, p) = tiny_models();
        let mut off = FineTuner::new(&cfg, f, p, TransformConfig::default()).unwrap();
        let l = off.step(&x, &y, 5, (1e-2, 1e-2)).unwrap();
        assert_eq!((l.g_kl, l.g_ce), (0.0, 0.0), "{l:?}");

        cfg.kl_weight = 1.0;
        // Before the guidance starts the term is off, as CE is.
        let late_cfg = TrainAtopConfig {
            ce_after_epochs: 1,
            ..cfg.clone()
        };
        let (f, p) = tiny_models();
        let mut late = FineTuner::new(&late_cfg, f, p, TransformConfig::default()).unwrap();
        assert_eq!(late.step(&x, &y, 0, (1e-2, 1e-2)).unwrap().g_kl, 0.0);
        let (f, p) = tiny_models();
        let g0 = snapshot(&p.g_vs);
        let mut on = FineTuner::new(&cfg, f, p, TransformConfig::default()).unwrap();
        let l = on.step(&x, &y, 5, (1e-2, 1e-2)).unwrap();
        // A purified image is not the clean one: the divergence is positive, and only it moves g.
        assert!(l.g_kl > 0.0 && l.g_kl.is_finite(), "{l:?}");
        assert!(
            moved(&g0, &on.p.g_vs) > 0,
            "the KL gradient did not reach g"
        );
    }

    #[test]
    fn the_weight_average_leaves_training_alone_and_lags_the_live_weights() {
        let mut cfg = TrainAtopConfig::preset("atop-demo").unwrap();
        cfg.adversary = classifier_fgsm();
        let (x, y) = random_batch();
        // No random transform and the same initial weights in both runs: nothing here reads
        // libtorch's global generator, which tests running in parallel share.
        let transform = TransformConfig {
            kind: crate::transforms::TransformKind::None,
            ..Default::default()
        };
        let (f0, p0) = tiny_models();
        let run = |decay: f64| {
            let cfg = TrainAtopConfig {
                ema_decay: decay,
                ..cfg.clone()
            };
            let (mut f, mut p) = tiny_models();
            f.vs.copy(&f0.vs).unwrap();
            p.g_vs.copy(&p0.g_vs).unwrap();
            p.d_vs.copy(&p0.d_vs).unwrap();
            let mut tuner = FineTuner::new(&cfg, f, p, transform.clone()).unwrap();
            let start = snapshot(&tuner.p.g_vs);
            for _ in 0..3 {
                tuner.step(&x, &y, 5, (1e-2, 1e-2)).unwrap();
            }
            let live = snapshot(&tuner.p.g_vs);
            let exported = tuner.with_exported(|| snapshot(&tuner.p.g_vs));
            // with_exported puts the live weights back.
            assert_eq!(moved(&live, &tuner.p.g_vs), 0);
            (start, live, exported)
        };
        let (_, plain, plain_exported) = run(0.0);
        let (start, live, average) = run(0.9);
        // The average is a shadow: the live trajectory is the one without it.
        for ((k, a), (_, b)) in plain.iter().zip(&live) {
            assert!(a.equal(b), "{k}: the average changed training");
        }
        for ((k, a), (_, b)) in plain.iter().zip(&plain_exported) {
            assert!(
                a.equal(b),
                "{k}: without an average the live weights are exported"
            );
        }
        // After 3 warmed-up updates it lies strictly between the start and the live weights
        // on some variable.
        let between = start
            .iter()
            .zip(&live)
            .zip(&average)
            .filter(|(((_, s), (_, l)), (_, a))| {
                let d_live = (l - a).abs().max().double_value(&[]);
                let d_start = (s - a).abs().max().double_value(&[]);
                d_live > 0.0 && d_start > 0.0
            })
            .count();
        assert!(
            between > 0,
            "the average equals the start or the live weights"
        );
        let mut bad = cfg.clone();
        bad.classifier = Some("c".into());
        bad.purifier = Some("p".into());
        bad.ema_decay = 1.0;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("ema_decay = 1")
        );
    }

    #[test]
    fn bad_settings_name_the_field() {
        let mut cfg = TrainAtopConfig::preset("atop-demo").unwrap();
        cfg.classifier = Some("c".into());
        cfg.purifier = Some("p".into());
        let err = |f: &dyn Fn(&mut TrainAtopConfig)| {
            let mut c = cfg.clone();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(err(&|c| c.lambda = -0.1).contains("lambda = -0.1"));
        assert!(err(&|c| c.kl_weight = f64::NAN).contains("kl_weight"));
        assert!(err(&|c| c.adversary.eot = 0).contains("adversary.eot"));
        for bad in [0.0, 1.5, f64::NAN] {
            assert!(err(&|c| c.adversary.fraction = bad).contains("adversary.fraction"));
        }
        assert!(
            err(&|c| {
                c.adversary.attack = AdversaryKind::Pgd;
                c.adversary.steps = 0
            })
            .contains("adversary.steps")
        );
        assert!(err(&|c| c.eval.subset = 0).contains("eval.subset"));
        assert!(err(&|c| c.purifier = None).contains("no purifier"));
        for bad in [0, 6, 4096] {
            assert!(err(&|c| c.widen = Some(bad)).contains("widen"));
        }
    }
}
