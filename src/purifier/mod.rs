//! The purifier `g` of AToP: a DeepFillv2-style inpainting generator (gated convolutions,
//! contextual attention) that fills the holes and noise of a random transform, with its
//! SN-PatchGAN discriminator for (pre-)training.
//!
//! A purifier checkpoint is a folder holding `generator.safetensors`,
//! `discriminator.safetensors` and `purifier.json` (architecture, the transform it was trained
//! with, dataset, provenance), each written atomically.

pub mod ae;
pub mod apply;
pub mod defended;
pub mod discriminator;
pub mod generator;
pub mod layers;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::models::checkpoint::{self, CheckpointError};
use crate::transforms::{Resize, Resolution, TransformConfig, Transformed, assemble};
use discriminator::Discriminator;
use generator::{Generator, Layout};

pub const GENERATOR: &str = "generator.safetensors";
pub const DISCRIMINATOR: &str = "discriminator.safetensors";
pub const SIDECAR: &str = "purifier.json";
/// Entries of a generator weight file that are training state, not weights: the update
/// counter of the weight average stored beside an AToP run's live generator.
pub const TRAINING_STATE_PREFIX: &str = "ema.";
const FORMAT: &str = "atop-purifier";
const FORMAT_VERSION: u32 = 2;

/// The purifier's architecture and working resolution. The defaults are the authors' layout;
/// `stages`, `skips`, `group_norm` and `residual` are trainability options (docs/purifier.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PurifierConfig {
    /// Generator width c (a multiple of 4; the paper's 48 gives 4.05 M parameters).
    pub width: usize,
    /// The contextual-attention branch of the fine stage.
    pub attention: bool,
    /// Stride-2 stages of the generator's encoders: 2 (DeepFillv2) or 1 (a finer bottleneck
    /// for small images).
    pub stages: usize,
    /// U-Net skip connections from each encoder to its decoder.
    pub skips: bool,
    /// Group normalisation of every gated layer's features.
    pub group_norm: bool,
    /// Global residual path: each stage outputs its input plus a correction (clamped to
    /// [-1,1]) instead of tanh of the correction.
    pub residual: bool,
    /// Discriminator width (DeepFillv2: 64).
    pub disc_width: usize,
    /// The side the transform is drawn at and the generator runs at: images are resized to it
    /// first and the purified image back to the classifier's size (the authors: 256 for
    /// CIFAR). None = the images' own resolution.
    pub work_size: Option<usize>,
    /// Resizing to the working size (the authors: bilinear).
    pub resize_up: Resize,
    /// Resizing the purified image back to the classifier's size.
    pub resize_down: Resize,
}

impl Default for PurifierConfig {
    fn default() -> Self {
        let r = Resolution::default();
        PurifierConfig {
            width: 48,
            attention: true,
            stages: 2,
            skips: false,
            group_norm: false,
            residual: false,
            disc_width: 64,
            work_size: None,
            resize_up: r.up,
            resize_down: r.down,
        }
    }
}

impl PurifierConfig {
    pub fn validate(&self) -> Result<()> {
        if self.width < 4 || !self.width.is_multiple_of(4) {
            bail!(
                "purifier width = {}: expected a positive multiple of 4 (the generator uses c/4 channels; paper: 48)",
                self.width
            );
        }
        if self.width > MAX_WIDTH {
            bail!(
                "purifier width = {}: expected at most {MAX_WIDTH} (the paper uses 48)",
                self.width
            );
        }
        if !(1..=2).contains(&self.stages) {
            bail!(
                "purifier stages = {}: expected 1 or 2 stride-2 stages (DeepFillv2: 2)",
                self.stages
            );
        }
        if self.disc_width == 0 || self.disc_width > MAX_WIDTH {
            bail!(
                "purifier disc_width = {}: expected 1 to {MAX_WIDTH} (DeepFillv2: 64)",
                self.disc_width
            );
        }
        if let Some(s) = self.work_size {
            let m = self.layout().side_multiple() as usize;
            if s < m || !s.is_multiple_of(m) || s > MAX_WORK_SIZE {
                bail!(
                    "purifier work_size = {s}: expected a multiple of {m} (the generator's strides) up to {MAX_WORK_SIZE}, e.g. 256"
                );
            }
        }
        Ok(())
    }

    pub fn layout(&self) -> Layout {
        Layout {
            width: self.width as i64,
            attention: self.attention,
            stages: self.stages as i64,
            skips: self.skips,
            norm: self.group_norm,
            residual: self.residual,
        }
    }

    pub fn resolution(&self) -> Resolution {
        Resolution {
            work_size: self.work_size,
            up: self.resize_up,
            down: self.resize_down,
        }
    }

    /// Checks that images of `h` x `w` can be purified under `transform`: the working size is
    /// not below the images', the generator's strides and the transform's grid divide it.
    pub fn check_images(&self, h: i64, w: i64, transform: &TransformConfig) -> Result<()> {
        let r = self.resolution();
        r.check(
            h,
            w,
            self.layout().side_multiple(),
            "the generator's strides",
        )?;
        let (wh, ww) = r.work_dims(h, w);
        transform.validate(Some(wh))?;
        if ww != wh {
            transform.validate(Some(ww))?;
        }
        Ok(())
    }

    /// An error when a caller asked for a working size other than the one this purifier was
    /// trained at (`origin` names the checkpoint).
    pub fn expect_work_size(&self, requested: Option<usize>, origin: &str) -> Result<()> {
        match requested {
            Some(r) if Some(r) != self.work_size => bail!(
                "{origin} was trained at {}, not at the requested work size {r}: its weights are tuned to that resolution (retrain it at {r}, or drop the work-size request)",
                match self.work_size {
                    Some(s) => format!("work size {s}"),
                    None => "the images' own size (no work_size)".into(),
                }
            ),
            _ => Ok(()),
        }
    }

