//! Image-folder datasets: `<split>/<class>/*.{jpg,jpeg,png}`, classes = sorted folder names,
//! read from a folder or straight from a `.tar` / `.tar.gz` archive. Optionally wrapped in one
//! top folder (`imagenette2-320/train/...`). Decoding runs on all worker threads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use image::RgbImage;
use image::imageops::FilterType;

use super::error::{DataError, Result};
use super::source::{Source, read_file, subdirs};
use super::{ImageSet, Skipped, Split};
use crate::progress;

#[derive(Debug, Clone, Default)]
pub struct FolderOptions {
    /// Resize the shorter side to this, then centre-crop a square; `None`: all images must
    /// already share one size.
    pub image_size: Option<u32>,
    pub skip_corrupt: bool,
}

/// Folder names a split may have on disk.
fn split_dirs(split: Split) -> &'static [&'static str] {
    match split {
        Split::Train => &["train"],
        Split::Test => &["test", "val"],
    }
}

pub fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".jpg", ".jpeg", ".png"].iter().any(|e| lower.ends_with(e))
}

fn is_hidden(name: &str) -> bool {
    name.rsplit('/').next().is_some_and(|b| b.starts_with('.'))
}

/// A file to decode: where it is (for messages), its label, and its bytes if already read.
struct Item {
    path: PathBuf,
    label: i64,
    bytes: Option<Vec<u8>>,
}

pub fn load(root: &Path, split: Split, opts: &FolderOptions) -> Result<ImageSet> {
    let source = Source::open(root)?;
    let (classes, items, mut skipped) = match &source {
        Source::Dir(dir) => list_dir(dir, split, opts)?,
        Source::Tar { path, .. } => list_archive(&source, path, split, opts)?,
    };
    let (pixels, height, width, labels, bad) = decode_all(items, opts)?;
    skipped.extend(bad);
    Ok(ImageSet {
        name: String::new(),
        split,
        class_names: classes.clone(),
        classes,
        height,
        width,
        pixels,
        labels,
        coarse: None,
        source: root.to_path_buf(),
        skipped,
    })
}

type Listing = (Vec<String>, Vec<Item>, Vec<Skipped>);

fn not_an_image(path: PathBuf, opts: &FolderOptions, skipped: &mut Vec<Skipped>) -> Result<()> {
    if opts.skip_corrupt {
        skipped.push(Skipped {
            path: path.display().to_string(),
            reason: "not an image file".into(),
        });
        Ok(())
    } else {
        Err(DataError::NotAnImage { path })
    }
}

fn list_dir(root: &Path, split: Split, opts: &FolderOptions) -> Result<Listing> {
    let names = split_dirs(split);
    let direct: Vec<PathBuf> = names
        .iter()
        .map(|n| root.join(n))
        .filter(|p| p.is_dir())
        .collect();
    let candidates = if direct.is_empty() {
        // One level down: an extracted archive often has a single top folder.
        let mut nested = Vec::new();
        for sub in subdirs(root)? {
            nested.extend(
                names
                    .iter()
                    .map(|n| root.join(&sub).join(n))
                    .filter(|p| p.is_dir()),
            );
        }
        nested
    } else {
        direct
    };
    let split_dir = match candidates.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(DataError::Layout {
                path: root.to_path_buf(),
                what: format!(
                    "no {} folder: expected {}/{}/<class>/*.jpg (or .png)",
                    names.join(" or "),
                    root.display(),
                    names[0]
                ),
            });
        }
        many => {
            return Err(DataError::Layout {
                path: root.to_path_buf(),
                what: format!(
                    "several folders could be the {} split: {many:?}",
                    split.as_str()
                ),
            });
        }
    };
    let classes = subdirs(&split_dir)?;
    if classes.is_empty() {
        return Err(DataError::Layout {
            path: split_dir,
            what: "holds no class folders (expected <class>/*.jpg)".into(),
        });
    }
    let mut items = Vec::new();
    let mut skipped = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = split_dir.join(class);
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| DataError::io(&dir, e))? {
            let entry = entry.map_err(|e| DataError::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ft = entry
                .file_type()
                .map_err(|e| DataError::io(entry.path(), e))?;
            if ft.is_dir() || is_hidden(&name) {
                continue;
            }
            files.push(name);
        }
        files.sort();
        let before = items.len();
        for name in files {
            let path = dir.join(&name);
            if is_image_name(&name) {
                items.push(Item {
                    path,
                    label: label as i64,
                    bytes: None,
                });
            } else {
                not_an_image(path, opts, &mut skipped)?;
            }
        }
        if items.len() == before {
            return Err(DataError::EmptyClass { path: dir });
        }
    }
    Ok((classes, items, skipped))
}

