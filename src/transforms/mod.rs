//! The random transforms `t` of AToP (paper section 3.1), applied to images in [0,1] before the
//! purifier: Gaussian noise and block masks on a grid, combined as RT1 (mask), RT2 (noise, then
//! one mask) and RT3 (noise, then N disjoint masks that tile the image; the purifier fills each
//! masked copy and the output is assembled from each copy's hole pixels).
//!
//! The transform is drawn at the purifier's working size ([`Resolution`]): the authors resize
//! CIFAR to 256 px first, so their noise falls on 8x8 copies of every pixel and a mask block is
//! 32 px wide at 256 (4 px of the original).
//!
//! Randomness comes from libtorch's generator, fresh on every call; seeding it (as the attack
//! runner and the trainers do) makes a run repeatable. Masks are 1 in the holes.

mod resolution;

pub use resolution::{Resize, Resolution, TransformStage};

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Which combination of noise and masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum TransformKind {
    /// No transform: the purifier sees the image itself (with an empty mask).
    None,
    /// Gaussian noise only (no mask): a randomized defence on its own, and the probe of how
    /// much noise a classifier tolerates.
    Noise,
    /// One block mask.
    Rt1,
    /// Gaussian noise, then one block mask (the paper's main setting).
    Rt2,
    /// Gaussian noise, then `pieces` disjoint masks tiling the image.
    Rt3,
}

impl TransformKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransformKind::None => "none",
            TransformKind::Noise => "noise",
            TransformKind::Rt1 => "rt1",
            TransformKind::Rt2 => "rt2",
            TransformKind::Rt3 => "rt3",
        }
    }
}

impl fmt::Display for TransformKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransformKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(TransformKind::None),
            "noise" => Ok(TransformKind::Noise),
            "rt1" => Ok(TransformKind::Rt1),
            "rt2" => Ok(TransformKind::Rt2),
            "rt3" => Ok(TransformKind::Rt3),
            _ => Err(format!(
                "unknown transform '{s}': expected rt1, rt2, rt3, noise or none"
            )),
        }
    }
}

/// Settings of a random transform; defaults are the paper's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformConfig {
    pub kind: TransformKind,
    /// Standard deviation of the Gaussian noise (RT2, RT3, noise), in [0,1] pixel units, drawn
    /// independently for every pixel at the working size.
    pub sigma: f64,
    /// Fraction of blocks that are holes (RT1, RT2): floor(r * grid^2) blocks.
    pub missing_rate: f64,
    /// RT3: number of disjoint masks that tile the image.
    pub pieces: usize,
    /// The image is a grid x grid array of square blocks.
    pub grid: usize,
    /// One mask for the whole batch (as the authors' code did) instead of one per sample.
    pub per_batch_mask: bool,
}

impl Default for TransformConfig {
    fn default() -> Self {
        TransformConfig {
            kind: TransformKind::Rt2,
            sigma: 0.25,
            missing_rate: 0.25,
            pieces: 4,
            grid: 8,
            per_batch_mask: false,
        }
    }
}

/// Single settings given over a transform's (a purifier's training one, or a kind's defaults):
/// each replaces its field when set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformOverrides {
    pub sigma: Option<f64>,
    pub missing_rate: Option<f64>,
    pub pieces: Option<usize>,
    pub grid: Option<usize>,
    pub per_batch_mask: Option<bool>,
}

impl TransformOverrides {
    /// Whether any setting is given.
    pub fn any(&self) -> bool {
        *self != TransformOverrides::default()
    }

    pub fn apply(&self, cfg: &mut TransformConfig) {
        if let Some(v) = self.sigma {
            cfg.sigma = v;
        }
        if let Some(v) = self.missing_rate {
            cfg.missing_rate = v;
        }
        if let Some(v) = self.pieces {
            cfg.pieces = v;
        }
        if let Some(v) = self.grid {
            cfg.grid = v;
        }
        if let Some(v) = self.per_batch_mask {
            cfg.per_batch_mask = v;
        }
    }
}

