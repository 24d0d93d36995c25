//! Reading PyTorch checkpoints (`torch.save` zip format, `.pt` / `.pth`) without Python and
//! without executing pickled code: the pickle is interpreted as data by `pickle.rs`, tensors are
//! rebuilt from the archive's raw storages.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::Tensor;

use super::pickle::{self, TensorRef, Value};

/// The state dict in `path`: a dict of tensors, or a dict with such a dict under `state_dict`
/// (also `model` / `net`, common in training scripts). `module.` prefixes (DataParallel) are
/// removed. Returns (name, tensor) in file order.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a PyTorch zip checkpoint ({e}); files from torch < 1.6 (legacy format) must be re-saved with a newer torch",
            path.display()
        )
    })?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .with_context(|| {
            format!(
                "{}: no data.pkl inside: not a torch.save file",
                path.display()
            )
        })?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)?
        .read_to_end(&mut pkl)
        .with_context(|| format!("{}: cannot read {pkl_name}", path.display()))?;
    let root =
        pickle::load(&pkl).with_context(|| format!("{}: refusing to load", path.display()))?;

    let dict = find_state_dict(root).with_context(|| format!("{}", path.display()))?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::new();
    for (key, value) in dict {
        let Value::Str(name) = key else {
            bail!("{}: state dict key {key:?} is not a string", path.display());
        };
        let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
        let Value::Tensor(t) = value else {
            bail!(
                "{}: state dict entry '{name}' is {value:?}, expected a tensor",
                path.display()
            );
        };
        if !storages.contains_key(&t.key) {
            let entry = format!("{prefix}data/{}", t.key);
            let mut bytes = Vec::new();
            zip.by_name(&entry)
                .with_context(|| format!("{}: storage {entry} is missing", path.display()))?
                .read_to_end(&mut bytes)
                .with_context(|| format!("{}: cannot read {entry}", path.display()))?;
            storages.insert(t.key.clone(), bytes);
        }
        let tensor = rebuild(&t, &storages[&t.key])
            .with_context(|| format!("{}: tensor '{name}'", path.display()))?;
        out.push((name, tensor));
    }
    Ok(out)
}

fn find_state_dict(root: Value) -> Result<Vec<(Value, Value)>> {
    let Value::Dict(items) = root else {
        bail!(
            "the file holds {}, expected a state dict (a dict of tensors)",
            describe(&root)
        );
    };
    if items.iter().any(|(_, v)| matches!(v, Value::Tensor(_))) {
        return Ok(items);
    }
    for wanted in ["state_dict", "model", "net"] {
        if let Some((_, Value::Dict(inner))) =
            items.iter().find(|(k, _)| *k == Value::Str(wanted.into()))
        {
            return Ok(inner.clone());
        }
    }
    let keys: Vec<String> = items.iter().map(|(k, _)| format!("{k:?}")).collect();
    bail!(
        "no tensors at the top level and no 'state_dict' entry (keys: {})",
        keys.join(", ")
    )
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Tensor(_) => "a single tensor",
        _ => "a plain value",
    }
}

/// A strided view into a raw little-endian storage, made contiguous.
fn rebuild(t: &TensorRef, storage: &[u8]) -> Result<Tensor> {
    let elt = t.kind.bytes();
    if t.storage_numel.checked_mul(elt) != Some(storage.len()) {
        bail!(
            "storage {} has {} bytes, the pickle says {} elements of {elt} bytes",
            t.key,
            storage.len(),
            t.storage_numel
        );
    }
    if t.size.len() != t.stride.len()
        || t.size.iter().any(|&s| s < 0)
        || t.stride.iter().any(|&s| s < 0)
        || t.offset < 0
    {
        bail!(
            "invalid size {:?} / stride {:?} / offset {}",
            t.size,
            t.stride,
            t.offset
        );
    }
    // The furthest element the view touches must lie inside the storage.
    let last: i64 = t.offset
        + t.size
            .iter()
            .zip(&t.stride)
            .map(|(n, s)| (n - 1).max(0) * s)
            .sum::<i64>();
    let empty = t.size.contains(&0);
    if !empty && last as usize >= t.storage_numel {
        bail!(
            "view (offset {}, size {:?}, stride {:?}) reaches past its storage of {} elements",
            t.offset,
            t.size,
            t.stride,
            t.storage_numel
        );
    }
    let flat = Tensor::from_data_size(storage, &[t.storage_numel as i64], t.kind.kind());
    Ok(flat
        .as_strided(t.size.as_slice(), t.stride.as_slice(), Some(t.offset))
        .contiguous())
}
