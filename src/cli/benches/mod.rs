//! `atop bench ...`: timings measured on this machine, printed as a table (or JSON).

mod attacks;
mod data;
mod device;
mod finetune;
mod models;
mod purifier;

use anyhow::Result;
use clap::{Args as ClapArgs, Subcommand};

use super::Global;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Decoding all of CIFAR-10 into memory, and the training iterator's batches/s.
    Data(DataBenchArgs),
    /// Classifier inference and training img/s, side by side with PyTorch in the same venv.
    Models(ModelBenchArgs),
    /// PGD-20 and APGD-CE-100 img/s, side by side with torchattacks on the same weights.
    Attacks(AttackBenchArgs),
    /// Purifier training steps on the resolution pipeline (img/s, side by side with its PyTorch
    /// twin) and the cost of one whole-model attack step through it.
    Purifier(Box<PurifierBenchArgs>),
    /// AToP fine-tuning steps (the attack that makes x', the purifier's pass, the frozen
    /// classifier's CE, the optimizer steps), side by side with a PyTorch reference of the step.
    Atop(Box<AtopBenchArgs>),
    /// An accelerator against the CPU: the classifier's forward and training step, PGD, the
    /// purifier's pass and training step at its working size and the whole model's input
    /// gradient, from the same weights and inputs on both (f32), compared, with each step's
    /// cost per image on each. Run it with `--device cuda`.
    Device(Box<DeviceBenchArgs>),
}

#[derive(Debug, ClapArgs)]
pub struct DeviceBenchArgs {
    /// The trained classifier (checkpoint folder or training run) both devices load.
    #[arg(long)]
    pub model: std::path::PathBuf,
    #[command(flatten)]
    pub data: super::data::ModelDataArgs,
    /// A seeded subset of this many images for the classifier's steps.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 256)]
    pub n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The purifier preset whose generator (freshly initialised, the same weights on both
    /// devices), working size and transform the purifier's steps use.
    #[arg(long, default_value = "purifier-cifar10-paper")]
    pub purifier_preset: String,
    /// Images (the subset's first) for the purifier's steps.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 8)]
    pub purifier_images: usize,
    /// PGD iterations on the classifier (Linf, no random start, step eps / 4).
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 10)]
    pub pgd_steps: usize,
    #[arg(long, default_value = atop::attacks::defaults::EPS_TEXT, value_parser = atop::attacks::parse_eps)]
    pub eps: f64,
}

#[derive(Debug, ClapArgs)]
pub struct AtopBenchArgs {
    /// AToP presets to time (their loss weights, attack, optimizer and precision).
    #[arg(long, num_args = 1.., default_values = ["atop-cifar10-cpu"])]
    pub preset: Vec<String>,
    /// The purifier preset whose network (the GAN generator or the AE), working size and
    /// transform are fine-tuned (e.g. `purifier-ae-cifar10-cpu` with `atop-ae-cifar10-cpu`).
    #[arg(long, default_value = "purifier-cifar10-cpu")]
    pub purifier_preset: String,
    /// Overrides of the presets' attack (e.g. `--adversary fgsm --adversary-target classifier`).
    #[command(flatten)]
    pub adversary: super::train::AdversaryArgs,
    /// Images per step (default: the preset's batch size).
    #[arg(value_parser = crate::cli::batch, long)]
    pub batch: Option<usize>,
    /// Timed steps per round (after `--warmup` untimed ones).
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Alternating rounds of atop and PyTorch timings; the medians are reported.
    #[arg(value_parser = crate::cli::rounds, long, default_value_t = 3)]
    pub rounds: usize,
    /// The frozen classifier (randomly initialised; the CPU presets' classifier by default).
    #[arg(long, default_value = "airnet-32-64-128")]
    pub classifier_arch: atop::models::Arch,
    /// Skip the PyTorch side.
    #[arg(long)]
    pub no_reference: bool,
}

