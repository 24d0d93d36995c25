//! `atop attack`: attacks in AutoAttack's order (each only on the points still robust), each
//! adversarial image judged by one seeded draw of the model, every sample recording which attack
//! broke it. A case of the robust evaluation (one draw, a cascade, no checks): the same engine,
//! resume, batch files and checks of what it resumes; its report keeps `atop attack`'s form.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::robust::{AttackSpec, Points, RobustConfig, Surrogates, Target as Attacked, evaluate};
use super::target::Target;
use crate::attacks::sweep::index_tensor;
use crate::attacks::{AttackName, AttackSettings, GradStats};
use crate::models::Model;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerConfig {
    pub attacks: Vec<AttackName>,
    pub settings: AttackSettings,
    pub batch_size: usize,
    pub seed: u64,
    /// Identifies the model and data, so a state file is never resumed against other inputs.
    pub model: String,
    pub data: String,
}

/// One sample's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SampleRecord {
    /// Index in the dataset split.
    pub index: usize,
    pub label: i64,
    pub clean_pred: i64,
    /// Prediction on the returned image (the clean one for points misclassified clean).
    pub adv_pred: i64,
    /// "clean" for points misclassified without attack, an attack name, or None if robust.
    pub broken_by: Option<String>,
    /// Norm of the returned perturbation, in the budget's norm.
    pub perturbation_norm: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttackStep {
    pub attack: String,
    pub robust_after: usize,
    pub robust_accuracy: f64,
    pub seconds: f64,
    pub grad: GradStats,
    /// Set when a noticeable share of gradients were zero or non-finite.
    pub warning: Option<String>,
}

/// The result of a run.
#[derive(Debug, Serialize)]
pub struct RobustReport {
    pub config: RunnerConfig,
    pub n: usize,
    pub clean_accuracy: f64,
    pub robust_accuracy: f64,
    pub steps: Vec<AttackStep>,
    pub records: Vec<SampleRecord>,
    pub seconds: f64,
    /// Final adversarial images (clean images for the points no attack touched), N x C x H x W.
    #[serde(skip)]
    pub x_adv: Tensor,
}

pub struct Runner<'a> {
    pub model: &'a dyn Model,
    pub config: RunnerConfig,
    /// Folder for the state file and batch files; None keeps everything in memory.
    pub state_dir: Option<PathBuf>,
}

impl Runner<'_> {
    /// Attacks `x` (N x C x H x W in [0,1], any device) with labels `y`; `indices` name the
    /// samples in reports.
    pub fn run(&self, x: &Tensor, y: &Tensor, indices: &[usize]) -> Result<RobustReport> {
        let cfg = &self.config;
        let config = RobustConfig {
            attacks: cfg
                .attacks
                .iter()
                .map(|&attack| AttackSpec {
                    attack,
                    target: Attacked::Whole,
                })
                .collect(),
            settings: cfg.settings.clone(),
            draws: 1,
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            check_points: 0,
            model: cfg.model.clone(),
            data: cfg.data.clone(),
            plan: None,
            cascade: true,
        };
        let points = Points { x, y, indices };
        let (e, mut x_adv) = evaluate(
            self.model,
            Surrogates::default(),
            points,
            &config,
            None,
            self.state_dir.as_deref(),
        )?;
        let n = e.records.len();
        // Per point, the stage its one draw first went wrong: 0 the clean image, ai + 1 attack
        // ai, None never.
        let first = |d: &super::robust::Draws| d.preds[0];
        let broken_at: Vec<Option<usize>> = e
            .records
            .iter()
            .map(|r| {
                std::iter::once(&r.clean)
                    .chain(&r.attacks)
                    .position(|d| first(d) != r.label)
            })
            .collect();
        let records: Vec<SampleRecord> = e
            .records
            .iter()
            .zip(&broken_at)
            .map(|(r, &at)| {
                let clean_pred = first(&r.clean);
                SampleRecord {
                    index: r.index,
                    label: r.label,
                    clean_pred,
                    adv_pred: r.attacks.last().map_or(clean_pred, first),
                    broken_by: at.map(|s| match s {
                        0 => "clean".to_string(),
                        s => cfg.attacks[s - 1].to_string(),
                    }),
                    perturbation_norm: r.perturbation_norms.last().copied().unwrap_or(0.0),
                }
            })
            .collect();
        let share = |count: usize| count as f64 / n.max(1) as f64;
        let steps = e
            .attacks
            .iter()
            .enumerate()
            .map(|(ai, a)| {
                let robust_after = broken_at.iter().filter(|b| b.is_none_or(|s| s > ai + 1)).count();
                let masked = a.grad.masked_fraction();
                let step = AttackStep {
                    attack: cfg.attacks[ai].to_string(),
                    robust_after,
                    robust_accuracy: share(robust_after),
                    seconds: a.seconds,
                    grad: a.grad,
                    warning: (masked > 0.01).then(|| format!(
                        "{:.1} % of gradient evaluations were zero or non-finite: a sign of gradient masking, not robustness; attack through the offending stage with BPDA, or average stochastic gradients with `eot`",
                        100.0 * masked
                    )),
                };
                tracing::info!(
                    "{}: robust accuracy {:.2} % ({robust_after}/{n}) after {:.1} s",
                    step.attack,
                    100.0 * step.robust_accuracy,
                    step.seconds
                );
                if let Some(w) = &step.warning {
                    tracing::warn!("{}: {w}", step.attack);
                }
                step
            })
            .collect::<Vec<_>>();
        let clean = records.iter().filter(|r| r.clean_pred == r.label).count();
        let robust = records.iter().filter(|r| r.broken_by.is_none()).count();
        Ok(RobustReport {
            config: cfg.clone(),
            n,
            clean_accuracy: share(clean),
            robust_accuracy: share(robust),
            steps,
            records,
            seconds: e.seconds,
            x_adv: x_adv.pop().expect("at least one attack"),
        })
    }
}

