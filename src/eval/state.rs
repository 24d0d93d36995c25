//! A robust evaluation's saved progress (resume after every batch), the assembly of its
//! per-point records into the finished evaluation (scores, worst case, checks), and the merge
//! of shards.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::checks::*;
use super::scores::*;
use super::spec::*;
use crate::attacks::GradStats;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct State {
    pub(super) config: RobustConfig,
    #[serde(default)]
    pub(super) shard: Option<Shard>,
    pub(super) indices: Vec<usize>,
    pub(super) stochastic: bool,
    pub(super) max_logit_change: f64,
    pub(super) clean: Vec<Option<Draws>>,
    /// [attack][point]
    pub(super) done: Vec<Vec<Option<Draws>>>,
    pub(super) norms: Vec<Vec<f64>>,
    /// [attack][point]: what the attack claimed of its image at attack time (None where not
    /// recorded: states written before 2026-12-06).
    #[serde(default)]
    pub(super) claimed: Vec<Vec<Option<f64>>>,
    pub(super) grad: Vec<GradStats>,
    pub(super) seconds: Vec<f64>,
    /// Batch files (attack, first point), in order.
    pub(super) batches: Vec<String>,
    /// Finished check runs: name -> single-draw accuracy.
    #[serde(default)]
    pub(super) check_runs: std::collections::BTreeMap<String, f64>,
}

pub(super) const STATE: &str = "state.json";
pub(super) const BATCHES: &str = "batches";

/// Refuses an output folder that holds anything but an evaluation's own files (state, batches,
/// results, report, plots), or finished results without the state to resume them (a merged
/// report): an evaluation writes only into a new or empty folder or resumes its own.
pub fn check_output_dir(out: &Path) -> Result<()> {
    crate::io::check_output_dir(
        out,
        &[
            STATE,
            "batches/",
            "results.json",
            "records.csv",
            "report.md",
            "grid.png",
            "checks.png",
            crate::folder::COMPLETE,
        ],
        "`out`",
    )?;
    let occupied = std::fs::read_dir(out)
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name() != crate::folder::LOCK)));
    if occupied && !out.join(STATE).exists() {
        bail!(
            "{} is not empty and holds no robust evaluation to resume: choose another `out`",
            out.display()
        );
    }
    Ok(())
}