    pub fn describe(&self) -> String {
        let mut parts = vec![format!("c={}", self.width)];
        if !self.attention {
            parts.push("no attention".into());
        }
        if self.stages != 2 {
            parts.push(format!("{} stage", self.stages));
        }
        for (on, name) in [
            (self.skips, "skips"),
            (self.group_norm, "group norm"),
            (self.residual, "residual"),
        ] {
            if on {
                parts.push(name.into());
            }
        }
        parts.push(self.resolution().describe());
        format!("gan-purifier({})", parts.join(", "))
    }
}

/// Bounds that keep a typo from allocating the machine away.
pub const MAX_WIDTH: usize = 1024;
/// 1024 px: four times the paper's 256 (ImageNet-scale purification); one 4096 px image through
/// the paper's generator would need tens of GiB of activations.
pub const MAX_WORK_SIZE: usize = 1024;

/// The JSON sidecar of a purifier checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurifierSidecar {
    pub format: String,
    /// 2 since the transform is drawn at the working size (version 1 drew it at the image's
    /// size and only resized for the generator).
    pub format_version: u32,
    pub purifier: PurifierConfig,
    /// The transform it was trained with (the default for purification).
    pub transform: TransformConfig,
    pub dataset: Option<String>,
    pub image_size: Option<i64>,
    /// Completed training epochs and optimizer steps, if it comes from `atop train purifier`.
    pub epoch: Option<usize>,
    pub step: Option<usize>,
    pub config: serde_json::Value,
    /// The AToP fine-tuning settings, for a purifier that `atop train atop` produced (its
    /// `config` stays the pre-training's).
    #[serde(default)]
    pub fine_tuning: Option<serde_json::Value>,
    /// Set on a purifier that `atop purifier interpolate` made from a fine-tuned one.
    #[serde(default)]
    pub interpolation: Option<Interpolation>,
    pub atop_version: String,
    pub torch_version: String,
}

/// Where an interpolated purifier ([`GanPurifier::interpolated`]) comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Interpolation {
    /// The checkpoint the interpolation started from (a folder, or a generator file in one).
    pub start: String,
    /// The fine-tuned checkpoint (a folder, or a generator file in one).
    pub tuned: String,
    /// How far along the line from start (0) to tuned (1).
    pub alpha: f64,
    /// SHA-256 of the start's and the tuned checkpoint's folders (absent before 2026-12-07).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuned_sha256: Option<String>,
}

impl PurifierSidecar {
    /// The purifier an AToP fine-tuning started from, as its settings record it.
    pub fn fine_tuned_from(&self) -> Option<PathBuf> {
        let from = self.fine_tuning.as_ref()?.get("purifier")?.as_str()?;
        Some(PathBuf::from(from))
    }

    /// The data it was trained on: its training config's `data`, or a dataset name alone.
    pub fn data_config(&self) -> Option<crate::data::DataConfig> {
        self.config
            .get("data")
            .and_then(|d| serde_json::from_value(d.clone()).ok())
            .or_else(|| {
                self.dataset
                    .as_ref()
                    .and_then(|d| serde_json::from_value(serde_json::Value::String(d.clone())).ok())
                    .map(crate::data::DataConfig::new)
            })
    }

    pub fn new(purifier: PurifierConfig, transform: TransformConfig) -> Self {
        PurifierSidecar {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            purifier,
            transform,
            dataset: None,
            image_size: None,
            epoch: None,
            step: None,
            config: serde_json::Value::Null,
            fine_tuning: None,
            interpolation: None,
            atop_version: env!("CARGO_PKG_VERSION").into(),
            torch_version: env!("ATOP_TORCH_VERSION").into(),
        }
    }
}

/// Generator and discriminator, each in its own VarStore (they have separate optimizers).
pub struct GanPurifier {
    pub config: PurifierConfig,
    pub g_vs: VarStore,
    pub generator: Generator,
    pub d_vs: VarStore,
    pub discriminator: Discriminator,
}

