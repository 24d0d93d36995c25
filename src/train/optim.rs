//! SGD with momentum (PyTorch semantics), written here rather than using tch's wrapper because
//! resuming a run needs the momentum buffers, which libtorch's optimizer does not expose.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::VarStore;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    pub momentum: f64,
    #[serde(default)]
    pub nesterov: bool,
    pub weight_decay: f64,
    /// Also decay BatchNorm weights and biases (1-D parameters); off by default.
    #[serde(default)]
    pub decay_bn_and_bias: bool,
    /// Learning-rate multiplier for 1-D parameters (biases, BatchNorm); their weight decay is
    /// divided by it, so the decay applied per step is the same as for the other parameters.
    #[serde(default = "one")]
    pub bias_lr_scale: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            decay_bn_and_bias: false,
            bias_lr_scale: 1.0,
        }
    }
}

pub struct Sgd {
    cfg: SgdConfig,
    /// Trainable parameters by name (shallow copies sharing storage with the VarStore).
    params: Vec<(String, Tensor)>,
    momentum: Vec<Option<Tensor>>,
}

impl Sgd {
    pub fn new(vs: &VarStore, cfg: SgdConfig) -> Self {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let momentum = params.iter().map(|_| None).collect();
        Sgd {
            cfg,
            params,
            momentum,
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in self.params.iter_mut() {
            p.zero_grad();
        }
    }

    /// One step: d = g + wd * p; buf = m * buf + d; p -= lr * (nesterov ? d + m * buf : buf).
    pub fn step(&mut self, lr: f64) {
        let cfg = &self.cfg;
        tch::no_grad(|| {
            for ((_, p), buf) in self.params.iter_mut().zip(self.momentum.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let scale = if p.dim() > 1 { 1.0 } else { cfg.bias_lr_scale };
                let decay = cfg.weight_decay > 0.0 && (cfg.decay_bn_and_bias || p.dim() > 1);
                let d = if decay {
                    &g + &*p * (cfg.weight_decay / scale)
                } else {
                    g
                };
                let update = if cfg.momentum > 0.0 {
                    let b = match buf {
                        Some(b) => {
                            let _ = b.g_mul_scalar_(cfg.momentum).g_add_(&d);
                            b
                        }
                        None => buf.insert(d.copy()),
                    };
                    if cfg.nesterov {
                        &d + &*b * cfg.momentum
                    } else {
                        b.shallow_clone()
                    }
                } else {
                    d
                };
                let _ = p.g_sub_(&(update * (lr * scale)));
            }
        });
    }

    /// Momentum buffers as named tensors, for the checkpoint (`momentum.<param>`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.momentum)
            .filter_map(|((name, _), b)| {
                b.as_ref().map(|b| {
                    let b = b.to_device(tch::Device::Cpu).contiguous();
                    (format!("momentum.{name}"), b)
                })
            })
            .collect()
    }

