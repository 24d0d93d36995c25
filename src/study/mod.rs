//! `atop run`: one command from data to a report. A study trains (or takes) a classifier,
//! pre-trains (or takes) a purifier, fine-tunes that purifier with AToP, then attacks both
//! defended models, classifier(pre-trained purifier(t(x))) and classifier(AToP purifier(t(x))),
//! with the same whole-model attacks on the same seeded points and budgets (`eval robust`:
//! exact gradients, EOT, R draws per image, intervals), and writes one report comparing them.
//!
//! Study folder:
//!   study.json                  the resolved settings of every stage; a rerun must match them
//!   classifier/ purifier/ atop/ the training runs (none for a stage given as a checkpoint)
//!   eval/<pipeline>-<eps>/      one `eval robust` per defended model and budget
//!   report.md, summary.json     the comparison, written last
//!
//! Rerunning the same command resumes: finished stages are kept, an interrupted training or
//! evaluation continues from its last checkpoint or batch.

mod plan;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::eval::compare::Comparison;
use crate::eval::robust::Scores;
use crate::eval::target::{ModelData, TargetSpec};
use crate::models::checkpoint;
use crate::train::runlog;

pub use plan::*;

/// One row of the comparison: a defended model at a budget.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// "pre-trained" or "AToP".
    pub purifier: String,
    pub eps: String,
    pub clean: Scores,
    /// Per point, the worst case over the clean image and every attack.
    pub robust: Scores,
    pub results: PathBuf,
    pub minutes: f64,
    /// The attack that broke the most points (lowest single-draw accuracy).
    pub strongest: String,
    /// At least one attack differentiated the defended model (else: transfer accuracy).
    pub adaptive: bool,
}

/// What a stage took and gave.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub stage: String,
    pub model: PathBuf,
    /// "trained", or "given" for a checkpoint used as it is.
    pub how: String,
    /// Training minutes: the sum of its epochs' times, per-epoch evaluations included (None
    /// for a given one).
    pub minutes: Option<f64>,
    /// The last epoch's headline numbers.
    pub note: String,
}

/// `summary.json`: what `atop run` prints with --json.
#[derive(Debug, Clone, Serialize)]
pub struct StudySummary {
    pub out: PathBuf,
    pub description: String,
    pub stages: Vec<StageReport>,
    pub protocol: String,
    /// R: draws of the model per scored image.
    pub draws: usize,
    pub rows: Vec<Row>,
    /// Per budget, AToP against the pre-trained purifier point by point.
    pub comparisons: Vec<Comparison>,
    pub report: PathBuf,
    pub provenance: String,
}

const STUDY: &str = "study.json";

/// Runs (or resumes) the study `plan` in `out`.
pub fn run(plan: &StudyPlan, out: &Path, device: tch::Device) -> Result<StudySummary> {
    let out = &crate::folder::absolute(out);
    plan.check_given()?;
    let _lock = open(plan, out)?;
    let (classifier, pretrained, tuned) = plan.models(out);
    let stages = vec![
        run_stage(
            "classifier",
            &plan.classifier,
            out,
            |c| c.epochs,
            |c, dir, resume| crate::train::classifier::train(c, dir, device, resume).map(drop),
            |_, r| format!("test accuracy {:.2} %", 100.0 * num(r, "test_acc")),
        )?,
        run_stage(
            "purifier",
            &plan.purifier,
            out,
            |c| c.epochs,
            |c, dir, resume| crate::train::purifier::train(c, dir, device, resume).map(drop),
            |_, r| {
                format!(
                    "PSNR {:.2} dB, classifier on purified images {:.2} %",
                    num(r, "psnr"),
                    100.0 * num(r, "purified_acc")
                )
            },
        )?,
        run_stage(
            "atop",
            &plan.atop,
            out,
            |c| c.epochs,
            |c, dir, resume| crate::train::atop::train(c, dir, device, resume).map(drop),
            |c, r| {
                format!(
                    "per-epoch check on {} images: defended clean {:.2} %, whole-model PGD {:.2} %",
                    c.eval.subset,
                    100.0 * num(r, "defended_clean_acc"),
                    100.0 * num(r, "robust_acc")
                )
            },
        )?,
    ];
    let mut rows = Vec::new();
    let mut evaluations = Vec::new();
    for (label, folder, purifier) in [
        ("pre-trained", "pretrained", &pretrained),
        ("AToP", "atop", &tuned),
    ] {
        for (eps, eps_name) in &plan.eval.budgets {
            let dir = out.join("eval").join(format!(
                "{folder}-eps{}",
                eps_name.trim_end_matches("/255").replace('.', "p")
            ));
            tracing::info!(
                "study: evaluating {label} at {eps_name} ({})",
                dir.display()
            );
            // Always through the evaluation: a finished one is read back when its settings,
            // weights and images match those now in place (a retrained stage is not reused).
            let results = evaluate(plan, &classifier, purifier, *eps, &dir, device)?;
            let e = results.evaluation;
            rows.push(Row {
                purifier: label.into(),
                eps: eps_name.clone(),
                clean: e.clean.clone(),
                robust: e.worst_case.clone(),
                results: dir.join("report.md"),
                minutes: e.seconds / 60.0,
                strongest: e
                    .strongest()
                    .map_or("-".into(), |(ai, _)| e.attacks[ai].attack.clone()),
                adaptive: e.adaptive(),
            });
            evaluations.push((label, eps_name.clone(), e));
        }
    }
    let mut comparisons = Vec::new();
    for (label, eps, pre) in &evaluations {
        if *label != "pre-trained" {
            continue;
        }
        if let Some((_, _, tuned)) = evaluations
            .iter()
            .find(|(l, e, _)| *l == "AToP" && e == eps)
        {
            comparisons.push(Comparison::of(
                eps,
                ("the pre-trained purifier", pre),
                ("AToP", tuned),
            )?);
        }
    }
    let engine = crate::runtime::engine_info();
    let summary = StudySummary {
        out: out.to_path_buf(),
        description: plan.description.clone(),
        stages,
        protocol: protocol(&plan.eval),
        draws: plan.eval.draws,
        rows,
        comparisons,
        report: out.join("report.md"),
        provenance: format!(
            "atop {}, torch {}, {device:?}, {} threads, {}; finished {}",
            engine.atop_version,
            engine.torch_version,
            engine.threads,
            engine.cpu,
            crate::io::utc_now()
        ),
    };
    crate::io::write_json(&out.join("summary.json"), &summary)?;
    let text = markdown(&summary);
    crate::io::write_atomic(&summary.report, |w| {
        std::io::Write::write_all(w, text.as_bytes()).context("cannot write report.md")
    })?;
    Ok(summary)
}

