//! The purifier `g` of AToP, of two kinds behind one interface ([`Purifier`],
//! [`PurifierConfig`]): the GAN purifier (a DeepFillv2-style inpainting generator with its
//! SN-PatchGAN discriminator, [`gan`]) and the AE purifier (a DMAE-style masked autoencoder,
//! [`ae`]). Both undo a random transform drawn at their working size.
//!
//! A purifier checkpoint is a folder holding `generator.safetensors` (the purifying network:
//! the GAN's generator, the AE's encoder and decoder), `discriminator.safetensors` (GAN only)
//! and `purifier.json` (kind and architecture, the transform it was trained with, dataset,
//! provenance), each written atomically.

pub mod ae;
pub mod apply;
pub mod defended;
pub mod discriminator;
pub mod gan;
pub mod generator;
mod interface;
pub mod layers;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::models::checkpoint;
use crate::transforms::TransformConfig;
pub use gan::{GanConfig, GanPurifier};
pub use interface::{ArchOverrides, OwnTerms, Pass, Purifier, PurifierConfig};

pub const GENERATOR: &str = "generator.safetensors";
pub const DISCRIMINATOR: &str = "discriminator.safetensors";
pub const SIDECAR: &str = "purifier.json";
/// Entries of a generator weight file that are training state, not weights: the update
/// counter of the weight average stored beside an AToP run's live generator.
pub const TRAINING_STATE_PREFIX: &str = "ema.";
const FORMAT: &str = "atop-purifier";
const FORMAT_VERSION: u32 = 2;

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

/// Where an interpolated purifier ([`Purifier::interpolated`]) comes from.
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
    if s.format_version < FORMAT_VERSION && s.purifier.resolution().work_size.is_some() {
        bail!(
            "{}: format_version {} with work_size {}: this purifier was trained with the transform drawn at the image's size and only the generator at the working size; atop now draws the transform at the working size, so its numbers would not carry over: retrain it",
            path.display(),
            s.format_version,
            s.purifier.resolution().work_size.unwrap_or_default()
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
pub fn load(path: &Path, device: Device) -> Result<(Purifier, PurifierSidecar)> {
    let dir = resolve(path)?;
    let sidecar = read_sidecar(&dir)?;
    let mut p = Purifier::new(sidecar.purifier.clone(), device)?;
    p.load_network(&chosen_generator(path).unwrap_or_else(|| dir.join(GENERATOR)))?;
    p.load_critic(&dir)?;
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

pub(crate) fn check_alpha(alpha: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&alpha) {
        bail!("alpha = {alpha}: expected a number from 0 (the start) to 1 (the tuned purifier)");
    }
    Ok(())
}

/// Writes the purifier `alpha` of the way from `start` to `tuned` ([`Purifier::interpolated`])
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
    use super::gan::generator_batch;
    use super::*;
    use crate::transforms::TransformKind;

    #[test]
    fn parameter_counts_match_deepfillv2() {
        // Width 48: 1,631,151 (coarse) + 2,421,327 (fine) = 4,052,478; D at width 64: 5,946,816.
        let p = GanPurifier::new(GanConfig::default(), Device::Cpu).unwrap();
        assert_eq!(p.generator_parameters(), 4_052_478);
        assert_eq!(p.discriminator_parameters(), 5_946_816);
        let small = GanPurifier::new(
            GanConfig {
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
        let cfg = GanConfig {
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
            GanConfig {
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
        let base = GanConfig {
            width: 8,
            disc_width: 4,
            ..Default::default()
        };
        let params = GanPurifier::new(base.clone(), Device::Cpu)
            .unwrap()
            .generator_parameters();
        let variants = [
            GanConfig {
                stages: 1,
                ..base.clone()
            },
            GanConfig {
                skips: true,
                ..base.clone()
            },
            GanConfig {
                group_norm: true,
                ..base.clone()
            },
            GanConfig {
                residual: true,
                ..base.clone()
            },
            GanConfig {
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
                == (GanConfig {
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
            GanConfig {
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
        let base = GanConfig {
            width: 8,
            disc_width: 4,
            ..Default::default()
        };
        let layouts = [
            // DeepFillv2's: attention (a second input part at the merge), two stages.
            base.clone(),
            // The CPU preset's: skips (second input parts in both decoders), no attention.
            GanConfig {
                attention: false,
                skips: true,
                ..base.clone()
            },
            GanConfig {
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
            GanConfig {
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
        let cfg = GanConfig {
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
                GanConfig {
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
        let other = GanPurifier::new(GanConfig { stages: 1, ..cfg }, Device::Cpu).unwrap();
        assert!(tuned.interpolated(&other, 0.5).is_err());
    }

    #[test]
    fn the_transform_is_drawn_at_the_working_size() {
        // Work size 256 on 32 px images, as the authors ran CIFAR: each mask hole is one block
        // of the 8x8 grid at 256 px (32 x 32 pixels, 4 x 4 of the original), and the noise left
        // after averaging back to 32 px has about sigma / 8 of spread.
        tch::manual_seed(5);
        let p = GanPurifier::new(
            GanConfig {
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
            GanConfig {
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
            GanConfig {
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
        let err = |c: GanConfig| c.validate().unwrap_err().to_string();
        assert!(
            err(GanConfig {
                width: 30,
                ..Default::default()
            })
            .contains("multiple of 4")
        );
        assert!(
            err(GanConfig {
                work_size: Some(100),
                ..Default::default()
            })
            .contains("multiple of 8")
        );
        // 4096 px would need tens of GiB of activations per image: above the ceiling.
        assert!(
            err(GanConfig {
                work_size: Some(4096),
                ..Default::default()
            })
            .contains("up to 1024")
        );
        let rt2 = TransformConfig::default();
        let e = GanConfig::default()
            .check_images(30, 30, &rt2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not divisible by 8"), "{e}");
        let at = |work_size, stages| GanConfig {
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
            GanConfig {
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
