//! Runs a sequence of attacks the way AutoAttack does: each attack only sees the points that
//! are still robust, robust accuracy is recorded after each attack, and every sample keeps a
//! record of which attack broke it. Progress is saved after every batch (state.json plus one
//! safetensors file per batch), so an interrupted run continues where it stopped and reaches
//! the same result.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{AttackName, AttackSettings, GradStats};
use crate::models::{Measured, Model};

/// Named compositions.
pub const COMPOSITIONS: &[&str] = &["autoattack-standard", "autoattack-rand"];

/// Expands a comma-separated list of attacks and compositions, with the settings a
/// composition implies: AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square at the
/// settings' budgets, by default 100 iterations, 9 targets, 5,000 queries) and its rand version
/// (APGD-CE and APGD-DLR with EOT 20).
pub fn expand(list: &str, settings: &mut AttackSettings) -> Result<Vec<AttackName>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.to_ascii_lowercase().as_str() {
            "autoattack-rand" => {
                out.extend([AttackName::ApgdCe, AttackName::ApgdDlr]);
                if settings.eot == 1 {
                    settings.eot = 20;
                }
            }
            "autoattack-standard" => {
                if settings.budget.norm == super::Norm::L1 {
                    // AutoAttack's L1 version: APGD on the 3/2/1 eps schedule, APGD-CE with 5
                    // restarts, APGD-T with 5 targets.
                    let tweak = |attack, restarts, targets| super::AttackOverride {
                        restarts,
                        targets,
                        large_eps: Some(true),
                        ..super::AttackOverride::none(attack)
                    };
                    settings.overrides.extend([
                        tweak(AttackName::ApgdCe, Some(5), None),
                        tweak(AttackName::ApgdT, None, Some(5)),
                    ]);
                }
                out.extend([
                    AttackName::ApgdCe,
                    AttackName::ApgdT,
                    AttackName::FabT,
                    AttackName::Square,
                ]);
            }
            other => out.push(other.parse().map_err(anyhow::Error::msg)?),
        }
    }
    if out.is_empty() {
        bail!("--attack: no attack given");
    }
    Ok(out)
}

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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    config: RunnerConfig,
    records: Vec<SampleRecord>,
    steps: Vec<AttackStep>,
    /// Next attack to run (index in config.attacks).
    next_attack: usize,
    /// Positions (into records) the current attack still has to process.
    queue: Option<Vec<usize>>,
    /// Batch files written so far, in order.
    batches: Vec<String>,
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

