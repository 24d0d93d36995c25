//! Robust accuracy of any [`Model`], stochastic ones included, scored so that it survives
//! scrutiny: every attack runs on every point (not only on the points one clean draw got
//! right), and every clean or adversarial image is then classified by R independent draws of
//! the model. From those draws come three scores, each with a 95 % Clopper-Pearson interval:
//! single draw (mean and std over the R draws), majority vote, and worst of R (a point counts
//! only if all R draws are right). The worst case per point is taken over all attacks, with
//! the clean image counted as one of them. Sanity checks measure instead of trusting
//! declarations (randomness, gradients, attack orderings). Progress is saved after every
//! batch: an interrupted evaluation resumes without redoing finished work.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tch::{Device, Kind, Tensor};

use super::checks::*;
use super::state::*;
use crate::attacks::sweep::{
    BatchResult, Pass, Task, batch_seed, check_budget, index_tensor, sweep,
};
use crate::attacks::{AttackName, AttackSettings, GradStats};
use crate::models::{Measured, Model};

pub use super::scores::*;
pub use super::spec::*;

/// The evaluated points: images N x C x H x W in [0,1], labels, dataset indices.
#[derive(Clone, Copy)]
pub struct Points<'a> {
    pub x: &'a Tensor,
    pub y: &'a Tensor,
    pub indices: &'a [usize],
}

