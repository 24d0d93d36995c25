//! Datasets: CIFAR-10/100 (official binary format), image folders (from a folder or an archive),
//! ImageNette, seeded subsets and the batch iterator.
//!
//! Everything is decoded once into memory as RGB u8 (N x H x W x 3); batches become f32 NCHW
//! tensors in [0,1]. Normalisation belongs to the models, not here.

pub mod augment;
pub mod cifar;
pub mod download;
pub mod error;
pub mod folder;
pub mod inspect;
pub mod loader;
pub mod source;
pub mod subset;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::Tensor;

pub use error::DataError;
use error::Result;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    /// The held-out split (`test` for CIFAR, `val` for ImageNette); what evaluations default to.
    #[default]
    #[cfg_attr(feature = "cli", value(alias = "val"))]
    #[serde(alias = "val")]
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    Cifar10,
    Cifar100,
    Imagenette,
    /// Any `<split>/<class>/*.{jpg,jpeg,png}` tree.
    Folder,
}

impl DatasetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Imagenette => "imagenette",
            DatasetKind::Folder => "folder",
        }
    }

    /// Files this dataset is usually found as inside `$ATOP_DATA_DIR`, in order of preference.
    fn default_names(self) -> &'static [&'static str] {
        match self {
            DatasetKind::Cifar10 => &[
                "cifar-10-batches-bin",
                "cifar-10-binary.tar.gz",
                "cifar10-jpg.tar.gz",
                "cifar10",
            ],
            DatasetKind::Cifar100 => &["cifar-100-binary", "cifar-100-binary.tar.gz", "cifar100"],
            DatasetKind::Imagenette => &[
                "imagenette2-224.tar",
                "imagenette2-224",
                "imagenette2-320.tgz",
                "imagenette2-320",
                "imagenette2.tgz",
                "imagenette2",
                "imagenette2-160.tgz",
                "imagenette2-160",
            ],
            DatasetKind::Folder => &[],
        }
    }

    /// Side length images are brought to when none is asked for; `None` keeps the files' size.
    pub fn default_image_size(self) -> Option<u32> {
        match self {
            DatasetKind::Imagenette => Some(224),
            _ => None,
        }
    }
}

/// The largest image side atop decodes to (a 4096 x 4096 RGB image is 200 MB in f32).
pub const MAX_IMAGE_SIZE: u32 = 4096;

/// Optional data flags that override a config's (training) or a model's (evaluation) data.
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct DataOverrides {
    /// Dataset (default: the config's, or the one the model was trained on).
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub dataset: Option<DatasetKind>,
    #[cfg_attr(feature = "cli", arg(long))]
    pub root: Option<PathBuf>,
    /// Image size (default: the config's, or the model's training run's).
    #[cfg_attr(feature = "cli", arg(long))]
    pub image_size: Option<u32>,
}

impl DataOverrides {
    /// Writes the given flags into `cfg`.
    pub fn apply(&self, cfg: &mut DataConfig) {
        if let Some(d) = self.dataset {
            cfg.dataset = d;
        }
        if self.root.is_some() {
            cfg.root = self.root.clone();
        }
        if self.image_size.is_some() {
            cfg.image_size = self.image_size;
        }
    }
}

/// What to load. Every field has a CLI flag; the struct is also a TOML section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub dataset: DatasetKind,
    /// Folder or archive; default: the usual file name inside `$ATOP_DATA_DIR`.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// Resize the shorter side to this and centre-crop a square (image folders only).
    #[serde(default)]
    pub image_size: Option<u32>,
    /// Count and skip undecodable or non-image files instead of failing.
    #[serde(default)]
    pub skip_corrupt: bool,
}

impl DataConfig {
    pub fn new(dataset: DatasetKind) -> Self {
        DataConfig {
            dataset,
            root: None,
            image_size: None,
            skip_corrupt: false,
        }
    }

    /// The root to read: the explicit one, or the first known name found in `$ATOP_DATA_DIR`.
    /// The same settings with `root` absolute: what a run records (never a path relative to
    /// the working directory it was started from).
    pub fn absolute(&self) -> DataConfig {
        DataConfig {
            root: self.root.as_deref().map(crate::folder::absolute),
            ..self.clone()
        }
    }

