//! `atop data inspect` and `atop data download`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use atop::data::download::{self, ImagenetteVariant};
use atop::data::inspect::InspectSpec;
use atop::data::{DataConfig, DatasetKind, ImageSet, Split};
use clap::{Args as ClapArgs, Subcommand};

use super::Global;

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Count images per class and write a PNG grid of samples with class names.
    Inspect(InspectArgs),
    /// Fetch an official archive and verify its published checksum.
    Download(DownloadArgs),
}

/// Flags that say which dataset to read; shared by every command that loads data.
#[derive(Debug, Clone, ClapArgs)]
pub struct DataArgs {
    #[arg(long, value_enum)]
    pub dataset: DatasetKind,
    /// Dataset folder or .tar/.tar.gz archive (default: the usual name inside $ATOP_DATA_DIR).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Resize the shorter side and centre-crop to this many pixels (ImageNette default: 224).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Skip (and count) undecodable or non-image files instead of stopping.
    #[arg(long)]
    pub skip_corrupt: bool,
}

impl DataArgs {
    pub fn config(&self) -> DataConfig {
        DataConfig {
            dataset: self.dataset,
            root: self.root.clone(),
            image_size: self.image_size,
            skip_corrupt: self.skip_corrupt,
        }
    }
}

pub use atop::data::DataOverrides;

/// Data flags of commands that evaluate a model: each defaults to what the model was trained on.
#[derive(Debug, Clone, ClapArgs)]
pub struct ModelDataArgs {
    #[command(flatten)]
    pub data: DataOverrides,
    #[arg(long, value_enum, default_value = "test")]
    pub split: Split,
}

impl ModelDataArgs {
    pub fn model_data(&self) -> atop::eval::target::ModelData {
        atop::eval::target::ModelData {
            dataset: self.data.dataset,
            root: self.data.root.clone(),
            image_size: self.data.image_size,
            split: self.split,
        }
    }

    /// The split for `sidecar`'s model, loaded (see [`atop::eval::target::ModelData`]).
    pub fn load_for(
        &self,
        sidecar: &atop::models::checkpoint::Sidecar,
        model_dir: &std::path::Path,
    ) -> Result<(DataConfig, ImageSet)> {
        self.model_data().load_for(sidecar, model_dir)
    }
}

#[derive(Debug, ClapArgs)]
pub struct InspectArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, value_enum, default_value = "train")]
    pub split: Split,
    /// Look at a seeded random subset of this many images.
    #[arg(value_parser = crate::cli::positive, long)]
    pub subset: Option<usize>,
    /// Seed for --subset and for picking the grid's samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Samples per class in the grid.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 8)]
    pub per_class: usize,
    /// At most this many classes (rows) in the grid.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 20)]
    pub max_classes: usize,
    /// Where to write the grid (default: <dataset>-<split>-grid.png).
    #[arg(long)]
    pub grid: Option<PathBuf>,
}

#[derive(Debug, ClapArgs)]
pub struct DownloadArgs {
    #[arg(value_enum)]
    pub dataset: DatasetKind,
    /// Folder to put the archive in.
    #[arg(long)]
    pub root: PathBuf,
    /// ImageNette resolution.
    #[arg(long, value_enum, default_value = "320")]
    pub variant: ImagenetteVariant,
    /// Fetch from this URL instead of the official one (a mirror); needs --md5.
    #[arg(long, requires = "md5")]
    pub url: Option<String>,
    /// Expected MD5 of the file at --url.
    #[arg(long, requires = "url")]
    pub md5: Option<String>,
}

pub fn run(cmd: DataCommand, global: &Global) -> Result<()> {
    match cmd {
        DataCommand::Inspect(args) => inspect(args, global),
        DataCommand::Download(args) => download(args, global),
    }
}

fn inspect(args: InspectArgs, global: &Global) -> Result<()> {
    let report = atop::data::inspect::inspect(&InspectSpec {
        data: args.data.config(),
        split: args.split,
        subset: args.subset,
        seed: args.seed,
        per_class: args.per_class,
        max_classes: args.max_classes,
        grid: args.grid,
    })?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} {}: {} images of {}x{} from {} (loaded in {:.1} s)",
        report.dataset,
        report.split.as_str(),
        report.images,
        report.width,
        report.height,
        report.source.display(),
        report.seconds
    );
    let names: Vec<String> = report
        .classes
        .iter()
        .map(|c| {
            if c.name == c.class {
                c.name.clone()
            } else {
                format!("{} ({})", c.name, c.class)
            }
        })
        .collect();
    let width = names.iter().map(|n| n.len()).max().unwrap_or(5).max(5);
    println!("{:>5}  {:<width$}  {:>7}", "label", "class", "images");
    for (c, name) in report.classes.iter().zip(&names) {
        println!("{:>5}  {:<width$}  {:>7}", c.label, name, c.count);
    }
    if !report.skipped.is_empty() {
        println!(
            "skipped {} corrupt or non-image files:",
            report.skipped.len()
        );
        for s in report.skipped.iter().take(20) {
            println!("  {}: {}", s.path, s.reason);
        }
    }
    if let Some(idx) = &report.subset_indices {
        println!(
            "subset: {} indices (seed {}), first {:?}",
            idx.len(),
            args.seed,
            &idx[..idx.len().min(8)]
        );
    }
    println!("grid: {}", report.grid.display());
    Ok(())
}

fn download(args: DownloadArgs, global: &Global) -> Result<()> {
    let archive = match (&args.url, &args.md5) {
        (Some(url), Some(md5)) => download::Archive {
            url: url.clone(),
            file_name: download::file_name_of(url)?,
            md5: md5.clone(),
        },
        _ => download::official(args.dataset, args.variant)?,
    };
    let done = download::download(&archive, &args.root)
        .with_context(|| format!("downloading {} failed", args.dataset.as_str()))?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else if done.already_present {
        println!(
            "{} already present, MD5 {} verified",
            done.path.display(),
            done.md5
        );
    } else {
        println!(
            "{}: {} bytes, MD5 {} verified",
            done.path.display(),
            done.bytes,
            done.md5
        );
    }
    Ok(())
}