fn count(vs: &VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

impl GanPurifier {
    /// A freshly initialised purifier (libtorch's generator draws the weights).
    pub fn new(config: PurifierConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let g_vs = VarStore::new(device);
        let generator = Generator::new(&g_vs.root(), config.layout());
        let d_vs = VarStore::new(device);
        let discriminator = Discriminator::new(&d_vs.root(), config.disc_width as i64);
        Ok(GanPurifier {
            config,
            g_vs,
            generator,
            d_vs,
            discriminator,
        })
    }

    pub fn device(&self) -> Device {
        self.g_vs.device()
    }

    /// This purifier with its generator widened to `width` channels, computing the same
    /// function ([`Generator::widen_from`]); the discriminator is copied as it is.
    pub fn widened(&self, width: usize) -> Result<GanPurifier> {
        if width < self.config.width {
            bail!(
                "widen = {width}: expected at least the purifier's width {}",
                self.config.width
            );
        }
        if self.config.group_norm {
            bail!(
                "widen = {width}: a purifier with group_norm cannot be widened without changing its output (its groups change)"
            );
        }
        let config = PurifierConfig {
            width,
            ..self.config.clone()
        };
        let mut wide = GanPurifier::new(config, self.device())?;
        wide.generator
            .widen_from(&self.generator)
            .with_context(|| format!("widen = {width}"))?;
        wide.d_vs.copy(&self.d_vs)?;
        Ok(wide)
    }

    /// The purifier on the straight line between the one a fine-tuning started from
    /// (`start`) and its result (`self`), `alpha` of the way to the result: every generator
    /// weight is (1 - alpha) * start + alpha * tuned (weight-space ensembling, WiSE-FT,
    /// Wortsman et al. 2022), the discriminator is the tuned one. A `start` narrower than the
    /// tuned generator (a fine-tuning with `widen`) enters at the tuned width computing its own
    /// function ([`Generator::widen_from`] into a copy of the tuned weights, so the weights
    /// that cannot affect that function are the tuned ones and stay put): alpha = 0 computes
    /// exactly what `start` computes, alpha = 1 what `self` computes.
    pub fn interpolated(&self, start: &GanPurifier, alpha: f64) -> Result<GanPurifier> {
        check_alpha(alpha)?;
        let same_layout = PurifierConfig {
            width: self.config.width,
            ..start.config.clone()
        } == self.config;
        if !same_layout || start.config.width > self.config.width {
            bail!(
                "the start ({}) is not the tuned purifier's architecture ({}) at the same or a smaller width",
                start.config.describe(),
                self.config.describe()
            );
        }
        let copy = || -> Result<GanPurifier> {
            let mut p = GanPurifier::new(self.config.clone(), self.device())?;
            p.g_vs.copy(&self.g_vs)?;
            p.d_vs.copy(&self.d_vs)?;
            Ok(p)
        };
        let mut anchor = copy()?;
        if start.config.width == self.config.width {
            anchor.g_vs.copy(&start.g_vs)?;
        } else {
            anchor.generator.widen_from(&start.generator)?;
        }
        // The start's weights become the result in place: one copy of the generator, not two.
        let to = self.g_vs.variables();
        tch::no_grad(|| {
            for (name, mut w) in anchor.g_vs.variables() {
                let mixed = &w * (1.0 - alpha) + &to[&name] * alpha;
                w.copy_(&mixed);
            }
        });
        Ok(anchor)
    }

    pub fn generator_parameters(&self) -> i64 {
        count(&self.g_vs)
    }

    pub fn discriminator_parameters(&self) -> i64 {
        count(&self.d_vs)
    }

    /// The generator on `noisy` images in [0,1] with `mask` (1 = hole), at their own size:
    /// (x1, x2) in [-1,1].
    pub fn generate(&self, noisy: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
        self.generator.forward(&(noisy * 2.0 - 1.0), mask)
    }

    /// The generator's data-dependent initialisation ([`Generator::normalise`]) on a batch of
    /// clean images, transformed at the working size.
    pub fn normalise(&self, x: &Tensor, transform: &TransformConfig) {
        let t = transform.sample(&self.config.resolution().to_work(x));
        let (noisy, masks) = generator_batch(&t);
        let _ = self.generator.normalise(&(noisy * 2.0 - 1.0), &masks);
    }

    /// The whole purification of `x` (N x 3 x H x W in [0,1]), differentiable in `x`: resized
    /// to the working size, transformed there, purified there (every masked copy in one
    /// generator batch, assembled for RT3), and resized back to H x W.
    pub fn pass(&self, x: &Tensor, transform: &TransformConfig) -> Pass {
        let resolution = self.config.resolution();
        let clean = resolution.to_work(x);
        let drawn = transform.sample(&clean);
        let (noisy, masks) = generator_batch(&drawn);
        let (x1, x2) = self.generate(&noisy, &masks);
        let (h, w) = (x.size()[2], x.size()[3]);
        let purified = resolution.to_image(&purified_from(&x2, &drawn), h, w);
        Pass {
            clean,
            drawn,
            masks,
            x1,
            x2,
            purified,
            resolution,
            size: (h, w),
        }
    }

    /// Draws `transform` on `x` (N x 3 x H x W in [0,1]) and purifies it ([`GanPurifier::pass`]).
    pub fn purify(&self, x: &Tensor, transform: &TransformConfig) -> Tensor {
        self.pass(x, transform).purified
    }

    /// Writes the checkpoint folder: both weight files, then the sidecar (last, so a folder
    /// with a sidecar is complete).
    pub fn save(&self, dir: &Path, sidecar: &PurifierSidecar) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        checkpoint::save_vars(&self.g_vs, &dir.join(GENERATOR))?;
        checkpoint::save_vars(&self.d_vs, &dir.join(DISCRIMINATOR))?;
        crate::io::write_json(&dir.join(SIDECAR), sidecar)
    }

    /// Loads weights saved by [`GanPurifier::save`] into this purifier (strict names/shapes).
    pub fn load_weights(&mut self, dir: &Path) -> Result<(), CheckpointError> {
        self.load_generator(&dir.join(GENERATOR))?;
        self.load_discriminator(dir)
    }

    fn load_discriminator(&mut self, dir: &Path) -> Result<(), CheckpointError> {
        let what = self.config.describe();
        let d = dir.join(DISCRIMINATOR);
        checkpoint::copy_into(
            &self.d_vs,
            &format!("{what} discriminator"),
            checkpoint::read_tensors(&d)?,
            &d,
        )
    }

    /// Loads generator weights from `file` (strict names/shapes), skipping the training
    /// state that may sit beside them ([`TRAINING_STATE_PREFIX`]).
    pub fn load_generator(&mut self, file: &Path) -> Result<(), CheckpointError> {
        let weights = checkpoint::read_tensors(file)?
            .into_iter()
            .filter(|(k, _)| !k.starts_with(TRAINING_STATE_PREFIX))
            .collect();
        checkpoint::copy_into(
            &self.g_vs,
            &format!("{} generator", self.config.describe()),
            weights,
            file,
        )
    }
}

