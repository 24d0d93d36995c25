//! `atop eval clean`: accuracy, per-class accuracy and the confusion matrix of a checkpoint.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use atop::data::Split;
use atop::data::subset::seeded_subset;
use atop::eval::clean::evaluate;
use atop::models::Model;
use atop::models::checkpoint;
use atop::purifier::defended::{Defence, defended};
use atop::report::{grid, plot};
use atop::transforms::{TransformConfig, TransformKind};
use clap::{Args as ClapArgs, Subcommand};
use serde::Serialize;

use super::Global;

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Clean accuracy, per-class accuracy and a confusion matrix (JSON + PNG).
    Clean(CleanArgs),
}

#[derive(Debug, ClapArgs)]
pub struct CleanArgs {
    /// A checkpoint folder, one of its files, or a training run folder (its latest checkpoint).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: super::data::ModelDataArgs,
    /// Evaluate a seeded subset of this many images.
    #[arg(long)]
    pub subset: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// f32, or bf16 autocast.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: atop::runtime::Precision,
    /// Evaluate the classifier behind this random transform (holes grey, one draw per image,
    /// seeded by --seed): what the transform alone costs it.
    #[arg(long, value_enum)]
    pub transform: Option<TransformKind>,
    #[command(flatten)]
    pub transform_settings: super::purifier::TransformArgs,
    /// Draw the transform at this side (the images are resized up to it and back).
    #[arg(long, requires = "transform")]
    pub work_size: Option<usize>,
    /// Folder for eval-clean-<split>.json and confusion-<split>.png (default: the --model folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Serialize)]
struct Output {
    model: PathBuf,
    /// What was evaluated: the classifier, or the transform in front of it.
    defence: String,
    dataset: String,
    split: Split,
    subset_seed: Option<u64>,
    subset_indices: Option<Vec<usize>>,
    #[serde(flatten)]
    report: atop::eval::clean::CleanReport,
    classes: Vec<String>,
    json: PathBuf,
    confusion_png: PathBuf,
}

pub fn run(cmd: EvalCommand, global: &Global) -> Result<()> {
    match cmd {
        EvalCommand::Clean(args) => clean(args, global),
    }
}

fn clean(a: CleanArgs, global: &Global) -> Result<()> {
    let dir = checkpoint::resolve(&a.model)?;
    let (model, sidecar) = checkpoint::load(&dir, global.device)?;
    let cfg = a.data.config_for(&sidecar, &dir)?;
    let dataset = cfg.dataset;
    let mut data = cfg.load(a.data.split)?;
    let indices = match a.subset {
        Some(n) => {
            let idx = seeded_subset(data.len(), n, a.seed)?;
            data = data.select(&idx);
            Some(idx)
        }
        None => None,
    };
    let names = data.class_names.clone();
    let defence = Defence {
        transform: a.transform.map(|kind| {
            let mut t = TransformConfig::with_kind(kind);
            a.transform_settings.apply(&mut t);
            t
        }),
        work_size: a.work_size,
        ..Default::default()
    };
    let pipeline = defended(
        &model,
        None,
        &defence,
        (data.height as i64, data.width as i64),
    )?;
    tch::manual_seed(a.seed as i64);
    let report = evaluate(
        &pipeline,
        Arc::new(data),
        a.batch_size,
        global.device,
        a.precision,
    )?;
    let out = a.out.clone().unwrap_or_else(|| {
        if a.model.is_dir() {
            a.model.clone()
        } else {
            dir.clone()
        }
    });
    // A transform gets its own file names: the plain evaluation's stay as they are.
    let tag = match &pipeline.stages.first() {
        Some(s) => format!(
            "{}-{}",
            a.data.split.as_str(),
            s.describe()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '-'
                })
                .collect::<String>()
                .trim_matches('-')
        ),
        None => a.data.split.as_str().to_string(),
    };
    let json = out.join(format!("eval-clean-{tag}.json"));
    let png = out.join(format!("confusion-{tag}.png"));
    grid::save_png(&plot::confusion_matrix(&report.confusion, &names), &png)?;
    let output = Output {
        model: dir,
        defence: pipeline.describe(),
        dataset: dataset.as_str().into(),
        split: a.data.split,
        subset_seed: a.subset.map(|_| a.seed),
        subset_indices: indices,
        report,
        classes: names,
        json: json.clone(),
        confusion_png: png,
    };
    atop::io::write_json(&json, &output)?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&output)?);
        return Ok(());
    }
    println!(
        "{} [{}] on {} {} ({} images): accuracy {:.2}%, loss {:.4}",
        output.model.display(),
        output.defence,
        output.dataset,
        a.data.split.as_str(),
        output.report.images,
        100.0 * output.report.accuracy,
        output.report.loss
    );
    for (name, acc) in output.classes.iter().zip(&output.report.per_class_accuracy) {
        println!("  {name:<20} {:>6.2}%", 100.0 * acc);
    }
    println!(
        "wrote {} and {}",
        output.json.display(),
        output.confusion_png.display()
    );
    Ok(())
}
