//! A purifier applied to a set of images under one random transform (`atop purify`): the
//! purified and the transformed images, their PSNR and SSIM against the originals and, with a
//! classifier and labels, its accuracy on the clean, transformed and purified images.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::Purifier;
use crate::data::subset::seeded_subset;
use crate::data::{DataOverrides, DatasetKind, Split};
use crate::figures::grid;
use crate::models::accuracy::count_correct;
use crate::models::{Classifier, Model, checkpoint};
use crate::runtime::Precision;
use crate::transforms::{TransformConfig, TransformKind, TransformOverrides};

/// What one transform gave.
pub struct Purified {
    /// The purified images and the purifier's input as shown (noisy, holes grey), on the CPU.
    pub purified: Tensor,
    pub shown: Tensor,
    pub scores: PurifyScores,
}

#[derive(Debug, Clone, Serialize)]
pub struct PurifyScores {
    pub transform: TransformConfig,
    pub n: usize,
    pub psnr: f64,
    pub ssim: f64,
    /// PSNR of the transformed input (noisy, holes grey, at the classifier's size), for
    /// comparison.
    pub transformed_psnr: f64,
    pub clean_accuracy: Option<f64>,
    /// The classifier on the transformed images without purification (holes grey; RT3: the
    /// first masked copy), for scale.
    pub transformed_accuracy: Option<f64>,
    pub purified_accuracy: Option<f64>,
}

/// A classifier's accuracy on `images` with labels `y`.
fn accuracy(c: &dyn Model, images: &Tensor, y: &Tensor, batch: usize, device: Device) -> f64 {
    count_correct(c, images, y, batch, device, Precision::F32) as f64
        / images.size()[0].max(1) as f64
}

/// Purifies `x` (N x 3 x H x W in [0,1], on the CPU) under `t` in batches on `device`, the
/// transform seeded by `seed` (the same call draws the same noise and masks). With a
/// classifier and labels, its accuracies; `clean_accuracy` is passed in so that several
/// transforms of the same images share it.
pub fn purify(
    p: &Purifier,
    x: &Tensor,
    t: &TransformConfig,
    labelled: Option<(&dyn Model, &Tensor, Option<f64>)>,
    seed: u64,
    batch: usize,
    device: Device,
) -> Result<Purified> {
    let (h, w) = (x.size()[2], x.size()[3]);
    p.config().check_images(h, w, t)?;
    tch::manual_seed(seed as i64);
    let n = x.size()[0];
    let (mut purified, mut shown) = (Vec::new(), Vec::new());
    let bar = crate::progress::bar(n as u64, &format!("purify {}", t.kind));
    for start in (0..n).step_by(batch) {
        let len = (n - start).min(batch as i64);
        let xb = x.narrow(0, start, len).to_device(device);
        let pass = tch::no_grad(|| p.pass(&xb, t));
        shown.push(pass.shown().to_device(Device::Cpu));
        purified.push(pass.purified.to_device(Device::Cpu));
        bar.inc(len as u64);
    }
    bar.finish_and_clear();
    let purified = Tensor::cat(&purified, 0);
    let shown = Tensor::cat(&shown, 0);
    let mean = |t: Tensor| t.mean(Kind::Float).double_value(&[]);
    let (clean_accuracy, transformed_accuracy, purified_accuracy) = match labelled {
        Some((c, y, clean)) => (
            Some(clean.unwrap_or_else(|| accuracy(c, x, y, batch, device))),
            Some(accuracy(c, &shown, y, batch, device)),
            Some(accuracy(c, &purified, y, batch, device)),
        ),
        None => (None, None, None),
    };
    let scores = PurifyScores {
        transform: t.clone(),
        n: n as usize,
        psnr: mean(super::psnr(&purified, x)),
        ssim: mean(super::ssim(&purified, x)),
        transformed_psnr: mean(super::psnr(&shown, x)),
        clean_accuracy,
        transformed_accuracy,
        purified_accuracy,
    };
    Ok(Purified {
        purified,
        shown,
        scores,
    })
}

