//! PNG grids of images with text labels (an 8x8 bitmap font, so no system fonts are needed).

use std::path::Path;

use anyhow::{Context, Result};
use image::imageops::FilterType;
use image::{Rgb, RgbImage};

const FONT_PX: u32 = 8;
const TEXT_SCALE: u32 = 2;
const PAD: u32 = 4;
const BG: Rgb<u8> = Rgb([255, 255, 255]);
const FG: Rgb<u8> = Rgb([20, 20, 20]);

/// One labelled row of same-sized images (each H x W x 3 bytes).
pub struct Row<'a> {
    pub label: String,
    pub images: Vec<&'a [u8]>,
}

/// N x 3 x H x W images in [0,1] as N buffers of H x W x 3 bytes (rounded, clipped).
pub fn to_hwc_bytes(t: &tch::Tensor) -> Result<Vec<Vec<u8>>> {
    let hwc = (t.to_kind(tch::Kind::Float) * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(tch::Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
        .to_device(tch::Device::Cpu);
    (0..hwc.size()[0])
        .map(|i| Ok(Vec::<u8>::try_from(hwc.get(i).reshape([-1]))?))
        .collect()
}

/// Saves a PNG of labelled rows of images given as N x 3 x H x W tensors in [0,1] (all of one
/// size), creating the parent folder.
pub fn save_tensor_rows(rows: &[(&str, tch::Tensor)], path: &Path) -> Result<()> {
    let Some((_, first)) = rows.first() else {
        return Ok(());
    };
    let (h, w) = (first.size()[2] as usize, first.size()[3] as usize);
    let bytes: Vec<(String, Vec<Vec<u8>>)> = rows
        .iter()
        .map(|(label, t)| Ok(((*label).to_string(), to_hwc_bytes(t)?)))
        .collect::<Result<_>>()?;
    let rows: Vec<Row> = bytes
        .iter()
        .map(|(label, imgs)| Row {
            label: label.clone(),
            images: imgs.iter().map(|b| b.as_slice()).collect(),
        })
        .collect();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    save_png(&labelled_rows(&rows, h, w), path)
}

/// Cell side: small images are enlarged (nearest) to at least 64 px, big ones shrunk to 128 px.
fn cell_size(h: u32, w: u32) -> (u32, u32) {
    let side = h.max(w);
    if side < 64 {
        let k = 64_u32.div_ceil(side);
        (h * k, w * k)
    } else if side > 128 {
        (h * 128 / side, w * 128 / side)
    } else {
        (h, w)
    }
}

/// Rows of images, each row preceded by its label. Labels longer than 18 characters are cut.
pub fn labelled_rows(rows: &[Row], height: usize, width: usize) -> RgbImage {
    let (h, w) = (height as u32, width as u32);
    let (ch, cw) = cell_size(h, w);
    let max_chars = rows
        .iter()
        .map(|r| r.label.chars().count().min(18))
        .max()
        .unwrap_or(0) as u32;
    let label_w = max_chars * FONT_PX * TEXT_SCALE + 2 * PAD;
    let cols = rows.iter().map(|r| r.images.len()).max().unwrap_or(0) as u32;
    let total_w = label_w + cols * (cw + PAD) + PAD;
    let total_h = rows.len() as u32 * (ch + PAD) + PAD;
    let mut canvas = RgbImage::from_pixel(total_w.max(1), total_h.max(1), BG);
    for (r, row) in rows.iter().enumerate() {
        let y0 = PAD + r as u32 * (ch + PAD);
        let text: String = row.label.chars().take(18).collect();
        let ty = y0 + ch.saturating_sub(FONT_PX * TEXT_SCALE) / 2;
        draw_text(&mut canvas, PAD, ty, &text, TEXT_SCALE);
        for (c, pixels) in row.images.iter().enumerate() {
            let img =
                RgbImage::from_raw(w, h, pixels.to_vec()).expect("image buffer matches its size");
            let filter = if ch > h {
                FilterType::Nearest
            } else {
                FilterType::Triangle
            };
            let cell = if (ch, cw) == (h, w) {
                img
            } else {
                image::imageops::resize(&img, cw, ch, filter)
            };
            let x0 = label_w + c as u32 * (cw + PAD);
            image::imageops::replace(&mut canvas, &cell, x0 as i64, y0 as i64);
        }
    }
    canvas
}

/// Draws ASCII text with the 8x8 font, each font pixel `scale` x `scale`; others become '?'.
pub fn draw_text(canvas: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32) {
    for (i, ch) in text.chars().enumerate() {
        let code = if ch.is_ascii() {
            ch as usize
        } else {
            b'?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        let gx = x + i as u32 * FONT_PX * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let px = gx + col * scale + dx;
                            let py = y + row as u32 * scale + dy;
                            if px < canvas.width() && py < canvas.height() {
                                canvas.put_pixel(px, py, FG);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Writes a PNG atomically (temp file + rename), creating the parent folder.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    crate::io::write_atomic(path, |file| {
        img.write_to(file, image::ImageFormat::Png)
            .with_context(|| format!("cannot encode PNG {}", path.display()))
    })
}

/// A perturbation (N x C x H x W) scaled per image so its largest entry reaches the full range,
/// around mid-grey: what the grids show as "perturbation".
pub fn amplified(delta: &tch::Tensor) -> tch::Tensor {
    let scale = delta.abs().amax([1, 2, 3], true).clamp_min(1e-12);
    (delta / scale * 0.5 + 0.5).clamp(0.0, 1.0)
}

/// Each image of `images` (N x 3 x H x W in [0,1]) as a PNG in `folder`, named after `names`
/// with the extension replaced by .png.
pub fn save_pngs(folder: &Path, images: &tch::Tensor, names: &[String]) -> Result<()> {
    std::fs::create_dir_all(folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    let (h, w) = (images.size()[2] as u32, images.size()[3] as u32);
    for (bytes, name) in to_hwc_bytes(images)?.into_iter().zip(names) {
        let img = RgbImage::from_raw(w, h, bytes).expect("buffer matches the image size");
        let stem = Path::new(name)
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        save_png(&img, &folder.join(format!("{stem}.png")))?;
    }
    Ok(())
}
