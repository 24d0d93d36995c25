//! What an AToP fine-tuning run is: the training attack, the per-epoch evaluation and the whole
//! run's settings, with their defaults, presets and validation.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::attacks::{Budget, Norm};
use crate::data::DataConfig;
use crate::purifier::{self};
use crate::runtime::Precision;
use crate::train::adam::AdamConfig;
use crate::train::runlog;
use crate::train::schedule::Schedule;
use crate::train::setup;
use crate::transforms::TransformConfig;

/// What the generator reconstructs (the released code has both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Reconstruction {
    /// The clean image (the authors' logged run; atop's default).
    #[default]
    Clean,
    /// The adversarial input x' itself (the released notebooks; the printed equation).
    Adversarial,
}

/// The attack that makes x' for training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum AdversaryKind {
    /// One step of eps (the authors' code).
    #[default]
    Fgsm,
    /// `steps` projected steps of `step_size` from a random start.
    Pgd,
}

/// Which model the training attack differentiates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
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
    ("atop-demo", include_str!("../../../presets/atop-demo.toml")),
    (
        "atop-cifar10-cpu",
        include_str!("../../../presets/atop-cifar10-cpu.toml"),
    ),
    (
        "atop-cifar10-paper",
        include_str!("../../../presets/atop-cifar10-paper.toml"),
    ),
    (
        "atop-ae-cifar10-cpu",
        include_str!("../../../presets/atop-ae-cifar10-cpu.toml"),
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
            bail!("no classifier: set `classifier` to a checkpoint");
        }
        if self.purifier.is_none() {
            bail!("no purifier: set `purifier` to a pre-trained one");
        }
        setup::check_counts(self.epochs, self.batch_size)?;
        setup::check_weights(&[
            ("lambda", self.lambda),
            ("kl_weight", self.kl_weight),
            ("l1_weight", self.l1_weight),
            ("gan_weight", self.gan_weight),
        ])?;
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
