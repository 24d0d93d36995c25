//! What every trainer sets up alike: the seeded subsets of its data, its training loader, its
//! evaluation images, and the checks of its counts and loss weights (one message each).

use std::sync::Arc;

use anyhow::{Result, bail};
use tch::{Device, Kind, Tensor};

use crate::data::ImageSet;
use crate::data::augment::Augment;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::subset::seeded_subset;

/// `set`, or a seeded subset of `n` of its images.
pub fn subset(set: ImageSet, n: Option<usize>, seed: u64) -> Result<ImageSet> {
    Ok(match n {
        Some(n) => set.select(&seeded_subset(set.len(), n, seed)?),
        None => set,
    })
}

/// Random crops and flips with `flip`, nothing otherwise (the purifier's and AToP's setting).
pub fn flips(flip: bool) -> Augment {
    if flip {
        Augment::CropFlip { pad: 0 }
    } else {
        Augment::None
    }
}

/// The shuffled training batches of `set` (seeded); an error when one batch is more than the
/// images.
pub fn loader(
    set: Arc<ImageSet>,
    batch_size: usize,
    augment: Augment,
    seed: u64,
) -> Result<Loader> {
    let len = set.len();
    let loader = Loader::new(set, LoaderConfig::train(batch_size, augment, seed));
    if loader.batches_per_epoch() == 0 {
        bail!("batch_size {batch_size} is larger than the {len} training images");
    }
    Ok(loader)
}

/// A trainer's per-epoch evaluation images: a seeded subset of the test split, on its device.
pub struct EvalImages {
    pub x: Tensor,
    pub y: Tensor,
    /// Their indices in the test split.
    pub indices: Vec<usize>,
}

/// `n` seeded images of `test` (all of them where it holds fewer), as floats on `device`.
pub fn eval_images(test: &ImageSet, n: usize, seed: u64, device: Device) -> Result<EvalImages> {
    let indices = seeded_subset(test.len(), n.min(test.len()), seed)?;
    let (x, y) = test.tensors(&indices);
    Ok(EvalImages {
        x: x.to_kind(Kind::Float).to_device(device),
        y: y.to_device(device),
        indices,
    })
}

/// Ceilings of the counts that multiply a run's time or memory.
pub const MAX_EPOCHS: usize = 10_000;
pub const MAX_BATCH: usize = 65_536;

/// At least one epoch and one image per batch, and at most the ceilings.
pub fn check_counts(epochs: usize, batch_size: usize) -> Result<()> {
    if epochs == 0 {
        bail!("invalid setting epochs = 0: expected at least 1");
    }
    if epochs > MAX_EPOCHS {
        bail!("invalid setting epochs = {epochs}: at most {MAX_EPOCHS}");
    }
    if batch_size == 0 {
        bail!("invalid setting batch_size = 0: expected at least 1");
    }
    if batch_size > MAX_BATCH {
        bail!("invalid setting batch_size = {batch_size}: at most {MAX_BATCH}");
    }
    Ok(())
}

/// Loss weights, each finite and non-negative; an error names the first that is not.
pub fn check_weights(weights: &[(&str, f64)]) -> Result<()> {
    for &(name, w) in weights {
        if !(w.is_finite() && w >= 0.0) {
            bail!("invalid setting {name} = {w}: expected a non-negative number");
        }
    }
    Ok(())
}

/// A trainer's inputs for its run folder: its training and test images, and each checkpoint it
/// reads (by the SHA-256 of its folder's files).
pub fn inputs(
    train: &ImageSet,
    test: &ImageSet,
    checkpoints: &[(&str, &std::path::Path)],
) -> Result<crate::folder::Inputs> {
    let mut inputs = crate::folder::Inputs::default();
    inputs.add("train images", Some(&train.source), train.sha256());
    inputs.add("test images", Some(&test.source), test.sha256());
    for (name, dir) in checkpoints {
        inputs.add(name, Some(dir), crate::folder::folder_sha256(dir)?);
    }
    Ok(inputs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_that_multiply_time_or_memory_have_ceilings() {
        assert!(super::check_counts(10_000, 65_536).is_ok());
        let e = super::check_counts(1_000_000, 8).unwrap_err().to_string();
        assert!(e.contains("epochs = 1000000: at most 10000"), "{e}");
        let e = super::check_counts(1, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("batch_size = 1048576: at most 65536"), "{e}");
    }
}
