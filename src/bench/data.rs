//! Decoding the data sets into memory and the training iterator's batches/s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::data::augment::Augment;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::{DataConfig, DatasetKind, Split};

#[derive(Debug, Clone)]
pub struct DataBench {
    /// CIFAR-10 folder or archive (default: found in $ATOP_DATA_DIR).
    pub cifar10: Option<PathBuf>,
    /// ImageNette folder or archive (default: found in $ATOP_DATA_DIR); skipped if absent.
    pub imagenette: Option<PathBuf>,
    /// ImageNette training resolution for the iterator benchmark.
    pub imagenette_size: u32,
    pub batch_size: usize,
    /// Batches timed per iterator benchmark.
    pub batches: usize,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub what: String,
    pub value: f64,
    pub unit: &'static str,
}

pub fn run(b: &DataBench) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let cifar = DataConfig {
        root: b.cifar10.clone(),
        ..DataConfig::new(DatasetKind::Cifar10)
    };
    let t = Instant::now();
    let train = cifar.load(Split::Train)?;
    let test = cifar.load(Split::Test)?;
    let secs = t.elapsed().as_secs_f64();
    let n = train.len() + test.len();
    rows.push(Row {
        what: format!(
            "CIFAR-10 decode all {n} images ({})",
            train.source.display()
        ),
        value: secs,
        unit: "s",
    });
    rows.push(Row {
        what: "CIFAR-10 decode rate".into(),
        value: n as f64 / secs,
        unit: "img/s",
    });
    rows.push(iterate(
        "CIFAR-10 train iterator, crop+flip",
        Loader::new(
            Arc::new(train),
            LoaderConfig::train(b.batch_size, Augment::cifar(), 0),
        ),
        b.batches,
    ));
    let nette = DataConfig {
        root: b.imagenette.clone(),
        ..DataConfig::new(DatasetKind::Imagenette)
    };
    if nette.resolve_root().is_ok() {
        let t = Instant::now();
        let set = nette.load(Split::Train)?;
        let secs = t.elapsed().as_secs_f64();
        rows.push(Row {
            what: format!(
                "ImageNette decode {} train images at {}px",
                set.len(),
                set.height
            ),
            value: secs,
            unit: "s",
        });
        let size = b.imagenette_size;
        rows.push(iterate(
            &format!("ImageNette train iterator, random-resized-crop {size}px + flip"),
            Loader::new(
                Arc::new(set),
                LoaderConfig::train(b.batch_size, Augment::resized_crop(size), 0),
            ),
            b.batches,
        ));
    }
    Ok(rows)
}

fn iterate(what: &str, loader: Loader, batches: usize) -> Row {
    let batches = batches.min(loader.batches_per_epoch());
    let t = Instant::now();
    let mut seen = 0;
    for batch in loader.epoch(0).take(batches) {
        seen += batch.indices.len();
    }
    let secs = t.elapsed().as_secs_f64();
    Row {
        what: format!("{what}: {batches} batches ({seen} images)"),
        value: batches as f64 / secs,
        unit: "batches/s",
    }
}
