//! `atop attack`: runs attacks (or AutoAttack compositions) on a checkpoint over a seeded subset
//! of a dataset split; writes results.json, the adversarial images and a PNG grid. The run is
//! resumable: rerunning the same command continues an interrupted run.

use std::path::PathBuf;

use anyhow::Result;
use atop::attacks::compositions;
use atop::attacks::loss::LossKind;
use atop::attacks::{AttackSettings, Budget, Norm, Selection, defaults, parse_eps};
use atop::transforms::TransformKind;
use clap::Args as ClapArgs;

use super::Global;

#[derive(Debug, ClapArgs)]
pub struct AttackArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Attacks run in sequence on the still-robust points: fgsm, pgd, apgd-ce, apgd-dlr, apgd-t,
    /// fab-t, square, cw (l2), selective-eot, or the compositions autoattack-standard (APGD-CE, APGD-T, FAB-T,
    /// Square) and autoattack-rand (APGD-CE + APGD-DLR, EOT 20); comma-separated.
    #[arg(long, default_value = "apgd-ce")]
    pub attack: String,
    #[command(flatten)]
    pub settings: SettingsArgs,
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 256)]
    pub batch_size: usize,
    /// Output folder (default: runs/attack-<attacks>-<norm>-<eps>).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The attacked model and its data: a classifier, optionally behind a defence, on a seeded
/// subset of a split (shared by `attack` and `eval robust`).
#[derive(Debug, ClapArgs)]
pub struct TargetArgs {
    /// A checkpoint folder, one of its files, or a training run folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Put an input quantisation to this many levels in front of the model (a non-differentiable
    /// toy defence; combine with --bpda to attack through it).
    #[arg(long)]
    pub quantize: Option<u32>,
    /// Defend the classifier with this purifier (a checkpoint folder, a training run, or a
    /// generator file in a checkpoint such as generator-live.safetensors): the attacked model is
    /// classifier(purifier(transform(x))), with exact gradients through all of it (use --eot
    /// for the transform's randomness) or, with --bpda, the identity through transform and purifier.
    #[arg(long)]
    pub purifier: Option<PathBuf>,
    /// The random transform in front of the purifier (default: the one it was trained with),
    /// or, without --purifier, in front of the classifier alone (holes grey).
    #[arg(long, value_enum)]
    pub transform: Option<TransformKind>,
    #[command(flatten)]
    pub transform_settings: super::purifier::TransformArgs,
    /// With --purifier, the working size you expect it to run at (an error if it was trained
    /// at another); with a transform alone, the side it is drawn at.
    #[arg(long)]
    pub work_size: Option<usize>,
    /// Differentiate through the defence stage (--quantize, --transform or --purifier) as the
    /// identity (BPDA).
    #[arg(long)]
    pub bpda: bool,
    #[command(flatten)]
    pub data: super::data::ModelDataArgs,
    /// A seeded subset of this many images (default: the whole split).
    #[arg(value_parser = crate::cli::positive, long)]
    pub n: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The attacks' budgets and hyper-parameters (shared by `attack` and `eval robust`).
#[derive(Debug, ClapArgs)]
pub struct SettingsArgs {
    /// Threat model: linf, l2 or l1.
    #[arg(long, default_value_t = defaults::NORM, value_parser = |s: &str| s.parse::<Norm>())]
    pub norm: Norm,
    /// Budget: a number or a fraction such as 8/255.
    #[arg(long, default_value = defaults::EPS_TEXT, value_parser = parse_eps)]
    pub eps: f64,
    /// Iterations (default: PGD 20, APGD and FAB 100, C&W 1,000 Adam steps per search step).
    #[arg(long)]
    pub steps: Option<usize>,
    /// PGD step size (default eps/4).
    #[arg(long, value_parser = parse_eps)]
    pub step_size: Option<f64>,
    #[arg(value_parser = crate::cli::positive, long, default_value_t = defaults::RESTARTS)]
    pub restarts: usize,
    /// PGD starts at a random point of the ball (pass false for the classic zero start).
    #[arg(long, default_value_t = defaults::RANDOM_START, action = clap::ArgAction::Set)]
    pub random_start: bool,
    /// PGD objective.
    #[arg(long, value_enum, default_value_t = defaults::LOSS)]
    pub loss: LossKind,
    /// APGD-T and FAB-T target classes.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = defaults::TARGETS)]
    pub targets: usize,
    /// Square: queries per sample.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = defaults::QUERIES)]
    pub queries: usize,
    /// Square: initial fraction of the image a proposal window covers.
    #[arg(long, default_value_t = defaults::P_INIT)]
    pub p_init: f64,
    /// Square: stretch the window schedule as if the budget were 10,000 queries (the original
    /// Square code and torchattacks do; AutoAttack does not).
    #[arg(long)]
    pub square_rescale: bool,
    /// APGD with --norm l1: iterate at 3 eps, 2 eps, then eps (AutoAttack's L1 schedule).
    #[arg(long)]
    pub large_eps: bool,
    /// C&W: binary-search steps over the constant c.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = defaults::SEARCH_STEPS)]
    pub search_steps: usize,
    /// C&W: the first constant c.
    #[arg(long, default_value_t = defaults::INITIAL_CONST)]
    pub initial_const: f64,
    /// C&W: confidence margin kappa.
    #[arg(long, default_value_t = defaults::KAPPA)]
    pub kappa: f64,
    /// Gradient samples averaged per step (Expectation over Transformation).
    #[arg(value_parser = crate::cli::positive, long, default_value_t = defaults::EOT)]
    pub eot: usize,
    /// On a model measured random, the image an attack returns per point: last (the last
    /// iterate, as Madry's PGD and torchattacks' EOTPGD; FAB and C&W: the most-fooled iterate
    /// inside the budget), most-fooled (the iterate that fooled most of its EOT draws), or
    /// first-draw (the first iterate whose EOT-averaged logits were wrong: atop's rule before
    /// 2026-12-06, kept to compare against). With last and most-fooled an attack claims success
    /// on fresh draws of the image it returns.
    #[arg(long, default_value_t = defaults::SELECTION, value_parser = |s: &str| s.parse::<Selection>())]
    pub selection: Selection,
}

impl SettingsArgs {
    pub fn settings(&self) -> Result<AttackSettings> {
        let mut s = AttackSettings::new(Budget::new(self.norm, self.eps)?);
        s.steps = self.steps;
        s.step_size = self.step_size;
        s.restarts = self.restarts;
        s.random_start = self.random_start;
        s.loss = self.loss;
        s.targets = self.targets;
        s.eot = self.eot;
        s.queries = self.queries;
        s.p_init = self.p_init;
        s.square_rescale = self.square_rescale;
        s.large_eps = self.large_eps;
        s.search_steps = self.search_steps;
        s.initial_const = self.initial_const;
        s.kappa = self.kappa;
        s.selection = self.selection;
        Ok(s)
    }
}

impl TargetArgs {
    pub fn spec(&self) -> atop::eval::target::TargetSpec {
        atop::eval::target::TargetSpec {
            model: self.model.clone(),
            quantize: self.quantize,
            purifier: self.purifier.clone(),
            transform: self.transform,
            transform_overrides: self.transform_settings.overrides(),
            work_size: self.work_size,
            bpda: self.bpda,
            data: self.data.model_data(),
            n: self.n,
            seed: self.seed,
        }
    }

