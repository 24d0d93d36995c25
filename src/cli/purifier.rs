//! `atop purifier info` (architecture and parameter counts), `atop purifier interpolate`
//! (a purifier between a fine-tuned one and its start) and `atop purify` (transform +
//! purify a dataset split or a folder of images; PSNR/SSIM against the originals and, with a
//! classifier, accuracy on clean and purified images).

use std::path::PathBuf;

use anyhow::Result;
use atop::data::Split;
use atop::purifier::apply::{self, PurifyInput, PurifyJob, PurifyReport};
use atop::purifier::{self, ArchOverrides, Purifier, PurifierConfig};
use atop::transforms::{Resize, TransformConfig, TransformKind};
use clap::{Args as ClapArgs, Subcommand};
use tch::Device;

use super::Global;
use super::data::DataOverrides;

/// Noise and mask settings of the random transforms (the kind is each command's --transform).
#[derive(Debug, Clone, ClapArgs)]
pub struct TransformArgs {
    /// Gaussian noise standard deviation, in [0,1] pixel units (paper: 0.25).
    #[arg(long)]
    pub sigma: Option<f64>,
    /// Fraction of mask blocks that are holes (paper: 0.25).
    #[arg(long)]
    pub missing_rate: Option<f64>,
    /// RT3: number of disjoint masks (paper: 4).
    #[arg(long)]
    pub pieces: Option<usize>,
    /// Blocks per image side (paper: 8).
    #[arg(long)]
    pub grid: Option<usize>,
    /// One mask for the whole batch instead of one per image.
    #[arg(long)]
    pub per_batch_mask: Option<bool>,
}

impl TransformArgs {
    pub fn overrides(&self) -> atop::transforms::TransformOverrides {
        atop::transforms::TransformOverrides {
            sigma: self.sigma,
            missing_rate: self.missing_rate,
            pieces: self.pieces,
            grid: self.grid,
            per_batch_mask: self.per_batch_mask,
        }
    }

    /// Whether any setting is given.
    pub fn any(&self) -> bool {
        self.overrides().any()
    }

    pub fn apply(&self, cfg: &mut TransformConfig) {
        self.overrides().apply(cfg)
    }
}

/// The purifier's architecture and working resolution, over a preset's or the defaults (the
/// authors' layout).
#[derive(Debug, Clone, ClapArgs)]
pub struct PurifierArchArgs {
    /// Generator width c (a multiple of 4; paper: 48).
    #[arg(long)]
    pub width: Option<usize>,
    /// Discriminator width (DeepFillv2: 64).
    #[arg(long)]
    pub disc_width: Option<usize>,
    /// The contextual-attention branch.
    #[arg(long)]
    pub attention: Option<bool>,
    /// Stride-2 stages of the generator's encoders (DeepFillv2: 2; 1 gives small images a finer
    /// bottleneck).
    #[arg(long)]
    pub stages: Option<usize>,
    /// U-Net skip connections from each encoder to its decoder.
    #[arg(long)]
    pub skips: Option<bool>,
    /// Group normalisation of every gated layer's features.
    #[arg(long)]
    pub group_norm: Option<bool>,
    /// Global residual path (output = input + correction) instead of tanh.
    #[arg(long)]
    pub residual: Option<bool>,
    /// Draw the transform and run the generator at this side (the authors: 256 for CIFAR).
    #[arg(long)]
    pub work_size: Option<usize>,
    /// Resizing up to the working size.
    #[arg(long, value_enum)]
    pub resize_up: Option<Resize>,
    /// Resizing the purified image back to the classifier's size.
    #[arg(long, value_enum)]
    pub resize_down: Option<Resize>,
}