const STATE: &str = "state.json";
const BATCHES: &str = "batches";

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
        cfg.settings.validate()?;
        if cfg.batch_size == 0 {
            bail!("batch_size = 0: expected at least 1");
        }
        let n = x.size()[0] as usize;
        if indices.len() != n || y.size() != [n as i64] {
            bail!(
                "{n} images, {} labels and {} indices",
                y.numel(),
                indices.len()
            );
        }
        let device = self.model.device();
        let k = self.model.num_classes() as i64;
        let (lo, hi) = (y.min().int64_value(&[]), y.max().int64_value(&[]));
        if n > 0 && (lo < 0 || hi >= k) {
            bail!(
                "labels range over [{lo}, {hi}] but the model has {k} classes (expected 0..{})",
                k - 1
            );
        }
        let started = Instant::now();
        let mut state = match self.load_state(y, indices)? {
            Some(s) => s,
            None => self.clean_pass(x, y, indices, device)?,
        };
        // The attacks follow the rule for random models where the model is measured random,
        // whatever it declares.
        let (stochastic, _) = super::select::measure_randomness(self.model, x, cfg.seed)?;
        let attacked = Measured {
            inner: self.model,
            stochastic,
        };
        // Images produced so far: start from clean, replay batch files in order (each checked:
        // a tampered or corrupt file must neither crash the run nor enter its report).
        let mut x_adv = x.to_device(Device::Cpu).to_kind(Kind::Float).copy();
        for b in &state.batches {
            let (pos, images) = self.read_batch(b, x)?;
            let _ = x_adv.index_copy_(0, &pos, &images);
        }
        let total_attacks = cfg.attacks.len();
        while state.next_attack < total_attacks {
            let ai = state.next_attack;
            let name = cfg.attacks[ai];
            let attack = cfg.settings.build(name)?;
            let queue = state.queue.get_or_insert_with(|| {
                (0..n)
                    .filter(|&i| state.records[i].broken_by.is_none())
                    .collect()
            });
            let bar = crate::progress::bar(
                queue.len() as u64,
                &format!("{} ({}/{})", attack.name(), ai + 1, total_attacks),
            );
            if state.steps.len() == ai {
                state.steps.push(AttackStep {
                    attack: name.to_string(),
                    robust_after: 0,
                    robust_accuracy: 0.0,
                    seconds: 0.0,
                    grad: GradStats::default(),
                    warning: None,
                });
            }
            loop {
                let queue = state.queue.as_mut().expect("set above");
                if queue.is_empty() {
                    break;
                }
                let t = Instant::now();
                let take = queue.len().min(cfg.batch_size);
                let chunk: Vec<usize> = queue[..take].to_vec();
                let pos = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>());
                let xb = x
                    .index_select(0, &pos.to_device(x.device()))
                    .to_device(device)
                    .to_kind(Kind::Float);
                let yb = y
                    .index_select(0, &pos.to_device(y.device()))
                    .to_device(device);
                // The seed depends on the attack and the first sample only, not on history.
                let seed =
                    cfg.seed ^ ((ai as u64) << 40) ^ (chunk[0] as u64).wrapping_mul(0x9E37_79B9);
                let BatchResult {
                    adv, norms, grad, ..
                } = attack_batch(attack.as_ref(), &attacked, (&xb, &yb), seed, &attack.name())?;
                let pred = tch::no_grad(|| self.model.logits(&adv)).argmax(-1, false);
                let pred = Vec::<i64>::try_from(pred.to_device(Device::Cpu))?;
                for (j, &p) in chunk.iter().enumerate() {
                    let r = &mut state.records[p];
                    r.adv_pred = pred[j];
                    r.perturbation_norm = norms[j];
                    if pred[j] != r.label {
                        r.broken_by = Some(name.to_string());
                    }
                }
                let file = format!("{ai:02}-{}-{:06}.safetensors", name, chunk[0]);
                let adv_cpu = adv.to_device(Device::Cpu);
                if self.state_dir.is_some() {
                    crate::io::write_safetensors(
                        &self.batch_path(&file),
                        &[
                            ("positions".into(), pos.shallow_clone()),
                            ("images".into(), adv_cpu.shallow_clone()),
                        ],
                    )?;
                }
                let _ = x_adv.index_copy_(0, &pos, &adv_cpu);
                state.batches.push(file);
                queue.drain(..take);
                let step = &mut state.steps[ai];
                step.grad.add(grad);
                step.seconds += t.elapsed().as_secs_f64();
                bar.inc(take as u64);
                self.save_state(&state)?;
            }
            bar.finish_and_clear();
            let robust = state
                .records
                .iter()
                .filter(|r| r.broken_by.is_none())
                .count();
            let step = &mut state.steps[ai];
            step.robust_after = robust;
            step.robust_accuracy = robust as f64 / n.max(1) as f64;
            let masked = step.grad.masked_fraction();
            if masked > 0.01 {
                step.warning = Some(format!(
                    "{:.1} % of gradient evaluations were zero or non-finite: a sign of gradient masking, not robustness; attack through the offending stage with BPDA, or average stochastic gradients with --eot",
                    100.0 * masked
                ));
            }
            tracing::info!(
                "{}: robust accuracy {:.2} % ({robust}/{n}) after {:.1} s",
                name,
                100.0 * step.robust_accuracy,
                step.seconds
            );
            if let Some(w) = &step.warning {
                tracing::warn!("{name}: {w}");
            }
            state.queue = None;
            state.next_attack += 1;
            self.save_state(&state)?;
        }
        let clean = state
            .records
            .iter()
            .filter(|r| r.clean_pred == r.label)
            .count();
        let robust = state
            .records
            .iter()
            .filter(|r| r.broken_by.is_none())
            .count();
        Ok(RobustReport {
            config: cfg.clone(),
            n,
            clean_accuracy: clean as f64 / n.max(1) as f64,
            robust_accuracy: robust as f64 / n.max(1) as f64,
            steps: state.steps,
            records: state.records,
            seconds: started.elapsed().as_secs_f64(),
            x_adv,
        })
    }

    fn clean_pass(
        &self,
        x: &Tensor,
        y: &Tensor,
        indices: &[usize],
        device: Device,
    ) -> Result<State> {
        let n = x.size()[0] as usize;
        let mut preds = Vec::with_capacity(n);
        for start in (0..n).step_by(self.config.batch_size.max(1)) {
            let len = (n - start).min(self.config.batch_size) as i64;
            let xb = x
                .narrow(0, start as i64, len)
                .to_device(device)
                .to_kind(Kind::Float);
            let logits = tch::no_grad(|| self.model.logits(&xb));
            if logits.size() != [len, self.model.num_classes() as i64] {
                bail!(
                    "the model returned logits of shape {:?} for {len} images; expected [{len}, {}]",
                    logits.size(),
                    self.model.num_classes()
                );
            }
            preds.extend(Vec::<i64>::try_from(
                logits.argmax(-1, false).to_device(Device::Cpu),
            )?);
        }
        let labels = Vec::<i64>::try_from(y.to_device(Device::Cpu))?;
        let records = (0..n)
            .map(|i| SampleRecord {
                index: indices[i],
                label: labels[i],
                clean_pred: preds[i],
                adv_pred: preds[i],
                broken_by: (preds[i] != labels[i]).then(|| "clean".to_string()),
                perturbation_norm: 0.0,
            })
            .collect();
        let state = State {
            config: self.config.clone(),
            records,
            steps: Vec::new(),
            next_attack: 0,
            queue: None,
            batches: Vec::new(),
        };
        self.save_state(&state)?;
        Ok(state)
    }

    fn batch_path(&self, file: &str) -> PathBuf {
        self.state_dir
            .as_deref()
            .unwrap_or(Path::new("."))
            .join(BATCHES)
            .join(file)
    }

    /// The saved state, if any, checked against this run: its settings, and everything in it
    /// that later code indexes with or reports (records, queue, steps, batch names).
    fn load_state(&self, y: &Tensor, indices: &[usize]) -> Result<Option<State>> {
        let Some(dir) = &self.state_dir else {
            return Ok(None);
        };
        let path = dir.join(STATE);
        let Some(state) = crate::io::read_json_opt::<State>(&path, "an attack state file")? else {
            return Ok(None);
        };
        if state.config != self.config {
            bail!(
                "{} holds an attack run with different settings (attacks, budget, seed, model or data); resume it with the same settings or choose another --out",
                path.display()
            );
        }
        let labels = Vec::<i64>::try_from(y.to_device(Device::Cpu))?;
        self.check_state(&state, &labels, indices)
            .map_err(|e| corrupt(&path, dir, e))?;
        if state.next_attack < state.config.attacks.len() {
            tracing::info!(
                "resuming {}: attack {}/{}",
                path.display(),
                state.next_attack + 1,
                state.config.attacks.len()
            );
        } else {
            tracing::info!("{}: all attacks already done", path.display());
        }
        Ok(Some(state))
    }

    /// What is wrong with a resumed `state` (settings already equal), in words.
    fn check_state(&self, state: &State, labels: &[i64], indices: &[usize]) -> Result<(), String> {
        let attacks = &self.config.attacks;
        let (n, k) = (indices.len(), self.model.num_classes() as i64);
        if state.records.len() != n {
            return Err(format!(
                "records holds {} entries but the run has {n} points",
                state.records.len()
            ));
        }
        if state.next_attack > attacks.len() {
            return Err(format!(
                "next_attack is {} but the run has {} attacks",
                state.next_attack,
                attacks.len()
            ));
        }
        // Attacks begun so far (the current one included while its queue is saved).
        let begun = state.next_attack + usize::from(state.queue.is_some());
        if begun > attacks.len() {
            return Err(format!(
                "queue is set but next_attack ({}) says every attack is done",
                state.next_attack
            ));
        }
        for (i, r) in state.records.iter().enumerate() {
            if r.index != indices[i] || r.label != labels[i] {
                return Err(format!(
                    "records[{i}] is dataset index {} with label {}, but point {i} is index {} with label {}",
                    r.index, r.label, indices[i], labels[i]
                ));
            }
            for (what, p) in [("clean_pred", r.clean_pred), ("adv_pred", r.adv_pred)] {
                if !(0..k).contains(&p) {
                    return Err(format!(
                        "records[{i}].{what} is {p}, outside the model's {k} classes"
                    ));
                }
            }
            let clean_broken = r.broken_by.as_deref() == Some("clean");
            if clean_broken != (r.clean_pred != r.label) {
                return Err(format!(
                    "records[{i}] has clean prediction {} for label {} but broken_by {:?}",
                    r.clean_pred, r.label, r.broken_by
                ));
            }
            if let Some(b) = &r.broken_by
                && !clean_broken
                && !attacks[..begun].iter().any(|a| a.to_string() == *b)
            {
                return Err(format!(
                    "records[{i}].broken_by is '{b}', neither 'clean' nor an attack run so far"
                ));
            }
            if !(r.perturbation_norm.is_finite() && r.perturbation_norm >= 0.0) {
                return Err(format!(
                    "records[{i}].perturbation_norm is {}",
                    r.perturbation_norm
                ));
            }
        }
        if let Some(queue) = &state.queue {
            let mut seen = vec![false; n];
            for &p in queue {
                if p >= n {
                    return Err(format!(
                        "queue holds position {p} but the run has {n} points"
                    ));
                }
                if std::mem::replace(&mut seen[p], true) {
                    return Err(format!("queue holds position {p} twice"));
                }
                if state.records[p].broken_by.is_some() {
                    return Err(format!(
                        "queue holds position {p}, a point already broken (records[{p}].broken_by)"
                    ));
                }
            }
        }
        if state.steps.len() != begun {
            return Err(format!(
                "steps holds {} entries but {begun} attacks have begun (next_attack {}, queue {})",
                state.steps.len(),
                state.next_attack,
                if state.queue.is_some() {
                    "set"
                } else {
                    "unset"
                }
            ));
        }
        for (i, s) in state.steps.iter().enumerate() {
            if s.attack != attacks[i].to_string()
                || s.robust_after > n
                || !(0.0..=1.0).contains(&s.robust_accuracy)
                || !(s.seconds.is_finite() && s.seconds >= 0.0)
            {
                return Err(format!(
                    "steps[{i}] (attack '{}', robust_after {}, robust_accuracy {}, seconds {}) does not fit attack {} of {n} points",
                    s.attack, s.robust_after, s.robust_accuracy, s.seconds, attacks[i]
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, b) in state.batches.iter().enumerate() {
            let ai = parse_batch_name(b, attacks).ok_or_else(|| {
                format!("batches[{i}] is '{b}', not a batch file name of this run")
            })?;
            if ai >= begun {
                return Err(format!(
                    "batches[{i}] ('{b}') is from attack {} but only {begun} attacks have begun",
                    ai + 1
                ));
            }
            if !names.insert(b.as_str()) {
                return Err(format!("batches lists '{b}' twice"));
            }
        }
        Ok(())
    }

    /// The positions and images of a batch file named in the state (its name already checked),
    /// validated against the run: positions in range and unique, one image per position of
    /// the points' shape, finite, in [0,1] and inside the attack's budget.
    fn read_batch(&self, file: &str, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let dir = self.state_dir.as_deref().unwrap_or(Path::new("."));
        let path = self.batch_path(file);
        let bad = |what: String| corrupt(&path, dir, what);
        let n = x.size()[0];
        let (ai, start) = parse_batch_name(file, &self.config.attacks)
            .zip(file.trim_end_matches(".safetensors").rsplit('-').next())
            .and_then(|(ai, s)| Some((ai, s.parse::<i64>().ok()?)))
            .ok_or_else(|| bad("not a batch file name of this run".into()))?;
        let t = crate::models::checkpoint::read_tensors(&path)?;
        let get = |name: &str| {
            t.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.shallow_clone())
                .ok_or_else(|| bad(format!("no tensor '{name}'")))
        };
        let (pos, images) = (get("positions")?, get("images")?);
        let len = pos.size().first().copied().unwrap_or(0);
        if pos.kind() != Kind::Int64
            || pos.dim() != 1
            || !(1..=self.config.batch_size as i64).contains(&len)
        {
            return Err(bad(format!(
                "positions are {:?} of shape {:?}; expected 1 to {} int64 positions",
                pos.kind(),
                pos.size(),
                self.config.batch_size
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
        if images.size() != want {
            return Err(bad(format!(
                "images have shape {:?}; expected {want:?} (one image per position)",
                images.size()
            )));
        }
        let images = images.to_kind(Kind::Float);
        if !bool::try_from(images.isfinite().all())? {
            return Err(bad("images hold NaN or infinite values".into()));
        }
        let clean = x
            .index_select(0, &pos.to_device(x.device()))
            .to_device(Device::Cpu)
            .to_kind(Kind::Float);
        let name = self.config.attacks[ai];
        let budget = self.config.settings.build(name)?.budget();
        check_budget(&images, &clean, &budget, &format!("{name} (resumed)"))
            .map_err(|e| bad(format!("images outside the threat model ({e})")))?;
        Ok((pos, images))
    }

    fn save_state(&self, state: &State) -> Result<()> {
        match &self.state_dir {
            Some(dir) => crate::io::write_json(&dir.join(STATE), state),
            None => Ok(()),
        }
    }
}

/// The error for a resumed file that does not fit the run.
fn corrupt(file: &Path, dir: &Path, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {what}: the resume state is corrupt; delete {} to start over",
        file.display(),
        dir.display()
    )
}

/// The attack index of a batch file name as the runner writes it
/// (`AA-ATTACK-SSSSSS.safetensors`), or None for anything else (paths included).
fn parse_batch_name(file: &str, attacks: &[AttackName]) -> Option<usize> {
    let stem = file.strip_suffix(".safetensors")?;
    let (ai, rest) = stem.split_once('-')?;
    let (name, start) = rest.rsplit_once('-')?;
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !ok(ai) || !ok(start) {
        return None;
    }
    let ai: usize = ai.parse().ok()?;
    start.parse::<u64>().ok()?;
    (attacks.get(ai)?.to_string() == name).then_some(ai)
}

/// One batch attacked.
pub struct BatchResult {
    /// The adversarial images, checked against the threat model.
    pub adv: Tensor,
    /// Their perturbation norms in the budget's norm.
    pub norms: Vec<f64>,
    /// What the attack claims of each image (see [`super::AttackOutput::claimed`]).
    pub claimed: Vec<f64>,
    pub grad: GradStats,
}

/// Attacks one batch; `what` names the attack in errors.
pub fn attack_batch(
    attack: &dyn super::Attack,
    model: &dyn Model,
    (x, y): (&Tensor, &Tensor),
    seed: u64,
    what: &str,
) -> Result<BatchResult> {
    let out = attack.run(model, x, y, seed)?;
    let adv = out.x_adv.detach().to_kind(Kind::Float);
    check_budget(&adv, x, &attack.budget(), what)?;
    let cpu = |t: &Tensor| Vec::<f64>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double));
    let norms = cpu(&attack.budget().norm.measure(&(&adv - x)))?;
    let claimed = cpu(&out.claimed)?;
    if claimed.len() != norms.len() {
        bail!(
            "{what} claimed {} results for {} images: this is a bug in the attack",
            claimed.len(),
            norms.len()
        );
    }
    Ok(BatchResult {
        adv,
        norms,
        claimed,
        grad: out.grad,
    })
}

/// Refuses results outside the threat model: an attack bug must never inflate a report.
pub fn check_budget(adv: &Tensor, x: &Tensor, budget: &super::Budget, name: &str) -> Result<()> {
    let (lo, hi) = (adv.min().double_value(&[]), adv.max().double_value(&[]));
    if lo < 0.0 || hi > 1.0 || lo.is_nan() || hi.is_nan() {
        bail!(
            "{name} returned pixels outside [0,1] (min {lo}, max {hi}): this is a bug in the attack"
        );
    }
    let worst = budget.norm.measure(&(adv - x)).max().double_value(&[]);
    // Float32 rounding of x + delta can exceed eps by an ulp.
    if worst > budget.eps * (1.0 + 1e-5) + 1e-6 {
        bail!(
            "{name} returned a perturbation of {} norm {worst} > eps {}: this is a bug in the attack",
            budget.norm,
            budget.eps
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attacks::{Budget, Norm};

    #[test]
    fn autoattack_compositions_expand_to_their_attacks_and_settings() {
        let mut s = AttackSettings::new(Budget::new(Norm::Linf, 8.0 / 255.0).unwrap());
        let list = expand("autoattack-standard", &mut s).unwrap();
        assert_eq!(
            list,
            [
                AttackName::ApgdCe,
                AttackName::ApgdT,
                AttackName::FabT,
                AttackName::Square
            ]
        );
        assert!(s.overrides.is_empty() && s.eot == 1 && !s.square_rescale);
        let list = expand("autoattack-rand", &mut s).unwrap();
        assert_eq!(list, [AttackName::ApgdCe, AttackName::ApgdDlr]);
        assert_eq!(s.eot, 20);
        // L1: APGD-CE with 5 restarts and APGD-T with 5 targets, both on the 3/2/1 eps
        // schedule; FAB-T keeps 1 restart and 9 targets.
        let mut s = AttackSettings::new(Budget::new(Norm::L1, 12.0).unwrap());
        expand("autoattack-standard", &mut s).unwrap();
        let ce = s.for_attack(AttackName::ApgdCe);
        assert_eq!((ce.restarts, ce.targets, ce.large_eps), (5, 9, true));
        let t = s.for_attack(AttackName::ApgdT);
        assert_eq!((t.restarts, t.targets, t.large_eps), (1, 5, true));
        let fab = s.for_attack(AttackName::FabT);
        assert_eq!((fab.restarts, fab.targets, fab.large_eps), (1, 9, false));
        assert!(s.build(AttackName::FabT).is_ok() && s.build(AttackName::ApgdT).is_ok());
    }
}