/// What `atop attack` writes to `results.json` (and prints with `--json`).
#[derive(Serialize)]
pub struct AttackRun {
    pub model: PathBuf,
    pub defence: String,
    pub dataset: String,
    #[serde(flatten)]
    pub report: RobustReport,
    pub results: PathBuf,
    pub images: PathBuf,
    pub grid: PathBuf,
}

/// The files of an attack run's folder: its resume state, then its outputs.
pub const OUTPUTS: &[&str] = &[
    "state.json",
    "batches/",
    "results.json",
    "adversarial.safetensors",
    "grid.png",
];

/// `atop attack` into the folder `out` (new, empty, or an earlier run of the same command,
/// which resumes): `attacks` with `settings` on the target's points, in batches of `batch` with
/// `seed`; writes the adversarial images (with the clean ones, indices and labels), a grid of
/// up to 8 of them and `results.json`, last.
pub fn attack_into(
    target: &Target,
    attacks: Vec<AttackName>,
    settings: AttackSettings,
    (batch_size, seed): (usize, u64),
    out: &Path,
) -> Result<AttackRun> {
    crate::io::check_output_dir(out, OUTPUTS, "`out`")?;
    let _lock = crate::folder::lock(out)?;
    let pipeline = target.model()?;
    let model: &dyn Model = &pipeline;
    if model.is_stochastic() && settings.eot == 1 {
        tracing::warn!("the model is stochastic and `eot` is 1: gradients are single samples");
    }
    let config = RunnerConfig {
        attacks,
        settings,
        batch_size,
        seed,
        model: target.describe()?,
        data: target.data.clone(),
    };
    for name in &config.attacks {
        config.settings.fit_model(*name, model.num_classes())?;
    }
    let (x, y, indices) = (&target.x, &target.y, &target.indices);
    let report = Runner {
        model,
        config,
        state_dir: Some(out.to_path_buf()),
    }
    .run(x, y, indices)?;
    let images = out.join("adversarial.safetensors");
    let idx = index_tensor(indices);
    crate::io::write_safetensors(
        &images,
        &[
            ("images".into(), report.x_adv.shallow_clone()),
            ("clean".into(), x.to_kind(Kind::Float)),
            ("indices".into(), idx),
            ("labels".into(), y.shallow_clone()),
        ],
    )?;
    let grid = out.join("grid.png");
    write_grid(x, &report, &grid, &target.class_names)?;
    let run = AttackRun {
        model: target.dir.clone(),
        defence: model.describe(),
        dataset: target.dataset.clone(),
        report,
        results: out.join("results.json"),
        images,
        grid,
    };
    crate::io::write_json(&run.results, &run)?;
    Ok(run)
}

/// Rows: clean, adversarial, perturbation amplified to the full range, for up to 8 samples
/// (broken ones first).
fn write_grid(
    x: &Tensor,
    report: &RobustReport,
    path: &Path,
    class_names: &[String],
) -> Result<()> {
    let mut order: Vec<usize> = (0..report.n)
        .filter(|&i| {
            report.records[i]
                .broken_by
                .as_deref()
                .is_some_and(|b| b != "clean")
        })
        .collect();
    let rest: Vec<usize> = (0..report.n).filter(|i| !order.contains(i)).collect();
    order.extend(rest);
    order.truncate(8);
    if order.is_empty() {
        return Ok(());
    }
    let pos = index_tensor(&order);
    let clean = x.index_select(0, &pos).to_kind(Kind::Float);
    let adv = report.x_adv.index_select(0, &pos);
    let amplified = crate::figures::grid::amplified(&(&adv - &clean));
    let name = |k: i64| {
        class_names
            .get(k as usize)
            .cloned()
            .unwrap_or(k.to_string())
    };
    let caption = order
        .iter()
        .map(|&i| {
            let r = &report.records[i];
            format!("{} -> {}", name(r.clean_pred), name(r.adv_pred))
        })
        .collect::<Vec<_>>()
        .join(" | ");
    tracing::info!("grid columns: {caption}");
    crate::figures::grid::save_tensor_rows(
        &[
            ("clean", clean),
            ("adversarial", adv),
            ("perturbation", amplified),
        ],
        path,
    )
}
