//! `atop eval clean`: accuracy, per-class accuracy and the confusion matrix of a checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use atop::eval::clean::{CleanSettings, clean_into};
use atop::eval::defaults;
use atop::models::checkpoint;
use atop::purifier::defended::Defence;
use atop::transforms::{TransformConfig, TransformKind};
use clap::{Args as ClapArgs, Subcommand};

use super::Global;

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Clean accuracy, per-class accuracy and a confusion matrix (JSON + PNG).
    Clean(Box<CleanArgs>),
    /// Robust accuracy of any model (a classifier, behind a transform, behind a purifier): every
    /// attack on every point, each image scored by R draws (single draw, majority, worst of R,
    /// with intervals), sanity checks, report.md, results.json, records.csv; resumable.
    Robust(Box<RobustArgs>),
    /// Merges the shards of one `eval robust` run (`--shard i/n`, any order) into the report
    /// the unsharded run gives.
    Merge(MergeArgs),
    /// Compares finished `eval robust` runs point by point with the first: the same points and
    /// scoring draws, so per-point differences with a bootstrap interval and an exact McNemar
    /// test (e.g. a fine-tuned purifier against the pre-trained one, or two attack settings).
    Compare(CompareArgs),
}

#[derive(Debug, ClapArgs)]
pub struct CompareArgs {
    /// The evaluation folder every other is compared with.
    pub first: PathBuf,
    /// Evaluation folders of the same points, seed, draws and budget.
    #[arg(required = true, num_args = 1..)]
    pub others: Vec<PathBuf>,
}