/// One purification ([`GanPurifier::pass`]): what the trainer, the sample grids and `atop
/// purify` need besides the purified image.
pub struct Pass {
    /// The clean images at the working size, in [0,1].
    pub clean: Tensor,
    /// The transform, drawn at the working size.
    pub drawn: Transformed,
    /// The generator's masks, stacked like its batch (one copy per mask for RT3).
    pub masks: Tensor,
    /// The generator's coarse and fine outputs on that batch, in [-1,1], at the working size.
    pub x1: Tensor,
    pub x2: Tensor,
    /// The purified images in [0,1] at the input size.
    pub purified: Tensor,
    resolution: Resolution,
    size: (i64, i64),
}

impl Pass {
    /// Working-size images back at the input size.
    pub fn at_input_size(&self, t: &Tensor) -> Tensor {
        self.resolution.to_image(t, self.size.0, self.size.1)
    }

    /// The transformed images (holes grey; RT3: the first masked copy) at the input size.
    pub fn shown(&self) -> Tensor {
        self.at_input_size(&self.drawn.shown())
    }

    /// The coarse output (RT3: the first copy) in [0,1] at the input size.
    pub fn coarse(&self) -> Tensor {
        let n = self.drawn.noisy.size()[0];
        let x1 = ((self.x1.narrow(0, 0, n) + 1.0) * 0.5).clamp(0.0, 1.0);
        self.at_input_size(&x1)
    }
}

/// The generator's batch for a drawn transform: the noisy images once per mask (RT3 draws
/// several) and the masks stacked in the same order.
pub fn generator_batch(t: &Transformed) -> (Tensor, Tensor) {
    let k = t.masks.len() as i64;
    let noisy = if k == 1 {
        t.noisy.shallow_clone()
    } else {
        t.noisy.repeat([k, 1, 1, 1])
    };
    let masks = match t.masks.as_slice() {
        [one] => one.shallow_clone(),
        many => Tensor::cat(many, 0),
    };
    (noisy, masks)
}

/// The purified image in [0,1] from the generator's fine output on [`generator_batch`]: each
/// copy's output taken whole (one mask) or assembled from its hole pixels (RT3).
pub fn purified_from(x2: &Tensor, t: &Transformed) -> Tensor {
    let outputs = ((x2 + 1.0) * 0.5)
        .clamp(0.0, 1.0)
        .split(t.noisy.size()[0], 0);
    assemble(&outputs, &t.masks)
}

/// The checkpoint folder for a purifier argument: the folder itself, the folder of a given
/// file, or a training run's latest checkpoint (via `last.json`).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let dir = checkpoint::resolve_folder(path, SIDECAR)?;
    if !dir.join(SIDECAR).exists() {
        bail!(
            "{}: no {SIDECAR} here: expected a purifier checkpoint folder or a purifier training run",
            path.display()
        );
    }
    Ok(dir)
}

pub fn read_sidecar(dir: &Path) -> Result<PurifierSidecar> {
    let path = dir.join(SIDECAR);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    parse_sidecar(&text, &path)
}

/// A purifier description from its JSON text, validated; `path` names it in errors.
pub fn parse_sidecar(text: &str, path: &Path) -> Result<PurifierSidecar> {
    let s: PurifierSidecar = serde_json::from_str(text)
        .with_context(|| format!("{}: not an atop purifier description", path.display()))?;
    if s.format != FORMAT {
        bail!(
            "{}: format is '{}', expected '{FORMAT}'",
            path.display(),
            s.format
        );
    }
    if s.format_version < FORMAT_VERSION && s.purifier.work_size.is_some() {
        bail!(
            "{}: format_version {} with work_size {}: this purifier was trained with the transform drawn at the image's size and only the generator at the working size; atop now draws the transform at the working size, so its numbers would not carry over: retrain it",
            path.display(),
            s.format_version,
            s.purifier.work_size.unwrap_or_default()
        );
    }
    s.purifier
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    if let Some(size) = s.image_size
        && !(1..=crate::data::MAX_IMAGE_SIZE as i64).contains(&size)
    {
        bail!(
            "{}: image_size = {size}: expected 1 to {} pixels",
            path.display(),
            crate::data::MAX_IMAGE_SIZE
        );
    }
    s.transform
        .validate(None)
        .with_context(|| format!("{}: transform", path.display()))?;
    Ok(s)
}

/// Loads a purifier checkpoint (folder, file in it, or training run) onto `device`. A
/// `generator*.safetensors` file other than the folder's own generator is loaded in its place
/// (e.g. `generator-live.safetensors`, the live weights of an AToP run that exports a weight
/// average); the description and the discriminator come from its folder.
pub fn load(path: &Path, device: Device) -> Result<(GanPurifier, PurifierSidecar)> {
    let dir = resolve(path)?;
    let sidecar = read_sidecar(&dir)?;
    let mut p = GanPurifier::new(sidecar.purifier.clone(), device)?;
    p.load_generator(&chosen_generator(path).unwrap_or_else(|| dir.join(GENERATOR)))?;
    p.load_discriminator(&dir)?;
    Ok((p, sidecar))
}

/// What a purifier argument loads, for reports: the generator file it names in place of its
/// folder's own ([`load`]), else the checkpoint folder.
pub fn source(path: &Path) -> Result<PathBuf> {
    match chosen_generator(path) {
        Some(file) => Ok(file),
        None => resolve(path),
    }
}

/// The generator file a purifier argument names in place of its folder's `generator.safetensors`.
fn chosen_generator(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let other_generator =
        name != GENERATOR && name.starts_with("generator") && name.ends_with(".safetensors");
    (path.is_file() && other_generator).then(|| path.to_path_buf())
}

