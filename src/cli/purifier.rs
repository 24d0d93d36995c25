//! `atop purifier info` (architecture and parameter counts), `atop purifier interpolate`
//! (a purifier between a fine-tuned one and its start) and `atop purify` (transform +
//! purify a dataset split or a folder of images; PSNR/SSIM against the originals and, with a
//! classifier, accuracy on clean and purified images).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use atop::data::Split;
use atop::data::subset::seeded_subset;
use atop::figures::grid;
use atop::models::Classifier;
use atop::models::checkpoint;
use atop::purifier::apply::{self, PurifyScores};
use atop::purifier::{self, GanPurifier, PurifierConfig};
use atop::transforms::{Resize, TransformConfig, TransformKind};
use clap::{Args as ClapArgs, Subcommand};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

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
    pub fn apply(&self, cfg: &mut PurifierConfig) {
        fn set<T: Copy>(field: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *field = v;
            }
        }
        set(&mut cfg.width, self.width);
        set(&mut cfg.disc_width, self.disc_width);
        set(&mut cfg.attention, self.attention);
        set(&mut cfg.stages, self.stages);
        set(&mut cfg.skips, self.skips);
        set(&mut cfg.group_norm, self.group_norm);
        set(&mut cfg.residual, self.residual);
        if self.work_size.is_some() {
            cfg.work_size = self.work_size;
        }
        set(&mut cfg.resize_up, self.resize_up);
        set(&mut cfg.resize_down, self.resize_down);
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

