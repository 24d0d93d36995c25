//! The GAN purifier: a DeepFillv2-style inpainting generator (gated convolutions, contextual
//! attention) that fills the holes and noise of a random transform, with its SN-PatchGAN
//! discriminator for (pre-)training.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::discriminator::Discriminator;
use super::generator::{Generator, Layout};
use super::{MAX_WIDTH, MAX_WORK_SIZE, check_alpha};
use crate::transforms::{Resize, Resolution, TransformConfig, Transformed, assemble};

/// The purifier's architecture and working resolution. The defaults are the authors' layout;
/// `stages`, `skips`, `group_norm` and `residual` are trainability options (docs/purifier.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GanConfig {
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

impl Default for GanConfig {
    fn default() -> Self {
        let r = Resolution::default();
        GanConfig {
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

impl GanConfig {
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

/// Generator and discriminator, each in its own VarStore (they have separate optimizers).
pub struct GanPurifier {
    pub config: GanConfig,
    pub g_vs: VarStore,
    pub generator: Generator,
    pub d_vs: VarStore,
    pub discriminator: Discriminator,
}

/// Trainable parameters of a VarStore.
pub(super) fn count(vs: &VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

impl GanPurifier {
    /// A freshly initialised purifier (libtorch's generator draws the weights).
    pub fn new(config: GanConfig, device: Device) -> Result<Self> {
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
        let config = GanConfig {
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
        let same_layout = GanConfig {
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

    /// The generator on a transform drawn at the working size: its batch's masks (one copy
    /// per mask for RT3) and its coarse and fine outputs x1, x2 in [-1,1].
    pub fn on_drawn(&self, drawn: &Transformed) -> (Tensor, Tensor, Tensor) {
        let (noisy, masks) = generator_batch(drawn);
        let (x1, x2) = self.generate(&noisy, &masks);
        (masks, x1, x2)
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