    pub fn resolve_root(&self) -> Result<PathBuf> {
        if let Some(root) = &self.root {
            return Ok(root.clone());
        }
        let Some(dir) = std::env::var_os("ATOP_DATA_DIR") else {
            return Err(DataError::Setting {
                field: "root",
                value: "(none)".into(),
                expected: format!(
                    "a dataset folder or archive for {} (pass `root`, or set ATOP_DATA_DIR to a folder holding one)",
                    self.dataset.as_str()
                ),
            });
        };
        let dir = PathBuf::from(dir);
        self.dataset
            .default_names()
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.exists())
            .ok_or_else(|| DataError::NotFound {
                path: dir.clone(),
                what: format!(
                    "ATOP_DATA_DIR holds none of {:?} for {}; pass `root`",
                    self.dataset.default_names(),
                    self.dataset.as_str()
                ),
            })
    }

    pub fn load(&self, split: Split) -> Result<ImageSet> {
        let root = self.resolve_root()?;
        if let Some(size) = self.image_size
            && !(1..=MAX_IMAGE_SIZE).contains(&size)
        {
            return Err(DataError::Setting {
                field: "image_size",
                value: size.to_string(),
                expected: format!("1 to {MAX_IMAGE_SIZE} pixels"),
            });
        }
        let image_size = self.image_size.or(self.dataset.default_image_size());
        let opts = folder::FolderOptions {
            image_size,
            skip_corrupt: self.skip_corrupt,
        };
        let mut set = match self.dataset {
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
                let format = if self.dataset == DatasetKind::Cifar10 {
                    cifar::CifarFormat::Cifar10
                } else {
                    cifar::CifarFormat::Cifar100
                };
                match cifar::load(&root, format, split)? {
                    Some(set) => set,
                    // Not in binary format: read it as an image folder (the shared JPEG copy).
                    None => folder::load(&root, split, &opts)?,
                }
            }
            DatasetKind::Imagenette => {
                let mut set = folder::load(&root, split, &opts)?;
                set.class_names = set.classes.iter().map(|w| imagenette_name(w)).collect();
                set
            }
            DatasetKind::Folder => folder::load(&root, split, &opts)?,
        };
        set.name = self.dataset.as_str().to_string();
        Ok(set)
    }
}

/// Human-readable ImageNette class names, keyed by WordNet id.
pub fn imagenette_name(wnid: &str) -> String {
    match wnid {
        "n01440764" => "tench",
        "n02102040" => "English springer",
        "n02979186" => "cassette player",
        "n03000684" => "chain saw",
        "n03028079" => "church",
        "n03394916" => "French horn",
        "n03417042" => "garbage truck",
        "n03425413" => "gas pump",
        "n03445777" => "golf ball",
        "n03888257" => "parachute",
        other => other,
    }
    .to_string()
}

/// A file that `skip_corrupt` left out, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Labels of a second granularity (CIFAR-100's 20 superclasses).
#[derive(Debug, Clone)]
pub struct CoarseLabels {
    pub classes: Vec<String>,
    pub labels: Vec<i64>,
}

/// A decoded split held in memory: RGB u8 images of one size, labels, and class names.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub name: String,
    pub split: Split,
    /// Class identifiers in label order (folder names, or the official names).
    pub classes: Vec<String>,
    /// Names for people (same as `classes` except for ImageNette's WordNet ids).
    pub class_names: Vec<String>,
    pub height: usize,
    pub width: usize,
    /// N x H x W x 3, row-major.
    pub pixels: Vec<u8>,
    pub labels: Vec<i64>,
    pub coarse: Option<CoarseLabels>,
    pub source: PathBuf,
    pub skipped: Vec<Skipped>,
}

impl ImageSet {
    /// SHA-256 of the images and labels (sizes, pixels, labels, class names): what identifies
    /// a run's data whatever folder or archive it was read from.
    pub fn sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!("{}x{}x{}", self.len(), self.height, self.width).as_bytes());
        h.update(&self.pixels);
        for l in &self.labels {
            h.update(l.to_le_bytes());
        }
        h.update(self.classes.join("\n").as_bytes());
        crate::io::hex(&h.finalize())
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    pub fn image_bytes(&self) -> usize {
        self.height * self.width * 3
    }

    /// Image `i` as H x W x 3 bytes.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_bytes();
        &self.pixels[i * n..(i + 1) * n]
    }

    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes()];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// The images at `indices` as an f32 N x 3 x H x W tensor in [0,1], and their labels.
    pub fn tensors(&self, indices: &[usize]) -> (Tensor, Tensor) {
        let n = self.image_bytes();
        let mut buf = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            buf.extend_from_slice(self.image(i));
        }
        let labels: Vec<i64> = indices.iter().map(|&i| self.labels[i]).collect();
        (
            hwc_u8_to_tensor(&buf, indices.len(), self.height, self.width),
            Tensor::from_slice(&labels),
        )
    }

    /// A new set holding only `indices` (in that order).
    pub fn select(&self, indices: &[usize]) -> ImageSet {
        let mut pixels = Vec::with_capacity(indices.len() * self.image_bytes());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
        }
        ImageSet {
            pixels,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            coarse: self.coarse.as_ref().map(|c| CoarseLabels {
                classes: c.classes.clone(),
                labels: indices.iter().map(|&i| c.labels[i]).collect(),
            }),
            skipped: Vec::new(),
            name: self.name.clone(),
            split: self.split,
            classes: self.classes.clone(),
            class_names: self.class_names.clone(),
            height: self.height,
            width: self.width,
            source: self.source.clone(),
        }
    }
}

/// Packed N x H x W x 3 bytes -> f32 N x 3 x H x W in [0,1] (on the CPU).
pub fn hwc_u8_to_tensor(buf: &[u8], n: usize, h: usize, w: usize) -> Tensor {
    Tensor::from_slice(buf)
        .view([n as i64, h as i64, w as i64, 3])
        .permute([0, 3, 1, 2])
        .to_kind(tch::Kind::Float)
        / 255.0
}
