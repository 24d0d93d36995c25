#![allow(dead_code)] // each fuzz target uses one function
//! What each fuzz target runs on one input: the parsers that read users' files, fed bytes. Any
//! input may be refused with an error; none may panic, abort or hang. Shared by the cargo-fuzz
//! targets (`fuzz/fuzz_targets/`) and the regression test that replays saved inputs
//! (`tests/fuzz_regressions.rs`).

use std::path::Path;

use atop::data::cifar::{self, CifarFormat};
use atop::eval::plan::Plan;
use atop::models::{checkpoint, pickle, pytorch};
use atop::train::purifier::TrainPurifierConfig;
use atop::train::{atop::TrainAtopConfig, classifier::TrainClassifierConfig};

/// Runs one input; true when it was accepted.
pub type Target = fn(&[u8]) -> bool;

/// The targets, by name (the names of `fuzz/fuzz_targets/*.rs` and of the seed folders).
pub const TARGETS: &[(&str, Target)] = &[
    ("pickle", pickle),
    ("state_dict", state_dict),
    ("torch_zip", torch_zip),
    ("safetensors", safetensors),
    ("sidecar", sidecar),
    ("cifar", cifar),
    ("config", config),
];

/// The pickle reader (an `import`ed `.pt` file's `data.pkl`).
pub fn pickle(data: &[u8]) -> bool {
    pickle::load(data).is_ok()
}

/// A state dict from a pickle and its storages: the first two bytes give the pickle's length,
/// the rest after the pickle is cycled to fill every storage it asks for (so that views,
/// strides and offsets of the pickle meet real storages; a zip's checksums would stop most
/// mutated pickles before this point).
pub fn state_dict(data: &[u8]) -> bool {
    let Some((head, rest)) = data.split_first_chunk::<2>() else {
        return false;
    };
    let n = (u16::from_le_bytes(*head) as usize).min(rest.len());
    let (pkl, pool) = rest.split_at(n);
    let Ok(root) = pickle::load(pkl) else {
        return false;
    };
    pytorch::state_dict_from(Path::new("fuzz.pt"), "", root, |entry, bytes, _| {
        if bytes > 1 << 20 {
            anyhow::bail!("{entry}: {bytes} bytes, more than the fuzz harness fills");
        }
        Ok(if pool.is_empty() {
            vec![0; bytes as usize]
        } else {
            pool.iter().copied().cycle().take(bytes as usize).collect()
        })
    })
    .is_ok()
}

/// A whole `.pt` file (zip archive, pickle, storages), as `atop import` reads it.
pub fn torch_zip(data: &[u8]) -> bool {
    let file = temp_file(data);
    pytorch::read_state_dict(file.path()).is_ok()
}

/// A safetensors weights file, as every checkpoint load reads it.
pub fn safetensors(data: &[u8]) -> bool {
    let file = temp_file(data);
    checkpoint::read_tensors(file.path()).is_ok()
}

/// The JSON descriptions beside the weights: a classifier's `model.json`, a purifier's
/// `purifier.json`, a run's `last.json`-style pointer.
pub fn sidecar(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let path = Path::new("fuzz.json");
    let classifier = checkpoint::parse_sidecar(text, path).is_ok();
    atop::purifier::parse_sidecar(text, path).is_ok() || classifier
}

/// CIFAR binary batches: the first byte picks CIFAR-10 or CIFAR-100, the rest are records.
/// Decoded records must hold whole images and labels in range.
pub fn cifar(data: &[u8]) -> bool {
    let Some((&pick, bytes)) = data.split_first() else {
        return false;
    };
    let format = if pick % 2 == 0 {
        CifarFormat::Cifar10
    } else {
        CifarFormat::Cifar100
    };
    let (mut pixels, mut labels, mut coarse) = (Vec::new(), Vec::new(), Vec::new());
    let path = Path::new("fuzz.bin");
    let ok = cifar::decode_records(path, bytes, format, &mut pixels, &mut labels, &mut coarse);
    if ok.is_ok() {
        let records = bytes.len() / format.record_bytes();
        assert_eq!(pixels.len(), records * 32 * 32 * 3);
        assert_eq!(labels.len(), records);
        let (fine, _) = format.num_classes();
        assert!(labels.iter().all(|&l| (0..fine as i64).contains(&l)));
    }
    ok.is_ok()
}

/// The TOML settings files: the first byte picks a classifier, purifier or AToP training config
/// or an evaluation plan; each one parsed is then validated as the commands do (accepted means
/// parsed: an AToP preset names no classifier, so it is not valid alone).
pub fn config(data: &[u8]) -> bool {
    let Some((&pick, bytes)) = data.split_first() else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    match pick % 4 {
        0 => TrainClassifierConfig::from_toml(text, "fuzz.toml")
            .map(|c| c.validate())
            .is_ok(),
        1 => TrainPurifierConfig::from_toml(text, "fuzz.toml")
            .map(|c| c.validate())
            .is_ok(),
        2 => TrainAtopConfig::from_toml(text, "fuzz.toml")
            .map(|c| c.validate())
            .is_ok(),
        _ => Plan::from_toml(text, "fuzz.toml")
            .map(|plan| {
                let budget = atop::attacks::Budget::new(atop::attacks::Norm::Linf, 8.0 / 255.0)
                    .expect("a valid budget");
                plan.attacks(atop::attacks::AttackSettings::new(budget), true)
            })
            .is_ok(),
    }
}

fn temp_file(data: &[u8]) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    file.write_all(data).expect("writing a temporary file");
    file
}