/// Creates the study folder, or checks that the one there holds this very study.
fn open(plan: &StudyPlan, out: &Path) -> Result<crate::folder::Lock> {
    let path = out.join(STUDY);
    let wanted = serde_json::to_value(plan)?;
    let foreign = std::fs::read_dir(out).ok().and_then(|entries| {
        entries
            .flatten()
            .find(|e| e.file_name() != crate::folder::LOCK)
    });
    let lock = crate::folder::lock(out)?;
    if path.exists() {
        let saved: serde_json::Value = crate::io::read_json(&path, "a study's settings")?;
        if saved != wanted {
            let stage = ["classifier", "purifier", "atop", "eval", "description"]
                .into_iter()
                .find(|k| saved.get(k) != wanted.get(k))
                .unwrap_or("settings");
            bail!(
                "{} holds a study with other settings ({stage} differs): rerun its own settings to resume it, or choose another `out`",
                out.display()
            );
        }
        return Ok(lock);
    }
    if let Some(entry) = foreign {
        bail!(
            "{} holds {} and no study: a study starts in an empty or new folder",
            out.display(),
            entry.file_name().to_string_lossy()
        );
    }
    crate::io::write_json(&path, &wanted)?;
    Ok(lock)
}

/// Logs what the stage's run in `dir` is about to do: check a finished run, resume, or train.
fn announce(stage: &str, dir: &Path, epochs: usize) {
    match checkpoint::read_last(dir) {
        Ok(l) if l.epoch >= epochs => {
            tracing::info!("study: {stage}: finished earlier ({})", dir.display())
        }
        Ok(l) => tracing::info!(
            "study: {stage}: resuming after epoch {} of {epochs} ({})",
            l.epoch,
            dir.display()
        ),
        Err(_) => tracing::info!(
            "study: {stage}: training {epochs} epochs ({})",
            dir.display()
        ),
    }
}

fn num(record: &serde_json::Value, key: &str) -> f64 {
    record.get(key).and_then(|v| v.as_f64()).unwrap_or(f64::NAN)
}

/// Trains the stage into `out/name` (or finishes or keeps what is there), or checks the given
/// checkpoint; then what it took and gave. `note` words the last epoch's record.
fn run_stage<T>(
    name: &str,
    stage: &Stage<T>,
    out: &Path,
    epochs: impl Fn(&T) -> usize,
    train: impl FnOnce(&T, &Path, bool) -> Result<()>,
    note: impl Fn(&T, &serde_json::Value) -> String,
) -> Result<StageReport> {
    match stage {
        Stage::Train(cfg) => {
            let dir = out.join(name);
            // A finished stage is still opened by its trainer, which checks that its inputs
            // (the earlier stages' weights, the data) are those it was trained on.
            announce(name, &dir, epochs(cfg));
            train(cfg, &dir, dir.join(runlog::CONFIG).exists())?;
            trained(name, &dir, |r| note(cfg, r))
        }
        Stage::Given(p) => given(name, p),
    }
}