/// The noisy image and the masks the purifier fills; the output is
/// `sum_i purify(noisy, mask_i) * mask_i` for several masks, `purify(noisy, mask)` for one.
pub struct Transformed {
    /// N x C x H x W in [0,1].
    pub noisy: Tensor,
    /// Each N x 1 x H x W, 1 = hole. One mask for RT1/RT2 (all zeros for `none`), `pieces`
    /// disjoint masks summing to one everywhere for RT3.
    pub masks: Vec<Tensor>,
    /// Blocks that are holes in every image of the first mask, where the draw knows it (None
    /// for a mask built by hand): lets a reader skip counting them on the device.
    pub hidden: Option<usize>,
}

impl TransformConfig {
    pub fn with_kind(kind: TransformKind) -> Self {
        TransformConfig {
            kind,
            ..Default::default()
        }
    }

    /// Checks the settings (and, with `side`, that an image of that side fits the grid).
    pub fn validate(&self, side: Option<i64>) -> Result<()> {
        if !(self.sigma.is_finite() && self.sigma >= 0.0) {
            bail!(
                "transform sigma = {}: expected a finite, non-negative noise level (paper: 0.25)",
                self.sigma
            );
        }
        if self.grid == 0 {
            bail!("transform grid = 0: expected at least 1 block per side (paper: 8)");
        }
        let blocks = self.grid * self.grid;
        match self.kind {
            TransformKind::Rt1 | TransformKind::Rt2 => {
                if !(self.missing_rate > 0.0 && self.missing_rate < 1.0) {
                    bail!(
                        "transform missing_rate = {}: expected a fraction strictly between 0 and 1 (paper: 0.25)",
                        self.missing_rate
                    );
                }
                if self.holes() == 0 {
                    bail!(
                        "transform missing_rate = {} leaves no hole on a {}x{} grid (floor(r * {blocks}) = 0)",
                        self.missing_rate,
                        self.grid,
                        self.grid
                    );
                }
            }
            TransformKind::Rt3 => {
                if self.pieces < 2 || !blocks.is_multiple_of(self.pieces) {
                    bail!(
                        "transform pieces = {}: RT3 needs at least 2 masks that split the {blocks} blocks of a {}x{} grid evenly (a divisor of {blocks}, paper: 4)",
                        self.pieces,
                        self.grid,
                        self.grid
                    );
                }
            }
            TransformKind::None | TransformKind::Noise => {}
        }
        if let Some(side) = side
            && self.has_mask()
            && (side <= 0 || !(side as usize).is_multiple_of(self.grid))
        {
            bail!(
                "working side {side} is not divisible by the transform grid {} (mask blocks must be whole pixels; set work_size to a multiple of {})",
                self.grid,
                self.grid
            );
        }
        Ok(())
    }

    /// Number of hole blocks for RT1/RT2.
    pub fn holes(&self) -> usize {
        (self.missing_rate * (self.grid * self.grid) as f64 + 1e-9).floor() as usize
    }

    pub fn is_stochastic(&self) -> bool {
        self.kind != TransformKind::None && (self.has_mask() || self.sigma > 0.0)
    }

    /// Whether every image draws its own noise and mask (a per-batch mask is shared).
    pub fn draws_per_sample(&self) -> bool {
        !(self.per_batch_mask && self.has_mask())
    }

    /// Whether the transform draws block masks (RT1/RT2/RT3).
    pub fn has_mask(&self) -> bool {
        matches!(
            self.kind,
            TransformKind::Rt1 | TransformKind::Rt2 | TransformKind::Rt3
        )
    }

    pub fn describe(&self) -> String {
        match self.kind {
            TransformKind::None => "no transform".into(),
            TransformKind::Noise => format!("noise(sigma={})", self.sigma),
            TransformKind::Rt1 => format!("rt1(r={})", self.missing_rate),
            TransformKind::Rt2 => format!("rt2(sigma={}, r={})", self.sigma, self.missing_rate),
            TransformKind::Rt3 => format!("rt3(sigma={}, pieces={})", self.sigma, self.pieces),
        }
    }