/// Which images `atop purify` transforms and purifies.
#[derive(Debug, Clone)]
pub enum PurifyInput {
    /// A seeded subset (`n`, all by default) of a dataset split: the purifier's training data
    /// unless overridden; labels known.
    Split {
        data: DataOverrides,
        split: Split,
        n: Option<usize>,
    },
    /// Every png/jpg of a folder, all of one size; outputs keep their names.
    Folder(PathBuf),
}

/// One `atop purify` run: the purifier under each transform on the same images.
#[derive(Debug, Clone)]
pub struct PurifyJob {
    /// A purifier checkpoint folder, a training run, or a generator file in a checkpoint.
    pub purifier: PathBuf,
    /// Also score this classifier on the clean, transformed and purified images.
    pub classifier: Option<PathBuf>,
    pub input: PurifyInput,
    /// The transforms to apply (default: the one the purifier was trained with).
    pub transforms: Option<Vec<TransformKind>>,
    /// Noise and mask settings over the purifier's.
    pub transform: TransformOverrides,
    /// The working size the caller expects: an error if the purifier was trained at another.
    pub work_size: Option<usize>,
    pub seed: u64,
    pub batch_size: usize,
    /// Output folder (default: runs/purify-<transforms>).
    pub out: Option<PathBuf>,
}

/// Results for one transform.
#[derive(Debug, Serialize)]
pub struct PurifyResult {
    #[serde(flatten)]
    pub scores: PurifyScores,
    pub images: PathBuf,
    pub grid: PathBuf,
}

/// What `purify_into` wrote to `purify.json`.
#[derive(Debug, Serialize)]
pub struct PurifyReport {
    pub purifier: PathBuf,
    pub classifier: Option<PathBuf>,
    pub data: String,
    pub seconds: f64,
    pub results: Vec<PurifyResult>,
}

/// The images to purify, labels where known, output names for a folder, and a description.
struct Images {
    x: Tensor,
    y: Option<Tensor>,
    names: Option<Vec<String>>,
    desc: String,
}

fn load_images(
    job: &PurifyJob,
    sidecar: &super::PurifierSidecar,
    classifier: Option<&Classifier>,
) -> Result<Images> {
    let (data, split, n) = match &job.input {
        PurifyInput::Folder(folder) => {
            let (x, names) = crate::data::folder::read_flat(folder)?;
            return Ok(Images {
                x,
                y: None,
                names: Some(names),
                desc: folder.display().to_string(),
            });
        }
        PurifyInput::Split { data, split, n } => (data, *split, *n),
    };
    let mut cfg = sidecar
        .data_config()
        .context("the purifier does not say which dataset it was trained on: give a `dataset`")?;
    data.apply(&mut cfg);
    let set = cfg.load(split)?;
    let idx = match n {
        Some(n) => seeded_subset(set.len(), n, job.seed)?,
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
            split.as_str(),
            idx.len(),
            job.seed
        ),
    })
}

/// The output folder, checked: only purify's own files in it, and apart from the input.
fn output_dir(job: &PurifyJob, kinds: &[TransformKind]) -> Result<PathBuf> {
    let out = job.out.clone().unwrap_or_else(|| {
        let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        PathBuf::from("runs").join(format!("purify-{}", names.join("+")))
    });
    let mut own = vec!["purify.json", "grid-*.png", "purified-*.safetensors"];
    let folders: Vec<String> = kinds.iter().map(|k| format!("{}/", k.as_str())).collect();
    own.extend(folders.iter().map(String::as_str));
    crate::io::check_output_dir(&out, &own, "`out`")?;
    if let PurifyInput::Folder(input) = &job.input
        && let (Ok(i), Ok(o)) = (input.canonicalize(), out.canonicalize())
        && (i.starts_with(&o) || o.starts_with(&i))
    {
        bail!(
            "`out` {} and `input` {} overlap: purify never writes over or beside its inputs; choose another `out`",
            out.display(),
            input.display()
        );
    }
    Ok(out)
}