fn trained(
    stage: &str,
    dir: &Path,
    note: impl Fn(&serde_json::Value) -> String,
) -> Result<StageReport> {
    let records: Vec<serde_json::Value> = runlog::read(dir)?;
    let seconds: f64 = records.iter().map(|r| num(r, "seconds")).sum();
    Ok(StageReport {
        stage: stage.into(),
        model: dir.to_path_buf(),
        how: "trained".into(),
        minutes: Some(seconds / 60.0),
        note: records.last().map(&note).unwrap_or_default(),
    })
}

/// A stage given as a checkpoint (checked to exist when the plan was resolved).
fn given(stage: &str, path: &Path) -> Result<StageReport> {
    Ok(StageReport {
        stage: stage.into(),
        model: path.to_path_buf(),
        how: "given".into(),
        minutes: None,
        note: String::new(),
    })
}

/// One `eval robust` of classifier(purifier(t(x))) at `eps` into `dir`.
fn evaluate(
    plan: &StudyPlan,
    classifier: &Path,
    purifier: &Path,
    eps: f64,
    dir: &Path,
    device: tch::Device,
) -> Result<crate::eval::run::RobustResults> {
    let e = &plan.eval;
    let target = TargetSpec {
        model: classifier.to_path_buf(),
        purifier: Some(purifier.to_path_buf()),
        data: ModelData::default(),
        n: Some(e.n),
        seed: e.seed,
        ..Default::default()
    }
    .load(device)?;
    let config = e.config(eps, target.describe()?, target.data.clone())?;
    let run = crate::eval::run::evaluate_into(&target, &config, None, dir, device)?;
    crate::report::robust::write_run(dir, &run, &target)?;
    Ok(run.results)
}

fn protocol(e: &EvalPlan) -> String {
    let budgets: Vec<&str> = e.budgets.iter().map(|(_, s)| s.as_str()).collect();
    let attacks = match &e.plan {
        Some(p) => format!("the plan {}", p.description),
        None => format!(
            "{} ({}, EOT {})",
            e.attacks,
            e.steps
                .map_or("each attack's default iterations".to_string(), |s| format!(
                    "{s} iterations"
                )),
            e.eot
        ),
    };
    format!(
        "Linf {} on {} seeded test images (seed {}); attacks: {attacks}, on the whole defended model with exact gradients through transform, purifier and classifier (transfer: computed on the classifier alone, scored on the whole model); every image scored by R = {} draws of the model; robust = right on the clean and on every attacked image; 95 % Clopper-Pearson intervals",
        budgets.join(" and "),
        e.n,
        e.seed,
        e.draws
    )
}

fn show(s: &Scores) -> [String; 3] {
    let p = |p: &crate::eval::stats::Proportion| {
        format!(
            "{:.2} % [{:.1}, {:.1}]",
            100.0 * p.value,
            100.0 * p.lo,
            100.0 * p.hi
        )
    };
    [p(&s.single), p(&s.majority), p(&s.worst_of_r)]
}