fn check_alpha(alpha: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&alpha) {
        bail!("alpha = {alpha}: expected a number from 0 (the start) to 1 (the tuned purifier)");
    }
    Ok(())
}

/// Writes the purifier `alpha` of the way from `start` to `tuned` ([`GanPurifier::interpolated`])
/// as a checkpoint folder `out`, described as `tuned` is plus where it came from. `start`
/// defaults to the purifier the fine-tuning recorded as its start. `out` must be a new folder,
/// or one holding only an earlier result of this command; never one of the inputs.
pub fn write_interpolated(
    tuned: &Path,
    start: Option<&Path>,
    alpha: f64,
    out: &Path,
) -> Result<Interpolation> {
    check_alpha(alpha)?;
    let (late, mut sidecar) = load(tuned, Device::Cpu)?;
    let start = match start {
        Some(s) => s.to_path_buf(),
        None => sidecar.fine_tuned_from().with_context(|| {
            format!(
                "{}: its description records no fine-tuning start: name the purifier it started from with `start`",
                tuned.display()
            )
        })?,
    };
    // Recorded before AToP recorded its paths absolute: relative to a working directory that
    // is not known; refused rather than guessed.
    if !start.is_absolute() {
        bail!(
            "{}: its description records its fine-tuning start as {}, relative to the folder the run was started from, which is not known: name the start with `start`",
            tuned.display(),
            start.display()
        );
    }
    let (early, early_sidecar) = load(&start, Device::Cpu)
        .with_context(|| format!("the start of the interpolation, {}", start.display()))?;
    if (early_sidecar.dataset.as_ref(), early_sidecar.image_size)
        != (sidecar.dataset.as_ref(), sidecar.image_size)
    {
        bail!(
            "{} was trained on {:?} at {:?} px, {} on {:?} at {:?} px: expected the same data",
            start.display(),
            early_sidecar.dataset,
            early_sidecar.image_size,
            tuned.display(),
            sidecar.dataset,
            sidecar.image_size
        );
    }
    // A fine-tuned description counts the start's epochs and its own.
    if let (Some(before), Some(after)) = (early_sidecar.epoch, sidecar.epoch)
        && before >= after
    {
        bail!(
            "{} records {before} training epochs, {} only {after}: it cannot be the start of that fine-tuning; name its start with `start`",
            start.display(),
            tuned.display()
        );
    }
    for input in [resolve(tuned)?, resolve(&start)?] {
        if let (Ok(i), Ok(o)) = (input.canonicalize(), out.canonicalize())
            && i == o
        {
            bail!(
                "`out` {} is an input's folder: interpolate never writes over its inputs; choose another `out`",
                out.display()
            );
        }
    }
    let record = Interpolation {
        start: crate::folder::absolute(&source(&start)?)
            .display()
            .to_string(),
        tuned: crate::folder::absolute(&source(tuned)?)
            .display()
            .to_string(),
        alpha,
        start_sha256: Some(crate::folder::folder_sha256(&resolve(&start)?)?),
        tuned_sha256: Some(crate::folder::folder_sha256(&resolve(tuned)?)?),
    };
    // A folder holding only these files is an earlier write of this command: an unfinished
    // one (no description yet, written last) is redone, a finished one of the same
    // interpolation is the result, any other purifier is kept.
    crate::io::check_output_dir(out, &[GENERATOR, DISCRIMINATOR, SIDECAR], "`out`")?;
    let _lock = crate::folder::lock(out)?;
    if out.join(SIDECAR).exists() {
        let earlier = read_sidecar(out)?.interpolation;
        // The same inputs by content (and where they were read), the same alpha.
        if earlier.as_ref().is_some_and(|e| {
            (e.start.as_str(), e.tuned.as_str()) == (&record.start, &record.tuned)
                && (&e.start_sha256, &e.tuned_sha256)
                    == (&record.start_sha256, &record.tuned_sha256)
                && (e.alpha - alpha).abs() < 1e-12
        }) {
            return Ok(record);
        }
        bail!(
            "`out` {} holds another purifier ({}): choose a new folder",
            out.display(),
            match earlier {
                Some(e) => format!("alpha {} from {} to {}", e.alpha, e.start, e.tuned),
                None => "not an interpolation".into(),
            }
        );
    }
    let mixed = late.interpolated(&early, alpha)?;
    sidecar.interpolation = Some(record.clone());
    mixed.save(out, &sidecar)?;
    Ok(record)
}

/// Peak signal-to-noise ratio (dB) of `a` against `b` (both in [0,1]), per sample.
pub fn psnr(a: &Tensor, b: &Tensor) -> Tensor {
    let mse = (a - b)
        .square()
        .flatten(1, -1)
        .mean_dim(1, false, Kind::Float)
        .clamp_min(1e-12);
    mse.log10() * -10.0
}