    /// Draws a fresh transform of `x` (N x C x H x W in [0,1]); differentiable in `x`.
    pub fn sample(&self, x: &Tensor) -> Transformed {
        let (n, _, h, w) = x.size4().expect("images are N x C x H x W");
        let noisy = match self.kind {
            TransformKind::Rt2 | TransformKind::Rt3 | TransformKind::Noise if self.sigma > 0.0 => {
                (x + x.randn_like() * self.sigma).clamp(0.0, 1.0)
            }
            _ => x.shallow_clone(),
        };
        let rows = if self.per_batch_mask { 1 } else { n };
        let blocks = (self.grid * self.grid) as i64;
        let opts = (Kind::Float, x.device());
        let per = blocks / self.pieces.max(1) as i64;
        let hidden = match self.kind {
            TransformKind::None | TransformKind::Noise => 0,
            TransformKind::Rt1 | TransformKind::Rt2 => self.holes(),
            TransformKind::Rt3 => per as usize,
        };
        let masks = match self.kind {
            TransformKind::None | TransformKind::Noise => vec![Tensor::zeros([n, 1, h, w], opts)],
            TransformKind::Rt1 | TransformKind::Rt2 => {
                // A random permutation of the blocks per row; the first `holes` are holes.
                let order = Tensor::rand([rows, blocks], opts).argsort(1, false);
                let rank = order.argsort(1, false);
                vec![self.upsample(&rank.lt(self.holes() as i64), n, h, w)]
            }
            TransformKind::Rt3 => {
                let order = Tensor::rand([rows, blocks], opts).argsort(1, false);
                let rank = order.argsort(1, false);
                (0..self.pieces as i64)
                    .map(|i| {
                        let sel = rank.ge(i * per).logical_and(&rank.lt((i + 1) * per));
                        self.upsample(&sel, n, h, w)
                    })
                    .collect()
            }
        };
        Transformed {
            noisy,
            masks,
            hidden: Some(hidden),
        }
    }

    /// Block indicator (rows x grid^2, bool) to a pixel mask N x 1 x H x W (float).
    fn upsample(&self, blocks: &Tensor, n: i64, h: i64, w: i64) -> Tensor {
        let g = self.grid as i64;
        let (bh, bw) = (h / g, w / g);
        let m = blocks
            .to_kind(Kind::Float)
            .view([-1, 1, g, 1, g, 1])
            .expand([-1, 1, g, bh, g, bw], false)
            .reshape([-1, 1, h, w]);
        if m.size()[0] == n {
            m
        } else {
            m.expand([n, 1, h, w], false).contiguous()
        }
    }
}

impl Transformed {
    /// What a classifier without a purifier sees: the noisy image with the (first) mask's holes
    /// grey.
    pub fn shown(&self) -> Tensor {
        let m = &self.masks[0];
        &self.noisy * (m.ones_like() - m) + m * 0.5
    }
}

