//! `atop train classifier|purifier`: settings from a TOML file, a preset or a resumed run, then
//! flags on top, all merged here into one validated config.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use atop::data::DataConfig;
use atop::models::Arch;
use atop::train::atop::{self as atop_train, TrainAtopConfig};
use atop::train::classifier::{self, TrainClassifierConfig};
use atop::train::optim::SgdConfig;
use atop::train::purifier::{self, TrainPurifierConfig};
use atop::train::schedule::Schedule;
use atop::transforms::TransformKind;
use clap::{Args as ClapArgs, Subcommand};

use super::Global;
use super::data::DataOverrides;

#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Train a classifier (checkpoint every epoch, resumable).
    Classifier(Box<ClassifierArgs>),
    /// Pre-train the GAN purifier under a random transform (checkpoint every epoch, resumable).
    Purifier(Box<PurifierArgs>),
    /// AToP fine-tuning: the pre-trained purifier trained through the frozen classifier on
    /// adversarial inputs (Eq. 9; checkpoint every epoch, resumable).
    Atop(Box<AtopArgs>),
}

/// Where a training run's settings start from and which folder it writes; the flags of each
/// command then override single fields.
#[derive(Debug, ClapArgs)]
pub struct RunSource {
    /// TOML settings file (examples in presets/).
    #[arg(long, conflicts_with_all = ["preset", "resume"])]
    pub config: Option<PathBuf>,
    /// Named settings, a file of presets/ (classifiers: cifar10-demo, cifar10-small,
    /// cifar10-cpu, imagenette-cpu; purifiers: purifier-demo, purifier-cifar10-cpu,
    /// purifier-cifar10-paper; AToP: atop-demo, atop-cifar10-cpu, atop-cifar10-paper).
    #[arg(long, conflicts_with = "resume")]
    pub preset: Option<String>,
    /// Continue the run in this folder from its latest checkpoint, on the inputs and settings it
    /// began with (only --epochs and learning rates may change; each change is recorded).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Run folder (default: runs/<classifier|purifier>-<dataset>-...).
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,
}