fn list_archive(
    source: &Source,
    archive: &Path,
    split: Split,
    opts: &FolderOptions,
) -> Result<Listing> {
    let names = split_dirs(split);
    // Position of the split folder in a '/'-separated path of `depth` parts, if it is one of ours.
    let split_at = |parts: &[&str], depth: usize| {
        parts.len() >= depth && names.contains(&parts[parts.len() - depth])
    };
    let listing = source.scan_archive(|rel| {
        let parts: Vec<&str> = rel.split('/').collect();
        split_at(&parts, 3) && !is_hidden(rel)
    })?;
    // The folder holding the split, e.g. "" or "imagenette2-320/"; it must be unique.
    let mut prefixes: Vec<String> = Vec::new();
    let mut class_dirs = std::collections::BTreeSet::new();
    for dir in &listing.dirs {
        let parts: Vec<&str> = dir.split('/').collect();
        if split_at(&parts, 2) {
            let prefix = parts[..parts.len() - 1].join("/");
            if !prefixes.contains(&prefix) {
                prefixes.push(prefix.clone());
            }
            class_dirs.insert((prefix, parts[parts.len() - 1].to_string()));
        }
    }
    let prefix = match prefixes.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(DataError::Layout {
                path: archive.to_path_buf(),
                what: format!(
                    "archive has no {}/<class>/ folders (expected {}/<class>/*.jpg inside)",
                    names.join(" or "),
                    names[0]
                ),
            });
        }
        many => {
            return Err(DataError::Layout {
                path: archive.to_path_buf(),
                what: format!(
                    "several folders could be the {} split: {many:?}",
                    split.as_str()
                ),
            });
        }
    };
    let classes: Vec<String> = class_dirs
        .into_iter()
        .filter(|(p, _)| *p == prefix)
        .map(|(_, c)| c)
        .collect();
    let mut per_class: Vec<Vec<Item>> = (0..classes.len()).map(|_| Vec::new()).collect();
    let mut skipped = Vec::new();
    for file in listing.files {
        let parts: Vec<&str> = file.rel.split('/').collect();
        let (class, name) = (parts[parts.len() - 2], parts[parts.len() - 1]);
        if parts[..parts.len() - 2].join("/") != prefix {
            continue;
        }
        let label = classes
            .binary_search_by(|c| c.as_str().cmp(class))
            .expect("class dir listed");
        let path = archive.join(&file.rel);
        if is_image_name(name) {
            per_class[label].push(Item {
                path,
                label: label as i64,
                bytes: Some(file.bytes),
            });
        } else {
            not_an_image(path, opts, &mut skipped)?;
        }
    }
    for (class, items) in classes.iter().zip(&per_class) {
        if items.is_empty() {
            let dir = [prefix.as_str(), class]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("/");
            return Err(DataError::EmptyClass {
                path: archive.join(dir),
            });
        }
    }
    // Sorted by class, then by file name: the same order as reading the extracted folder.
    let mut items = Vec::new();
    for mut class_items in per_class {
        class_items.sort_by(|a, b| a.path.cmp(&b.path));
        items.extend(class_items);
    }
    Ok((classes, items, skipped))
}

