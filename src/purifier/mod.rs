//! The purifier `g` of AToP: a DeepFillv2-style inpainting generator (gated convolutions,
//! contextual attention) that fills the holes and noise of a random transform, with its
//! SN-PatchGAN discriminator for (pre-)training.
//!
//! A purifier checkpoint is a folder holding `generator.safetensors`,
//! `discriminator.safetensors` and `purifier.json` (architecture, the transform it was trained
//! with, dataset, provenance), each written atomically.

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
use crate::transforms::{TransformConfig, Transformed, assemble};
use discriminator::Discriminator;
use generator::Generator;

pub const GENERATOR: &str = "generator.safetensors";
pub const DISCRIMINATOR: &str = "discriminator.safetensors";
pub const SIDECAR: &str = "purifier.json";
const FORMAT: &str = "atop-purifier";

/// The purifier's architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PurifierConfig {
    /// Generator width c (a multiple of 4; the paper's 48 gives 4.05 M parameters).
    pub width: usize,
    /// The contextual-attention branch of the fine stage.
    pub attention: bool,
    /// Discriminator width (DeepFillv2: 64).
    pub disc_width: usize,
    /// Run the generator at this side (images are resized up and back), as the authors did
    /// at 256 px for CIFAR; None = the images' own resolution.
    pub work_size: Option<usize>,
}

impl Default for PurifierConfig {
    fn default() -> Self {
        PurifierConfig {
            width: 48,
            attention: true,
            disc_width: 64,
            work_size: None,
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
        if self.disc_width == 0 {
            bail!("purifier disc_width = 0: expected at least 1 (DeepFillv2: 64)");
        }
        if let Some(s) = self.work_size
            && (s < 8 || !s.is_multiple_of(8))
        {
            bail!("purifier work_size = {s}: expected a multiple of 8 (e.g. 256)");
        }
        Ok(())
    }

    /// Checks that images of side `side` can be purified.
    pub fn check_side(&self, side: i64) -> Result<()> {
        if self.work_size.is_none() && (side < 8 || side % 8 != 0) {
            bail!(
                "image side {side} is not divisible by 8: the generator halves it twice and its attention once more (resize the images, or set work_size)"
            );
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        format!(
            "gan-purifier(c={}{}{})",
            self.width,
            if self.attention { "" } else { ", no attention" },
            self.work_size
                .map(|s| format!(", at {s} px"))
                .unwrap_or_default()
        )
    }
}

/// The JSON sidecar of a purifier checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurifierSidecar {
    pub format: String,
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
    pub atop_version: String,
    pub torch_version: String,
}

impl PurifierSidecar {
    pub fn new(purifier: PurifierConfig, transform: TransformConfig) -> Self {
        PurifierSidecar {
            format: FORMAT.into(),
            format_version: 1,
            purifier,
            transform,
            dataset: None,
            image_size: None,
            epoch: None,
            step: None,
            config: serde_json::Value::Null,
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
        let generator = Generator::new(&g_vs.root(), config.width as i64, config.attention);
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

    pub fn generator_parameters(&self) -> i64 {
        count(&self.g_vs)
    }

    pub fn discriminator_parameters(&self) -> i64 {
        count(&self.d_vs)
    }

    /// The generator on `noisy` images in [0,1] with `mask` (1 = hole): (x1, x2) in [-1,1] at
    /// the input resolution. With `work_size`, it runs on bilinearly resized images (nearest
    /// for the mask) and its outputs are averaged back down.
    pub fn generate(&self, noisy: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
        self.generate_with(noisy, mask, |g, x, m| g.forward(x, m))
    }

    /// The generator's data-dependent initialisation ([`Generator::normalise`]) on a batch of
    /// transformed images, at the working size.
    pub fn normalise(&self, noisy: &Tensor, mask: &Tensor) {
        let _ = self.generate_with(noisy, mask, |g, x, m| g.normalise(x, m));
    }

    fn generate_with(
        &self,
        noisy: &Tensor,
        mask: &Tensor,
        run: impl Fn(&Generator, &Tensor, &Tensor) -> (Tensor, Tensor),
    ) -> (Tensor, Tensor) {
        let image = noisy * 2.0 - 1.0;
        let (h, w) = (noisy.size()[2], noisy.size()[3]);
        match self.config.work_size.map(|s| s as i64) {
            Some(s) if s != h || s != w => {
                let up = image.upsample_bilinear2d([s, s], false, None, None);
                let m = mask.upsample_nearest2d([s, s], None, None);
                let (x1, x2) = run(&self.generator, &up, &m);
                let down = |t: Tensor| t.adaptive_avg_pool2d([h, w]);
                (down(x1), down(x2))
            }
            _ => run(&self.generator, &image, mask),
        }
    }

    /// The purified image in [0,1] for a drawn transform: the generator fills every masked
    /// copy (all copies in one batch) and the outputs are assembled (RT3) or taken whole.
    pub fn restore(&self, t: &Transformed) -> Tensor {
        let (noisy, masks) = generator_batch(t);
        let (_, x2) = self.generate(&noisy, &masks);
        purified_from(&x2, t)
    }

    /// Draws `transform` on `x` (N x 3 x H x W in [0,1]) and purifies it.
    pub fn purify(&self, x: &Tensor, transform: &TransformConfig) -> Tensor {
        self.restore(&transform.sample(x))
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
        let what = self.config.describe();
        let g = dir.join(GENERATOR);
        checkpoint::copy_into(
            &self.g_vs,
            &format!("{what} generator"),
            checkpoint::read_tensors(&g)?,
            &g,
        )?;
        let d = dir.join(DISCRIMINATOR);
        checkpoint::copy_into(
            &self.d_vs,
            &format!("{what} discriminator"),
            checkpoint::read_tensors(&d)?,
            &d,
        )
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
    (noisy, Tensor::cat(&t.masks, 0))
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
    let s: PurifierSidecar = serde_json::from_str(&text)
        .with_context(|| format!("{}: not an atop purifier description", path.display()))?;
    if s.format != FORMAT {
        bail!(
            "{}: format is '{}', expected '{FORMAT}'",
            path.display(),
            s.format
        );
    }
    s.purifier
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(s)
}

/// Loads a purifier checkpoint (folder, file in it, or training run) onto `device`.
pub fn load(path: &Path, device: Device) -> Result<(GanPurifier, PurifierSidecar)> {
    let dir = resolve(path)?;
    let sidecar = read_sidecar(&dir)?;
    let mut p = GanPurifier::new(sidecar.purifier.clone(), device)?;
    p.load_weights(&dir)?;
    Ok((p, sidecar))
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
        p.normalise(&noisy, &masks);
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
        let e = PurifierConfig::default()
            .check_side(30)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not divisible by 8"), "{e}");
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
