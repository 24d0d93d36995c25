//! An exponential moving average of a model's weights (Polyak averaging, as in the adversarial
//! training of Gowal et al. 2020 and timm's `ModelEma`): a shadow copy updated after every
//! optimizer step, `shadow <- shadow + (1 - d_t) (w - shadow)` with `d_t = min(d, (1 + t) /
//! (10 + t))`, so the first steps are not averaged against the starting weights for long. The
//! shadow is what a run exports; the live weights keep training.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::models::checkpoint;

/// The name of the update counter in [`Ema::live_state`]; a purifier loader given that file
/// skips it (it starts with [`crate::purifier::TRAINING_STATE_PREFIX`]).
const UPDATES: &str = "ema.updates";

pub struct Ema {
    decay: f64,
    /// Updates so far (the `t` of the warm-up).
    updates: u64,
    /// Averaged values by variable name, on the model's device.
    shadow: BTreeMap<String, Tensor>,
}

impl Ema {
    /// Starts the average at the current weights of `vs`.
    pub fn new(vs: &VarStore, decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            bail!("ema decay {decay}: expected a number in [0, 1)");
        }
        Ok(Ema {
            decay,
            updates: 0,
            shadow: copies(vs),
        })
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// This update's decay.
    fn current_decay(&self) -> f64 {
        let t = self.updates as f64;
        self.decay.min((1.0 + t) / (10.0 + t))
    }

    /// Moves the average toward the current weights of `vs` (after an optimizer step).
    pub fn update(&mut self, vs: &VarStore) {
        let w = 1.0 - self.current_decay();
        let vars = vs.variables();
        tch::no_grad(|| {
            for (k, s) in self.shadow.iter_mut() {
                if let Some(v) = vars.get(k) {
                    if v.is_floating_point() {
                        let _ = s.lerp_(&v.to_kind(s.kind()), w);
                    } else {
                        s.copy_(v);
                    }
                }
            }
        });
        self.updates += 1;
    }

    /// Runs `f` with the averaged weights in `vs`, then puts the live ones back (also when `f`
    /// fails).
    pub fn with_average<T>(&self, vs: &VarStore, f: impl FnOnce() -> T) -> T {
        let live = copies(vs);
        load_into(vs, &self.shadow);
        let out = f();
        load_into(vs, &live);
        out
    }

    /// What a checkpoint needs besides the averaged weights (which it stores as the model's
    /// own): the live weights of `vs` and the update count, on the CPU.
    pub fn live_state(&self, vs: &VarStore) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .map(|(k, t)| (k, t.detach().to_device(Device::Cpu)))
            .collect();
        out.push((UPDATES.into(), Tensor::from_slice(&[self.updates as i64])));
        out
    }

    /// Resumes from a checkpoint: `vs` holds its averaged weights (loaded as the model's own),
    /// `file` what [`Ema::live_state`] wrote. Afterwards the average is those weights and `vs`
    /// the live ones. Errors name the file.
    pub fn restore(&mut self, vs: &VarStore, file: &Path) -> Result<()> {
        let mut given: BTreeMap<String, Tensor> =
            checkpoint::read_tensors(file)?.into_iter().collect();
        let updates = given
            .remove(UPDATES)
            .with_context(|| format!("{}: no {UPDATES} entry", file.display()))?;
        let average = copies(vs);
        checkpoint::copy_into(
            vs,
            "generator (live weights)",
            given.into_iter().collect(),
            file,
        )?;
        self.shadow = average;
        self.updates = updates.to_kind(Kind::Int64).int64_value(&[0]).max(0) as u64;
        Ok(())
    }
}

/// Detached copies of the variables of `vs`, by name.
fn copies(vs: &VarStore) -> BTreeMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().copy()))
        .collect()
}

/// Copies `values` into the same-named variables of `vs`.
fn load_into(vs: &VarStore, values: &BTreeMap<String, Tensor>) {
    let mut vars = vs.variables();
    tch::no_grad(|| {
        for (k, t) in values {
            if let Some(v) = vars.get_mut(k) {
                v.copy_(t);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(v: f32) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let _ = vs.root().var("w", &[3], tch::nn::Init::Const(v as f64));
        vs
    }

    fn value(vs: &VarStore) -> f64 {
        vs.variables()["w"].double_value(&[0])
    }

    #[test]
    fn the_average_follows_the_weights_with_the_warmed_up_decay() {
        let vs = store(0.0);
        let mut ema = Ema::new(&vs, 0.9).unwrap();
        let mut expected = 0.0;
        for (t, w) in [1.0, 2.0, 4.0, 4.0, 4.0].into_iter().enumerate() {
            let _ = tch::no_grad(|| vs.variables()["w"].shallow_clone().fill_(w));
            let d = 0.9f64.min((1.0 + t as f64) / (10.0 + t as f64));
            expected = d * expected + (1.0 - d) * w;
            ema.update(&vs);
        }
        assert_eq!(ema.updates(), 5);
        // The live weights are untouched; the average is seen only inside with_average.
        assert_eq!(value(&vs), 4.0);
        let seen = ema.with_average(&vs, || value(&vs));
        assert!((seen - expected).abs() < 1e-6, "{seen} vs {expected}");
        assert!(seen > 0.0 && seen < 4.0);
        assert_eq!(value(&vs), 4.0);
    }

    #[test]
    fn a_restored_average_continues_where_it_stopped_and_a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vs = store(1.0);
        let mut ema = Ema::new(&vs, 0.99).unwrap();
        let _ = tch::no_grad(|| vs.variables()["w"].shallow_clone().fill_(3.0));
        ema.update(&vs);
        // The checkpoint as the trainer writes it: the average as the model's weights, the
        // live ones beside it.
        let file = dir.path().join("live.safetensors");
        crate::io::write_safetensors(&file, &ema.live_state(&vs)).unwrap();
        let average = ema.with_average(&vs, || value(&vs));
        let resumed = store(average as f32);
        let mut back = Ema::new(&resumed, 0.99).unwrap();
        back.restore(&resumed, &file).unwrap();
        assert_eq!(back.updates(), 1);
        assert_eq!(value(&resumed), 3.0);
        assert_eq!(back.with_average(&resumed, || value(&resumed)), average);
        for model in [(&mut ema, &vs), (&mut back, &resumed)] {
            model.0.update(model.1);
        }
        assert_eq!(
            ema.with_average(&vs, || value(&vs)),
            back.with_average(&resumed, || value(&resumed))
        );

        let other = VarStore::new(Device::Cpu);
        let _ = other.root().var("v", &[3], tch::nn::Init::Const(0.0));
        let mut foreign = Ema::new(&other, 0.99).unwrap();
        let err = format!("{:#}", foreign.restore(&other, &file).unwrap_err());
        assert!(err.contains("live.safetensors"), "{err}");
        assert!(Ema::new(&vs, 1.0).is_err());
    }
}
