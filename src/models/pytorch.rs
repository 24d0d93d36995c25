//! Reading PyTorch checkpoints (`torch.save` zip format, `.pt` / `.pth`) without Python and
//! without executing pickled code: the pickle is interpreted as data by `pickle.rs`, tensors are
//! rebuilt from the archive's raw storages.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tch::Tensor;

use super::pickle::{self, TensorRef, Value};
use super::{Arch, Classifier, ModelSpec, checkpoint};
use crate::data::DatasetKind;

/// The largest `data.pkl` accepted: a state dict's pickle takes about 100 bytes per tensor.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// The most tensor bytes one checkpoint may hold, all storages together (a WRN-70-16 takes
/// about 1 GiB in float32).
pub const MAX_TENSOR_BYTES: u64 = 8 << 30;

/// How much larger than its compressed size an entry may inflate, for entries over
/// [`RATIO_FROM`] bytes: torch.save stores tensors uncompressed, and trained weights deflate
/// by a few percent, while a zip bomb inflates a thousandfold.
const MAX_RATIO: u64 = 100;
const RATIO_FROM: u64 = 16 << 20;

/// The state dict in `path`: a dict of tensors, or a dict with such a dict under `state_dict`
/// (also `model` / `net`, common in training scripts). `module.` prefixes (DataParallel) are
/// removed. Returns (name, tensor) in file order.
///
/// Nothing in the file is trusted: every archive entry's declared size is checked against its
/// cap (the pickle's for `data.pkl`, the bytes the pickle says a storage holds for tensors)
/// before it is read, and it is read through a limit, so a lying header cannot inflate it.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let archive_len = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
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
    let pkl = read_entry(
        &mut zip,
        (path, archive_len),
        &pkl_name,
        Expect::AtMost(MAX_PICKLE_BYTES),
    )?;
    let root = pickle::load(&pkl)
        .with_context(|| format!("{}: refusing to load {pkl_name}", path.display()))?;
    drop(pkl);
    state_dict_from(path, &prefix, root, |entry, bytes, what| {
        read_entry(
            &mut zip,
            (path, archive_len),
            entry,
            Expect::Exactly(bytes, what),
        )
    })
}

/// The tensors of an unpickled torch.save `root`. `storage(entry, bytes, what)` gives the bytes
/// of the archive entry `entry` (under `prefix`), which the pickle says holds `bytes` bytes
/// (`what`, in words). `path` names the file in errors.
pub fn state_dict_from(
    path: &Path,
    prefix: &str,
    root: Value,
    mut storage: impl FnMut(&str, u64, &str) -> Result<Vec<u8>>,
) -> Result<Vec<(String, Tensor)>> {
    let dict = find_state_dict(root).with_context(|| format!("{}", path.display()))?;
    // Each storage, read once, as a flat tensor; views of it are rebuilt per entry.
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut total: u64 = 0;
    let mut out = Vec::new();
    for (key, value) in dict {
        let Value::Str(name) = key else {
            bail!(
                "{}: state dict key {} is not a string",
                path.display(),
                key.describe()
            );
        };
        let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
        let Value::Tensor(t) = value else {
            bail!(
                "{}: state dict entry '{}' is {}, expected a tensor",
                path.display(),
                short(&name),
                value.describe()
            );
        };
        if !storages.contains_key(&t.key) {
            let entry = format!("{prefix}data/{}", t.key);
            let bytes = (t.storage_numel as u64)
                .checked_mul(t.kind.bytes() as u64)
                .filter(|b| total.saturating_add(*b) <= MAX_TENSOR_BYTES)
                .with_context(|| {
                    format!(
                        "{}: tensor '{}': the pickle says storage {entry} holds {} elements of {} bytes, which takes the checkpoint's tensors past {} GiB",
                        path.display(),
                        short(&name),
                        t.storage_numel,
                        t.kind.bytes(),
                        MAX_TENSOR_BYTES >> 30
                    )
                })?;
            total += bytes;
            let what = format!(
                "the storage of tensor '{}' ({} elements of {} bytes)",
                short(&name),
                t.storage_numel,
                t.kind.bytes()
            );
            let data = storage(&entry, bytes, &what)?;
            if data.len() as u64 != bytes {
                bail!(
                    "{}: {entry} holds {} bytes, but the pickle says it is {what}: {bytes} bytes",
                    path.display(),
                    data.len()
                );
            }
            let flat = Tensor::f_from_data_size(&data, &[t.storage_numel as i64], t.kind.kind())
                .with_context(|| format!("{}: storage {entry}", path.display()))?;
            storages.insert(t.key.clone(), flat);
        }
        let tensor = rebuild(&t, &storages[&t.key])
            .with_context(|| format!("{}: tensor '{}'", path.display(), short(&name)))?;
        out.push((name, tensor));
    }
    Ok(out)
}

