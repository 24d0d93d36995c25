//! Errors from reading datasets. Every variant names the file (or folder) and what was wrong, so a
//! user can fix their data without reading atop's source.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not found ({what})")]
    NotFound { path: PathBuf, what: String },
    #[error(
        "{path}: size {size} bytes is not a whole number of {record}-byte records ({format}); the file is truncated or not in that format"
    )]
    BadRecordSize {
        path: PathBuf,
        size: u64,
        record: usize,
        format: &'static str,
    },
    #[error("{path}: record {record} has {which} label {label}, expected 0..{num_classes}")]
    LabelOutOfRange {
        path: PathBuf,
        record: usize,
        which: &'static str,
        label: u8,
        num_classes: usize,
    },
    #[error("{path}: {what}")]
    BadMeta { path: PathBuf, what: String },
    #[error("{path}: cannot decode image: {reason} (use `skip_corrupt` to skip such files)")]
    CorruptImage { path: PathBuf, reason: String },
    #[error(
        "{path}: not an image file (expected .jpg, .jpeg or .png; use `skip_corrupt` to skip it)"
    )]
    NotAnImage { path: PathBuf },
    #[error("{path}: class folder holds no images")]
    EmptyClass { path: PathBuf },
    #[error(
        "{path}: image is {found_w}x{found_h}, the others are {want_w}x{want_h}; pass an image size to resize them all"
    )]
    SizeMismatch {
        path: PathBuf,
        found_w: u32,
        found_h: u32,
        want_w: u32,
        want_h: u32,
    },
    #[error("{path}: {what}")]
    Layout { path: PathBuf, what: String },
    #[error("{path}: {what}")]
    Archive { path: PathBuf, what: String },
    #[error("invalid setting {field} = {value}: expected {expected}")]
    Setting {
        field: &'static str,
        value: String,
        expected: String,
    },
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
