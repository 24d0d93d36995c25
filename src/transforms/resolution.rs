//! The working resolution of a defence: the image is resized to the working side P, the random
//! transform is drawn there (and the purifier runs there), and the result is resized back to
//! the classifier's input size. Every step is differentiable, so attacks perturb the image at
//! its own resolution with exact gradients.

use std::fmt;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::TransformConfig;
use crate::models::pipeline::Stage;

/// How images are resized to and from the working size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    Nearest,
    /// Bilinear, half-pixel centres (align_corners = false, as `transforms.Resize`); antialiased
    /// when it shrinks.
    Bilinear,
    Bicubic,
    /// Averages over each output pixel's footprint (exact block means for integer ratios).
    Area,
}

impl Resize {
    pub fn as_str(self) -> &'static str {
        match self {
            Resize::Nearest => "nearest",
            Resize::Bilinear => "bilinear",
            Resize::Bicubic => "bicubic",
            Resize::Area => "area",
        }
    }

    /// `x` (N x C x h x w) resized to `h` x `w`.
    pub fn apply(self, x: &Tensor, h: i64, w: i64) -> Tensor {
        let (xh, xw) = (x.size()[2], x.size()[3]);
        if (xh, xw) == (h, w) {
            return x.shallow_clone();
        }
        match self {
            Resize::Nearest => x.upsample_nearest2d([h, w], None, None),
            Resize::Bilinear if h < xh || w < xw => {
                x.internal_upsample_bilinear2d_aa([h, w], false, None, None)
            }
            Resize::Bilinear => x.upsample_bilinear2d([h, w], false, None, None),
            Resize::Bicubic => x.upsample_bicubic2d([h, w], false, None, None),
            Resize::Area => x.adaptive_avg_pool2d([h, w]),
        }
    }
}

impl fmt::Display for Resize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a defence works: `work_size` (None = the image's own size), the resize up to it and
/// the resize back down to the classifier's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub work_size: Option<usize>,
    pub up: Resize,
    pub down: Resize,
}

impl Default for Resolution {
    /// The authors' choice: bilinear up (`transforms.Resize(256)`), block means back down.
    fn default() -> Self {
        Resolution {
            work_size: None,
            up: Resize::Bilinear,
            down: Resize::Area,
        }
    }
}

impl Resolution {
    pub fn at(work_size: Option<usize>) -> Self {
        Resolution {
            work_size,
            ..Default::default()
        }
    }

    /// The working height and width for images of `h` x `w`.
    pub fn work_dims(&self, h: i64, w: i64) -> (i64, i64) {
        match self.work_size {
            Some(s) => (s as i64, s as i64),
            None => (h, w),
        }
    }

    /// Checks that images of `h` x `w` can be worked on: the working size is not below the
    /// image's, and is a multiple of `multiple` (`what` says why).
    pub fn check(&self, h: i64, w: i64, multiple: i64, what: &str) -> Result<()> {
        if h <= 0 || w <= 0 {
            bail!("images of {h}x{w} pixels: expected a positive size");
        }
        let (wh, ww) = self.work_dims(h, w);
        if let Some(s) = self.work_size
            && ((s as i64) < h || (s as i64) < w)
        {
            bail!(
                "work_size {s} is smaller than the {h}x{w} images: the defence works at or above the image's resolution (set work_size >= {})",
                h.max(w)
            );
        }
        if wh % multiple != 0 || ww % multiple != 0 {
            let fix = match self.work_size {
                Some(_) => format!("set work_size to a multiple of {multiple}"),
                None => format!(
                    "resize the images, or set work_size to a multiple of {multiple} (e.g. {})",
                    (h.max(w) + multiple - 1) / multiple * multiple
                ),
            };
            bail!("working size {wh}x{ww} is not divisible by {multiple} ({what}): {fix}");
        }
        Ok(())
    }

    /// Images (N x C x h x w) resized to the working size.
    pub fn to_work(&self, x: &Tensor) -> Tensor {
        let (h, w) = self.work_dims(x.size()[2], x.size()[3]);
        self.up.apply(x, h, w)
    }