/// Checks a read-back evaluation (`file`) against what the engine guarantees: one record per
/// point, each at its position with that point's dataset index, a label and R predictions per
/// draw within the classes for the clean image and every attack, perturbation norms within eps,
/// and scores, worst case and checks equal to those recomputed from the records. What this
/// cannot see (records edited together with every score derived from them) the SHA-256 of
/// `results.json` in `complete.json` makes visible.
pub fn validate(e: &RobustEvaluation, file: &Path) -> Result<()> {
    let bad = |what: String| -> Result<()> {
        bail!(
            "{}: {what}: not what atop eval robust writes (edited or damaged); rerun the evaluation",
            file.display()
        )
    };
    let cfg = &e.config;
    let (draws, attacks, classes) = (cfg.draws, cfg.attacks.len(), e.classes as i64);
    if e.records.len() != e.n {
        return bad(format!("{} records for n = {}", e.records.len(), e.n));
    }
    if e.attacks.len() != attacks {
        return bad(format!(
            "{} attack results for {attacks} attacks",
            e.attacks.len()
        ));
    }
    let eps = cfg.settings.budget.eps;
    let mut seen = vec![false; e.indices.len()];
    for r in &e.records {
        let at = format!("the record of position {}", r.position);
        match seen.get_mut(r.position) {
            Some(s) if !*s => *s = true,
            Some(_) => return bad(format!("{at} is there twice")),
            None => return bad(format!("{at} is outside the {} points", e.indices.len())),
        }
        if e.indices[r.position] != r.index {
            return bad(format!(
                "{at} names dataset index {}, the points list {}",
                r.index, e.indices[r.position]
            ));
        }
        if !(0..classes).contains(&r.label) {
            return bad(format!(
                "{at} has label {} outside the {classes} classes",
                r.label
            ));
        }
        if r.attacks.len() != attacks || r.perturbation_norms.len() != attacks {
            return bad(format!(
                "{at} holds {} attacks and {} norms for {attacks} attacks",
                r.attacks.len(),
                r.perturbation_norms.len()
            ));
        }
        if !r.claimed.is_empty() && r.claimed.len() != attacks {
            return bad(format!(
                "{at} holds {} claims for {attacks} attacks",
                r.claimed.len()
            ));
        }
        for d in std::iter::once(&r.clean).chain(&r.attacks) {
            if d.preds.len() != draws {
                return bad(format!(
                    "{at} holds {} predictions for R = {draws} draws",
                    d.preds.len()
                ));
            }
            if let Some(p) = d.preds.iter().find(|p| !(0..classes).contains(*p)) {
                return bad(format!(
                    "{at} predicts class {p}, outside the {classes} classes"
                ));
            }
        }
        if let Some(v) = r
            .perturbation_norms
            .iter()
            .find(|v| !(v.is_finite() && **v <= eps * (1.0 + 1e-5) + 1e-6))
        {
            return bad(format!("{at} has a perturbation of norm {v} > eps {eps}"));
        }
    }
    let again = assemble(Parts {
        config: e.config.clone(),
        shard: e.shard,
        indices: e.indices.clone(),
        stochastic: e.stochastic,
        max_logit_change: e.max_logit_change,
        declared_stochastic: e.declared_stochastic,
        classes: e.classes,
        records: e.records.clone(),
        per_attack: e.attacks.iter().map(|a| (a.grad, a.seconds)).collect(),
        curves: e.curves.clone(),
        seconds: e.seconds,
    });
    fn same<T: Serialize>(a: &T, b: &T) -> bool {
        match (serde_json::to_value(a), serde_json::to_value(b)) {
            (Ok(a), Ok(b)) => close(&a, &b),
            _ => false,
        }
    }
    if !same(&e.clean, &again.clean) || !same(&e.worst_case, &again.worst_case) {
        return bad("its clean or worst-case scores differ from those of its records".into());
    }
    for (a, b) in e.attacks.iter().zip(&again.attacks) {
        if !same(&a.scores, &b.scores) {
            return bad(format!(
                "the scores of {} differ from those of its records",
                a.attack
            ));
        }
    }
    if !same(&e.checks, &again.checks) {
        return bad("its checks differ from those recomputed from its records".into());
    }
    Ok(())
}

/// JSON values equal, numbers to 1e-12 relative (serde_json's default float parser may read a
/// written float back one unit in the last place off).
fn close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| close(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
        }
        _ => a == b,
    }
}

/// The whole evaluation from all its shards (any order): the same records, scores and checks
/// as an unsharded run; gradient statistics and seconds are summed. The shards come validated
/// (`crate::eval::run::read_results`, [`validate`]).
pub fn merge(mut shards: Vec<RobustEvaluation>) -> Result<RobustEvaluation> {
    let Some(first) = shards.first() else {
        bail!("nothing to merge");
    };
    let count = match first.shard {
        Some(s) => s.count,
        None => bail!("not a shard: an evaluation run without `shard` needs no merge"),
    };
    for e in &shards {
        if e.config != first.config || e.indices != first.indices {
            bail!(
                "shards of different evaluations (settings, model, data or points differ): {} vs {}",
                e.config.model,
                first.config.model
            );
        }
        if e.stochastic != first.stochastic || e.classes != first.classes {
            bail!("shards of different models (measured randomness or classes differ)");
        }
        match e.shard {
            Some(s) if s.count == count => {}
            _ => bail!("shards split {count} ways and otherwise mixed"),
        }
    }
    shards.sort_by_key(|e| e.shard.map_or(0, |s| s.index));
    let got: Vec<usize> = shards
        .iter()
        .filter_map(|e| e.shard.map(|s| s.index))
        .collect();
    if got != (0..count).collect::<Vec<_>>() {
        bail!("expected shards 0..{count} once each, got {got:?}");
    }
    let n = shards[0].indices.len();
    let mut records: Vec<PointRecord> = shards.iter().flat_map(|e| e.records.clone()).collect();
    records.sort_by_key(|r| r.position);
    if records.len() != n || records.iter().enumerate().any(|(i, r)| r.position != i) {
        bail!("the shards' points do not cover the {n} evaluated points exactly once");
    }
    let attacks = shards[0].config.attacks.len();
    let mut per_attack = vec![(GradStats::default(), 0.0); attacks];
    for e in &shards {
        for (ai, a) in e.attacks.iter().enumerate() {
            per_attack[ai].0.add(a.grad);
            per_attack[ai].1 += a.seconds;
        }
    }
    let first = &shards[0];
    Ok(assemble(Parts {
        config: first.config.clone(),
        shard: None,
        indices: first.indices.clone(),
        stochastic: first.stochastic,
        max_logit_change: first.max_logit_change,
        declared_stochastic: first.declared_stochastic,
        classes: first.classes,
        records,
        per_attack,
        curves: first.curves.clone(),
        seconds: shards.iter().map(|e| e.seconds).sum(),
    }))
}