impl RunSource {
    /// The base settings from a resumed run, a file or a preset; None when none is given.
    fn base<T>(
        &self,
        saved: impl Fn(&Path) -> Result<T>,
        from_toml: impl Fn(&str, &str) -> Result<T>,
        preset: impl Fn(&str) -> Result<T>,
    ) -> Result<Option<T>> {
        if let Some(run) = &self.resume {
            saved(run).map(Some)
        } else if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            from_toml(&text, &path.display().to_string()).map(Some)
        } else if let Some(name) = &self.preset {
            preset(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The run folder and whether it is resumed.
    fn folder(&self, default: impl FnOnce() -> PathBuf) -> (PathBuf, bool) {
        match (&self.resume, &self.out) {
            (Some(run), _) => (run.clone(), true),
            (None, Some(out)) => (out.clone(), false),
            (None, None) => (default(), false),
        }
    }
}

#[derive(Debug, ClapArgs)]
pub struct PurifierArgs {
    #[command(flatten)]
    pub run: RunSource,
    #[command(flatten)]
    pub data: DataOverrides,
    #[command(flatten)]
    pub arch: super::purifier::PurifierArchArgs,
    /// Random transform to train under: rt1, rt2, rt3 (or none).
    #[arg(long, value_enum)]
    pub transform: Option<TransformKind>,
    #[command(flatten)]
    pub transform_settings: super::purifier::TransformArgs,
    #[command(flatten)]
    pub run_loop: LoopArgs,
    #[command(flatten)]
    pub gan: GanArgs,
    /// Weight of the classifier's CE on purified images (needs --classifier).
    #[arg(long)]
    pub ce_weight: Option<f64>,
    /// Weight of KL(f(clean) || f(purified)), the classifier's clean prediction as the target
    /// (needs --classifier).
    #[arg(long)]
    pub kl_weight: Option<f64>,
    /// Frozen classifier for the CE and KL terms and for the per-epoch purified accuracy.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Epochs of plain reconstruction before the CE/KL guidance starts.
    #[arg(long)]
    pub ce_after_epochs: Option<usize>,
    /// Data-dependent initialisation of the generator (default false: He init only).
    #[arg(long)]
    pub data_init: Option<bool>,
    /// Share of each batch given without the transform, the image itself the target (0: off).
    #[arg(long)]
    pub identity_fraction: Option<f64>,
    #[arg(value_parser = crate::cli::positive, long)]
    pub eval_subset: Option<usize>,
}

#[derive(Debug, ClapArgs)]
pub struct AtopArgs {
    #[command(flatten)]
    pub run: RunSource,
    /// The frozen classifier f.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// The pre-trained purifier g (a checkpoint folder, a purifier training run, or a generator
    /// file in a checkpoint).
    #[arg(long)]
    pub purifier: Option<PathBuf>,
    /// Random transform during fine-tuning (default: the purifier's).
    #[arg(long, value_enum)]
    pub transform: Option<TransformKind>,
    #[command(flatten)]
    pub transform_settings: super::purifier::TransformArgs,
    #[command(flatten)]
    pub run_loop: LoopArgs,
    #[command(flatten)]
    pub gan: GanArgs,
    /// Weight of CE(y, f(g(t(x')))) (paper: 0.1).
    #[arg(long)]
    pub lambda: Option<f64>,
    /// Weight of KL(f(x) || f(g(t(x')))), the classifier's clean prediction as a soft target
    /// (default 0: Eq. 9 as published).
    #[arg(long)]
    pub kl_weight: Option<f64>,
    /// What the generator reconstructs: clean (default) or adversarial.
    #[arg(long, value_enum)]
    pub reconstruction: Option<atop::train::atop::Reconstruction>,
    /// Epochs of plain reconstruction before the CE term starts (the authors: 2).
    #[arg(long)]
    pub ce_after_epochs: Option<usize>,
    #[command(flatten)]
    pub adversary: AdversaryArgs,
    /// Per-epoch evaluation: seeded test images.
    #[arg(value_parser = crate::cli::positive, long)]
    pub eval_subset: Option<usize>,
    /// Per-epoch evaluation: Linf budget.
    #[arg(long, value_parser = atop::attacks::parse_eps)]
    pub eval_eps: Option<f64>,
    /// Per-epoch evaluation: PGD iterations.
    #[arg(value_parser = crate::cli::positive, long)]
    pub eval_steps: Option<usize>,
    /// Per-epoch evaluation: EOT samples of the whole-model attack.
    #[arg(value_parser = crate::cli::positive, long)]
    pub eval_eot: Option<usize>,
    /// Fine-tune a wider generator (this width, a multiple of 4), starting from the
    /// pre-trained one's function: its weights in the first channels, the rest at zero.
    #[arg(value_parser = crate::cli::positive, long)]
    pub widen: Option<usize>,
    /// Keep an exponential moving average of the generator's weights with this decay (e.g.
    /// 0.999) and export it; 0 (default): none.
    #[arg(long)]
    pub ema_decay: Option<f64>,
}

/// The settings every trainer has, declared once.
#[derive(Debug, ClapArgs)]
pub struct LoopArgs {
    #[arg(value_parser = crate::cli::positive, long)]
    pub epochs: Option<usize>,
    #[arg(value_parser = crate::cli::batch, long)]
    pub batch_size: Option<usize>,
    /// Learning-rate schedule (constant, cosine, one-cycle).
    #[arg(long, value_enum)]
    pub schedule: Option<Schedule>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Train on this many seeded training images.
    #[arg(value_parser = crate::cli::positive, long)]
    pub train_subset: Option<usize>,
    /// f32, or bf16 autocast (about 2x faster on CPUs with AVX512-BF16, and on recent GPUs).
    #[arg(long, value_enum)]
    pub precision: Option<atop::runtime::Precision>,
}

/// `LoopArgs` onto a trainer's config: the three configs name these fields alike.
macro_rules! apply_loop_args {
    ($a:expr, $cfg:expr) => {{
        let (a, cfg) = (&$a, &mut $cfg);
        set(&mut cfg.epochs, &a.epochs);
        set(&mut cfg.batch_size, &a.batch_size);
        set(&mut cfg.schedule, &a.schedule);
        set(&mut cfg.seed, &a.seed);
        set_some(&mut cfg.train_subset, &a.train_subset);
        set(&mut cfg.precision, &a.precision);
    }};
}

/// The settings of the two GAN trainers (purifier pre-training and AToP), declared once.
#[derive(Debug, ClapArgs)]
pub struct GanArgs {
    /// Adam learning rate of both the generator and the discriminator.
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub l1_weight: Option<f64>,
    #[arg(long)]
    pub gan_weight: Option<f64>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Write a sample grid every this many steps.
    #[arg(long)]
    pub sample_every: Option<usize>,
}

/// `GanArgs` onto the purifier's or the AToP config (they name these fields alike).
macro_rules! apply_gan_args {
    ($a:expr, $cfg:expr) => {{
        let (a, cfg) = (&$a, &mut $cfg);
        set(&mut cfg.generator_optimizer.lr, &a.lr);
        set(&mut cfg.discriminator_optimizer.lr, &a.lr);
        set(&mut cfg.l1_weight, &a.l1_weight);
        set(&mut cfg.gan_weight, &a.gan_weight);
        set(&mut cfg.warmup_steps, &a.warmup_steps);
        set(&mut cfg.sample_every, &a.sample_every);
    }};
}

/// How x' is made in AToP fine-tuning (shared by `train atop` and `bench atop`).
#[derive(Debug, Default, ClapArgs)]
pub struct AdversaryArgs {
    /// The attack that makes x': fgsm or pgd.
    #[arg(long, value_enum)]
    pub adversary: Option<atop::train::atop::AdversaryKind>,
    /// What it attacks: the classifier alone, or the whole defended model.
    #[arg(long, value_enum)]
    pub adversary_target: Option<atop::train::atop::AdversaryTarget>,
    /// Its Linf budget (e.g. 8/255).
    #[arg(long, value_parser = atop::attacks::parse_eps)]
    pub adversary_eps: Option<f64>,
    /// PGD iterations.
    #[arg(value_parser = crate::cli::positive, long)]
    pub adversary_steps: Option<usize>,
    /// PGD step size (default 2.5 eps / steps).
    #[arg(long, value_parser = atop::attacks::parse_eps)]
    pub adversary_step_size: Option<f64>,
    /// EOT samples per step against the defended model.
    #[arg(value_parser = crate::cli::positive, long)]
    pub adversary_eot: Option<usize>,
    /// Share of each batch made adversarial, in (0, 1]; the rest stays clean (default 1).
    #[arg(long, value_parser = crate::cli::share)]
    pub adversary_fraction: Option<f64>,
    /// Arithmetic of the attack that makes x': f32 (default), bf16 autocast, or auto (bf16
    /// where the hardware computes it natively). Evaluation attacks stay f32.
    #[arg(long, value_enum)]
    pub adversary_precision: Option<atop::runtime::Precision>,
}

impl AdversaryArgs {
    pub fn apply(&self, adv: &mut atop::train::atop::AdversaryConfig) {
        set(&mut adv.attack, &self.adversary);
        set(&mut adv.target, &self.adversary_target);
        set(&mut adv.eps, &self.adversary_eps);
        set(&mut adv.steps, &self.adversary_steps);
        set_some(&mut adv.step_size, &self.adversary_step_size);
        set(&mut adv.eot, &self.adversary_eot);
        set(&mut adv.fraction, &self.adversary_fraction);
        set(&mut adv.precision, &self.adversary_precision);
    }
}

#[derive(Debug, ClapArgs)]
pub struct ClassifierArgs {
    #[command(flatten)]
    pub run: RunSource,
    #[command(flatten)]
    pub data: DataOverrides,
    /// wrn-DEPTH-WIDTH, resnet18|34|50[-imagenet].
    #[arg(long)]
    pub arch: Option<Arch>,
    #[command(flatten)]
    pub run_loop: LoopArgs,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub momentum: Option<f64>,
    #[arg(long)]
    pub nesterov: Option<bool>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Also apply weight decay to BatchNorm and bias parameters.
    #[arg(long)]
    pub decay_bn_and_bias: Option<bool>,
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    #[arg(value_parser = crate::cli::positive, long)]
    pub test_subset: Option<usize>,
    #[arg(long)]
    pub augment: Option<bool>,
    /// Random-translation range of the 32 px augmentation, in pixels.
    #[arg(long)]
    pub crop_pad: Option<usize>,
    /// Learning-rate multiplier for biases and BatchNorm parameters.
    #[arg(long)]
    pub bias_lr_scale: Option<f64>,
}

pub fn run(cmd: TrainCommand, global: &Global) -> Result<()> {
    match cmd {
        TrainCommand::Classifier(args) => train_classifier(*args, global),
        TrainCommand::Purifier(args) => train_purifier(*args, global),
        TrainCommand::Atop(args) => train_atop(*args, global),
    }
}

fn set<T: Clone>(field: &mut T, value: &Option<T>) {
    if let Some(v) = value {
        *field = v.clone();
    }
}

/// For optional settings: given, it replaces the setting; absent, the setting stays.
fn set_some<T: Clone>(field: &mut Option<T>, value: &Option<T>) {
    if value.is_some() {
        *field = value.clone();
    }
}

fn purifier_settings(a: &PurifierArgs) -> Result<(TrainPurifierConfig, PathBuf, bool)> {
    let Some(mut cfg) = a.run.base(
        purifier::saved_config,
        TrainPurifierConfig::from_toml,
        TrainPurifierConfig::preset,
    )?
    else {
        bail!(
            "say what to train: --config FILE, --preset NAME (e.g. purifier-demo) or --resume RUN_DIR"
        );
    };
    a.data.apply(&mut cfg.data);
    let saved = cfg.purifier.clone();
    cfg.purifier.apply(&a.arch.overrides())?;
    if a.run.resume.is_some() && cfg.purifier != saved {
        bail!(
            "a resumed run keeps its purifier ({}); the flags ask for {}: start a new run (--out) to change the architecture or the working size",
            saved.describe(),
            cfg.purifier.describe()
        );
    }
    set(&mut cfg.transform.kind, &a.transform);
    a.transform_settings.apply(&mut cfg.transform);
    apply_loop_args!(a.run_loop, cfg);
    apply_gan_args!(a.gan, cfg);
    set(&mut cfg.ce_weight, &a.ce_weight);
    set(&mut cfg.kl_weight, &a.kl_weight);
    set_some(&mut cfg.classifier, &a.classifier);
    set(&mut cfg.ce_after_epochs, &a.ce_after_epochs);
    set(&mut cfg.data_init, &a.data_init);
    set(&mut cfg.identity_fraction, &a.identity_fraction);
    set(&mut cfg.eval_subset, &a.eval_subset);
    cfg.validate()?;
    let (run, resume) = a.run.folder(|| purifier::default_out(&cfg));
    Ok((cfg, run, resume))
}

fn train_purifier(args: PurifierArgs, global: &Global) -> Result<()> {
    let (cfg, run, resume) = purifier_settings(&args)?;
    let summary = purifier::train(&cfg, &run, global.device, resume)?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let quality = summary.last.as_ref().map_or(String::new(), |m| {
        let acc = match (m.purified_acc, m.clean_acc) {
            (Some(p), Some(c)) => format!(
                ", accuracy purified {:.2}% / clean {:.2}%",
                100.0 * p,
                100.0 * c
            ),
            _ => String::new(),
        };
        format!("PSNR {:.2} dB, SSIM {:.3}{acc}", m.psnr, m.ssim)
    });
    println!(
        "{}: {} epochs ({:.0} s); {quality}; checkpoint {}",
        summary.run.display(),
        summary.epochs,
        summary.seconds,
        summary.checkpoint.display(),
    );
    Ok(())
}

fn atop_settings(a: &AtopArgs) -> Result<(TrainAtopConfig, PathBuf, bool)> {
    let Some(mut cfg) = a.run.base(
        atop_train::saved_config,
        TrainAtopConfig::from_toml,
        TrainAtopConfig::preset,
    )?
    else {
        bail!(
            "say what to run: --config FILE, --preset NAME (e.g. atop-cifar10-cpu) or --resume RUN_DIR"
        );
    };
    if a.run.resume.is_some() && (a.classifier.is_some() || a.purifier.is_some()) {
        bail!("a resumed run keeps its classifier and purifier: drop --classifier and --purifier");
    }
    set_some(&mut cfg.classifier, &a.classifier);
    set_some(&mut cfg.purifier, &a.purifier);
    if a.transform.is_some() || a.transform_settings.any() {
        // Over the run's transform, or the purifier's.
        let mut t = match (&cfg.transform, &cfg.purifier) {
            (Some(t), _) => t.clone(),
            (None, Some(p)) => {
                atop::purifier::read_sidecar(&atop::purifier::resolve(p)?)?.transform
            }
            (None, None) => Default::default(),
        };
        set(&mut t.kind, &a.transform);
        a.transform_settings.apply(&mut t);
        cfg.transform = Some(t);
    }
    apply_loop_args!(a.run_loop, cfg);
    apply_gan_args!(a.gan, cfg);
    set(&mut cfg.lambda, &a.lambda);
    set(&mut cfg.kl_weight, &a.kl_weight);
    set(&mut cfg.reconstruction, &a.reconstruction);
    set(&mut cfg.ce_after_epochs, &a.ce_after_epochs);
    a.adversary.apply(&mut cfg.adversary);
    set(&mut cfg.eval.subset, &a.eval_subset);
    set(&mut cfg.eval.eps, &a.eval_eps);
    set(&mut cfg.eval.steps, &a.eval_steps);
    set(&mut cfg.eval.eot, &a.eval_eot);
    if a.run.resume.is_some() && a.widen.is_some_and(|w| Some(w) != cfg.widen) {
        bail!("a resumed run keeps its generator's width: drop --widen");
    }
    set_some(&mut cfg.widen, &a.widen);
    if a.run.resume.is_some() && a.ema_decay.is_some_and(|d| d != cfg.ema_decay) {
        bail!("a resumed run keeps its weight average: drop --ema-decay");
    }
    set(&mut cfg.ema_decay, &a.ema_decay);
    cfg.validate()?;
    let (run, resume) = a.run.folder(|| atop_train::default_out(&cfg));
    Ok((cfg, run, resume))
}

fn train_atop(args: AtopArgs, global: &Global) -> Result<()> {
    let (cfg, run, resume) = atop_settings(&args)?;
    let summary = atop_train::train(&cfg, &run, global.device, resume)?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "{}: {} epochs ({:.0} s); x' by {}",
        summary.fitted.run.display(),
        summary.fitted.epochs,
        summary.fitted.seconds,
        summary.adversary
    );
    if let Some(m) = &summary.fitted.last {
        println!(
            "  defended clean {:.2}%, whole-model PGD {:.2}%, classifier-only transfer {:.2}% (classifier alone, clean: {:.2}%)",
            100.0 * m.defended_clean_acc,
            100.0 * m.robust_acc,
            100.0 * m.transfer_acc,
            100.0 * m.clean_acc
        );
    }
    println!("  evaluation: {}", summary.evaluation);
    println!("  checkpoint {}", summary.fitted.checkpoint.display());
    Ok(())
}

/// Base settings (file, preset, resumed run, or defaults for --dataset/--arch) plus overrides.
fn settings(a: &ClassifierArgs) -> Result<(TrainClassifierConfig, PathBuf, bool)> {
    let base = a.run.base(
        classifier::saved_config,
        TrainClassifierConfig::from_toml,
        TrainClassifierConfig::preset,
    )?;
    let mut cfg = if let Some(cfg) = base {
        cfg
    } else {
        let (Some(dataset), Some(arch)) = (a.data.dataset, a.arch) else {
            bail!(
                "say what to train: --config FILE, --preset NAME, --resume RUN_DIR, or at least --dataset and --arch"
            );
        };
        TrainClassifierConfig {
            data: DataConfig::new(dataset),
            arch,
            epochs: 30,
            batch_size: 128,
            lr: 0.1,
            sgd: SgdConfig::default(),
            schedule: Schedule::Cosine,
            warmup_epochs: 1.0,
            label_smoothing: 0.0,
            seed: 0,
            augment: true,
            crop_pad: 4,
            train_subset: None,
            test_subset: None,
            eval_batch_size: 256,
            precision: Default::default(),
        }
    };
    a.data.apply(&mut cfg.data);
    set(&mut cfg.arch, &a.arch);
    apply_loop_args!(a.run_loop, cfg);
    set(&mut cfg.lr, &a.lr);
    set(&mut cfg.sgd.momentum, &a.momentum);
    set(&mut cfg.sgd.nesterov, &a.nesterov);
    set(&mut cfg.sgd.weight_decay, &a.weight_decay);
    set(&mut cfg.sgd.decay_bn_and_bias, &a.decay_bn_and_bias);
    set(&mut cfg.warmup_epochs, &a.warmup_epochs);
    set(&mut cfg.label_smoothing, &a.label_smoothing);
    set(&mut cfg.augment, &a.augment);
    set(&mut cfg.crop_pad, &a.crop_pad);
    set(&mut cfg.sgd.bias_lr_scale, &a.bias_lr_scale);
    set_some(&mut cfg.test_subset, &a.test_subset);
    cfg.validate()?;
    let (run, resume) = a.run.folder(|| classifier::default_out(&cfg));
    Ok((cfg, run, resume))
}

fn train_classifier(args: ClassifierArgs, global: &Global) -> Result<()> {
    let (cfg, run, resume) = settings(&args)?;
    let summary = classifier::train(&cfg, &run, global.device, resume)?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{}: {} epochs, test accuracy {:.2}% ({:.0} s); checkpoint {}; curves {}",
            summary.run.display(),
            summary.epochs,
            100.0 * summary.test_acc,
            summary.seconds,
            summary.checkpoint.display(),
            summary.run.join(classifier::CURVES).display()
        );
    }
    Ok(())
}