    /// Working-size images resized back to `h` x `w`.
    pub fn to_image(&self, y: &Tensor, h: i64, w: i64) -> Tensor {
        self.down.apply(y, h, w)
    }

    pub fn describe(&self) -> String {
        match self.work_size {
            Some(s) => format!("at {s} px ({} up, {} down)", self.up, self.down),
            None => "at the image's size".into(),
        }
    }
}

/// A classifier's input behind a random transform alone (no purifier): resized to the working
/// size, transformed there (holes grey), and resized back. A randomized defence on its own, and
/// the measure of how much a transform costs a classifier.
pub struct TransformStage {
    pub transform: TransformConfig,
    pub resolution: Resolution,
}

impl Stage for TransformStage {
    fn apply(&self, images: &Tensor) -> Tensor {
        let (h, w) = (images.size()[2], images.size()[3]);
        let drawn = self.transform.sample(&self.resolution.to_work(images));
        self.resolution.to_image(&drawn.shown(), h, w)
    }
    fn is_stochastic(&self) -> bool {
        self.transform.is_stochastic()
    }
    fn draws_per_sample(&self) -> bool {
        self.transform.draws_per_sample()
    }
    fn work_size(&self) -> Option<usize> {
        self.resolution.work_size
    }
    fn describe(&self) -> String {
        match self.resolution.work_size {
            Some(_) => format!(
                "{} {}",
                self.transform.describe(),
                self.resolution.describe()
            ),
            None => self.transform.describe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::TransformKind;
    use tch::{Device, Kind};

    #[test]
    fn resizes_round_trip_and_errors_name_the_fix() {
        let x = Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let r = Resolution::at(Some(256));
        let up = r.to_work(&x);
        assert_eq!(up.size(), [2, 3, 256, 256]);
        // Nearest up, block means down: the identity.
        let exact = Resolution {
            up: Resize::Nearest,
            ..r
        };
        let back = exact.to_image(&exact.to_work(&x), 32, 32);
        assert!(back.allclose(&x, 1e-6, 1e-6, false));
        // Bilinear up blurs each pixel into its neighbours' footprints: close to the identity
        // on a smooth image only.
        let smooth = Tensor::rand([2, 3, 4, 4], (Kind::Float, Device::Cpu)).upsample_bilinear2d(
            [32, 32],
            false,
            None,
            None,
        );
        let back = r.to_image(&r.to_work(&smooth), 32, 32);
        let err = (&back - &smooth).abs().mean(Kind::Float).double_value(&[]);
        assert!(err < 0.01, "round trip off by {err}");
        assert!(r.check(32, 32, 8, "the generator's strides").is_ok());
        let e = Resolution::at(Some(16))
            .check(32, 32, 8, "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("smaller than the 32x32"), "{e}");
        let e = Resolution::at(Some(100))
            .check(32, 32, 8, "the generator's strides")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not divisible by 8") && e.contains("strides"),
            "{e}"
        );
        let e = Resolution::default()
            .check(30, 30, 8, "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("e.g. 32"), "{e}");
    }

    #[test]
    fn a_transform_stage_keeps_the_size_and_noise_shrinks_when_drawn_finer() {
        tch::manual_seed(3);
        let x = Tensor::full([64, 3, 32, 32], 0.5, (Kind::Float, Device::Cpu));
        let noise = TransformConfig::with_kind(TransformKind::Noise);
        let spread = |work| {
            let s = TransformStage {
                transform: noise.clone(),
                resolution: Resolution::at(work),
            };
            let y = s.apply(&x);
            assert_eq!(y.size(), [64, 3, 32, 32]);
            (y - &x).std(true).double_value(&[])
        };
        let native = spread(None);
        let fine = spread(Some(128));
        assert!((native - 0.25).abs() < 0.02, "{native}");
        // 4x4 pixels averaged: a quarter of the spread.
        assert!((fine - 0.0625).abs() < 0.005, "{fine}");
    }
}