/// The study's `report.md`.
pub fn markdown(s: &StudySummary) -> String {
    use std::fmt::Write;
    let mut m = String::new();
    let _ = writeln!(m, "# atop run: {}\n", s.description);
    let _ = writeln!(m, "Folder `{}`; {}.\n", s.out.display(), s.provenance);
    let _ = writeln!(m, "## Stages\n");
    let _ = writeln!(m, "| stage | model | how | minutes | last epoch |");
    let _ = writeln!(m, "|---|---|---|---|---|");
    for st in &s.stages {
        let _ = writeln!(
            m,
            "| {} | `{}` | {} | {} | {} |",
            st.stage,
            st.model.display(),
            st.how,
            st.minutes.map_or("-".into(), |x| format!("{x:.1}")),
            st.note
        );
    }
    let _ = writeln!(
        m,
        "\n## Robustness: pre-trained against AToP-fine-tuned purifier\n"
    );
    let _ = writeln!(m, "Protocol: {}.\n", s.protocol);
    let draws = s.draws;
    let adaptive = s.rows.iter().all(|r| r.adaptive);
    let what = if adaptive {
        "robust"
    } else {
        "transfer accuracy (no attack differentiated the defended model: not robust accuracy)"
    };
    let _ = writeln!(
        m,
        "| purifier | eps | clean, single draw | {what}, single draw | {what}, majority of {draws} | {what}, worst of {draws} | strongest attack | minutes |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|");
    for row in &s.rows {
        let [single, majority, worst] = show(&row.robust);
        let _ = writeln!(
            m,
            "| {} | {} | {} | {single} | {majority} | {worst} | {} | {:.1} |",
            row.purifier,
            row.eps,
            show(&row.clean)[0],
            row.strongest,
            row.minutes
        );
    }
    let _ = writeln!(
        m,
        "\nThe intervals in the table are each model's own (95 % Clopper-Pearson over the points). The two models are scored on the same points and the same draws, so the comparison below is paired (`atop eval compare`: AToP second, the pre-trained purifier first).\n"
    );
    m.push_str(&crate::report::robust::comparison_markdown(&s.comparisons));
    let _ = writeln!(
        m,
        "\nEach evaluation's own report (every attack, the sanity checks, per-point records):"
    );
    for row in &s.rows {
        let _ = writeln!(
            m,
            "- {} at {}: `{}`",
            row.purifier,
            row.eps,
            row.results.display()
        );
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::atop::TrainAtopConfig;

    #[test]
    fn every_study_preset_resolves() {
        for (name, _) in PRESETS {
            let cfg = StudyConfig::preset(name).unwrap();
            let plan = StudyPlan::new(&cfg, Path::new("runs/x")).unwrap();
            let Stage::Train(atop) = &plan.atop else {
                panic!("{name}: the AToP stage is not trained")
            };
            assert_eq!(
                atop.classifier.as_deref(),
                Some(Path::new("runs/x/classifier"))
            );
            assert_eq!(atop.purifier.as_deref(), Some(Path::new("runs/x/purifier")));
        }
    }

    #[test]
    fn stage_settings_merge_over_the_preset_key_by_key() {
        let cfg = StudyConfig::from_toml(
            r#"
            description = "t"
            [classifier]
            checkpoint = "src"
            [purifier]
            checkpoint = "presets"
            [atop]
            preset = "atop-cifar10-cpu"
            [atop.set]
            epochs = 2
            adversary = { steps = 1 }
            [eval]
            eps = ["8/255", "0.01"]
            steps = 3
            n = 4
            draws = 2
            "#,
            "test",
        )
        .unwrap();
        let plan = StudyPlan::new(&cfg, Path::new("o")).unwrap();
        let Stage::Train(a) = &plan.atop else {
            panic!()
        };
        let preset = TrainAtopConfig::preset("atop-cifar10-cpu").unwrap();
        assert_eq!(a.epochs, 2);
        assert_eq!(a.adversary.steps, 1);
        // The rest of the adversary table is the preset's.
        assert_eq!(a.adversary.eps, preset.adversary.eps);
        assert_eq!(a.adversary.attack, preset.adversary.attack);
        assert_eq!(a.lambda, preset.lambda);
        assert_eq!(a.classifier.as_deref(), Some(Path::new("src")));
        assert_eq!(a.purifier.as_deref(), Some(Path::new("presets")));
        let labels: Vec<&str> = plan.eval.budgets.iter().map(|b| b.1.as_str()).collect();
        assert_eq!(labels, ["8/255", "0.01"]);
    }

    #[test]
    fn bad_studies_are_refused_naming_the_field() {
        let base = |atop: &str, eval: &str| {
            format!(
                "description = \"t\"\n[classifier]\ncheckpoint = \"src\"\n[purifier]\ncheckpoint = \"presets\"\n[atop]\n{atop}\n[eval]\n{eval}\n"
            )
        };
        let err = |text: String| match StudyConfig::from_toml(&text, "t")
            .and_then(|c| StudyPlan::new(&c, Path::new("o")))
        {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => format!("{e:#}"),
        };
        let ok_eval = "eps = [\"8/255\"]";
        for (atop, eval, expect) in [
            (
                "preset = \"atop-demo\"\n[atop.set]\nlambda = -1",
                ok_eval,
                "lambda",
            ),
            (
                "preset = \"atop-demo\"\n[atop.set]\npurifier = \"x\"",
                ok_eval,
                "the study sets it",
            ),
            ("preset = \"nope\"", ok_eval, "expected one of"),
            (
                "preset = \"atop-demo\"\ncheckpoint = \"x\"",
                ok_eval,
                "not both",
            ),
            (
                "preset = \"atop-demo\"\n[atop.set]\nepochz = 1",
                ok_eval,
                "epochz",
            ),
            ("preset = \"atop-demo\"", "eps = []", "at least one"),
            ("preset = \"atop-demo\"", "eps = [\"9/0\"]", "eps"),
            (
                "preset = \"atop-demo\"",
                "eps = [\"8/255\"]\nattacks = [\"pgdd\"]",
                "pgdd",
            ),
            (
                "preset = \"atop-demo\"",
                "eps = [\"8/255\"]\nplan = \"eval-robust-cpu\"\nn = 3",
                "the plan",
            ),
            (
                "preset = \"atop-demo\"",
                "eps = [\"8/255\"]\ndraws = 0",
                "draws",
            ),
        ] {
            let e = err(base(atop, eval));
            assert!(e.contains(expect), "{atop} / {eval}: {e}");
        }
    }
}
