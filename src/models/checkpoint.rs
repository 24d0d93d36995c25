//! Classifier checkpoints: `model.safetensors` (weights, torchvision/RobustBench names) plus
//! `model.json` (architecture, classes, normalisation, provenance). Both are written atomically;
//! loading is strict: every missing, unexpected or mis-shaped tensor is named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::{Classifier, ModelSpec};

pub const WEIGHTS: &str = "model.safetensors";
pub const SIDECAR: &str = "model.json";
/// In a training run folder: which checkpoint is the latest complete one.
pub const LAST: &str = "last.json";
const FORMAT: &str = "atop-classifier";

/// PyTorch keeps a step counter in every BatchNorm; it does not affect the outputs.
const IGNORED_SUFFIXES: &[&str] = &["num_batches_tracked"];

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path}: missing tensors for {arch}: {names:?}")]
    Missing {
        path: PathBuf,
        arch: String,
        names: Vec<String>,
    },
    #[error("{path}: tensors that {arch} does not have: {names:?}")]
    Unexpected {
        path: PathBuf,
        arch: String,
        names: Vec<String>,
    },
    #[error("{path}: tensor {name} has shape {found:?}, {arch} expects {expected:?}")]
    Shape {
        path: PathBuf,
        arch: String,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("{path}: tensor {name} holds NaN or infinite values")]
    NonFinite { path: PathBuf, name: String },
    #[error("{path}: {reason}")]
    Sidecar { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// The JSON sidecar.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sidecar {
    pub format: String,
    pub format_version: u32,
    #[serde(flatten)]
    pub spec: ModelSpec,
    /// Dataset the model was trained (or imported) for, and its class names in label order.
    pub dataset: Option<String>,
    pub classes: Vec<String>,
    /// Completed training epochs, if it comes from `atop train`.
    pub epoch: Option<usize>,
    /// The settings that produced it (training config, import source, ...).
    pub config: serde_json::Value,
    pub atop_version: String,
    pub torch_version: String,
}

impl Sidecar {
    pub fn new(
        spec: ModelSpec,
        dataset: Option<String>,
        classes: Vec<String>,
        epoch: Option<usize>,
        config: serde_json::Value,
    ) -> Self {
        Sidecar {
            format: FORMAT.into(),
            format_version: 1,
            spec,
            dataset,
            classes,
            epoch,
            config,
            atop_version: env!("CARGO_PKG_VERSION").into(),
            torch_version: env!("ATOP_TORCH_VERSION").into(),
        }
    }
}

fn write_err(path: &Path, reason: String) -> CheckpointError {
    CheckpointError::Write {
        path: path.to_path_buf(),
        reason,
    }
}

/// Writes `dir/model.safetensors` then `dir/model.json`, each via a temp file and rename.
pub fn save(model: &Classifier, sidecar: &Sidecar, dir: &Path) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e.to_string()))?;
    save_vars(&model.vs, &dir.join(WEIGHTS))?;
    crate::io::write_json(&dir.join(SIDECAR), sidecar)
        .map_err(|e| write_err(&dir.join(SIDECAR), format!("{e:#}")))
}

/// Writes every variable of `vs` (CPU, contiguous, sorted by name) to `file` atomically.
pub fn save_vars(vs: &tch::nn::VarStore, file: &Path) -> Result<(), CheckpointError> {
    let named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .map(|(k, v)| (k, v.to_device(Device::Cpu).contiguous()))
        .collect();
    crate::io::write_safetensors(file, &named).map_err(|e| write_err(file, format!("{e:#}")))
}

/// Where training left off; written (atomically) only after a checkpoint folder is complete.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastCheckpoint {
    /// Completed epochs.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: usize,
    /// The checkpoint folder, relative to the run folder.
    pub dir: String,
}