#[derive(Debug, ClapArgs)]
pub struct MergeArgs {
    /// The shards' output folders.
    #[arg(required = true, num_args = 1..)]
    pub shards: Vec<PathBuf>,
    /// Folder for the merged results (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, ClapArgs)]
pub struct RobustArgs {
    #[command(flatten)]
    pub target: super::attack::TargetArgs,
    /// Attacks, each run on every point: fgsm, pgd, apgd-ce, apgd-dlr, apgd-t, fab-t, square,
    /// selective-eot, the compositions autoattack-standard and autoattack-rand, and transfer (PGD on the
    /// classifier alone, scored on the whole model) and bpda (PGD with the identity backward
    /// through the defence, scored on the whole model); comma-separated.
    #[arg(long, default_value = defaults::ATTACKS)]
    pub attack: String,
    /// Take the attacks, their budgets, N, R and the check points from a plan:
    /// eval-robust-cpu (scaled to 2 CPU cores, and said so in the report) or eval-robust-full
    /// (the reference budgets: PGD 200 x EOT 20, AutoAttack standard + rand, ...).
    #[arg(long, conflicts_with_all = ["attack", "steps", "eot", "targets", "queries", "draws", "check_points", "config"])]
    pub preset: Option<String>,
    /// A plan in a TOML file (the format of presets/eval-robust-cpu.toml).
    #[arg(long, conflicts_with_all = ["attack", "steps", "eot", "targets", "queries", "draws", "check_points"])]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: super::attack::SettingsArgs,
    /// R: independent draws of the model per scored image.
    #[arg(long, default_value_t = defaults::DRAWS)]
    pub draws: usize,
    /// Points (the first evaluated ones) for the checks that run PGD themselves: eps grid and
    /// unbounded eps, doubled iterations, doubled EOT, one fixed draw (0: skip them).
    #[arg(long, default_value_t = defaults::CHECK_POINTS)]
    pub check_points: usize,
    #[arg(value_parser = crate::cli::batch, long, default_value_t = defaults::BATCH_SIZE)]
    pub batch_size: usize,
    /// Evaluate one deterministic slice: batch b of the seeded points belongs to shard
    /// b mod n (0-based i of n, e.g. `--shard $SLURM_ARRAY_TASK_ID/4`); `atop eval merge` joins them.
    /// A slice in index order, not a sample: only the merged result speaks for all the points.
    #[arg(long)]
    pub shard: Option<atop::eval::robust::Shard>,
    /// Output folder (default: runs/eval-robust-<attacks>-<norm>-<eps>[-shard-i-of-n]);
    /// rerunning the same command resumes it.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, ClapArgs)]
pub struct CleanArgs {
    /// A checkpoint folder, one of its files, or a training run folder (its latest checkpoint).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: super::data::ModelDataArgs,
    /// Evaluate a seeded subset of this many images.
    #[arg(value_parser = crate::cli::positive, long)]
    pub subset: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 256)]
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

pub fn run(cmd: EvalCommand, global: &Global) -> Result<()> {
    match cmd {
        EvalCommand::Clean(args) => clean(*args, global),
        EvalCommand::Robust(args) => robust(*args, global),
        EvalCommand::Merge(args) => merge(args, global),
        EvalCommand::Compare(args) => compare(args, global),
    }
}

fn clean(a: CleanArgs, global: &Global) -> Result<()> {
    let dir = checkpoint::resolve(&a.model)?;
    let (model, sidecar) = checkpoint::load(&dir, global.device)?;
    let (cfg, data) = a.data.load_for(&sidecar, &dir)?;
    let settings = CleanSettings {
        subset: a.subset,
        seed: a.seed,
        batch_size: a.batch_size,
        precision: a.precision,
        defence: Defence {
            transform: a.transform.map(|kind| {
                let mut t = TransformConfig::with_kind(kind);
                a.transform_settings.apply(&mut t);
                t
            }),
            work_size: a.work_size,
            ..Default::default()
        },
    };
    let out = a.out.clone().unwrap_or_else(|| {
        if a.model.is_dir() {
            a.model.clone()
        } else {
            dir.clone()
        }
    });
    let output = clean_into(
        (&dir, &model),
        (cfg.dataset, a.data.split, data),
        &settings,
        (&out, a.out.is_some()),
        global.device,
    )?;
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

fn robust(mut a: RobustArgs, global: &Global) -> Result<()> {
    use atop::eval::robust::{RobustConfig, parse_attacks};

    use atop::eval::plan::Plan;
    let plan = match (&a.preset, &a.config) {
        (Some(name), _) => Some(Plan::preset(name)?),
        (None, Some(path)) => Some(Plan::from_file(path)?),
        (None, None) => None,
    };
    let (attacks, settings) = match &plan {
        Some(p) => {
            let defended = a.target.has_defence();
            // The plan sets what it names; the budget, step size, restarts, loss and C&W
            // settings stay the flags'.
            let (attacks, settings) = p.attacks(a.settings.settings()?, defended)?;
            if !defended {
                tracing::info!(
                    "no defence stage: the plan's bpda and transfer attacks are left out"
                );
            }
            a.draws = p.draws;
            a.check_points = p.check_points;
            a.target.n.get_or_insert(p.n);
            (attacks, settings)
        }
        None => {
            let mut settings = a.settings.settings()?;
            (parse_attacks(&a.attack, &mut settings)?, settings)
        }
    };
    a.target.n.get_or_insert(defaults::N);
    let out = a.out.clone().unwrap_or_else(|| {
        let names: Vec<String> = attacks.iter().map(|s| s.label()).collect();
        PathBuf::from("runs").join(format!(
            "eval-robust-{}-{}-{:.5}{}",
            names.join("+"),
            a.settings.norm,
            a.settings.eps,
            a.shard.map_or(String::new(), |s| format!(
                "-shard-{}-of-{}",
                s.index, s.count
            ))
        ))
    });
    atop::eval::state::check_output_dir(&out)?;
    let target = a.target.load(global.device)?;
    let config = RobustConfig {
        attacks,
        settings,
        draws: a.draws,
        batch_size: a.batch_size,
        seed: a.target.seed,
        check_points: a.check_points,
        model: target.describe()?,
        data: target.data.clone(),
        plan: plan.map(|p| p.description),
        cascade: false,
    };
    let run = atop::eval::run::evaluate_into(&target, &config, a.shard, &out, global.device)?;
    let written = atop::report::robust::write_run(&out, &run, &target)?;
    print_robust(&run.results, &written, global)
}

/// Prints the summary (or the whole results as JSON with --json).
fn print_robust(
    results: &atop::eval::run::RobustResults,
    written: &std::path::Path,
    global: &Global,
) -> Result<()> {
    if global.json {
        println!("{}", serde_json::to_string_pretty(results)?);
        return Ok(());
    }
    print!(
        "{}",
        atop::report::robust::terminal(&results.evaluation, &results.provenance)
    );
    println!("wrote {} and the report beside it", written.display());
    Ok(())
}

fn merge(a: MergeArgs, global: &Global) -> Result<()> {
    if a.out.exists() && std::fs::read_dir(&a.out)?.next().is_some() {
        anyhow::bail!(
            "{} is not empty: choose a new folder for the merged results",
            a.out.display()
        );
    }
    let merged = atop::eval::run::merge_results(&a.shards)?;
    let _lock = atop::folder::lock(&a.out)?;
    let written = atop::report::robust::write_results(&a.out, &merged)?;
    print_robust(&merged, &written, global)
}

fn compare(a: CompareArgs, global: &Global) -> Result<()> {
    let comparisons = atop::report::robust::compare_results(&a.first, &a.others)?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&comparisons)?);
    } else {
        print!(
            "{}",
            atop::report::robust::comparison_markdown(&comparisons)
        );
    }
    Ok(())
}
