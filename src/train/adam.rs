//! Adam (Kingma & Ba 2015) with torch.optim.Adam's arithmetic, written here (like [`super::optim`])
//! so that its moments can be saved and a resumed run continues exactly.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::VarStore;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
}

fn default_eps() -> f64 {
    1e-8
}

impl Default for AdamConfig {
    /// DeepFillv2's and AToP's setting.
    fn default() -> Self {
        AdamConfig {
            lr: 1e-4,
            beta1: 0.5,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl AdamConfig {
    pub fn validate(&self, what: &str) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("{what}.lr = {}: expected a positive number", self.lr);
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("{what}.{name} = {b}: expected a number in [0, 1)");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("{what}.eps = {}: expected a positive number", self.eps);
        }
        Ok(())
    }
}

pub struct Adam {
    cfg: AdamConfig,
    params: Vec<(String, Tensor)>,
    /// First and second moments per parameter.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: i64,
}

impl Adam {
    pub fn new(vs: &VarStore, cfg: AdamConfig) -> Self {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let m = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let v = params.iter().map(|(_, p)| p.zeros_like()).collect();
        Adam {
            cfg,
            params,
            m,
            v,
            step: 0,
        }
    }

    /// Sets the learning rate of the next steps (schedules; the moments are unaffected).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in self.params.iter_mut() {
            p.zero_grad();
        }
    }

    /// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    /// p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps).
    pub fn step(&mut self) {
        self.step += 1;
        let AdamConfig {
            lr,
            beta1,
            beta2,
            eps,
        } = self.cfg;
        let c1 = 1.0 - beta1.powi(self.step as i32);
        let c2 = (1.0 - beta2.powi(self.step as i32)).sqrt();
        tch::no_grad(|| {
            for (((_, p), m), v) in self.params.iter_mut().zip(&mut self.m).zip(&mut self.v) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = m.g_mul_scalar_(beta1).g_add_(&(&g * (1.0 - beta1)));
                let _ = v.g_mul_scalar_(beta2).g_add_(&(g.square() * (1.0 - beta2)));
                let denom = v.sqrt() / c2 + eps;
                let _ = p.g_sub_(&(&*m / denom * (lr / c1)));
            }
        });
    }

    /// Moments and the step count as named tensors (`m.<param>`, `v.<param>`, `step`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu).contiguous();
        let mut out: Vec<(String, Tensor)> = Vec::new();
        for ((name, _), (m, v)) in self.params.iter().zip(self.m.iter().zip(&self.v)) {
            out.push((format!("m.{name}"), cpu(m)));
            out.push((format!("v.{name}"), cpu(v)));
        }
        out.push(("step".into(), Tensor::from_slice(&[self.step])));
        out
    }

    /// Restores a state saved by [`Adam::state`]; every parameter's moments must be present.
    pub fn load_state(&mut self, tensors: Vec<(String, Tensor)>) -> Result<()> {
        let mut seen = 0;
        for (name, t) in tensors {
            if name == "step" {
                self.step = t.int64_value(&[0]);
                continue;
            }
            let (slot, pname) = match name.split_once('.') {
                Some(("m", p)) => (0, p),
                Some(("v", p)) => (1, p),
                _ => bail!("optimizer state: unexpected tensor '{name}'"),
            };
            let Some(i) = self.params.iter().position(|(n, _)| n == pname) else {
                bail!("optimizer state: no parameter '{pname}' in this model");
            };
            let p = &self.params[i].1;
            if t.size() != p.size() {
                bail!(
                    "optimizer state: '{name}' has shape {:?}, the parameter has {:?}",
                    t.size(),
                    p.size()
                );
            }
            let t = t.to_device(p.device());
            if slot == 0 {
                self.m[i] = t;
            } else {
                self.v[i] = t;
            }
            seen += 1;
        }
        if seen != 2 * self.params.len() {
            bail!(
                "optimizer state: {seen} moment tensors for {} parameters (expected two each)",
                self.params.len()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module, OptimizerConfig};
    use tch::{Device, Kind};

    #[test]
    fn matches_libtorch_adam_and_resumes_exactly() {
        let make = || {
            let vs = VarStore::new(Device::Cpu);
            let net = nn::seq()
                .add(nn::linear(vs.root() / "a", 5, 7, Default::default()))
                .add_fn(|x| x.tanh())
                .add(nn::linear(vs.root() / "b", 7, 3, Default::default()));
            (vs, net)
        };
        let x = Tensor::randn([16, 5], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(3, [16], (Kind::Int64, Device::Cpu));
        let (vs1, net1) = make();
        let (mut vs2, net2) = make();
        vs2.copy(&vs1).unwrap();
        let cfg = AdamConfig {
            lr: 0.01,
            beta1: 0.5,
            beta2: 0.999,
            eps: 1e-8,
        };
        let mut ours = Adam::new(&vs1, cfg);
        let mut theirs = nn::Adam {
            beta1: 0.5,
            beta2: 0.999,
            wd: 0.0,
            eps: 1e-8,
            amsgrad: false,
        }
        .build(&vs2, 0.01)
        .unwrap();
        let loss = |net: &nn::Sequential| net.forward(&x).cross_entropy_for_logits(&y);
        for _ in 0..3 {
            ours.zero_grad();
            loss(&net1).backward();
            ours.step();
            theirs.backward_step(&loss(&net2));
        }
        // Save, restore into a fresh optimizer, continue: same as the uninterrupted libtorch run.
        let mut resumed = Adam::new(&vs1, cfg);
        resumed.load_state(ours.state()).unwrap();
        for _ in 0..3 {
            resumed.zero_grad();
            loss(&net1).backward();
            resumed.step();
            theirs.backward_step(&loss(&net2));
        }
        let v2 = vs2.variables();
        for (name, t) in vs1.variables() {
            let diff = (&t - &v2[&name]).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name}: {diff}");
        }
        let err = Adam::new(&vs1, cfg)
            .load_state(vec![(
                "m.nope".into(),
                Tensor::zeros([1], (Kind::Float, Device::Cpu)),
            )])
            .unwrap_err();
        assert!(err.to_string().contains("nope"));
    }
}
