//! Training augmentations on packed H x W x 3 bytes. Each takes its own RNG so the loader can
//! make results independent of which worker thread ran them.

use image::RgbImage;
use image::imageops::FilterType;
use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Augment {
    #[default]
    None,
    /// CIFAR: zero-pad by `pad` pixels, take a random crop of the original size, flip half.
    CropFlip { pad: usize },
    /// ImageNet style: random area/aspect crop resized to `size`, flip half.
    ResizedCropFlip {
        size: u32,
        scale: (f32, f32),
        ratio: (f32, f32),
    },
}

impl Augment {
    pub fn cifar() -> Self {
        Augment::CropFlip { pad: 4 }
    }

    /// torchvision's RandomResizedCrop defaults.
    pub fn resized_crop(size: u32) -> Self {
        Augment::ResizedCropFlip {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    /// Output (height, width) for inputs of (h, w).
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        match self {
            Augment::ResizedCropFlip { size, .. } => (*size as usize, *size as usize),
            _ => (h, w),
        }
    }

    /// Writes the augmented `src` (h x w x 3) into `dst` (output_size x 3).
    pub fn apply<R: Rng>(&self, src: &[u8], h: usize, w: usize, dst: &mut [u8], rng: &mut R) {
        match self {
            Augment::None => dst.copy_from_slice(src),
            Augment::CropFlip { pad } => {
                let pad = *pad as i64;
                let dy = rng.random_range(0..=2 * pad) - pad;
                let dx = rng.random_range(0..=2 * pad) - pad;
                let flip = rng.random_bool(0.5);
                crop_shift(src, h, w, dy, dx, flip, dst);
            }
            Augment::ResizedCropFlip { size, scale, ratio } => {
                let (top, left, ch, cw) = sample_crop(h, w, *scale, *ratio, rng);
                let img = RgbImage::from_raw(w as u32, h as u32, src.to_vec())
                    .expect("buffer matches size");
                let crop =
                    image::imageops::crop_imm(&img, left as u32, top as u32, cw as u32, ch as u32)
                        .to_image();
                let mut out = image::imageops::resize(&crop, *size, *size, FilterType::Triangle);
                if rng.random_bool(0.5) {
                    image::imageops::flip_horizontal_in_place(&mut out);
                }
                dst.copy_from_slice(out.as_raw());
            }
        }
    }
}

/// out(y, x) = src(y + dy, x + dx) (mirrored in x when `flip`), zero outside the source.
fn crop_shift(src: &[u8], h: usize, w: usize, dy: i64, dx: i64, flip: bool, dst: &mut [u8]) {
    dst.fill(0);
    for y in 0..h {
        let sy = y as i64 + dy;
        if sy < 0 || sy >= h as i64 {
            continue;
        }
        for x in 0..w {
            let sx = x as i64 + dx;
            if sx < 0 || sx >= w as i64 {
                continue;
            }
            let ox = if flip { w - 1 - x } else { x };
            let s = (sy as usize * w + sx as usize) * 3;
            let d = (y * w + ox) * 3;
            dst[d..d + 3].copy_from_slice(&src[s..s + 3]);
        }
    }
}

/// torchvision's RandomResizedCrop box: (top, left, height, width).
fn sample_crop<R: Rng>(
    h: usize,
    w: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut R,
) -> (usize, usize, usize, usize) {
    let area = (h * w) as f32;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(lr0..=lr1).exp();
        let cw = (target * aspect).sqrt().round() as usize;
        let ch = (target / aspect).sqrt().round() as usize;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let top = rng.random_range(0..=h - ch);
            let left = rng.random_range(0..=w - cw);
            return (top, left, ch, cw);
        }
    }
    // Fallback: the centre crop with the aspect ratio clamped into range.
    let in_ratio = w as f32 / h as f32;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, ((w as f32 / ratio.0).round() as usize).min(h))
    } else if in_ratio > ratio.1 {
        (((h as f32 * ratio.1).round() as usize).min(w), h)
    } else {
        (w, h)
    };
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn crop_shift_moves_and_pads_with_zero() {
        // 2x2 image with distinct pixels; shift right by one: left column comes from x+1.
        let src: Vec<u8> = (1..=12).collect();
        let mut dst = vec![0; 12];
        crop_shift(&src, 2, 2, 0, 1, false, &mut dst);
        assert_eq!(dst, vec![4, 5, 6, 0, 0, 0, 10, 11, 12, 0, 0, 0]);
        crop_shift(&src, 2, 2, 0, 0, true, &mut dst);
        assert_eq!(dst, vec![4, 5, 6, 1, 2, 3, 10, 11, 12, 7, 8, 9]);
    }

    #[test]
    fn resized_crop_box_stays_inside_and_respects_scale() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..1000 {
            let (t, l, ch, cw) = sample_crop(60, 80, (0.3, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert!(t + ch <= 60 && l + cw <= 80 && ch > 0 && cw > 0);
            let frac = (ch * cw) as f32 / 4800.0;
            assert!(frac > 0.25, "area fraction {frac}");
        }
    }
}