/// The size an archive entry must have.
#[derive(Clone, Copy)]
enum Expect<'a> {
    AtMost(u64),
    /// The size and what it is, in words.
    Exactly(u64, &'a str),
}

/// The bytes of `entry` of the archive `path` (of `archive_len` bytes), refused before reading
/// when its declared size breaks `expect`, its compressed size exceeds the file, or it
/// inflates suspiciously far; and read through a limit so that a header understating
/// the size cannot make it inflate further.
fn read_entry<R: std::io::Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    (path, archive_len): (&Path, u64),
    entry: &str,
    expect: Expect<'_>,
) -> Result<Vec<u8>> {
    let file = zip
        .by_name(entry)
        .with_context(|| format!("{}: {entry} is missing or unreadable", path.display()))?;
    let declared = file.size();
    let compressed = file.compressed_size();
    let cap = match expect {
        Expect::AtMost(cap) => {
            if declared > cap {
                bail!(
                    "{}: {entry} declares {declared} bytes uncompressed, more than the {} MiB a state dict's pickle may take: not a PyTorch state dict (a zip bomb?)",
                    path.display(),
                    cap >> 20
                );
            }
            cap
        }
        Expect::Exactly(n, what) => {
            if declared != n {
                bail!(
                    "{}: {entry} declares {declared} bytes uncompressed, but the pickle says it is {what}: {n} bytes",
                    path.display()
                );
            }
            n
        }
    };
    if compressed > archive_len {
        bail!(
            "{}: {entry} declares {compressed} compressed bytes, but the file has only {archive_len}: the archive is corrupt",
            path.display()
        );
    }
    if declared > RATIO_FROM && declared / compressed.max(1) > MAX_RATIO {
        bail!(
            "{}: {entry} inflates from {compressed} to {declared} bytes (more than {MAX_RATIO} to 1): refusing a likely zip bomb (torch.save stores tensors uncompressed; re-save the file with it)",
            path.display()
        );
    }
    let mut bytes = Vec::with_capacity(declared as usize);
    file.take(cap.min(declared) + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{}: cannot read {entry}", path.display()))?;
    if bytes.len() as u64 != declared {
        bail!(
            "{}: {entry} inflates to {} bytes, but its header declares {declared}: the archive is corrupt",
            path.display(),
            if bytes.len() as u64 > declared {
                format!("more than {declared}")
            } else {
                bytes.len().to_string()
            }
        );
    }
    Ok(bytes)
}

/// A state-dict name for errors, cut short if the file made it absurdly long.
fn short(name: &str) -> String {
    if name.chars().count() > 80 {
        format!("{}...", name.chars().take(80).collect::<String>())
    } else {
        name.to_string()
    }
}

fn find_state_dict(root: Value) -> Result<Vec<(Value, Value)>> {
    let Value::Dict(items) = root else {
        bail!(
            "the file holds {}, expected a state dict (a dict of tensors)",
            root.describe()
        );
    };
    if items.iter().any(|(_, v)| matches!(v, Value::Tensor(_))) {
        return Ok(items);
    }
    let mut items = items;
    for wanted in ["state_dict", "model", "net"] {
        if let Some(i) = items.iter().position(|(k, v)| {
            matches!(k, Value::Str(s) if s == wanted) && matches!(v, Value::Dict(_))
        }) {
            let (_, Value::Dict(inner)) = items.swap_remove(i) else {
                unreachable!("matched above")
            };
            return Ok(inner);
        }
    }
    let mut keys: Vec<String> = items.iter().take(10).map(|(k, _)| k.describe()).collect();
    if items.len() > 10 {
        keys.push(format!("and {} more", items.len() - 10));
    }
    bail!(
        "no tensors at the top level and no 'state_dict' entry (keys: {})",
        keys.join(", ")
    )
}

/// Dimensions a rebuilt tensor may have.
const MAX_DIMS: usize = 32;

/// A strided view into a flat storage, made contiguous.
fn rebuild(t: &TensorRef, flat: &Tensor) -> Result<Tensor> {
    if flat.numel() as u64 != t.storage_numel as u64 || flat.kind() != t.kind.kind() {
        bail!(
            "storage {} holds {} elements of {:?}, the pickle says {} elements of {:?}",
            t.key,
            flat.numel(),
            flat.kind(),
            t.storage_numel,
            t.kind.kind()
        );
    }
    let invalid = || {
        anyhow::anyhow!(
            "invalid size {} / stride {} / offset {}",
            dims(&t.size),
            dims(&t.stride),
            t.offset
        )
    };
    if t.size.len() != t.stride.len()
        || t.size.len() > MAX_DIMS
        || t.size.iter().any(|&s| s < 0)
        || t.stride.iter().any(|&s| s < 0)
        || t.offset < 0
    {
        return Err(invalid());
    }
    // Its element count must be one a checkpoint can hold, and the furthest element the view
    // touches must lie inside the storage (all in checked arithmetic: the numbers are the
    // file's).
    let numel = t
        .size
        .iter()
        .try_fold(1i64, |acc, &n| acc.checked_mul(n))
        .filter(|&n| (n as u64).saturating_mul(t.kind.bytes() as u64) <= MAX_TENSOR_BYTES)
        .ok_or_else(invalid)?;
    if numel > 0 {
        let last = t
            .size
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&n, &s)| {
                (n - 1).checked_mul(s).and_then(|d| acc.checked_add(d))
            })
            .ok_or_else(invalid)?;
        if last as u64 >= t.storage_numel as u64 {
            bail!(
                "view (offset {}, size {}, stride {}) reaches past its storage of {} elements",
                t.offset,
                dims(&t.size),
                dims(&t.stride),
                t.storage_numel
            );
        }
    }
    let view = flat.f_as_strided(t.size.as_slice(), t.stride.as_slice(), Some(t.offset))?;
    Ok(view.f_contiguous()?)
}