/// Structural similarity (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5, on each channel,
/// averaged), per sample, for images in [0,1].
pub fn ssim(a: &Tensor, b: &Tensor) -> Tensor {
    let c = a.size()[1];
    let coords = Tensor::arange(11, (Kind::Float, a.device())) - 5.0;
    let g = (coords.square() / (-2.0 * 1.5 * 1.5)).exp();
    let g = &g / g.sum(Kind::Float);
    let window = g
        .view([11, 1])
        .matmul(&g.view([1, 11]))
        .view([1, 1, 11, 11])
        .repeat([c, 1, 1, 1]);
    let blur = |t: &Tensor| t.conv2d(&window, None::<Tensor>, [1, 1], [5, 5], [1, 1], c);
    let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
    let (ma, mb) = (blur(&a), blur(&b));
    let va = blur(&(&a * &a)) - ma.square();
    let vb = blur(&(&b * &b)) - mb.square();
    let cov = blur(&(&a * &b)) - &ma * &mb;
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let map = ((&ma * &mb * 2.0 + c1) * (cov * 2.0 + c2))
        / ((ma.square() + mb.square() + c1) * (va + vb + c2));
    map.flatten(1, -1).mean_dim(1, false, Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::TransformKind;

    #[test]
    fn parameter_counts_match_deepfillv2() {
        // Width 48: 1,631,151 (coarse) + 2,421,327 (fine) = 4,052,478; D at width 64: 5,946,816.
        let p = GanPurifier::new(PurifierConfig::default(), Device::Cpu).unwrap();
        assert_eq!(p.generator_parameters(), 4_052_478);
        assert_eq!(p.discriminator_parameters(), 5_946_816);
        let small = GanPurifier::new(
            PurifierConfig {
                width: 16,
                ..Default::default()
            },
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(small.generator_parameters(), 454_574);
    }

    #[test]
    fn shapes_at_several_resolutions() {
        tch::manual_seed(0);
        let cfg = PurifierConfig {
            width: 8,
            disc_width: 4,
            ..Default::default()
        };
        let p = GanPurifier::new(cfg.clone(), Device::Cpu).unwrap();
        for side in [32, 64, 224, 256] {
            let x = Tensor::rand([2, 3, side, side], (Kind::Float, Device::Cpu));
            for kind in [TransformKind::Rt1, TransformKind::Rt2, TransformKind::Rt3] {
                let out = tch::no_grad(|| p.purify(&x, &TransformConfig::with_kind(kind)));
                assert_eq!(out.size(), [2, 3, side, side], "{kind} at {side}");
                assert!(out.min().double_value(&[]) >= 0.0 && out.max().double_value(&[]) <= 1.0);
            }
            let mask = TransformConfig::with_kind(TransformKind::Rt1)
                .sample(&x)
                .masks
                .remove(0);
            let (x1, x2) = tch::no_grad(|| p.generate(&x, &mask));
            assert_eq!(x1.size(), x2.size());
            let d = tch::no_grad(|| p.discriminator.forward_t(&x2, &mask, false));
            assert_eq!(d.size()[0], 2);
        }
        // Up-sampled working resolution: outputs come back at the input's size.
        let up = GanPurifier::new(
            PurifierConfig {
                work_size: Some(64),
                ..cfg
            },
            Device::Cpu,
        )
        .unwrap();
        let x = Tensor::rand([1, 3, 32, 32], (Kind::Float, Device::Cpu));
        let out = tch::no_grad(|| up.purify(&x, &TransformConfig::default()));
        assert_eq!(out.size(), [1, 3, 32, 32]);
    }

    #[test]
    fn every_trainability_option_keeps_the_shapes_and_one_stage_keeps_the_parameters() {
        tch::manual_seed(4);
        let base = PurifierConfig {
            width: 8,
            disc_width: 4,
            ..Default::default()
        };
        let params = GanPurifier::new(base.clone(), Device::Cpu)
            .unwrap()
            .generator_parameters();
        let variants = [
            PurifierConfig {
                stages: 1,
                ..base.clone()
            },
            PurifierConfig {
                skips: true,
                ..base.clone()
            },
            PurifierConfig {
                group_norm: true,
                ..base.clone()
            },
            PurifierConfig {
                residual: true,
                ..base.clone()
            },
            PurifierConfig {
                stages: 1,
                skips: true,
                group_norm: true,
                residual: true,
                attention: false,
                ..base.clone()
            },
        ];
        for cfg in variants {
            let p = GanPurifier::new(cfg.clone(), Device::Cpu).unwrap();
            if cfg
                == (PurifierConfig {
                    stages: 1,
                    ..base.clone()
                })
            {
                assert_eq!(p.generator_parameters(), params);
            }
            for side in [32, 64] {
                let x = Tensor::rand([2, 3, side, side], (Kind::Float, Device::Cpu));
                for kind in [TransformKind::Rt2, TransformKind::Rt3, TransformKind::None] {
                    let t = TransformConfig::with_kind(kind);
                    let pass = tch::no_grad(|| p.pass(&x, &t));
                    assert_eq!(
                        pass.purified.size(),
                        [2, 3, side, side],
                        "{}",
                        cfg.describe()
                    );
                    let v = pass.purified.isfinite().all();
                    assert!(bool::try_from(v).unwrap(), "{}", cfg.describe());
                }
            }
        }
        // The residual path starts near the identity: the output follows the input.
        let res = GanPurifier::new(
            PurifierConfig {
                residual: true,
                ..base.clone()
            },
            Device::Cpu,
        )
        .unwrap();
        let x = Tensor::rand([4, 3, 32, 32], (Kind::Float, Device::Cpu));
        let none = TransformConfig::with_kind(TransformKind::None);
        let corr = |p: &GanPurifier| {
            let y = tch::no_grad(|| p.purify(&x, &none));
            let (a, b) = (&x - x.mean(Kind::Float), &y - y.mean(Kind::Float));
            ((&a * &b).mean(Kind::Float) / (a.std(true) * b.std(true) + 1e-12)).double_value(&[])
        };
        assert!(corr(&res) > 0.9, "residual: {}", corr(&res));
    }

    #[test]
    fn a_widened_generator_computes_the_same_function_and_its_new_channels_learn() {
        tch::manual_seed(6);
        let base = PurifierConfig {
            width: 8,
            disc_width: 4,
            ..Default::default()
        };
        let layouts = [
            // DeepFillv2's: attention (a second input part at the merge), two stages.
            base.clone(),
            // The CPU preset's: skips (second input parts in both decoders), no attention.
            PurifierConfig {
                attention: false,
                skips: true,
                ..base.clone()
            },
            PurifierConfig {
                attention: false,
                skips: true,
                stages: 1,
                residual: true,
                ..base.clone()
            },
        ];
        let x = Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let mask = TransformConfig::with_kind(TransformKind::Rt1)
            .sample(&x)
            .masks
            .remove(0);
        for cfg in layouts {
            let narrow = GanPurifier::new(cfg.clone(), Device::Cpu).unwrap();
            // Data-dependent init, so the output depends on the input (He init alone barely).
            narrow.normalise(&x, &TransformConfig::default());
            let wide = narrow.widened(16).unwrap();
            assert_eq!(wide.config.width, 16);
            assert!(wide.generator_parameters() > 3 * narrow.generator_parameters());
            let (a1, a2) = tch::no_grad(|| narrow.generate(&x, &mask));
            let (b1, b2) = tch::no_grad(|| wide.generate(&x, &mask));
            assert!(a2.std(true).double_value(&[]) > 1e-3, "{}", cfg.describe());
            for (a, b) in [(a1, b1), (a2, b2)] {
                let d = (a - b).abs().max().double_value(&[]);
                assert!(d < 1e-5, "{}: outputs differ by {d}", cfg.describe());
            }
            let (d_narrow, d_wide) = tch::no_grad(|| {
                (
                    narrow.discriminator.forward_t(&x, &mask, false),
                    wide.discriminator.forward_t(&x, &mask, false),
                )
            });
            assert!(d_narrow.equal(&d_wide), "the discriminator was not copied");
            // The extra channels start at exactly zero and get a gradient: they will learn.
            let (_, x2) = wide.generate(&x, &mask);
            x2.square().mean(Kind::Float).backward();
            let vars = wide.g_vs.variables();
            let conv1 = &vars["coarse.conv1.weight"];
            let extra = conv1.narrow(0, 4, 4);
            assert_eq!(extra.abs().sum(Kind::Float).double_value(&[]), 0.0);
            let g = conv1.grad().narrow(0, 4, 4).abs().sum(Kind::Float);
            assert!(g.double_value(&[]) > 0.0, "{}", cfg.describe());
        }
        let narrow = GanPurifier::new(base.clone(), Device::Cpu).unwrap();
        let e = narrow.widened(4).err().unwrap().to_string();
        assert!(e.contains("widen = 4") && e.contains("width 8"), "{e}");
        let normed = GanPurifier::new(
            PurifierConfig {
                group_norm: true,
                ..base
            },
            Device::Cpu,
        )
        .unwrap();
        let e = normed.widened(16).err().unwrap().to_string();
        assert!(e.contains("group_norm"), "{e}");
    }

    #[test]
    fn an_interpolated_purifier_runs_from_the_start_function_to_the_tuned_weights() {
        tch::manual_seed(8);
        let cfg = PurifierConfig {
            width: 8,
            disc_width: 4,
            attention: false,
            skips: true,
            ..Default::default()
        };
        let x = Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let mask = TransformConfig::with_kind(TransformKind::Rt1)
            .sample(&x)
            .masks
            .remove(0);
        let start = GanPurifier::new(cfg.clone(), Device::Cpu).unwrap();
        start.normalise(&x, &TransformConfig::default());
        // Tuned at the same width and at twice it: weights unrelated to the start's.
        for width in [8, 16] {
            let tuned = GanPurifier::new(
                PurifierConfig {
                    width,
                    ..cfg.clone()
                },
                Device::Cpu,
            )
            .unwrap();
            tuned.normalise(&x, &TransformConfig::default());
            let at = |alpha| tuned.interpolated(&start, alpha).unwrap();
            let out = |p: &GanPurifier| tch::no_grad(|| p.generate(&x, &mask).1);
            let d = (out(&at(0.0)) - out(&start)).abs().max().double_value(&[]);
            assert!(d < 1e-5, "width {width}: alpha 0 is off the start by {d}");
            let (one, half) = (at(1.0), at(0.5));
            let (s, t, o, h) = (
                start.g_vs.variables(),
                tuned.g_vs.variables(),
                one.g_vs.variables(),
                half.g_vs.variables(),
            );
            for (k, w) in &t {
                assert!(o[k].equal(w), "width {width}: alpha 1 changed {k}");
            }
            // On the channels the two share, half way is the mean of the two weights.
            let shared = |w: &Tensor| w.narrow(0, 0, 4).narrow(1, 0, 3);
            let k = "coarse.conv1.weight";
            let mean = (shared(&s[k]) + shared(&t[k])) * 0.5;
            let d = (shared(&h[k]) - mean).abs().max().double_value(&[]);
            assert!(d < 1e-6, "width {width}: alpha 0.5 is not half way ({d})");
            assert!(!out(&half).equal(&out(&start)) && !out(&half).equal(&out(&tuned)));
        }
        let tuned = start.widened(16).unwrap();
        for bad in [-0.1, 1.5, f64::NAN] {
            let e = tuned.interpolated(&start, bad).err().unwrap().to_string();
            assert!(e.contains("alpha"), "{e}");
        }
        let e = start.interpolated(&tuned, 0.5).err().unwrap().to_string();
        assert!(e.contains("not the tuned purifier's architecture"), "{e}");
        let other = GanPurifier::new(PurifierConfig { stages: 1, ..cfg }, Device::Cpu).unwrap();
        assert!(tuned.interpolated(&other, 0.5).is_err());
    }

    #[test]
    fn the_transform_is_drawn_at_the_working_size() {
        // Work size 256 on 32 px images, as the authors ran CIFAR: each mask hole is one block
        // of the 8x8 grid at 256 px (32 x 32 pixels, 4 x 4 of the original), and the noise left
        // after averaging back to 32 px has about sigma / 8 of spread.
        tch::manual_seed(5);
        let p = GanPurifier::new(
            PurifierConfig {
                width: 4,
                disc_width: 4,
                attention: false,
                work_size: Some(256),
                ..Default::default()
            },
            Device::Cpu,
        )
        .unwrap();
        let x = Tensor::full([8, 3, 32, 32], 0.5, (Kind::Float, Device::Cpu));
        let rt2 = TransformConfig::default();
        p.config.check_images(32, 32, &rt2).unwrap();
        let pass = tch::no_grad(|| p.pass(&x, &rt2));
        assert_eq!(pass.purified.size(), [8, 3, 32, 32]);
        assert_eq!(pass.clean.size(), [8, 3, 256, 256]);
        let m = &pass.drawn.masks[0];
        assert_eq!(m.size(), [8, 1, 256, 256]);
        let blocks = m.avg_pool2d([32, 32], [32, 32], [0, 0], false, true, None::<i64>);
        let whole = blocks.eq(0.0).logical_or(&blocks.eq(1.0)).all();
        assert!(
            bool::try_from(whole).unwrap(),
            "a hole is not one 32 px block"
        );
        let holes = blocks.sum(Kind::Float).double_value(&[]);
        assert_eq!(holes, 8.0 * 16.0);
        let noise = pass.at_input_size(&pass.drawn.noisy) - &x;
        let spread = noise.std(true).double_value(&[]);
        let want = rt2.sigma / 8.0;
        assert!(
            (spread - want).abs() < 0.1 * want,
            "noise spread at 32 px {spread}, expected about {want}"
        );
        // Drawn at the image's own size instead, the full sigma is left.
        let native = GanPurifier::new(
            PurifierConfig {
                work_size: None,
                ..p.config.clone()
            },
            Device::Cpu,
        )
        .unwrap();
        let pass = tch::no_grad(|| native.pass(&x, &rt2));
        let spread = (&pass.drawn.noisy - &x).std(true).double_value(&[]);
        assert!((spread - rt2.sigma).abs() < 0.1 * rt2.sigma, "{spread}");
    }

    #[test]
    fn data_dependent_init_keeps_the_signal_alive() {
        // He initialisation alone: the output hardly depends on the input (spread across images
        // ~1e-6). After the data-dependent rescaling it does, and the rescaled generator still
        // computes a plain forward pass (same function, new weights).
        tch::manual_seed(1);
        let p = GanPurifier::new(
            PurifierConfig {
                width: 16,
                ..Default::default()
            },
            Device::Cpu,
        )
        .unwrap();
        let x = Tensor::rand([16, 3, 32, 32], (Kind::Float, Device::Cpu));
        let t = TransformConfig::default().sample(&x);
        let (noisy, masks) = generator_batch(&t);
        let spread = |p: &GanPurifier| {
            let (_, x2) = tch::no_grad(|| p.generate(&noisy, &masks));
            x2.std_dim(0, true, false)
                .mean(Kind::Float)
                .double_value(&[])
        };
        let before = spread(&p);
        p.normalise(&x, &TransformConfig::default());
        let after = spread(&p);
        assert!(before < 1e-4, "He init spread {before}");
        assert!(after > 1e-2, "after data-dependent init {after}");
    }

    #[test]
    fn bad_settings_are_explained() {
        let err = |c: PurifierConfig| c.validate().unwrap_err().to_string();
        assert!(
            err(PurifierConfig {
                width: 30,
                ..Default::default()
            })
            .contains("multiple of 4")
        );
        assert!(
            err(PurifierConfig {
                work_size: Some(100),
                ..Default::default()
            })
            .contains("multiple of 8")
        );
        // 4096 px would need tens of GiB of activations per image: above the ceiling.
        assert!(
            err(PurifierConfig {
                work_size: Some(4096),
                ..Default::default()
            })
            .contains("up to 1024")
        );
        let rt2 = TransformConfig::default();
        let e = PurifierConfig::default()
            .check_images(30, 30, &rt2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not divisible by 8"), "{e}");
        let at = |work_size, stages| PurifierConfig {
            work_size: Some(work_size),
            stages,
            ..Default::default()
        };
        // Below the image's size, not a multiple of the strides, not a multiple of the grid.
        let e = at(16, 2)
            .check_images(32, 32, &rt2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("smaller than the 32x32"), "{e}");
        assert!(
            at(36, 2)
                .validate()
                .unwrap_err()
                .to_string()
                .contains("multiple of 8")
        );
        let e = at(36, 1)
            .check_images(32, 32, &rt2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not divisible by the transform grid 8"), "{e}");
        assert!(at(256, 2).check_images(32, 32, &rt2).is_ok());
        assert!(
            PurifierConfig {
                stages: 3,
                ..Default::default()
            }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("1 or 2")
        );
    }

    #[test]
    fn psnr_and_ssim_of_identical_and_noisy_images() {
        let a = Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        assert!(ssim(&a, &a).min().double_value(&[]) > 0.999);
        let b = (&a + 0.1).clamp(0.0, 1.0);
        let p = psnr(&b, &a).double_value(&[0]);
        assert!(p > 19.0 && p < 21.0, "uniform 0.1 shift: PSNR {p}");
        let noisy = (&a + a.randn_like() * 0.3).clamp(0.0, 1.0);
        assert!(ssim(&noisy, &a).max().double_value(&[]) < 0.9);
    }
}