    /// Whether a defence stage stands in front of the classifier.
    pub fn has_defence(&self) -> bool {
        self.spec().has_defence()
    }

    pub fn load(&self, device: tch::Device) -> Result<atop::eval::target::Target> {
        self.spec().load(device)
    }
}

pub fn run(a: AttackArgs, global: &Global) -> Result<()> {
    let mut settings = a.settings.settings()?;
    let attacks = compositions::expand(&a.attack, &mut settings)?;
    for name in &attacks {
        settings.build(*name)?;
    }
    let target = a.target.load(global.device)?;
    let names: Vec<String> = attacks.iter().map(|a| a.to_string()).collect();
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "attack-{}-{}-{:.5}",
            names.join("+"),
            a.settings.norm,
            a.settings.eps
        ))
    });
    let output = atop::eval::attack::attack_into(
        &target,
        attacks,
        settings,
        (a.batch_size, a.target.seed),
        &out,
    )?;
    let report = &output.report;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&output)?);
        return Ok(());
    }
    println!(
        "{} ({}) on {} images, {} eps {:.5}: clean {:.2}%",
        output.model.display(),
        output.defence,
        report.n,
        a.settings.norm,
        a.settings.eps,
        100.0 * report.clean_accuracy
    );
    for s in &report.steps {
        println!(
            "  after {:<10} robust {:>6.2}%  ({:.1} s)",
            s.attack,
            100.0 * s.robust_accuracy,
            s.seconds
        );
        if let Some(w) = &s.warning {
            println!("    WARNING: {w}");
        }
    }
    println!(
        "wrote {}, {} and {}",
        output.results.display(),
        output.images.display(),
        output.grid.display()
    );
    Ok(())
}
