//! CIFAR-10 and CIFAR-100 in the official binary format.
//!
//! CIFAR-10: `data_batch_1..5.bin` (train), `test_batch.bin`, `batches.meta.txt`; each record is
//! 1 label byte + 3072 pixel bytes (1024 R, 1024 G, 1024 B, row-major 32x32).
//! CIFAR-100: `train.bin`, `test.bin`, `coarse_label_names.txt`, `fine_label_names.txt`; each
//! record is 1 coarse label byte + 1 fine label byte + 3072 pixel bytes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::{DataError, Result};
use super::source::{Source, read_file};
use super::{CoarseLabels, ImageSet, Split};

const SIDE: usize = 32;
const PIXELS: usize = SIDE * SIDE * 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarFormat {
    Cifar10,
    Cifar100,
}

impl CifarFormat {
    fn label_bytes(self) -> usize {
        match self {
            CifarFormat::Cifar10 => 1,
            CifarFormat::Cifar100 => 2,
        }
    }

    pub fn record_bytes(self) -> usize {
        self.label_bytes() + PIXELS
    }

    fn name(self) -> &'static str {
        match self {
            CifarFormat::Cifar10 => "CIFAR-10 binary",
            CifarFormat::Cifar100 => "CIFAR-100 binary",
        }
    }

    fn subdir(self) -> &'static str {
        match self {
            CifarFormat::Cifar10 => "cifar-10-batches-bin",
            CifarFormat::Cifar100 => "cifar-100-binary",
        }
    }

    pub fn split_files(self, split: Split) -> Vec<&'static str> {
        match (self, split) {
            (CifarFormat::Cifar10, Split::Train) => vec![
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            (CifarFormat::Cifar10, Split::Test) => vec!["test_batch.bin"],
            (CifarFormat::Cifar100, Split::Train) => vec!["train.bin"],
            (CifarFormat::Cifar100, Split::Test) => vec!["test.bin"],
        }
    }

    /// Class-name files: (fine or only, coarse).
    fn meta_files(self) -> (&'static str, Option<&'static str>) {
        match self {
            CifarFormat::Cifar10 => ("batches.meta.txt", None),
            CifarFormat::Cifar100 => ("fine_label_names.txt", Some("coarse_label_names.txt")),
        }
    }

    pub fn num_classes(self) -> (usize, Option<usize>) {
        match self {
            CifarFormat::Cifar10 => (10, None),
            CifarFormat::Cifar100 => (100, Some(20)),
        }
    }
}

/// Loads `split` if `root` holds the binary format; `Ok(None)` if it holds something else (an
/// image folder), so the caller can try that.
pub fn load(root: &Path, format: CifarFormat, split: Split) -> Result<Option<ImageSet>> {
    let source = Source::open(root)?;
    let files = format.split_files(split);
    let (meta, coarse_meta) = format.meta_files();
    let mut wanted: Vec<&str> = files.clone();
    wanted.push(meta);
    wanted.extend(coarse_meta);

    // Gather (name -> (display path, bytes)) for the files we need.
    let mut found: HashMap<&str, (PathBuf, Vec<u8>)> = HashMap::new();
    match &source {
        Source::Dir(dir) => {
            let Some(base) = [dir.clone(), dir.join(format.subdir())]
                .into_iter()
                .find(|d| files.iter().any(|f| d.join(f).is_file()))
            else {
                return Ok(None);
            };
            for name in &wanted {
                let path = base.join(name);
                if path.is_file() {
                    let bytes = read_file(&path)?;
                    found.insert(name, (path, bytes));
                }
            }
        }
        Source::Tar { path, .. } => {
            match source.first_archive_file()? {
                Some(first) if super::folder::is_image_name(&first) => return Ok(None),
                None => return Ok(None),
                _ => {}
            }
            let listing = source.scan_archive(|rel| {
                let base = rel.rsplit('/').next().unwrap_or(rel);
                wanted.contains(&base)
            })?;
            if !listing.files.iter().any(|f| f.rel.ends_with(".bin")) {
                return Ok(None);
            }
            for f in listing.files {
                let base = f.rel.rsplit('/').next().unwrap_or(&f.rel).to_string();
                if let Some(name) = wanted.iter().find(|w| **w == base) {
                    found.insert(name, (path.join(&f.rel), f.bytes));
                }
            }
        }
    }

    let missing = |name: &str| DataError::NotFound {
        path: root.join(name),
        what: format!(
            "{} needs it for the {} split",
            format.name(),
            split.as_str()
        ),
    };
    let (n_fine, n_coarse) = format.num_classes();
    let (meta_path, meta_bytes) = found.get(meta).ok_or_else(|| missing(meta))?;
    let classes = parse_names(meta_path, meta_bytes, n_fine)?;
    let coarse_classes = match coarse_meta {
        Some(name) => {
            let (p, b) = found.get(name).ok_or_else(|| missing(name))?;
            Some(parse_names(p, b, n_coarse.unwrap_or(0))?)
        }
        None => None,
    };

    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let mut coarse = Vec::new();
    for name in &files {
        let (path, bytes) = found.get(name).ok_or_else(|| missing(name))?;
        decode_records(path, bytes, format, &mut pixels, &mut labels, &mut coarse)?;
    }
    Ok(Some(ImageSet {
        name: String::new(),
        split,
        class_names: classes.clone(),
        classes,
        height: SIDE,
        width: SIDE,
        pixels,
        labels,
        coarse: coarse_classes.map(|classes| CoarseLabels {
            classes,
            labels: coarse,
        }),
        source: root.to_path_buf(),
        skipped: Vec::new(),
    }))
}

/// Appends the records of one `.bin` file: pixels as H x W x 3, fine labels, coarse labels.
pub fn decode_records(
    path: &Path,
    bytes: &[u8],
    format: CifarFormat,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<i64>,
    coarse: &mut Vec<i64>,
) -> Result<()> {
    let record = format.record_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
        return Err(DataError::BadRecordSize {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            record,
            format: format.name(),
        });
    }
    let (n_fine, n_coarse) = format.num_classes();
    pixels.reserve(bytes.len() / record * PIXELS);
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let check = |label: u8, which: &'static str, n: usize| {
            if (label as usize) < n {
                Ok(label as i64)
            } else {
                Err(DataError::LabelOutOfRange {
                    path: path.to_path_buf(),
                    record: i,
                    which,
                    label,
                    num_classes: n,
                })
            }
        };
        let planes = match format {
            CifarFormat::Cifar10 => {
                labels.push(check(rec[0], "the", n_fine)?);
                &rec[1..]
            }
            CifarFormat::Cifar100 => {
                coarse.push(check(rec[0], "coarse", n_coarse.unwrap_or(0))?);
                labels.push(check(rec[1], "fine", n_fine)?);
                &rec[2..]
            }
        };
        let plane = SIDE * SIDE;
        for p in 0..plane {
            pixels.extend_from_slice(&[planes[p], planes[plane + p], planes[2 * plane + p]]);
        }
    }
    Ok(())
}

fn parse_names(path: &Path, bytes: &[u8], expected: usize) -> Result<Vec<String>> {
    let text = std::str::from_utf8(bytes).map_err(|_| DataError::BadMeta {
        path: path.to_path_buf(),
        what: "not UTF-8 text".into(),
    })?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != expected {
        return Err(DataError::BadMeta {
            path: path.to_path_buf(),
            what: format!("lists {} class names, expected {expected}", names.len()),
        });
    }
    Ok(names)
}
