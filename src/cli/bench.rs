//! `atop bench ...`: timings measured on this machine, printed as a table (or JSON).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use atop::data::augment::Augment;
use atop::data::loader::{Loader, LoaderConfig};
use atop::data::{DataConfig, DatasetKind, Split};
use clap::{Args as ClapArgs, Subcommand};
use serde::Serialize;

use super::Global;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Decoding all of CIFAR-10 into memory, and the training iterator's batches/s.
    Data(DataBenchArgs),
}

#[derive(Debug, ClapArgs)]
pub struct DataBenchArgs {
    /// CIFAR-10 folder or archive (default: found in $ATOP_DATA_DIR).
    #[arg(long)]
    pub cifar10: Option<std::path::PathBuf>,
    /// ImageNette folder or archive (default: found in $ATOP_DATA_DIR); skipped if absent.
    #[arg(long)]
    pub imagenette: Option<std::path::PathBuf>,
    /// ImageNette training resolution for the iterator benchmark.
    #[arg(long, default_value_t = 128)]
    pub imagenette_size: u32,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Batches timed per iterator benchmark.
    #[arg(long, default_value_t = 200)]
    pub batches: usize,
}

#[derive(Serialize)]
struct Row {
    what: String,
    value: f64,
    unit: &'static str,
}

pub fn run(cmd: BenchCommand, global: &Global) -> Result<()> {
    match cmd {
        BenchCommand::Data(args) => data(args, global),
    }
}

fn data(args: DataBenchArgs, global: &Global) -> Result<()> {
    let mut rows = Vec::new();
    let cifar = DataConfig {
        root: args.cifar10.clone(),
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
    let train = Arc::new(train);
    rows.push(iterate(
        "CIFAR-10 train iterator, crop+flip",
        Loader::new(
            train,
            LoaderConfig::train(args.batch_size, Augment::cifar(), 0),
        ),
        args.batches,
    ));

    let nette = DataConfig {
        root: args.imagenette.clone(),
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
        let size = args.imagenette_size;
        rows.push(iterate(
            &format!("ImageNette train iterator, random-resized-crop {size}px + flip"),
            Loader::new(
                Arc::new(set),
                LoaderConfig::train(args.batch_size, Augment::resized_crop(size), 0),
            ),
            args.batches,
        ));
    }

    if global.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("threads: {}", atop::runtime::threads());
        for r in &rows {
            println!("{:<70} {:>10.2} {}", r.what, r.value, r.unit);
        }
    }
    Ok(())
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