    /// Restores buffers saved by [`Sgd::state`]; names and shapes must match the parameters.
    pub fn load_state(&mut self, tensors: Vec<(String, Tensor)>) -> Result<()> {
        let device = self
            .params
            .first()
            .map(|(_, p)| p.device())
            .unwrap_or(tch::Device::Cpu);
        for (name, t) in tensors {
            let Some(pname) = name.strip_prefix("momentum.") else {
                bail!("optimizer state: unexpected tensor '{name}'");
            };
            let Some(i) = self.params.iter().position(|(n, _)| n == pname) else {
                bail!("optimizer state: no parameter '{pname}' in this model");
            };
            if t.size() != self.params[i].1.size() {
                bail!(
                    "optimizer state: '{name}' has shape {:?}, parameter has {:?}",
                    t.size(),
                    self.params[i].1.size()
                );
            }
            self.momentum[i] = Some(t.to_device(device));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module, OptimizerConfig};
    use tch::{Device, Kind};

    /// Same steps as libtorch's own SGD (tch::nn::Sgd), which follows torch.optim.SGD.
    fn compare(nesterov: bool) {
        let make = || {
            let vs = VarStore::new(Device::Cpu);
            let net = nn::seq()
                .add(nn::linear(vs.root() / "a", 5, 7, Default::default()))
                .add_fn(|x| x.relu())
                .add(nn::linear(vs.root() / "b", 7, 3, Default::default()));
            (vs, net)
        };
        let x = Tensor::randn([16, 5], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(3, [16], (Kind::Int64, Device::Cpu));
        let (vs1, net1) = make();
        let (mut vs2, net2) = make();
        // Same starting weights even if another test thread drew from the global generator.
        vs2.copy(&vs1).unwrap();
        let cfg = SgdConfig {
            momentum: 0.9,
            nesterov,
            weight_decay: 0.01,
            decay_bn_and_bias: true,
            bias_lr_scale: 1.0,
        };
        let mut ours = Sgd::new(&vs1, cfg);
        let mut theirs = nn::Sgd {
            momentum: 0.9,
            dampening: 0.0,
            wd: 0.01,
            nesterov,
        }
        .build(&vs2, 0.05)
        .unwrap();
        for _ in 0..5 {
            ours.zero_grad();
            net1.forward(&x).cross_entropy_for_logits(&y).backward();
            ours.step(0.05);
            theirs.backward_step(&net2.forward(&x).cross_entropy_for_logits(&y));
        }
        let v2 = vs2.variables();
        for (name, t) in vs1.variables() {
            let diff = (&t - &v2[&name]).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name}: {diff}");
        }
    }

    #[test]
    fn matches_libtorch_sgd() {
        compare(false);
        compare(true);
    }

    #[test]
    fn bias_lr_scale_multiplies_bias_steps_and_keeps_decay_per_step() {
        let vs = VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root(), 3, 2, Default::default());
        let mut opt = Sgd::new(
            &vs,
            SgdConfig {
                momentum: 0.0,
                weight_decay: 0.1,
                decay_bn_and_bias: true,
                bias_lr_scale: 8.0,
                ..Default::default()
            },
        );
        let (w0, b0) = (lin.ws.copy(), lin.bs.as_ref().unwrap().copy());
        let x = Tensor::ones([1, 3], (Kind::Float, Device::Cpu));
        opt.zero_grad();
        lin.forward(&x).sum(Kind::Float).backward();
        opt.step(0.01);
        // d(sum)/d(bias) = 1, d(sum)/d(w) = 1.
        let want_b = &b0 - (&b0 * (0.1 / 8.0) + 1.0) * (0.01 * 8.0);
        let want_w = &w0 - (&w0 * 0.1 + 1.0) * 0.01;
        let db = (lin.bs.as_ref().unwrap() - want_b)
            .abs()
            .max()
            .double_value(&[]);
        let dw = (&lin.ws - want_w).abs().max().double_value(&[]);
        assert!(db < 1e-6 && dw < 1e-6, "bias {db}, weight {dw}");
    }

    #[test]
    fn bn_and_bias_are_not_decayed_by_default() {
        let vs = VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root(), 2, 2, Default::default());
        let mut opt = Sgd::new(
            &vs,
            SgdConfig {
                momentum: 0.0,
                weight_decay: 0.5,
                ..Default::default()
            },
        );
        let before_b = lin.bs.as_ref().unwrap().copy();
        let before_w = lin.ws.copy();
        // Zero-loss gradient: only weight decay moves parameters.
        (lin.ws.sum(Kind::Float) * 0.0 + lin.bs.as_ref().unwrap().sum(Kind::Float) * 0.0)
            .backward();
        opt.step(1.0);
        assert!(lin.bs.as_ref().unwrap().equal(&before_b));
        assert!(lin.ws.allclose(&(before_w * 0.5), 1e-6, 1e-6, false));
    }

    #[test]
    fn state_round_trips() {
        let vs = VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root(), 2, 2, Default::default());
        let mut opt = Sgd::new(&vs, SgdConfig::default());
        lin.forward(&Tensor::ones([1, 2], (Kind::Float, Device::Cpu)))
            .sum(Kind::Float)
            .backward();
        opt.step(0.1);
        let state = opt.state();
        assert_eq!(state.len(), 2);
        let mut other = Sgd::new(&vs, SgdConfig::default());
        other.load_state(state).unwrap();
        assert!(
            other.momentum[0]
                .as_ref()
                .unwrap()
                .equal(opt.momentum[0].as_ref().unwrap())
        );
        let bad = vec![(
            "momentum.nope".to_string(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        )];
        assert!(
            other
                .load_state(bad)
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
    }
}