/// Assembles the purified image: one mask keeps the whole output (every pixel regenerated, as
/// in the paper); several disjoint masks take each output's hole pixels.
pub fn assemble(outputs: &[Tensor], masks: &[Tensor]) -> Tensor {
    if outputs.len() == 1 {
        return outputs[0].shallow_clone();
    }
    outputs
        .iter()
        .zip(masks)
        .map(|(o, m)| o * m)
        .reduce(|a, b| a + b)
        .expect("at least one output")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn images(n: i64, side: i64) -> Tensor {
        Tensor::rand([n, 3, side, side], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn hole_fraction_equals_the_missing_rate_and_holes_are_whole_blocks() {
        tch::manual_seed(0);
        for side in [32, 64, 224] {
            let t = TransformConfig::with_kind(TransformKind::Rt1).sample(&images(5, side));
            let m = &t.masks[0];
            assert_eq!(m.size(), [5, 1, side, side]);
            let frac = m.mean_dim(&[1i64, 2, 3][..], false, Kind::Float);
            let frac = Vec::<f32>::try_from(frac).unwrap();
            assert!(frac.iter().all(|f| (*f - 0.25).abs() < 1e-6), "{frac:?}");
            // Constant over each block: pooling with the block side loses nothing.
            let p = side / 8;
            let pooled = m.avg_pool2d([p, p], [p, p], [0, 0], false, true, None::<i64>);
            let ok = pooled.eq(0.0).logical_or(&pooled.eq(1.0)).all();
            assert!(bool::try_from(ok).unwrap());
            // Noise-free: RT1 leaves the pixels alone.
            assert!(t.noisy.size() == [5, 3, side, side]);
        }
        // Masks differ between samples and between calls.
        let cfg = TransformConfig::with_kind(TransformKind::Rt1);
        let x = images(4, 32);
        let (a, b) = (
            cfg.sample(&x).masks.remove(0),
            cfg.sample(&x).masks.remove(0),
        );
        assert!(!a.equal(&b));
        assert!(!a.get(0).equal(&a.get(1)));
        let shared = TransformConfig {
            per_batch_mask: true,
            ..cfg
        }
        .sample(&x)
        .masks
        .remove(0);
        assert!(shared.get(0).equal(&shared.get(3)));
    }

    #[test]
    fn rt3_masks_tile_the_image_exactly() {
        tch::manual_seed(1);
        let cfg = TransformConfig::with_kind(TransformKind::Rt3);
        let t = cfg.sample(&images(3, 32));
        assert_eq!(t.masks.len(), 4);
        let sum = t
            .masks
            .iter()
            .fold(Tensor::zeros_like(&t.masks[0]), |a, m| a + m);
        assert!(
            bool::try_from(sum.eq(1.0).all()).unwrap(),
            "masks overlap or leave gaps"
        );
        for m in &t.masks {
            let frac = m.mean(Kind::Float).double_value(&[]);
            assert!((frac - 0.25).abs() < 1e-6);
        }
        // Assembly takes each output's hole pixels.
        let outs: Vec<Tensor> = (0..4)
            .map(|i| Tensor::full([3, 3, 32, 32], i as f64, (Kind::Float, Device::Cpu)))
            .collect();
        let a = assemble(&outs, &t.masks);
        let want = t.masks.iter().enumerate().fold(
            Tensor::zeros([3, 1, 32, 32], (Kind::Float, Device::Cpu)),
            |acc, (i, m)| acc + m * i as f64,
        );
        assert!(a.equal(&want.expand([3, 3, 32, 32], false)));
    }

    #[test]
    fn noise_has_the_requested_spread_and_stays_in_range() {
        tch::manual_seed(2);
        let x = Tensor::full([8, 3, 32, 32], 0.5, (Kind::Float, Device::Cpu));
        let t = TransformConfig::with_kind(TransformKind::Rt2).sample(&x);
        let d = &t.noisy - &x;
        let std = d.std(true).double_value(&[]);
        // Clipping at 0 and 1 (2 sigma away) trims the spread only slightly.
        assert!((std - 0.25).abs() < 0.02, "noise std {std}");
        assert!(t.noisy.min().double_value(&[]) >= 0.0 && t.noisy.max().double_value(&[]) <= 1.0);
    }

    #[test]
    fn bad_settings_are_explained() {
        let err = |c: TransformConfig, side| c.validate(side).unwrap_err().to_string();
        let rt2 = TransformConfig::default();
        assert!(
            err(
                TransformConfig {
                    sigma: -0.1,
                    ..rt2.clone()
                },
                None
            )
            .contains("sigma = -0.1")
        );
        assert!(
            err(
                TransformConfig {
                    missing_rate: 1.0,
                    ..rt2.clone()
                },
                None
            )
            .contains("strictly between 0 and 1")
        );
        assert!(
            err(
                TransformConfig {
                    missing_rate: 0.01,
                    ..rt2.clone()
                },
                None
            )
            .contains("no hole")
        );
        let rt3 = TransformConfig::with_kind(TransformKind::Rt3);
        assert!(err(TransformConfig { pieces: 3, ..rt3 }, None).contains("divisor of 64"));
        assert!(err(rt2.clone(), Some(30)).contains("not divisible"));
        assert!(rt2.validate(Some(224)).is_ok());
        assert!(
            "rt4"
                .parse::<TransformKind>()
                .unwrap_err()
                .contains("rt1, rt2, rt3")
        );
    }
}