pub fn read_last(run: &Path) -> Result<LastCheckpoint, CheckpointError> {
    let path = run.join(LAST);
    let text = std::fs::read_to_string(&path).map_err(|e| CheckpointError::Sidecar {
        path: path.clone(),
        reason: format!("cannot read: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Sidecar {
        path,
        reason: format!("not a checkpoint pointer: {e}"),
    })
}

/// The folder holding `model.json` + `model.safetensors` for a checkpoint argument: that folder
/// itself, the folder of a given file, or a training run's latest checkpoint (via `last.json`).
pub fn resolve(path: &Path) -> Result<PathBuf, CheckpointError> {
    resolve_folder(path, SIDECAR)
}

/// [`resolve`] for any checkpoint kind whose folder is marked by the file `sidecar`.
pub fn resolve_folder(path: &Path, sidecar: &str) -> Result<PathBuf, CheckpointError> {
    // A mistyped name must not fall back to its parent folder (a file in a checkpoint folder
    // names that checkpoint).
    if !path.exists() {
        return Err(CheckpointError::Unreadable {
            path: path.to_path_buf(),
            reason: "no such file or folder".into(),
        });
    }
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    if !dir.join(sidecar).exists() && dir.join(LAST).exists() {
        return Ok(dir.join(read_last(&dir)?.dir));
    }
    Ok(dir)
}

pub fn read_sidecar(path: &Path) -> Result<Sidecar, CheckpointError> {
    let err = |reason: String| CheckpointError::Sidecar {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    parse_sidecar(&text, path)
}

/// A model description from its JSON text, validated; `path` names it in errors.
pub fn parse_sidecar(text: &str, path: &Path) -> Result<Sidecar, CheckpointError> {
    let err = |reason: String| CheckpointError::Sidecar {
        path: path.to_path_buf(),
        reason,
    };
    let sidecar: Sidecar = serde_json::from_str(text)
        .map_err(|e| err(format!("not an atop model description: {e}")))?;
    if sidecar.format != FORMAT {
        return Err(err(format!(
            "format is '{}', expected '{FORMAT}'",
            sidecar.format
        )));
    }
    sidecar.spec.validate().map_err(|e| err(format!("{e:#}")))?;
    if sidecar.classes.len() != sidecar.spec.num_classes {
        return Err(err(format!(
            "classes names {} classes, num_classes says {}",
            sidecar.classes.len(),
            sidecar.spec.num_classes
        )));
    }
    Ok(sidecar)
}

/// Loads a checkpoint (folder or file path) onto `device`.
pub fn load(path: &Path, device: Device) -> Result<(Classifier, Sidecar), CheckpointError> {
    let dir = resolve(path)?;
    let sidecar = read_sidecar(&dir.join(SIDECAR))?;
    let mut model = Classifier::new(sidecar.spec.clone(), device);
    load_weights(&mut model, &dir.join(WEIGHTS))?;
    Ok((model, sidecar))
}

/// Reads all tensors of a safetensors file, naming the file on failure.
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    if !path.is_file() {
        return Err(CheckpointError::Unreadable {
            path: path.to_path_buf(),
            reason: "not found".into(),
        });
    }
    Tensor::read_safetensors(path).map_err(|e| CheckpointError::Unreadable {
        path: path.to_path_buf(),
        reason: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
    })
}

/// Copies the tensors of `file` into `model`, requiring exactly the model's names and shapes.
pub fn load_weights(model: &mut Classifier, file: &Path) -> Result<(), CheckpointError> {
    let tensors = read_tensors(file)?;
    copy_named(model, tensors, file)
}

/// Strictly copies `tensors` (by name) into the model's variables.
pub fn copy_named(
    model: &mut Classifier,
    tensors: Vec<(String, Tensor)>,
    file: &Path,
) -> Result<(), CheckpointError> {
    copy_into(&model.vs, &model.spec.arch.to_string(), tensors, file)
}

/// Strictly copies `tensors` (by name) into the variables of `vs`, which hold the network
/// described by `arch` (named in errors): every missing, unexpected, mis-shaped or non-finite
/// tensor is an error, and nothing is copied unless everything fits.
pub fn copy_into(
    vs: &tch::nn::VarStore,
    arch: &str,
    tensors: Vec<(String, Tensor)>,
    file: &Path,
) -> Result<(), CheckpointError> {
    let arch = arch.to_string();
    let mut vars = vs.variables();
    let given: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| !IGNORED_SUFFIXES.iter().any(|s| k.ends_with(s)))
        .collect();
    let want: BTreeSet<&String> = vars.keys().collect();
    let have: BTreeSet<&String> = given.keys().collect();
    let missing: Vec<String> = want.difference(&have).map(|s| s.to_string()).collect();
    if !missing.is_empty() {
        return Err(CheckpointError::Missing {
            path: file.to_path_buf(),
            arch,
            names: missing,
        });
    }
    let extra: Vec<String> = have.difference(&want).map(|s| s.to_string()).collect();
    if !extra.is_empty() {
        return Err(CheckpointError::Unexpected {
            path: file.to_path_buf(),
            arch,
            names: extra,
        });
    }
    for (name, src) in &given {
        let dst = &vars[name];
        if dst.size() != src.size() {
            return Err(CheckpointError::Shape {
                path: file.to_path_buf(),
                arch,
                name: name.clone(),
                expected: dst.size(),
                found: src.size(),
            });
        }
        if src.is_floating_point() && !bool::try_from(src.isfinite().all()).unwrap_or(false) {
            return Err(CheckpointError::NonFinite {
                path: file.to_path_buf(),
                name: name.clone(),
            });
        }
    }
    tch::no_grad(|| {
        for (name, src) in &given {
            vars.get_mut(name).expect("checked above").copy_(src);
        }
    });
    Ok(())
}