#[derive(Debug, ClapArgs)]
pub struct PurifierBenchArgs {
    /// Purifier training presets to time (their architecture, working size and RT2 settings;
    /// GAN or AE presets, one kind per call); without presets, the widths below.
    #[arg(long, num_args = 1..)]
    pub preset: Vec<String>,
    /// Time the AE purifier's network at its default settings instead of the GAN generator
    /// (an AE preset's: `--preset purifier-ae-cifar10-cpu`).
    #[arg(long, conflicts_with = "preset")]
    pub ae: bool,
    /// Generator widths c (48 is the paper's), each with the architecture flags below.
    #[arg(long, num_args = 1.., default_values = ["48", "16"], conflicts_with = "preset")]
    pub width: Vec<usize>,
    #[command(flatten)]
    pub arch: super::purifier::PurifierArchArgs,
    #[command(flatten)]
    pub transform: super::purifier::TransformArgs,
    /// Images per training step.
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 32)]
    pub batch: usize,
    /// Image side (the classifier's input).
    #[arg(long, default_value_t = 32, value_parser = crate::cli::image_side)]
    pub size: i64,
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Alternating rounds of atop and PyTorch timings; the medians are reported (the machine's
    /// speed drifts, so one measurement of each side is not a comparison).
    #[arg(value_parser = crate::cli::rounds, long, default_value_t = 3)]
    pub rounds: usize,
    /// Images per whole-model attack step (0: skip the attack-step timing).
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 4)]
    pub attack_batch: usize,
    /// Timed whole-model attack steps (after one untimed).
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 3)]
    pub attack_steps: usize,
    /// The classifier behind the purifier in the attack step (randomly initialised; the CPU
    /// presets' classifier by default).
    #[arg(long, default_value = "airnet-32-64-128")]
    pub classifier_arch: atop::models::Arch,
    /// Skip the PyTorch side.
    #[arg(long)]
    pub no_reference: bool,
}

#[derive(Debug, ClapArgs)]
pub struct AttackBenchArgs {
    /// Architectures (randomly initialised; both sides load the same weights).
    #[arg(long, num_args = 1.., default_values = ["airnet-64-256-256"])]
    pub arch: Vec<String>,
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 128)]
    pub batch: usize,
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 1)]
    pub batches: usize,
    /// PGD iterations.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 20)]
    pub pgd_steps: usize,
    /// APGD-CE iterations.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 100)]
    pub apgd_steps: usize,
    /// Put Gaussian noise of this sigma in front of the classifier (a randomized defence,
    /// drawn per image and pixel, on both sides).
    #[arg(long)]
    pub noise: Option<f64>,
    /// EOT draws per attack step (torchattacks' `eot_iter`); above 1 only APGD-CE is timed
    /// (torchattacks' PGD has no EOT).
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 1)]
    pub eot: usize,
    /// Alternating rounds of atop and torchattacks timings; the medians are reported (the
    /// machine's speed drifts, so one measurement of each side is not a comparison).
    #[arg(value_parser = crate::cli::rounds, long, default_value_t = 3)]
    pub rounds: usize,
    /// Skip the torchattacks side.
    #[arg(long)]
    pub no_reference: bool,
}

#[derive(Debug, ClapArgs)]
pub struct ModelBenchArgs {
    /// Architectures to time (each with --batch images of its native size: 32 px, or 64 px for -imagenet).
    #[arg(long, num_args = 1.., default_values = ["wrn-16-4"])]
    pub arch: Vec<String>,
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 128)]
    pub batch: usize,
    /// Timed steps per measurement (after --warmup untimed ones).
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Skip the PyTorch side (atop numbers only).
    #[arg(long)]
    pub no_reference: bool,
    /// Input side (default: 32, or 64 for -imagenet architectures).
    #[arg(long, value_parser = crate::cli::image_side)]
    pub image_size: Option<i64>,
    /// f32, or bf16 autocast (both sides).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: atop::runtime::Precision,
}

#[derive(Debug, ClapArgs)]
pub struct DataBenchArgs {
    /// CIFAR-10 folder or archive (default: found in $ATOP_DATA_DIR).
    #[arg(long)]
    pub cifar10: Option<std::path::PathBuf>,
    /// ImageNette folder or archive (default: found in $ATOP_DATA_DIR); skipped if absent.
    #[arg(long)]
    pub imagenette: Option<std::path::PathBuf>,
    /// ImageNette training resolution for the iterator benchmark.
    #[arg(long, default_value_t = 128)]
    pub imagenette_size: u32,
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 128)]
    pub batch_size: usize,
    /// Batches timed per iterator benchmark.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 200)]
    pub batches: usize,
}

pub fn run(cmd: BenchCommand, global: &Global) -> Result<()> {
    match cmd {
        BenchCommand::Data(args) => data::data(args, global),
        BenchCommand::Models(args) => models::models(args, global),
        BenchCommand::Attacks(args) => attacks::attacks(args, global),
        BenchCommand::Purifier(args) => purifier::purifier(*args, global),
        BenchCommand::Atop(args) => finetune::atop_step(*args, global),
        BenchCommand::Device(args) => device::device(*args, global),
    }
}