/// A size or stride for errors (its length is the file's).
fn dims(v: &[i64]) -> String {
    if v.len() > 8 {
        format!("[{} dimensions]", v.len())
    } else {
        format!("{v:?}")
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use zip::write::SimpleFileOptions;

    use super::*;

    /// torch.save's pickle of `{'w': tensor}` with a float storage '0' of `numel` elements
    /// viewed with `size` / `stride` (protocol 2, built by hand).
    fn pickle_one(numel: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
        let s = |t: &str| {
            let mut b = vec![b'X'];
            b.extend((t.len() as u32).to_le_bytes());
            b.extend(t.as_bytes());
            b
        };
        let ints = |v: &[u8]| {
            let mut b = vec![b'('];
            for &i in v {
                b.extend([b'K', i]);
            }
            b.push(b't');
            b
        };
        let mut p = vec![0x80, 2, b'}'];
        p.extend(s("w"));
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        p.extend(s("storage"));
        p.extend(b"ctorch\nFloatStorage\n");
        p.extend(s("0"));
        p.extend(s("cpu"));
        p.extend([b'K', numel, b't', b'Q', b'K', 0]);
        p.extend(ints(size));
        p.extend(ints(stride));
        p.extend([0x89]);
        p.extend(b"ccollections\nOrderedDict\n)R");
        p.extend(b"tRs.");
        p
    }

    /// A .pt with these entries (under `archive/`), deflated when asked.
    fn write_pt(dir: &Path, entries: &[(&str, &[u8], bool)]) -> std::path::PathBuf {
        let path = dir.join("x.pt");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        for (name, data, deflate) in entries {
            let method = if *deflate {
                zip::CompressionMethod::Deflated
            } else {
                zip::CompressionMethod::Stored
            };
            let opts = SimpleFileOptions::default()
                .compression_method(method)
                .large_file(data.len() > (1 << 30));
            z.start_file(format!("archive/{name}"), opts).unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
        path
    }

    fn err(path: &Path) -> String {
        format!("{:#}", read_state_dict(path).map(|_| ()).unwrap_err())
    }

    #[test]
    fn reads_a_tensor_and_refuses_bad_views_without_panicking() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let path = write_pt(
            tmp.path(),
            &[
                ("data.pkl", &pickle_one(2, &[2], &[1]), false),
                ("data/0", &data, false),
            ],
        );
        let sd = read_state_dict(&path).unwrap();
        assert_eq!(sd[0].0, "w");
        assert_eq!(Vec::<f32>::try_from(&sd[0].1).unwrap(), [1.5, -2.0]);
        // A view past the storage, and sizes whose product or extent overflows i64.
        for (size, stride, expected) in [
            (&[3u8][..], &[1u8][..], "reaches past its storage"),
            (
                &[255, 255, 255, 255, 255, 255, 255, 255],
                &[0; 8],
                "invalid size",
            ),
            (&[2, 2], &[255, 255], "reaches past"),
        ] {
            let path = write_pt(
                tmp.path(),
                &[
                    ("data.pkl", &pickle_one(2, size, stride), false),
                    ("data/0", &data, false),
                ],
            );
            let e = err(&path);
            assert!(
                e.contains("x.pt: tensor 'w'") && e.contains(expected),
                "{e}"
            );
        }
    }

    #[test]
    fn zip_bombs_are_refused_before_inflating() {
        let tmp = tempfile::tempdir().unwrap();
        let zeros = vec![0u8; 65 << 20];
        // A storage entry far larger than the pickle says (1 float): refused by its header.
        let path = write_pt(
            tmp.path(),
            &[
                ("data.pkl", &pickle_one(1, &[1], &[1]), false),
                ("data/0", &zeros[..8 << 20], true),
            ],
        );
        let e = err(&path);
        assert!(
            e.contains("x.pt: archive/data/0 declares 8388608 bytes uncompressed")
                && e.contains("tensor 'w' (1 elements of 4 bytes): 4 bytes"),
            "{e}"
        );
        // A data.pkl over the cap.
        let path = write_pt(tmp.path(), &[("data.pkl", &zeros, true)]);
        let e = err(&path);
        assert!(
            e.contains("x.pt: archive/data.pkl declares 68157440 bytes") && e.contains("64 MiB"),
            "{e}"
        );
        // A storage that inflates a thousandfold, even where the pickle agrees.
        let mut pkl = pickle_one(0, &[0], &[1]);
        let at = pkl.windows(3).position(|w| w == b"K\x00t").unwrap();
        pkl.splice(at..at + 2, [b'J', 0, 0, 0x80, 0]); // numel 8 Mi
        let path = write_pt(
            tmp.path(),
            &[
                ("data.pkl", &pkl, false),
                ("data/0", &zeros[..32 << 20], true),
            ],
        );
        let e = err(&path);
        assert!(
            e.contains("x.pt: archive/data/0 inflates from") && e.contains("zip bomb"),
            "{e}"
        );
        // A header that understates the size: the read stops one byte past it.
        let path = write_pt(
            tmp.path(),
            &[
                ("data.pkl", &pickle_one(1, &[1], &[1]), false),
                ("data/0", &zeros[..4096], true),
            ],
        );
        let mut bytes = std::fs::read(&path).unwrap();
        patch_sizes(&mut bytes, None, Some(4));
        std::fs::write(&path, &bytes).unwrap();
        // (the zip reader notices it too; either way the read is cut there)
        let e = err(&path);
        assert!(
            e.contains("x.pt: ")
                && e.contains("archive/data/0")
                && (e.contains("inflates to more than 4 bytes")
                    || e.contains("larger than its declared uncompressed size")),
            "{e}"
        );
        // A stored entry whose headers claim more bytes than the whole file: refused before
        // anything is allocated for it.
        let mut pkl = pickle_one(0, &[0], &[1]);
        let at = pkl.windows(3).position(|w| w == b"K\x00t").unwrap();
        pkl.splice(at..at + 2, [b'J', 0, 0, 0, 0x10]); // numel 256 Mi: 1 GiB
        let path = write_pt(
            tmp.path(),
            &[("data.pkl", &pkl, false), ("data/0", &zeros[..4096], false)],
        );
        let mut bytes = std::fs::read(&path).unwrap();
        patch_sizes(&mut bytes, Some(1 << 30), Some(1 << 30));
        std::fs::write(&path, &bytes).unwrap();
        let e = err(&path);
        assert!(
            e.contains(
                "x.pt: archive/data/0 declares 1073741824 compressed bytes, but the file has only"
            ),
            "{e}"
        );
    }

    /// Overwrites the sizes of entry `archive/data/0` in its local and central headers.
    fn patch_sizes(bytes: &mut [u8], compressed: Option<u32>, uncompressed: Option<u32>) {
        // (signature, offset of the compressed size, offset of the name)
        for (sig, off, name) in [(b"PK\x03\x04", 18, 30), (b"PK\x01\x02", 20, 46)] {
            let mut from = 0;
            while let Some(i) = bytes[from..].windows(4).position(|w| w == sig) {
                let h = from + i;
                if bytes[h + name..].starts_with(b"archive/data/0") {
                    for (at, v) in [(off, compressed), (off + 4, uncompressed)] {
                        if let Some(v) = v {
                            bytes[h + at..h + at + 4].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                }
                from = h + 4;
            }
        }
    }

    #[test]
    fn deeply_nested_pickles_are_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        // {'state_dict': {'k': [[[...]]]}} with 100k levels of lists.
        let mut p = b"\x80\x02}X\x0a\x00\x00\x00state_dict}X\x01\x00\x00\x00k".to_vec();
        p.extend(std::iter::repeat_n(b'(', 100_000));
        p.extend(std::iter::repeat_n(b'l', 100_000));
        p.extend(b"ss.");
        let path = write_pt(tmp.path(), &[("data.pkl", &p, true)]);
        let e = err(&path);
        assert!(
            e.contains("x.pt: refusing to load archive/data.pkl: nesting deeper than 1000 levels"),
            "{e}"
        );
    }
}

/// What the imported model expects its [0,1] input to be normalised with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Normalisation {
    /// The dataset's mean/std (models trained on normalised inputs, e.g. torchvision-style).
    Dataset,
    /// None: the model takes [0,1] images directly (RobustBench models).
    None,
}

/// A PyTorch classifier checkpoint to bring in as an atop checkpoint (`atop import`).
#[derive(Debug, Clone)]
pub struct ImportSpec {
    /// A state dict, or a dict with one under "state_dict".
    pub input: PathBuf,
    pub arch: Arch,
    pub num_classes: usize,
    pub dataset: DatasetKind,
    pub normalisation: Normalisation,
    /// Output folder for model.safetensors + model.json (new or empty).
    pub out: PathBuf,
    /// Replace a checkpoint already in `out`.
    pub force: bool,
}

#[derive(Debug, Serialize)]
pub struct Imported {
    pub out: PathBuf,
    pub arch: String,
    pub parameters: i64,
}

/// Reads `spec.input` without running pickled code, copies its tensors into the named
/// architecture (every parameter and buffer accounted for) and saves an atop checkpoint.
pub fn import(spec: &ImportSpec) -> anyhow::Result<Imported> {
    // Never over an existing checkpoint (or anything else) unless asked to.
    let own: &[&str] = if spec.force {
        &["model.safetensors", "model.json"]
    } else {
        &[]
    };
    crate::io::check_output_dir(&spec.out, own, "`out`")
        .map_err(|e| anyhow::anyhow!("{e:#} (or pass `force` to replace a checkpoint there)"))?;
    let _lock = crate::folder::lock(&spec.out)?;
    let (mean, std) = match spec.normalisation {
        Normalisation::Dataset => super::dataset_normalisation(spec.dataset),
        Normalisation::None => ([0.0; 3], [1.0; 3]),
    };
    let model_spec = ModelSpec::new(spec.arch, spec.num_classes, mean, std)?;
    let tensors = read_state_dict(&spec.input)?;
    let mut model = Classifier::new(model_spec.clone(), tch::Device::Cpu);
    checkpoint::copy_named(&mut model, tensors, &spec.input)?;
    let config = serde_json::json!({
        "imported_from": spec.input.display().to_string(),
        "normalisation": format!("{:?}", spec.normalisation).to_lowercase(),
    });
    let classes = (0..spec.num_classes).map(|i| i.to_string()).collect();
    let sidecar = checkpoint::Sidecar::new(
        model_spec,
        Some(spec.dataset.as_str().into()),
        classes,
        None,
        config,
    );
    checkpoint::save(&model, &sidecar, &spec.out)
        .with_context(|| format!("cannot write {}", spec.out.display()))?;
    Ok(Imported {
        out: spec.out.clone(),
        arch: spec.arch.to_string(),
        parameters: model.num_parameters(),
    })
}