impl PurifierArchArgs {
    pub fn overrides(&self) -> ArchOverrides {
        ArchOverrides {
            width: self.width,
            disc_width: self.disc_width,
            attention: self.attention,
            stages: self.stages,
            skips: self.skips,
            group_norm: self.group_norm,
            residual: self.residual,
            work_size: self.work_size,
            resize_up: self.resize_up,
            resize_down: self.resize_down,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum PurifierCommand {
    /// Parameter counts and output shapes of a purifier architecture or checkpoint.
    Info(InfoArgs),
    /// A purifier between a fine-tuned one and the one it started from: every generator weight
    /// (1 - alpha) * start + alpha * tuned (weight-space ensembling, WiSE-FT), written as a
    /// new checkpoint folder that every command takes as --purifier.
    Interpolate(InterpolateArgs),
}

#[derive(Debug, ClapArgs)]
pub struct InterpolateArgs {
    /// The fine-tuned purifier: a checkpoint folder, a training run, or a generator file in a
    /// checkpoint (e.g. generator-live.safetensors).
    #[arg(long)]
    pub tuned: PathBuf,
    /// The purifier the fine-tuning started from (default: the one its description records).
    #[arg(long)]
    pub start: Option<PathBuf>,
    /// How far from the start (0) toward the tuned purifier (1).
    #[arg(long)]
    pub alpha: f64,
    /// The new checkpoint folder.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, ClapArgs)]
pub struct InfoArgs {
    /// A purifier checkpoint (or training run) to describe instead of an architecture.
    #[arg(long, conflicts_with_all = ["width", "disc_width", "attention", "stages", "skips", "group_norm", "residual", "work_size"])]
    pub purifier: Option<PathBuf>,
    #[command(flatten)]
    pub arch: PurifierArchArgs,
    /// Image side for the shapes.
    #[arg(long, default_value_t = 32, value_parser = crate::cli::image_side)]
    pub image_size: i64,
}

pub fn run(cmd: PurifierCommand, global: &Global) -> Result<()> {
    match cmd {
        PurifierCommand::Info(a) => info(a, global),
        PurifierCommand::Interpolate(a) => {
            let made = purifier::write_interpolated(&a.tuned, a.start.as_deref(), a.alpha, &a.out)?;
            if global.json {
                println!("{}", serde_json::to_string_pretty(&made)?);
            } else {
                println!(
                    "{}: alpha {} from {} to {}",
                    a.out.display(),
                    made.alpha,
                    made.start,
                    made.tuned
                );
            }
            Ok(())
        }
    }
}

fn info(a: InfoArgs, global: &Global) -> Result<()> {
    let p = match &a.purifier {
        Some(path) => purifier::load(path, Device::Cpu)?.0,
        None => {
            let mut cfg = PurifierConfig::default();
            cfg.apply(&a.arch.overrides())?;
            Purifier::new(cfg, Device::Cpu)?
        }
    };
    let out = apply::info(&p, a.image_size)?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", p.describe());
        println!(
            "  network parameters        {:>10}",
            out.generator_parameters
        );
        println!(
            "  discriminator parameters  {:>10}",
            out.discriminator_parameters
        );
        println!(
            "  on {0}x{0} images: purified {1:?} at the working size, {2:?} at the image's{3}",
            a.image_size,
            out.work_shape,
            out.output_shape,
            match out.discriminator_scores_per_image {
                Some(k) => format!(", {k} patch scores per image"),
                None => String::new(),
            }
        );
    }
    Ok(())
}

#[derive(Debug, ClapArgs)]
pub struct PurifyArgs {
    /// A purifier checkpoint folder, a training run, or a generator file in a checkpoint
    /// (e.g. an AToP run's generator-live.safetensors).
    #[arg(long)]
    pub purifier: PathBuf,
    /// Transforms, comma-separated (rt1, rt2, rt3, none); default: the one it was trained with.
    #[arg(long)]
    pub transform: Option<String>,
    #[command(flatten)]
    pub transform_settings: TransformArgs,
    /// The working size you expect the purifier to run at: an error if it was trained at
    /// another (the default: the one it was trained at).
    #[arg(long)]
    pub work_size: Option<usize>,
    /// A folder of images (png/jpg) to purify instead of a dataset split; outputs keep the names.
    #[arg(long, conflicts_with_all = ["dataset", "n"])]
    pub input: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataOverrides,
    #[arg(long, value_enum, default_value = "test")]
    pub split: Split,
    /// A seeded subset of this many images.
    #[arg(value_parser = crate::cli::positive, long)]
    pub n: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also report this classifier's accuracy on clean and purified images.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 250)]
    pub batch_size: usize,
    /// Output folder (default: runs/purify-<transform>).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn purify(a: PurifyArgs, global: &Global) -> Result<()> {
    let transforms = a
        .transform
        .as_ref()
        .map(|list| {
            list.split(',')
                .map(|s| s.parse().map_err(anyhow::Error::msg))
                .collect::<Result<Vec<TransformKind>>>()
        })
        .transpose()?;
    let input = match a.input {
        Some(folder) => PurifyInput::Folder(folder),
        None => PurifyInput::Split {
            data: a.data,
            split: a.split,
            n: a.n,
        },
    };
    let job = PurifyJob {
        purifier: a.purifier,
        classifier: a.classifier,
        input,
        transforms,
        transform: a.transform_settings.overrides(),
        work_size: a.work_size,
        seed: a.seed,
        batch_size: a.batch_size,
        out: a.out,
    };
    let (out, report) = apply::purify_into(&job, global.device)?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_purify(&report);
        println!("wrote {}", out.join("purify.json").display());
    }
    Ok(())
}

fn print_purify(report: &PurifyReport) {
    println!(
        "{} on {} ({:.1} s)",
        report.purifier.display(),
        report.data,
        report.seconds
    );
    for r in &report.results {
        let r = &r.scores;
        let acc = match (
            r.clean_accuracy,
            r.transformed_accuracy,
            r.purified_accuracy,
        ) {
            (Some(c), Some(t), Some(p)) => format!(
                "  accuracy clean {:.2}% -> purified {:.2}% ({:+.2} points; transformed {:.2}%)",
                100.0 * c,
                100.0 * p,
                100.0 * (p - c),
                100.0 * t
            ),
            _ => String::new(),
        };
        println!(
            "  {:<22} PSNR {:.2} dB (transformed {:.2}), SSIM {:.3}{acc}",
            r.transform.describe(),
            r.psnr,
            r.transformed_psnr,
            r.ssim
        );
    }
}