pub(super) fn load_state(
    dir: Option<&Path>,
    config: &RobustConfig,
    shard: Option<Shard>,
    indices: &[usize],
) -> Result<Option<State>> {
    let Some(dir) = dir else {
        return Ok(None);
    };
    let path = dir.join(STATE);
    let Some(state) = crate::io::read_json_opt::<State>(&path, "a robust-evaluation state file")?
    else {
        return Ok(None);
    };
    if &state.config != config || state.shard != shard {
        bail!(
            "{} holds an evaluation with different settings (attacks, budgets, draws, seed, model, data or shard); resume it with the same settings or choose another `out`",
            path.display()
        );
    }
    let n = indices.len();
    let attacks = config.attacks.len();
    let corrupt = |what: String| {
        anyhow::anyhow!(
            "{}: {what}: the resume state is corrupt; delete {} to start over",
            path.display(),
            dir.display()
        )
    };
    if state.indices != indices {
        // The same settings and data describe the same points: other indices are an edit.
        return Err(corrupt(format!(
            "indices hold {} dataset indices that are not the {n} points of this run",
            state.indices.len()
        )));
    }
    for (field, len, want) in [
        ("clean", state.clean.len(), n),
        ("done", state.done.len(), attacks),
        ("norms", state.norms.len(), attacks),
        ("grad", state.grad.len(), attacks),
        ("seconds", state.seconds.len(), attacks),
    ] {
        if len != want {
            return Err(corrupt(format!(
                "{field} holds {len} entries, expected {want} ({n} points, {attacks} attacks)"
            )));
        }
    }
    let mut state = state;
    if state.claimed.is_empty() {
        // Written before claims were recorded: the finished batches have none.
        state.claimed = vec![vec![None; n]; attacks];
    }
    if state.claimed.len() != attacks || state.claimed.iter().any(|c| c.len() != n) {
        return Err(corrupt(format!(
            "claimed holds {} lists, expected {attacks} of {n} entries",
            state.claimed.len()
        )));
    }
    for (ai, (done, norms)) in state.done.iter().zip(&state.norms).enumerate() {
        if done.len() != n || norms.len() != n {
            return Err(corrupt(format!(
                "done[{ai}] / norms[{ai}] hold {} / {} entries, expected {n} (one per point)",
                done.len(),
                norms.len()
            )));
        }
    }
    let draws = std::iter::once(("clean".to_string(), &state.clean)).chain(
        state
            .done
            .iter()
            .enumerate()
            .map(|(ai, d)| (format!("done[{ai}]"), d)),
    );
    for (field, list) in draws {
        for (i, d) in list.iter().enumerate() {
            if let Some(d) = d
                && d.preds.len() != config.draws
            {
                return Err(corrupt(format!(
                    "{field}[{i}] holds {} predictions, expected R = {}",
                    d.preds.len(),
                    config.draws
                )));
            }
        }
    }
    tracing::info!("resuming the evaluation in {}", dir.display());
    Ok(Some(state))
}

pub(super) fn save_state(dir: Option<&Path>, state: &State) -> Result<()> {
    match dir {
        Some(d) => crate::io::write_json(&d.join(STATE), state),
        None => Ok(()),
    }
}

/// The path of batch file `file` of the state in `dir`.
pub(super) fn batch_file(dir: Option<&Path>, file: &str) -> PathBuf {
    dir.unwrap_or(Path::new(".")).join(BATCHES).join(file)
}

