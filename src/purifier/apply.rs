//! A purifier applied to a set of images under one random transform (`atop purify`): the
//! purified and the transformed images, their PSNR and SSIM against the originals and, with a
//! classifier and labels, its accuracy on the clean, transformed and purified images.

use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::GanPurifier;
use crate::models::Model;
use crate::models::accuracy::count_correct;
use crate::runtime::Precision;
use crate::transforms::TransformConfig;

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
    p: &GanPurifier,
    x: &Tensor,
    t: &TransformConfig,
    labelled: Option<(&dyn Model, &Tensor, Option<f64>)>,
    seed: u64,
    batch: usize,
    device: Device,
) -> Result<Purified> {
    let (h, w) = (x.size()[2], x.size()[3]);
    p.config.check_images(h, w, t)?;
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
