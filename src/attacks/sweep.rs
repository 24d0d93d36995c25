//! The one loop that runs a list of attacks over points, batch by batch: each batch is
//! attacked, its result checked against the threat model, then handed to the caller's
//! [`Task`], which decides which points each attack sees (every point, or only those still
//! robust), which batches are already done (resume), the seed of each batch, and what to record
//! (scores, saved progress). The robust evaluation (`eval::robust`, of which `atop attack` is a
//! case) and the AToP trainer's per-epoch estimate ([`one_draw_cascade`]) are its two tasks.

use std::time::Instant;

use anyhow::{Result, bail};
use tch::{Device, Kind, Tensor};

use super::{Attack, AttackName, AttackSettings, GradStats};
use crate::models::{Measured, Model};

/// One attack of a sweep, with the model it differentiates.
pub struct Pass<'a> {
    /// Names the attack in progress bars and errors.
    pub label: String,
    pub attack: Box<dyn Attack>,
    pub model: Measured<'a>,
}

/// What a caller supplies to [`sweep`].
pub trait Task {
    /// The positions attack `ai` attacks, in order (called once per attack, after the previous
    /// attack finished); consecutive chunks of `batch_size` form its batches.
    fn queue(&mut self, ai: usize) -> Result<Vec<usize>>;
    /// Whether the batch of attack `ai` that starts at position `first` is already recorded.
    fn done(&self, ai: usize, first: usize) -> bool;
    /// The seed of that batch: it depends on the attack and the batch only, never on history,
    /// so a resumed run attacks exactly as an uninterrupted one.
    fn seed(&self, ai: usize, first: usize) -> u64;
    /// Records an attacked batch at `positions`.
    fn record(
        &mut self,
        ai: usize,
        positions: &[usize],
        result: BatchResult,
        seconds: f64,
    ) -> Result<()>;
}