/// The classifier to score, refused when it was trained on another named dataset than the
/// one asked for (numbers without meaning).
fn load_classifier(job: &PurifyJob, device: Device) -> Result<Option<Classifier>> {
    let Some(path) = &job.classifier else {
        return Ok(None);
    };
    let (m, sidecar) = checkpoint::load(path, device)?;
    if let PurifyInput::Split { data, .. } = &job.input
        && let Some(d) = data.dataset
        && let Some(own) = &sidecar.dataset
        && own != d.as_str()
        && d != DatasetKind::Folder
    {
        bail!(
            "`dataset` {}: the classifier was trained on {own}, whose classes are not {}'s",
            d.as_str(),
            d.as_str()
        );
    }
    Ok(Some(m))
}

/// Runs `job`: for each transform, the purified images (safetensors, or PNGs named after a
/// folder's inputs), a grid of clean / transformed / purified images and the scores, all in
/// the output folder with `purify.json`; returns the folder and the report.
pub fn purify_into(job: &PurifyJob, device: Device) -> Result<(PathBuf, PurifyReport)> {
    let started = std::time::Instant::now();
    if job.batch_size == 0 {
        bail!("`batch_size` 0: expected at least 1");
    }
    let dir = super::resolve(&job.purifier)?;
    let (p, sidecar) = super::load(&job.purifier, device)?;
    p.config()
        .expect_work_size(job.work_size, &dir.display().to_string())?;
    let kinds = job
        .transforms
        .clone()
        .unwrap_or_else(|| vec![sidecar.transform.kind]);
    let classifier = load_classifier(job, device)?;
    let images = load_images(job, &sidecar, classifier.as_ref())?;
    let out = output_dir(job, &kinds)?;
    let _lock = crate::folder::lock(&out)?;
    let mut results = Vec::new();
    let mut clean = None;
    for kind in kinds {
        let mut t = TransformConfig {
            kind,
            ..sidecar.transform.clone()
        };
        job.transform.apply(&mut t);
        let labelled = match (&classifier, &images.y) {
            (Some(c), Some(y)) => Some((c as &dyn Model, y, clean)),
            _ => None,
        };
        let done = purify(
            &p,
            &images.x,
            &t,
            labelled,
            job.seed,
            job.batch_size,
            device,
        )?;
        // The same images for every transform: one clean accuracy.
        clean = done.scores.clean_accuracy;
        let written = match &images.names {
            Some(names) => {
                let folder = out.join(kind.as_str());
                grid::save_pngs(&folder, &done.purified, names)?;
                folder
            }
            None => {
                let file = out.join(format!("purified-{kind}.safetensors"));
                crate::io::write_safetensors(
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
        purifier: super::source(&job.purifier)?,
        classifier: job.classifier.clone(),
        data: images.desc,
        seconds: started.elapsed().as_secs_f64(),
        results,
    };
    crate::io::write_json(&out.join("purify.json"), &report)?;
    Ok((out, report))
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

/// A purifier's architecture, parameter counts and shapes on `image_size` images
/// (`atop purifier info`).
#[derive(Debug, Serialize)]
pub struct PurifierInfo {
    pub purifier: super::PurifierConfig,
    /// Parameters of the purifying network (the GAN's generator, the AE's encoder and
    /// decoder) and of the discriminator (0 for the AE).
    pub generator_parameters: i64,
    pub discriminator_parameters: i64,
    pub image_size: i64,
    /// The purified image at the working size.
    pub work_shape: Vec<i64>,
    pub output_shape: Vec<i64>,
    /// None for a purifier without a discriminator (the AE).
    pub discriminator_scores_per_image: Option<i64>,
}

/// [`PurifierInfo`] measured by one pass of a random image (without a transform: the shapes
/// do not depend on it).
pub fn info(p: &Purifier, image_size: i64) -> Result<PurifierInfo> {
    let none = TransformConfig::with_kind(crate::transforms::TransformKind::None);
    p.config().check_images(image_size, image_size, &none)?;
    let x = Tensor::rand([1, 3, image_size, image_size], (Kind::Float, p.device()));
    let pass = tch::no_grad(|| p.pass(&x, &none));
    let (network, critic) = p.parameters();
    Ok(PurifierInfo {
        purifier: p.config(),
        generator_parameters: network,
        discriminator_parameters: critic,
        image_size,
        work_shape: pass.at_work.size(),
        output_shape: pass.purified.size(),
        discriminator_scores_per_image: p.critic_scores_per_image(&pass),
    })
}