/// Decodes (and resizes) every item on all threads into one packed buffer.
#[allow(clippy::type_complexity)]
fn decode_all(
    mut items: Vec<Item>,
    opts: &FolderOptions,
) -> Result<(Vec<u8>, usize, usize, Vec<i64>, Vec<Skipped>)> {
    // The output size: asked for, or that of the first image that decodes.
    let (w, h) = match opts.image_size {
        Some(s) => (s, s),
        None => {
            let mut size = None;
            for item in &items {
                let bytes = match &item.bytes {
                    Some(b) => std::borrow::Cow::Borrowed(b),
                    None => std::borrow::Cow::Owned(read_file(&item.path)?),
                };
                match decode_rgb(&item.path, &bytes) {
                    Ok(img) => {
                        size = Some(img.dimensions());
                        break;
                    }
                    Err(e) if !opts.skip_corrupt => return Err(e),
                    Err(_) => {}
                }
            }
            size.unwrap_or((1, 1))
        }
    };
    let per_image = (w * h * 3) as usize;
    let n = items.len();
    let mut pixels = vec![0u8; n * per_image];
    let threads = crate::runtime::threads().max(1).min(n.max(1));
    let chunk = n.div_ceil(threads).max(1);
    let bar = progress::bar(n as u64, "decoding images");
    let done = AtomicUsize::new(0);
    let mut failures: Vec<(usize, DataError)> = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks_mut(chunk)
            .zip(pixels.chunks_mut(chunk * per_image))
            .enumerate()
            .map(|(c, (items, out))| {
                let bar = &bar;
                let done = &done;
                scope.spawn(move || {
                    let mut failed = Vec::new();
                    for (k, (item, dst)) in
                        items.iter_mut().zip(out.chunks_mut(per_image)).enumerate()
                    {
                        if let Err(e) = decode_into(item, opts.image_size, (w, h), dst) {
                            failed.push((c * chunk + k, e));
                        }
                        // Free the compressed bytes as we go.
                        item.bytes = None;
                        if done.fetch_add(1, Ordering::Relaxed).is_multiple_of(256) {
                            bar.set_position(done.load(Ordering::Relaxed) as u64);
                        }
                    }
                    failed
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("decode worker panicked"))
            .collect()
    });
    bar.finish_and_clear();
    failures.sort_by_key(|(i, _)| *i);

    let mut skipped = Vec::new();
    let mut drop = vec![false; n];
    for (i, err) in failures {
        match err {
            DataError::CorruptImage { path, reason } if opts.skip_corrupt => {
                skipped.push(Skipped {
                    path: path.display().to_string(),
                    reason,
                });
                drop[i] = true;
            }
            other => return Err(other),
        }
    }
    let labels: Vec<i64> = items
        .iter()
        .zip(&drop)
        .filter(|(_, d)| !**d)
        .map(|(it, _)| it.label)
        .collect();
    if !skipped.is_empty() {
        let mut kept = 0;
        for (i, dropped) in drop.iter().enumerate() {
            if !dropped {
                pixels.copy_within(i * per_image..(i + 1) * per_image, kept * per_image);
                kept += 1;
            }
        }
        pixels.truncate(kept * per_image);
    }
    Ok((pixels, h as usize, w as usize, labels, skipped))
}

fn decode_into(item: &Item, resize: Option<u32>, (w, h): (u32, u32), dst: &mut [u8]) -> Result<()> {
    let bytes = match &item.bytes {
        Some(b) => std::borrow::Cow::Borrowed(b),
        None => std::borrow::Cow::Owned(read_file(&item.path)?),
    };
    let mut img = decode_rgb(&item.path, &bytes)?;
    if let Some(s) = resize {
        img = resize_center_crop(img, s);
    } else if img.dimensions() != (w, h) {
        return Err(DataError::SizeMismatch {
            path: item.path.clone(),
            found_w: img.width(),
            found_h: img.height(),
            want_w: w,
            want_h: h,
        });
    }
    dst.copy_from_slice(img.as_raw());
    Ok(())
}

/// Any supported encoding (JPEG incl. greyscale and CMYK, PNG incl. alpha) to 8-bit RGB.
pub fn decode_rgb(path: &Path, bytes: &[u8]) -> Result<RgbImage> {
    let corrupt = |reason: String| DataError::CorruptImage {
        path: path.to_path_buf(),
        reason,
    };
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| corrupt(e.to_string()))?;
    if reader.format().is_none() {
        return Err(corrupt("unknown image format".into()));
    }
    let img = reader.decode().map_err(|e| corrupt(e.to_string()))?;
    Ok(img.into_rgb8())
}

/// Resize so the shorter side is `size` (antialiased bilinear), then crop the centre square.
pub fn resize_center_crop(img: RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (size, size) {
        return img;
    }
    let (nw, nh) = if w <= h {
        (
            size,
            ((h as u64 * size as u64) / w as u64).max(size as u64) as u32,
        )
    } else {
        (
            ((w as u64 * size as u64) / h as u64).max(size as u64) as u32,
            size,
        )
    };
    let resized = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
    let left = (nw - size) / 2;
    let top = (nh - size) / 2;
    image::imageops::crop_imm(&resized, left, top, size, size).to_image()
}

/// Every png/jpg directly in `folder` (sorted by name), all of one size, as N x 3 x H x W floats
/// in [0,1], with the file names (`atop purify --input`).
pub fn read_flat(folder: &Path) -> anyhow::Result<(tch::Tensor, Vec<String>)> {
    use anyhow::{Context, bail};
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .with_context(|| format!("cannot read {}", folder.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .png or .jpg images", folder.display());
    }
    let mut size = None;
    let mut bytes = Vec::new();
    let mut names = Vec::new();
    for f in &files {
        let img = image::open(f)
            .with_context(|| format!("{}: not a readable image", f.display()))?
            .to_rgb8();
        let dims = img.dimensions();
        match size {
            None => size = Some(dims),
            Some(s) if s != dims => bail!(
                "{}: {}x{} pixels, but {} is {}x{}: all images of a folder must have one size",
                f.display(),
                dims.0,
                dims.1,
                files[0].display(),
                s.0,
                s.1
            ),
            _ => {}
        }
        bytes.extend_from_slice(img.as_raw());
        names.push(
            f.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
    }
    let (w, h) = size.expect("at least one image");
    let x = tch::Tensor::from_slice(&bytes)
        .view([files.len() as i64, h as i64, w as i64, 3])
        .permute([0, 3, 1, 2])
        .to_kind(tch::Kind::Float)
        / 255.0;
    Ok((x, names))
}