/// Runs every pass over the points `x` (N x C x H x W in [0,1]) with labels `y`, in order.
pub fn sweep(
    passes: &[Pass<'_>],
    (x, y): (&Tensor, &Tensor),
    batch_size: usize,
    task: &mut dyn Task,
) -> Result<()> {
    if batch_size == 0 {
        bail!("batch_size = 0: expected at least 1");
    }
    for (ai, pass) in passes.iter().enumerate() {
        let queue = task.queue(ai)?;
        let todo: Vec<&[usize]> = queue
            .chunks(batch_size)
            .filter(|c| !task.done(ai, c[0]))
            .collect();
        if todo.is_empty() {
            continue;
        }
        let bar = crate::progress::bar(
            todo.iter().map(|c| c.len() as u64).sum(),
            &format!("{} ({}/{})", pass.label, ai + 1, passes.len()),
        );
        let device = pass.model.device();
        for chunk in todo {
            let t = Instant::now();
            let (xb, yb) = gather(chunk, x, y);
            let (xb, yb) = (
                xb.to_device(device).to_kind(Kind::Float),
                yb.to_device(device),
            );
            let seed = task.seed(ai, chunk[0]);
            // Attacks that draw nothing themselves (FGSM) still meet a random model: fix its
            // draws too.
            tch::manual_seed(seed as i64);
            let result = attack_batch(
                pass.attack.as_ref(),
                &pass.model,
                (&xb, &yb),
                seed,
                &pass.label,
            )?;
            task.record(ai, chunk, result, t.elapsed().as_secs_f64())?;
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
    }
    Ok(())
}

/// The images and labels at `positions`: a slice where they are consecutive, which keeps the
/// images' memory layout (a random model's draws fill it in memory order).
fn gather(positions: &[usize], x: &Tensor, y: &Tensor) -> (Tensor, Tensor) {
    let first = positions[0];
    if positions.iter().enumerate().all(|(j, &p)| p == first + j) {
        let len = positions.len() as i64;
        return (
            x.narrow(0, first as i64, len),
            y.narrow(0, first as i64, len),
        );
    }
    let pos = index_tensor(positions);
    (
        x.index_select(0, &pos.to_device(x.device())),
        y.index_select(0, &pos.to_device(y.device())),
    )
}

/// The seed of a batch: by the run's seed, the attack's slot and the batch's first position
/// only, never by history. (A cascade's slot is the attack's index; `eval robust`'s, one more.)
pub fn batch_seed(seed: u64, slot: usize, first: usize) -> u64 {
    seed ^ ((slot as u64) << 40) ^ (first as u64).wrapping_mul(0x9E37_79B9)
}

/// Positions as the int64 index tensor `index_select` and `index_copy_` take.
pub fn index_tensor(positions: &[usize]) -> Tensor {
    Tensor::from_slice(&positions.iter().map(|&i| i as i64).collect::<Vec<_>>())
}

/// One draw per image, in memory: the result of [`one_draw_cascade`].
pub struct OneDraw {
    /// Per point: the prediction on the clean image and on the returned image.
    pub clean_pred: Vec<i64>,
    pub adv_pred: Vec<i64>,
    /// Per point: right on the clean image and on every attack it met.
    pub robust: Vec<bool>,
    /// The returned images (the clean image where no attack broke the point), on the CPU.
    pub x_adv: Tensor,
}

/// The attacks in AutoAttack's order on the points `model` gets right, each judged by one
/// forward pass, nothing saved: a cheap estimate (the AToP trainer's per-epoch curve), never a
/// robustness claim on a random model (that is `eval robust`, R draws per image).
pub fn one_draw_cascade(
    model: &dyn Model,
    attacks: &[(AttackName, AttackSettings)],
    (x, y): (&Tensor, &Tensor),
    batch_size: usize,
    seed: u64,
) -> Result<OneDraw> {
    let n = x.size()[0] as usize;
    let device = model.device();
    let mut clean_pred = Vec::with_capacity(n);
    for start in (0..n).step_by(batch_size.max(1)) {
        let len = (n - start).min(batch_size) as i64;
        let xb = x
            .narrow(0, start as i64, len)
            .to_device(device)
            .to_kind(Kind::Float);
        let pred = tch::no_grad(|| model.logits(&xb)).argmax(-1, false);
        clean_pred.extend(Vec::<i64>::try_from(pred.to_device(Device::Cpu))?);
    }
    let labels = Vec::<i64>::try_from(y.to_device(Device::Cpu))?;
    let (stochastic, _) = super::select::measure_randomness(model, x, seed)?;
    let passes = attacks
        .iter()
        .map(|(name, settings)| {
            Ok(Pass {
                label: name.to_string(),
                attack: settings.build(*name)?,
                model: Measured {
                    inner: model,
                    stochastic,
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut task = InMemory {
        model,
        seed,
        robust: clean_pred
            .iter()
            .zip(&labels)
            .map(|(p, l)| p == l)
            .collect(),
        adv_pred: clean_pred.clone(),
        labels,
        x_adv: x.to_device(Device::Cpu).to_kind(Kind::Float).copy(),
    };
    sweep(&passes, (x, y), batch_size, &mut task)?;
    Ok(OneDraw {
        clean_pred,
        adv_pred: task.adv_pred,
        robust: task.robust,
        x_adv: task.x_adv,
    })
}

struct InMemory<'a> {
    model: &'a dyn Model,
    seed: u64,
    labels: Vec<i64>,
    robust: Vec<bool>,
    adv_pred: Vec<i64>,
    x_adv: Tensor,
}

impl Task for InMemory<'_> {
    fn queue(&mut self, _: usize) -> Result<Vec<usize>> {
        Ok((0..self.robust.len()).filter(|&i| self.robust[i]).collect())
    }
    fn done(&self, _: usize, _: usize) -> bool {
        false
    }
    fn seed(&self, ai: usize, first: usize) -> u64 {
        batch_seed(self.seed, ai, first)
    }
    fn record(&mut self, _: usize, positions: &[usize], r: BatchResult, _: f64) -> Result<()> {
        let pred = tch::no_grad(|| self.model.logits(&r.adv)).argmax(-1, false);
        let pred = Vec::<i64>::try_from(pred.to_device(Device::Cpu))?;
        for (j, &p) in positions.iter().enumerate() {
            self.adv_pred[p] = pred[j];
            self.robust[p] = pred[j] == self.labels[p];
        }
        let pos = index_tensor(positions);
        let _ = self
            .x_adv
            .index_copy_(0, &pos, &r.adv.to_device(Device::Cpu));
        Ok(())
    }
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
    attack: &dyn Attack,
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