#[derive(Serialize)]
struct Info {
    purifier: PurifierConfig,
    generator_parameters: i64,
    discriminator_parameters: i64,
    image_size: i64,
    /// The generator's output at the working size.
    work_shape: Vec<i64>,
    output_shape: Vec<i64>,
    discriminator_scores_per_image: i64,
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
            a.arch.apply(&mut cfg);
            GanPurifier::new(cfg, Device::Cpu)?
        }
    };
    let rt2 = TransformConfig::default();
    p.config.check_images(a.image_size, a.image_size, &rt2)?;
    let x = Tensor::rand(
        [1, 3, a.image_size, a.image_size],
        (Kind::Float, Device::Cpu),
    );
    let pass = tch::no_grad(|| p.pass(&x, &rt2));
    let d = tch::no_grad(|| p.discriminator.forward_t(&pass.x2, &pass.masks, false));
    let out = Info {
        purifier: p.config.clone(),
        generator_parameters: p.generator_parameters(),
        discriminator_parameters: p.discriminator_parameters(),
        image_size: a.image_size,
        work_shape: pass.x2.size(),
        output_shape: pass.purified.size(),
        discriminator_scores_per_image: d.size()[1],
    };
    if global.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", p.config.describe());
        println!(
            "  generator parameters      {:>10}",
            out.generator_parameters
        );
        println!(
            "  discriminator parameters  {:>10}",
            out.discriminator_parameters
        );
        println!(
            "  on {0}x{0} images: generator output {1:?}, purified {2:?}, {3} patch scores per image",
            a.image_size, out.work_shape, out.output_shape, out.discriminator_scores_per_image
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

/// Results for one transform.
#[derive(Debug, Serialize)]
struct PurifyResult {
    #[serde(flatten)]
    scores: PurifyScores,
    images: PathBuf,
    grid: PathBuf,
}

#[derive(Serialize)]
struct PurifyReport {
    purifier: PathBuf,
    classifier: Option<PathBuf>,
    data: String,
    seconds: f64,
    results: Vec<PurifyResult>,
}

/// The images to purify: a dataset split (labels known) or a folder (names kept), with a
/// description of them.
struct Images {
    x: Tensor,
    y: Option<Tensor>,
    names: Option<Vec<String>>,
    desc: String,
}

fn load_images(
    a: &PurifyArgs,
    sidecar: &purifier::PurifierSidecar,
    classifier: Option<&Classifier>,
) -> Result<Images> {
    if let Some(folder) = &a.input {
        let (x, names) = read_folder(folder)?;
        return Ok(Images {
            x: x.to_kind(Kind::Float),
            y: None,
            names: Some(names),
            desc: folder.display().to_string(),
        });
    }
    let mut cfg = sidecar
        .data_config()
        .context("the purifier does not say which dataset it was trained on: pass --dataset")?;
    a.data.apply(&mut cfg);
    let set = cfg.load(a.split)?;
    let idx = match a.n {
        Some(n) => seeded_subset(set.len(), n, a.seed)?,
        None => (0..set.len()).collect(),
    };
    let (x, y) = set.tensors(&idx);
    if let Some(c) = classifier
        && c.spec.num_classes != set.num_classes()
    {
        bail!(
            "the classifier has {} classes, {} has {}",
            c.spec.num_classes,
            set.name,
            set.num_classes()
        );
    }
    Ok(Images {
        x: x.to_kind(Kind::Float),
        y: Some(y),
        names: None,
        desc: format!(
            "{} {} n={} seed={}",
            cfg.dataset.as_str(),
            a.split.as_str(),
            idx.len(),
            a.seed
        ),
    })
}

/// The output folder, checked: only purify's own files in it, and apart from the input.
fn purify_out(a: &PurifyArgs, kinds: &[TransformKind]) -> Result<PathBuf> {
    let out = a.out.clone().unwrap_or_else(|| {
        let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        PathBuf::from("runs").join(format!("purify-{}", names.join("+")))
    });
    let mut own = vec!["purify.json", "grid-*.png", "purified-*.safetensors"];
    let folders: Vec<String> = kinds.iter().map(|k| format!("{}/", k.as_str())).collect();
    own.extend(folders.iter().map(String::as_str));
    atop::io::check_output_dir(&out, &own, "--out")?;
    if let Some(input) = &a.input
        && let (Ok(i), Ok(o)) = (input.canonicalize(), out.canonicalize())
        && (i.starts_with(&o) || o.starts_with(&i))
    {
        bail!(
            "--out {} and --input {} overlap: purify never writes over or beside its inputs; choose another --out",
            out.display(),
            input.display()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(out)
}

pub fn purify(a: PurifyArgs, global: &Global) -> Result<()> {
    let started = std::time::Instant::now();
    let dir = purifier::resolve(&a.purifier)?;
    let (p, sidecar) = purifier::load(&a.purifier, global.device)?;
    p.config
        .expect_work_size(a.work_size, &dir.display().to_string())?;
    let kinds: Vec<TransformKind> = match &a.transform {
        Some(list) => list
            .split(',')
            .map(|s| s.parse().map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?,
        None => vec![sidecar.transform.kind],
    };
    if a.batch_size == 0 {
        bail!("--batch-size 0: expected at least 1");
    }
    let classifier = a
        .classifier
        .as_ref()
        .map(|c| checkpoint::load(c, global.device))
        .transpose()?;
    // A classifier scored on another named dataset's images: numbers without meaning.
    if let (Some((_, cs)), Some(d)) = (&classifier, a.data.dataset)
        && let Some(own) = &cs.dataset
        && own != d.as_str()
        && d != atop::data::DatasetKind::Folder
    {
        bail!(
            "--dataset {}: the classifier was trained on {own}, whose classes are not {}'s",
            d.as_str(),
            d.as_str()
        );
    }
    let classifier = classifier.map(|(m, _)| m);
    let images = load_images(&a, &sidecar, classifier.as_ref())?;
    let out = purify_out(&a, &kinds)?;
    let mut results = Vec::new();
    let mut clean = None;
    for kind in kinds {
        let mut t = TransformConfig {
            kind,
            ..sidecar.transform.clone()
        };
        a.transform_settings.apply(&mut t);
        let labelled = match (&classifier, &images.y) {
            (Some(c), Some(y)) => Some((c as &dyn atop::models::Model, y, clean)),
            _ => None,
        };
        let done = apply::purify(
            &p,
            &images.x,
            &t,
            labelled,
            a.seed,
            a.batch_size,
            global.device,
        )?;
        // The same images for every transform: one clean accuracy.
        clean = done.scores.clean_accuracy;
        let written = match &images.names {
            Some(names) => {
                let folder = out.join(kind.as_str());
                write_folder(&folder, &done.purified, names)?;
                folder
            }
            None => {
                let file = out.join(format!("purified-{kind}.safetensors"));
                atop::io::write_safetensors(
                    &file,
                    &[
                        ("images".into(), done.purified.shallow_clone()),
                        ("clean".into(), images.x.shallow_clone()),
                    ],
                )?;
                file
            }
        };
        let grid_path = out.join(format!("grid-{kind}.png"));
        write_grid(&images.x, &done.shown, &done.purified, &grid_path)?;
        results.push(PurifyResult {
            scores: done.scores,
            images: written,
            grid: grid_path,
        });
    }
    let report = PurifyReport {
        purifier: purifier::source(&a.purifier)?,
        classifier: a.classifier.clone(),
        data: images.desc,
        seconds: started.elapsed().as_secs_f64(),
        results,
    };
    atop::io::write_json(&out.join("purify.json"), &report)?;
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

/// Every png/jpg in `folder` (sorted by name), all of one size, as N x 3 x H x W in [0,1].
fn read_folder(folder: &Path) -> Result<(Tensor, Vec<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .with_context(|| format!("cannot read {}", folder.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .png or .jpg images", folder.display());
    }
    let mut size = None;
    let mut bytes = Vec::new();
    let mut names = Vec::new();
    for f in &files {
        let img = image::open(f)
            .with_context(|| format!("{}: not a readable image", f.display()))?
            .to_rgb8();
        let dims = img.dimensions();
        match size {
            None => size = Some(dims),
            Some(s) if s != dims => bail!(
                "{}: {}x{} pixels, but {} is {}x{}: all images of a folder must have one size",
                f.display(),
                dims.0,
                dims.1,
                files[0].display(),
                s.0,
                s.1
            ),
            _ => {}
        }
        bytes.extend_from_slice(img.as_raw());
        names.push(
            f.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
    }
    let (w, h) = size.expect("at least one image");
    let x = Tensor::from_slice(&bytes)
        .view([files.len() as i64, h as i64, w as i64, 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0;
    Ok((x, names))
}

/// PNG files named after the inputs (extension replaced by .png).
fn write_folder(folder: &Path, images: &Tensor, names: &[String]) -> Result<()> {
    std::fs::create_dir_all(folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    let (h, w) = (images.size()[2] as u32, images.size()[3] as u32);
    for (bytes, name) in grid::to_hwc_bytes(images)?.into_iter().zip(names) {
        let img = image::RgbImage::from_raw(w, h, bytes).expect("buffer matches the image size");
        let stem = Path::new(name)
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        grid::save_png(&img, &folder.join(format!("{stem}.png")))?;
    }
    Ok(())
}

fn write_grid(clean: &Tensor, shown: &Tensor, purified: &Tensor, path: &Path) -> Result<()> {
    let k = clean.size()[0].min(8);
    grid::save_tensor_rows(
        &[
            ("clean", clean.narrow(0, 0, k)),
            ("transformed", shown.narrow(0, 0, k)),
            ("purified", purified.narrow(0, 0, k)),
        ],
        path,
    )
}
