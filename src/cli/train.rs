//! `atop train classifier`: settings from a TOML file, a preset or a resumed run, then flags on
//! top, all merged here into one validated `TrainClassifierConfig`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use atop::data::{DataConfig, DatasetKind};
use atop::models::Arch;
use atop::train::classifier::{self, TrainClassifierConfig};
use atop::train::optim::SgdConfig;
use atop::train::schedule::Schedule;
use clap::{Args as ClapArgs, Subcommand};

use super::Global;

#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Train a classifier (checkpoint every epoch, resumable).
    Classifier(Box<ClassifierArgs>),
}

#[derive(Debug, ClapArgs)]
pub struct ClassifierArgs {
    /// TOML settings file (see presets/ for examples).
    #[arg(long, conflicts_with_all = ["preset", "resume"])]
    pub config: Option<PathBuf>,
    /// Named settings: cifar10-demo, cifar10-cpu, imagenette-cpu (files in presets/).
    #[arg(long, conflicts_with = "resume")]
    pub preset: Option<String>,
    /// Continue the run in this folder from its latest checkpoint (flags below override its settings).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Run folder (default: runs/classifier-<dataset>-<arch>).
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,

    #[arg(long, value_enum)]
    pub dataset: Option<DatasetKind>,
    #[arg(long)]
    pub root: Option<PathBuf>,
    #[arg(long)]
    pub image_size: Option<u32>,
    /// wrn-DEPTH-WIDTH, resnet18|34|50[-imagenet].
    #[arg(long)]
    pub arch: Option<Arch>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
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
    #[arg(long, value_enum)]
    pub schedule: Option<Schedule>,
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub train_subset: Option<usize>,
    #[arg(long)]
    pub test_subset: Option<usize>,
    #[arg(long)]
    pub augment: Option<bool>,
    /// Random-translation range of the 32 px augmentation, in pixels.
    #[arg(long)]
    pub crop_pad: Option<usize>,
    /// Learning-rate multiplier for biases and BatchNorm parameters.
    #[arg(long)]
    pub bias_lr_scale: Option<f64>,
    /// f32, or bf16 autocast (about 2x faster on CPUs with AVX512-BF16, and on recent GPUs).
    #[arg(long, value_enum)]
    pub precision: Option<atop::runtime::Precision>,
}

pub fn run(cmd: TrainCommand, global: &Global) -> Result<()> {
    match cmd {
        TrainCommand::Classifier(args) => train_classifier(*args, global),
    }
}

/// Base settings (file, preset, resumed run, or defaults for --dataset/--arch) plus overrides.
fn settings(a: &ClassifierArgs) -> Result<(TrainClassifierConfig, PathBuf, bool)> {
    let mut cfg = if let Some(run) = &a.resume {
        classifier::saved_config(run)?
    } else if let Some(path) = &a.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        TrainClassifierConfig::from_toml(&text, &path.display().to_string())?
    } else if let Some(name) = &a.preset {
        TrainClassifierConfig::preset(name)?
    } else {
        let (Some(dataset), Some(arch)) = (a.dataset, a.arch) else {
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
    fn set<T: Clone>(field: &mut T, value: &Option<T>) {
        if let Some(v) = value {
            *field = v.clone();
        }
    }
    set(&mut cfg.data.dataset, &a.dataset);
    if a.root.is_some() {
        cfg.data.root = a.root.clone();
    }
    if a.image_size.is_some() {
        cfg.data.image_size = a.image_size;
    }
    set(&mut cfg.arch, &a.arch);
    set(&mut cfg.epochs, &a.epochs);
    set(&mut cfg.batch_size, &a.batch_size);
    set(&mut cfg.lr, &a.lr);
    set(&mut cfg.sgd.momentum, &a.momentum);
    set(&mut cfg.sgd.nesterov, &a.nesterov);
    set(&mut cfg.sgd.weight_decay, &a.weight_decay);
    set(&mut cfg.sgd.decay_bn_and_bias, &a.decay_bn_and_bias);
    set(&mut cfg.schedule, &a.schedule);
    set(&mut cfg.warmup_epochs, &a.warmup_epochs);
    set(&mut cfg.label_smoothing, &a.label_smoothing);
    set(&mut cfg.seed, &a.seed);
    set(&mut cfg.augment, &a.augment);
    set(&mut cfg.crop_pad, &a.crop_pad);
    set(&mut cfg.sgd.bias_lr_scale, &a.bias_lr_scale);
    set(&mut cfg.precision, &a.precision);
    if a.train_subset.is_some() {
        cfg.train_subset = a.train_subset;
    }
    if a.test_subset.is_some() {
        cfg.test_subset = a.test_subset;
    }
    cfg.validate()?;
    let (run, resume) = match (&a.resume, &a.out) {
        (Some(run), _) => (run.clone(), true),
        (None, Some(out)) => (out.clone(), false),
        (None, None) => (classifier::default_out(&cfg), false),
    };
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