/// Evaluates `model` on the `points`; transfer and BPDA attacks differentiate the `surrogates`. With `state_dir`, progress is saved after every batch and
/// an earlier run with the same config is resumed. Returns the evaluation and the adversarial
/// images of every attack (in config order).
pub fn evaluate(
    model: &dyn Model,
    surrogates: Surrogates<'_>,
    points: Points<'_>,
    config: &RobustConfig,
    shard: Option<Shard>,
    state_dir: Option<&Path>,
) -> Result<(RobustEvaluation, Vec<Tensor>)> {
    config.validate()?;
    if config.cascade && shard.is_some() {
        bail!("a cascade (each attack on the points still robust) runs unsharded");
    }
    let Points { x, y, indices } = points;
    let n = check_inputs(model, &surrogates, &points, config)?;
    let started = Instant::now();
    let device = model.device();
    let labels = Vec::<i64>::try_from(y.to_device(Device::Cpu))?;
    let mut state = match load_state(state_dir, config, shard, indices)? {
        Some(s) => s,
        None => new_state(model, x, config, shard, indices)?,
    };
    if state.stochastic && min_white_box_eot(config, true) == Some(1) {
        tracing::warn!(
            "the model is random (two calls differ by up to {:.3e} in a logit) and EOT is 1: each attack step sees one draw",
            state.max_logit_change
        );
    }
    let batches = owned_batches(n, config, shard)?;
    let slice = |t: &Tensor, s: usize, len: usize| t.narrow(0, s as i64, len as i64);
    // The clean draws.
    for &(s, len) in &batches {
        if state.clean[s].is_some() {
            continue;
        }
        let xb = slice(x, s, len).to_device(device).to_kind(Kind::Float);
        let draws = draw(model, &xb, config.draws, config.seed, usize::MAX, s)?;
        for (j, d) in draws.into_iter().enumerate() {
            state.clean[s + j] = Some(d);
        }
        save_state(state_dir, &state)?;
    }
    // Adversarial images: start from clean, replay finished batches.
    let x_adv = replay(x, config, &state, state_dir)?;
    let passes = config
        .attacks
        .iter()
        .map(|spec| {
            let settings = attack_settings(config, spec, state.stochastic);
            Ok(Pass {
                label: spec.label(),
                attack: settings.build(spec.attack)?,
                model: attacked_model(spec, model, &surrogates, state.stochastic, x, config)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let owned: Vec<usize> = batches.iter().flat_map(|&(s, len)| s..s + len).collect();
    let mut engine = Engine {
        model,
        config,
        labels: &labels,
        owned: &owned,
        state: &mut state,
        state_dir,
        x_adv,
    };
    sweep(&passes, (x, y), config.batch_size, &mut engine)?;
    let x_adv = engine.x_adv;
    // The check runs belong to the first shard (on the first points of the whole set).
    let curves = if shard.is_none_or(|s| s.index == 0) {
        check_runs(model, x, y, config, &mut state, state_dir)?
    } else {
        CheckCurves::default()
    };
    let evaluation = finish(
        &state,
        &labels,
        &owned,
        model,
        curves,
        started.elapsed().as_secs_f64(),
    )?;
    Ok((evaluation, x_adv))
}

/// The evaluation as a task of the attack sweep: which points each attack sees, what is done,
/// and the scoring and saving of each attacked batch.
struct Engine<'a> {
    model: &'a dyn Model,
    config: &'a RobustConfig,
    labels: &'a [i64],
    /// The positions this run (or shard) owns.
    owned: &'a [usize],
    state: &'a mut State,
    state_dir: Option<&'a Path>,
    /// Per attack, every point's image so far.
    x_adv: Vec<Tensor>,
}

impl Engine<'_> {
    /// Right on every draw of the clean image and of each attack before `ai`.
    fn robust_before(&self, ai: usize, p: usize) -> bool {
        let label = self.labels[p];
        let right = |d: &Option<Draws>| {
            d.as_ref()
                .is_some_and(|d| d.preds.iter().all(|&q| q == label))
        };
        right(&self.state.clean[p]) && self.state.done[..ai].iter().all(|a| right(&a[p]))
    }
}

impl Task for Engine<'_> {
    /// Every owned point; in a cascade, only the points still robust, the others keeping the
    /// image (and draws) that broke them.
    fn queue(&mut self, ai: usize) -> Result<Vec<usize>> {
        if !self.config.cascade {
            return Ok(self.owned.to_vec());
        }
        let (queue, carried): (Vec<usize>, Vec<usize>) =
            self.owned.iter().partition(|&&p| self.robust_before(ai, p));
        if ai > 0 && !carried.is_empty() {
            let pos = index_tensor(&carried);
            let before = self.x_adv[ai - 1].index_select(0, &pos);
            let _ = self.x_adv[ai].index_copy_(0, &pos, &before);
        }
        let mut changed = false;
        for &p in &carried {
            if self.state.done[ai][p].is_none() {
                let (draws, norm) = match ai {
                    0 => (self.state.clean[p].clone(), 0.0),
                    _ => (
                        self.state.done[ai - 1][p].clone(),
                        self.state.norms[ai - 1][p],
                    ),
                };
                self.state.done[ai][p] = draws;
                self.state.norms[ai][p] = norm;
                changed = true;
            }
        }
        if changed {
            save_state(self.state_dir, self.state)?;
        }
        Ok(queue)
    }

    fn done(&self, ai: usize, first: usize) -> bool {
        self.state.done[ai][first].is_some()
    }

    fn seed(&self, ai: usize, first: usize) -> u64 {
        // Every attack on every point keeps the slots its states were written with.
        let slot = ai + usize::from(!self.config.cascade);
        batch_seed(self.config.seed, slot, first)
    }

    fn record(
        &mut self,
        ai: usize,
        positions: &[usize],
        r: BatchResult,
        seconds: f64,
    ) -> Result<()> {
        let BatchResult {
            adv,
            norms,
            claimed,
            grad,
        } = r;
        let first = positions[0];
        let draws = draw(
            self.model,
            &adv,
            self.config.draws,
            self.config.seed,
            ai,
            first,
        )?;
        let adv_cpu = adv.to_device(Device::Cpu);
        let pos = index_tensor(positions);
        let (file, tensors) = if self.config.cascade {
            let name = self.config.attacks[ai].label();
            (
                format!("{ai:02}-{name}-{first:06}.safetensors"),
                vec![
                    ("positions".to_string(), pos.shallow_clone()),
                    ("images".to_string(), adv_cpu.shallow_clone()),
                ],
            )
        } else {
            (
                format!("{ai:02}-{first:06}.safetensors"),
                vec![("images".to_string(), adv_cpu.shallow_clone())],
            )
        };
        if let Some(dir) = self.state_dir {
            crate::io::write_safetensors(&dir.join(BATCHES).join(&file), &tensors)?;
        }
        let _ = self.x_adv[ai].index_copy_(0, &pos, &adv_cpu);
        let state = &mut *self.state;
        for (j, d) in draws.into_iter().enumerate() {
            let p = positions[j];
            state.done[ai][p] = Some(d);
            state.norms[ai][p] = norms[j];
            state.claimed[ai][p] = Some(claimed[j]);
        }
        state.grad[ai].add(grad);
        state.seconds[ai] += seconds;
        state.batches.push(file);
        save_state(self.state_dir, state)
    }
}

/// The state of an evaluation that starts now: the model's randomness measured, nothing done.
fn new_state(
    model: &dyn Model,
    x: &Tensor,
    config: &RobustConfig,
    shard: Option<Shard>,
    indices: &[usize],
) -> Result<State> {
    let n = indices.len();
    let (stochastic, change) = measure_randomness(model, x, config.batch_size, config.seed)?;
    let per_attack = config.attacks.len();
    Ok(State {
        config: config.clone(),
        shard,
        indices: indices.to_vec(),
        stochastic,
        max_logit_change: change,
        clean: vec![None; n],
        done: vec![vec![None; n]; per_attack],
        norms: vec![vec![0.0; n]; per_attack],
        claimed: vec![vec![None; n]; per_attack],
        grad: vec![GradStats::default(); per_attack],
        seconds: vec![0.0; per_attack],
        batches: Vec::new(),
        check_runs: Default::default(),
    })
}

/// The points are consistent (as many images, labels and indices; labels in the model's
/// range) and every attack has the model it needs; returns the number of points.
fn check_inputs(
    model: &dyn Model,
    surrogates: &Surrogates<'_>,
    points: &Points<'_>,
    config: &RobustConfig,
) -> Result<usize> {
    let Points { x, y, indices } = *points;
    let n = x.size()[0] as usize;
    if indices.len() != n || y.size() != [n as i64] {
        bail!(
            "{n} images, {} labels and {} indices",
            y.numel(),
            indices.len()
        );
    }
    if n == 0 {
        bail!("no images to evaluate");
    }
    let k = model.num_classes() as i64;
    let (lo, hi) = (y.min().int64_value(&[]), y.max().int64_value(&[]));
    if lo < 0 || hi >= k {
        bail!(
            "labels range over [{lo}, {hi}] but the model has {k} classes (expected 0..{})",
            k - 1
        );
    }
    for a in &config.attacks {
        match a.target {
            Target::Transfer if surrogates.classifier.is_none() => {
                bail!("a transfer attack needs the undefended classifier")
            }
            Target::Bpda if surrogates.bpda.is_none() => {
                bail!("a BPDA attack needs a defence stage to differentiate as the identity")
            }
            _ => {}
        }
    }
    Ok(n)
}

/// The batches this run (or shard) owns, as (start, length).
fn owned_batches(
    n: usize,
    config: &RobustConfig,
    shard: Option<Shard>,
) -> Result<Vec<(usize, usize)>> {
    let batches: Vec<(usize, usize)> = (0..n)
        .step_by(config.batch_size)
        .enumerate()
        .filter(|(b, _)| shard.is_none_or(|sh| sh.owns(*b)))
        .map(|(_, s)| (s, (n - s).min(config.batch_size)))
        .collect();
    if batches.is_empty() {
        bail!(
            "shard {} holds no batch: {n} points in batches of {} make only {} batches",
            shard.map_or(String::new(), |s| s.to_string()),
            config.batch_size,
            n.div_ceil(config.batch_size)
        );
    }
    Ok(batches)
}

/// Every attack's images: the clean ones, with the finished batches of the saved state copied
/// in (each re-checked against the budget).
fn replay(
    x: &Tensor,
    config: &RobustConfig,
    state: &State,
    state_dir: Option<&Path>,
) -> Result<Vec<Tensor>> {
    let slice = |t: &Tensor, s: usize, len: usize| t.narrow(0, s as i64, len as i64);
    let mut x_adv: Vec<Tensor> = config
        .attacks
        .iter()
        .map(|_| x.to_device(Device::Cpu).to_kind(Kind::Float).copy())
        .collect();
    for b in &state.batches {
        if config.cascade {
            let (ai, pos, images) = read_cascade_batch(state_dir, b, config, x)?;
            let _ = x_adv[ai].index_copy_(0, &pos, &images);
            continue;
        }
        // Checked against the run (attack, points, shape): a tampered file must not crash it.
        let (ai, s, images) = read_batch(state_dir, b, config, x)?;
        let len = images.size()[0] as usize;
        let xb = slice(x, s, len).to_device(Device::Cpu).to_kind(Kind::Float);
        // Resumed images are re-checked: a tampered or truncated file must not enter a report.
        check_budget(
            &images,
            &xb,
            &config.settings.budget,
            &format!("{} (resumed from {b})", config.attacks[ai].label()),
        )
        .with_context(|| {
            format!(
                "{}: the resume state is corrupt; delete {} to start over",
                batch_file(state_dir, b).display(),
                state_dir.map_or(Path::new("."), |d| d).display()
            )
        })?;
        x_adv[ai].narrow(0, s as i64, len as i64).copy_(&images);
    }
    Ok(x_adv)
}

/// The model an attack differentiates, with its measured randomness.
fn attacked_model<'a>(
    spec: &AttackSpec,
    model: &'a dyn Model,
    surrogates: &Surrogates<'a>,
    stochastic: bool,
    x: &Tensor,
    config: &RobustConfig,
) -> Result<Measured<'a>> {
    // Each attack follows the rule for random models where its model is measured random:
    // the whole model and its BPDA twin (the same forward pass) as measured above, the
    // classifier alone by its own measurement.
    Ok(match spec.target {
        Target::Whole => Measured {
            inner: model,
            stochastic,
        },
        Target::Bpda => Measured {
            inner: surrogates.bpda.expect("checked above"),
            stochastic,
        },
        Target::Transfer => {
            let f = surrogates.classifier.expect("checked above");
            Measured {
                inner: f,
                stochastic: measure_randomness(f, x, config.batch_size, config.seed)?.0,
            }
        }
    })
}