/// (attack index, first point, images) of a batch file named `AA-SSSSSS.safetensors`,
/// checked against the run: an attack of the config, a batch of the points (its first point
/// and length), one image of the points' shape per point.
/// The error for a damaged resume file: names the file and how to start over.
fn corrupt_state(path: &Path, dir: &Path, what: String) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {what}: the resume state is corrupt; delete {} to start over",
        path.display(),
        dir.display()
    )
}

/// A batch file's `images`, checked: the shape `want` (`which` says what it should hold) and
/// finite values; as floats.
fn batch_images(
    tensors: &[(String, Tensor)],
    want: &[i64],
    which: &str,
    corrupt: &dyn Fn(String) -> anyhow::Error,
) -> Result<Tensor> {
    let images = tensors
        .iter()
        .find(|(n, _)| n == "images")
        .map(|(_, v)| v.shallow_clone())
        .ok_or_else(|| corrupt("no tensor 'images'".into()))?;
    if images.size() != want {
        return Err(corrupt(format!(
            "images have shape {:?}; expected {want:?} ({which})",
            images.size()
        )));
    }
    let images = images.to_kind(Kind::Float);
    if !bool::try_from(images.isfinite().all())? {
        return Err(corrupt("images hold NaN or infinite values".into()));
    }
    Ok(images)
}

pub(super) fn read_batch(
    dir: Option<&Path>,
    file: &str,
    config: &RobustConfig,
    x: &Tensor,
) -> Result<(usize, usize, Tensor)> {
    let dir = dir.context("batch files without a state folder")?;
    let path: PathBuf = batch_file(Some(dir), file);
    let corrupt = |what: String| corrupt_state(&path, dir, what);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (a, s) = file
        .strip_suffix(".safetensors")
        .and_then(|stem| stem.split_once('-'))
        .filter(|(a, s)| digits(a) && digits(s))
        .and_then(|(a, s)| Some((a.parse::<usize>().ok()?, s.parse::<usize>().ok()?)))
        .ok_or_else(|| {
            corrupt("unexpected batch file name (expected AA-SSSSSS.safetensors)".into())
        })?;
    let n = x.size()[0] as usize;
    if a >= config.attacks.len() {
        return Err(corrupt(format!(
            "the batch is from attack {a}, but the evaluation has {} attacks (0 to {})",
            config.attacks.len(),
            config.attacks.len() - 1
        )));
    }
    if s >= n || !s.is_multiple_of(config.batch_size) {
        return Err(corrupt(format!(
            "the batch starts at point {s}, which does not start a batch of {} among the {n} points",
            config.batch_size
        )));
    }
    let t = crate::models::checkpoint::read_tensors(&path)?;
    let mut want = x.size();
    want[0] = (n - s).min(config.batch_size) as i64;
    let which = format!("points {s} to {} of {n}", s as i64 + want[0] - 1);
    let images = batch_images(&t, &want, &which, &corrupt)?;
    Ok((a, s, images))
}

/// (attack index, positions, images) of a cascade's batch file `AA-ATTACK-SSSSSS.safetensors`
/// (positions and images), checked against the run: an attack of the config, distinct positions
/// of the points starting at the one the name gives, one image per position inside the budget.
pub(super) fn read_cascade_batch(
    dir: Option<&Path>,
    file: &str,
    config: &RobustConfig,
    x: &Tensor,
) -> Result<(usize, Tensor, Tensor)> {
    let dir = dir.context("batch files without a state folder")?;
    let path = batch_file(Some(dir), file);
    let bad = |what: String| corrupt_state(&path, dir, what);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (ai, start) = file
        .strip_suffix(".safetensors")
        .and_then(|stem| stem.split_once('-'))
        .and_then(|(a, rest)| Some((a, rest.rsplit_once('-')?)))
        .filter(|(a, (_, s))| digits(a) && digits(s))
        .and_then(|(a, (name, s))| {
            let ai = a.parse::<usize>().ok()?;
            (config.attacks.get(ai)?.label() == name).then_some((ai, s.parse::<i64>().ok()?))
        })
        .ok_or_else(|| bad("not a batch file name of this run".into()))?;
    let t = crate::models::checkpoint::read_tensors(&path)?;
    let get = |name: &str| {
        t.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.shallow_clone())
            .ok_or_else(|| bad(format!("no tensor '{name}'")))
    };
    let pos = get("positions")?;
    let n = x.size()[0];
    let len = pos.size().first().copied().unwrap_or(0);
    if pos.kind() != Kind::Int64 || pos.dim() != 1 || !(1..=config.batch_size as i64).contains(&len)
    {
        return Err(bad(format!(
            "positions are {:?} of shape {:?}; expected 1 to {} int64 positions",
            pos.kind(),
            pos.size(),
            config.batch_size
        )));
    }
    let list = Vec::<i64>::try_from(&pos)?;
    let mut seen = std::collections::HashSet::new();
    for &p in &list {
        if !(0..n).contains(&p) {
            return Err(bad(format!(
                "positions hold {p} but the run has {n} points"
            )));
        }
        if !seen.insert(p) {
            return Err(bad(format!("positions hold {p} twice")));
        }
    }
    if list[0] != start {
        return Err(bad(format!(
            "positions start at {} but the file name says {start}",
            list[0]
        )));
    }
    let mut want = x.size();
    want[0] = len;
    let images = batch_images(&t, &want, "one image per position", &bad)?;
    let clean = x
        .index_select(0, &pos.to_device(x.device()))
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float);
    let label = config.attacks[ai].label();
    let budget = attack_settings(config, &config.attacks[ai], true)
        .build(config.attacks[ai].attack)?
        .budget();
    crate::attacks::sweep::check_budget(&images, &clean, &budget, &format!("{label} (resumed)"))
        .map_err(|e| bad(format!("images outside the threat model ({e})")))?;
    Ok((ai, pos, images))
}