pub(super) fn finish(
    state: &State,
    labels: &[i64],
    owned: &[usize],
    model: &dyn Model,
    curves: CheckCurves,
    seconds: f64,
) -> Result<RobustEvaluation> {
    let take = |v: &Option<Draws>| v.clone().context("an unfinished batch");
    let records = owned
        .iter()
        .map(|&i| {
            Ok(PointRecord {
                position: i,
                index: state.indices[i],
                label: labels[i],
                clean: take(&state.clean[i])?,
                attacks: state
                    .done
                    .iter()
                    .map(|a| take(&a[i]))
                    .collect::<Result<_>>()?,
                perturbation_norms: state.norms.iter().map(|a| a[i]).collect(),
                claimed: state.claimed.iter().map(|a| a[i]).collect(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let per_attack = state
        .grad
        .iter()
        .copied()
        .zip(state.seconds.iter().copied())
        .collect();
    Ok(assemble(Parts {
        config: state.config.clone(),
        shard: state.shard,
        indices: state.indices.clone(),
        stochastic: state.stochastic,
        max_logit_change: state.max_logit_change,
        declared_stochastic: model.is_stochastic(),
        classes: model.num_classes(),
        records,
        per_attack,
        curves,
        seconds,
    }))
}

/// The checks that need their own PGD runs, on the first `check_points` points; each finished
/// run is saved in the state, so a resumed evaluation skips it.
pub(super) fn check_runs(
    model: &dyn Model,
    x: &Tensor,
    y: &Tensor,
    config: &RobustConfig,
    state: &mut State,
    state_dir: Option<&Path>,
) -> Result<CheckCurves> {
    let m = config.check_points.min(x.size()[0] as usize);
    if m == 0 {
        return Ok(CheckCurves::default());
    }
    let (x, y) = (x.narrow(0, 0, m as i64), y.narrow(0, 0, m as i64));
    let base = config.settings.for_attack(AttackName::Pgd);
    let eps = base.budget.eps;
    let steps = base.steps.unwrap_or(20);
    let eot = base.eot;
    let draws = config.draws;
    let mut runs: Vec<(String, AttackSettings, bool)> = Vec::new();
    for f in [0.25, 0.5, 1.0, 2.0] {
        let mut s = base.clone();
        s.budget.eps = eps * f;
        s.step_size = None;
        runs.push((format!("eps {:.6}", eps * f), s, false));
    }
    let mut unbounded = base.clone();
    // Linf 1 reaches every image; L2 and L1 reach it at the image's norm.
    unbounded.budget.eps = match base.budget.norm {
        crate::attacks::Norm::Linf => 1.0,
        _ => (x.numel() / m) as f64,
    };
    unbounded.step_size = None;
    runs.push(("eps unbounded".into(), unbounded, false));
    let mut twice = base.clone();
    twice.steps = Some(2 * steps);
    runs.push((format!("iterations {}", 2 * steps), twice, false));
    if state.stochastic {
        let mut more = base.clone();
        more.eot = 2 * eot;
        runs.push((format!("eot {}", 2 * eot), more, false));
        let mut one = base.clone();
        one.eot = 1;
        runs.push(("fixed draw".into(), one, true));
    }
    let bar = crate::progress::bar(runs.len() as u64, "check runs");
    for (name, settings, fixed) in &runs {
        if state.check_runs.contains_key(name) {
            bar.inc(1);
            continue;
        }
        let acc = if *fixed {
            let f = FixedDraw {
                inner: model,
                seed: (config.seed ^ 0x0F1D) as i64,
            };
            pgd_accuracy(&f, &f, &x, &y, settings, config, 1)?
        } else {
            pgd_accuracy(model, model, &x, &y, settings, config, draws)?
        };
        tracing::info!(
            "check run {name}: single-draw accuracy {:.2} %",
            100.0 * acc
        );
        state.check_runs.insert(name.clone(), acc);
        save_state(state_dir, state)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let get = |name: &str| state.check_runs.get(name).copied();
    let mut curves = CheckCurves {
        points: m,
        ..Default::default()
    };
    for (name, s, _) in &runs {
        let Some(acc) = get(name) else { continue };
        if name.starts_with("eps") {
            curves.eps.push((s.budget.eps, acc));
        }
    }
    // The base point of the iteration and EOT curves is the eps x 1 run.
    let at_eps = get(&format!("eps {eps:.6}"));
    if let Some(a) = at_eps {
        curves.iterations.push((steps as f64, a));
        curves.eot.push((eot as f64, a));
    }
    if let Some(a) = get(&format!("iterations {}", 2 * steps)) {
        curves.iterations.push((2.0 * steps as f64, a));
    }
    if let Some(a) = get(&format!("eot {}", 2 * eot)) {
        curves.eot.push((2.0 * eot as f64, a));
    }
    curves.fixed_draw = get("fixed draw");
    Ok(curves)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_needs_a_strict_plurality_of_the_truth() {
        let d = |p: &[i64]| Draws { preds: p.to_vec() };
        assert!(d(&[1, 1, 2]).majority_correct(1));
        assert!(!d(&[1, 2, 2]).majority_correct(1));
        // A tie is not a win.
        assert!(!d(&[1, 2]).majority_correct(1));
        // A plurality below one half still wins.
        assert!(d(&[1, 1, 2, 3, 4]).majority_correct(1));
        assert_eq!(d(&[3, 2, 2, 3]).plurality(), 2);
    }

    #[test]
    fn scores_follow_their_definitions() {
        // 4 points x 3 draws.
        let correct = vec![
            vec![true, true, true],
            vec![true, false, true],
            vec![false, false, true],
            vec![false, false, false],
        ];
        let majority = vec![true, true, false, false];
        let s = Scores::from(&correct, &majority);
        assert_eq!(s.worst_of_r.k, 1);
        assert_eq!(s.majority.k, 2);
        // Per draw: 2/4, 1/4, 3/4.
        assert!((s.single.value - 0.5).abs() < 1e-12);
        assert!((s.single_std - 0.25).abs() < 1e-12);
        assert!(s.worst_of_r.value <= s.single.value);
        assert!(s.single.lo < s.single.value && s.single.value < s.single.hi);
    }

    #[test]
    fn attack_lists_parse_with_transfer_and_refuse_repeats() {
        let mut s = AttackSettings::new(
            crate::attacks::Budget::new(crate::attacks::Norm::Linf, 0.03).unwrap(),
        );
        let a = parse_attacks("pgd, transfer ,apgd-dlr", &mut s).unwrap();
        let labels: Vec<String> = a.iter().map(AttackSpec::label).collect();
        assert_eq!(labels, ["pgd", "transfer-pgd", "apgd-dlr"]);
        assert!(
            parse_attacks("pgd,pgd", &mut s)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(parse_attacks("pgd,nope", &mut s).is_err());
        assert!(parse_attacks(" , ", &mut s).is_err());
        let mut s2 = s.clone();
        let rand = parse_attacks("autoattack-rand", &mut s2).unwrap();
        assert_eq!(rand.len(), 2);
        assert_eq!(s2.eot, 20);
    }
}