/// What an evaluation (or the merge of its shards) is computed from.
pub(super) struct Parts {
    pub(super) config: RobustConfig,
    pub(super) shard: Option<Shard>,
    pub(super) indices: Vec<usize>,
    pub(super) stochastic: bool,
    pub(super) max_logit_change: f64,
    pub(super) declared_stochastic: bool,
    pub(super) classes: usize,
    pub(super) records: Vec<PointRecord>,
    /// Per attack: gradient statistics and seconds.
    pub(super) per_attack: Vec<(GradStats, f64)>,
    pub(super) curves: CheckCurves,
    pub(super) seconds: f64,
}

/// Scores, worst case and checks from per-point records.
pub(super) fn assemble(p: Parts) -> RobustEvaluation {
    let cfg = &p.config;
    let score = |draws: &dyn Fn(&PointRecord) -> &Draws| {
        let correct: Vec<Vec<bool>> = p
            .records
            .iter()
            .map(|r| draws(r).correct(r.label))
            .collect();
        let majority: Vec<bool> = p
            .records
            .iter()
            .map(|r| draws(r).majority_correct(r.label))
            .collect();
        (correct, majority)
    };
    let (clean_correct, clean_majority) = score(&|r| &r.clean);
    let mut worst_correct = clean_correct.clone();
    let mut worst_majority = clean_majority.clone();
    let mut attacks = Vec::new();
    for (ai, spec) in cfg.attacks.iter().enumerate() {
        let (c, m) = score(&|r| &r.attacks[ai]);
        for i in 0..p.records.len() {
            for (w, v) in worst_correct[i].iter_mut().zip(&c[i]) {
                *w &= *v;
            }
            worst_majority[i] &= m[i];
        }
        let settings = attack_settings(cfg, spec, p.stochastic);
        let (grad, seconds) = p.per_attack[ai];
        let cost = cost(spec.attack, &settings);
        attacks.push(AttackResult {
            attack: spec.label(),
            target: spec.target,
            scores: Scores::from(&c, &m),
            seconds,
            grad,
            budget: cost.words,
            eot: settings.eot,
            gradient_evaluations_per_point: cost.gradients,
            queries_per_point: cost.queries,
        });
    }
    let mut evaluation = RobustEvaluation {
        config: p.config.clone(),
        shard: p.shard,
        n: p.records.len(),
        indices: p.indices,
        declared_stochastic: p.declared_stochastic,
        classes: p.classes,
        stochastic: p.stochastic,
        max_logit_change: p.max_logit_change,
        clean: Scores::from(&clean_correct, &clean_majority),
        attacks,
        worst_case: Scores::from(&worst_correct, &worst_majority),
        checks: Vec::new(),
        curves: p.curves,
        records: p.records,
        seconds: p.seconds,
    };
    evaluation.checks = checks(&evaluation);
    evaluation
}
