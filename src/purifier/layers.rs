//! The building blocks of the DeepFillv2-style purifier: gated convolutions, contextual
//! attention and spectrally normalised convolutions.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Activation applied to the feature half of a gated convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Elu,
    Relu,
}

/// Gated convolution (Yu et al. 2019): one convolution produces 2C channels, split into
/// features and a gate; the output is act(features) * sigmoid(gate). Padding keeps the size
/// (dilation * (k - 1) / 2 on every side), so only the stride changes it.
/// With `norm`, the feature half is group-normalised before its activation (the gate is left
/// free to open and close).
#[derive(Debug)]
pub struct GatedConv {
    conv: nn::Conv2D,
    norm: Option<nn::GroupNorm>,
    out: i64,
    act: Act,
    /// Channel counts of the tensors concatenated into the input (one part unless the layer
    /// takes skip or branch features too), so that widening knows where each input sits.
    parts: Vec<i64>,
}

/// Groups of the feature normalisation: up to 8, dividing the channels.
fn groups(channels: i64) -> i64 {
    [8, 4, 2, 1]
        .into_iter()
        .find(|g| channels % g == 0)
        .unwrap_or(1)
}

impl GatedConv {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: nn::Path,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        dilation: i64,
        act: Act,
        norm: bool,
    ) -> Self {
        let cfg = nn::ConvConfig {
            stride,
            padding: dilation * (k - 1) / 2,
            dilation,
            // He (fan-out) initialisation, as the reference implementation uses.
            ws_init: nn::Init::Kaiming {
                dist: nn::init::NormalOrUniform::Uniform,
                fan: nn::init::FanInOut::FanOut,
                non_linearity: nn::init::NonLinearity::ReLU,
            },
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        let norm = norm.then(|| {
            nn::group_norm(
                &p / "norm",
                groups(cout),
                cout,
                nn::GroupNormConfig::default(),
            )
        });
        GatedConv {
            conv: nn::conv2d(p, cin, 2 * cout, k, cfg),
            norm,
            out: cout,
            act,
            parts: vec![cin],
        }
    }

    /// The same layer, its input declared as the concatenation of `parts` channels (in order).
    pub fn joined(mut self, parts: &[i64]) -> Self {
        debug_assert_eq!(parts.iter().sum::<i64>(), self.parts.iter().sum::<i64>());
        self.parts = parts.to_vec();
        self
    }

    /// Makes this layer compute what `narrow` computes on the channels the two share, while
    /// every channel this one has beyond `narrow`'s outputs exactly zero: `narrow`'s weights
    /// go to the rows and columns of the channels they belong to, and the feature half of each
    /// extra output channel gets zero weights and bias (ELU(0) = 0 whatever the gate says).
    /// The extra gates and the weights reading extra inputs keep their random initialisation,
    /// so the gradient reaches the zeroed features through them and the new channels learn.
    pub fn widen_from(&self, narrow: &GatedConv) -> anyhow::Result<()> {
        if self.norm.is_some() || narrow.norm.is_some() {
            anyhow::bail!(
                "group-normalised layers cannot be widened without changing their output (the groups change)"
            );
        }
        if self.parts.len() != narrow.parts.len()
            || self.parts.iter().zip(&narrow.parts).any(|(w, n)| w < n)
            || self.out < narrow.out
            || self.act != narrow.act
        {
            anyhow::bail!(
                "a layer of {:?} -> {} channels cannot hold one of {:?} -> {}",
                self.parts,
                self.out,
                narrow.parts,
                narrow.out
            );
        }
        // Output rows: the feature half, then the gate half, each at the start of its half.
        let rows = [(0, 0, narrow.out), (narrow.out, self.out, narrow.out)];
        tch::no_grad(|| {
            copy_block(
                &self.conv,
                &narrow.conv,
                &rows,
                &offsets(&narrow.parts, &self.parts),
            );
            let extra = self.out - narrow.out;
            if extra > 0 {
                let _ = self.conv.ws.narrow(0, narrow.out, extra).fill_(0.0);
                if let Some(b) = &self.conv.bs {
                    let _ = b.narrow(0, narrow.out, extra).fill_(0.0);
                }
            }
        });
        Ok(())
    }
}

/// (narrow offset, wide offset, length) of each input part.
pub(crate) fn offsets(narrow: &[i64], wide: &[i64]) -> Vec<(i64, i64, i64)> {
    let (mut a, mut b) = (0, 0);
    narrow
        .iter()
        .zip(wide)
        .map(|(&n, &w)| {
            let o = (a, b, n);
            (a, b) = (a + n, b + w);
            o
        })
        .collect()
}

/// Copies `from`'s weights and biases into `to` at the given (from, to, length) row and column
/// ranges.
pub(crate) fn copy_block(
    to: &nn::Conv2D,
    from: &nn::Conv2D,
    rows: &[(i64, i64, i64)],
    cols: &[(i64, i64, i64)],
) {
    for &(fr, tr, nr) in rows {
        for &(fc, tc, nc) in cols {
            to.ws
                .narrow(0, tr, nr)
                .narrow(1, tc, nc)
                .copy_(&from.ws.narrow(0, fr, nr).narrow(1, fc, nc));
        }
        if let (Some(t), Some(f)) = (&to.bs, &from.bs) {
            t.narrow(0, tr, nr).copy_(&f.narrow(0, fr, nr));
        }
    }
}

impl GatedConv {
    /// Data-dependent initialisation (in the spirit of LSUV, Mishkin & Matas 2016): rescales
    /// the feature and the gate halves of the weight so that, on `x`, each half's
    /// pre-activation has unit standard deviation. With the default He initialisation the
    /// signal of DeepFillv2 shrinks from layer to layer (sigmoid gates near 0.5, and dilated
    /// 3x3 kernels that mostly see padding on small maps), so a freshly initialised generator's
    /// output barely depends on its input (spread < 1e-4, a unit test).
    pub fn normalise(&self, x: &Tensor) {
        tch::no_grad(|| {
            let y = self.conv.forward(x);
            let y = match &self.conv.bs {
                Some(b) => y - b.view([1, -1, 1, 1]),
                None => y,
            };
            for (i, half) in y.split(self.out, 1).iter().enumerate() {
                let std = half.std(true).double_value(&[]);
                if std.is_finite() && std > 1e-12 {
                    let _ = self
                        .conv
                        .ws
                        .narrow(0, i as i64 * self.out, self.out)
                        .g_mul_scalar_(1.0 / std);
                }
            }
        });
    }
}

impl Module for GatedConv {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.conv.forward(x);
        let parts = y.split(self.out, 1);
        let features = match &self.norm {
            Some(n) => n.forward(&parts[0]),
            None => parts[0].shallow_clone(),
        };
        let features = match self.act {
            Act::Elu => features.elu(),
            Act::Relu => features.relu(),
        };
        features * parts[1].sigmoid()
    }
}

/// Nearest-neighbour up-sampling by 2.
pub fn upsample2(x: &Tensor) -> Tensor {
    let (h, w) = (x.size()[2], x.size()[3]);
    x.upsample_nearest2d([2 * h, 2 * w], None, None)
}

/// Contextual attention (Yu et al. 2018) within each image: every position of `features`
/// (N x C x h x w, h and w even) is rebuilt from 4x4 patches of the same map, weighted by a
/// softmax (scale 10) over the cosine-like similarity of 3x3 patches at half resolution.
/// Patches that touch the hole of `mask` (N x 1 x H x W, 1 = hole, H = 4h) are not used as
/// sources. Similarities are "fused" over neighbouring patch pairs, as in DeepFillv2, so
/// coherent regions are copied together. An image whose every patch touches the hole gets a
/// zero output. Differentiable in `features`.
pub fn contextual_attention(features: &Tensor, mask: &Tensor) -> Tensor {
    // The mask is sampled at the matching resolution (every 8 pixels after two stride-2 stages
    // and the halving here; every 4 after one).
    let (n, c, h, w) = features.size4().expect("features are N x C x h x w");
    let (hs, ws) = (h / 2, w / 2);
    let l = hs * ws;
    // 4x4 source patches at stride 2 (what gets pasted), C*16 x L per image.
    let raw = features.im2col([4, 4], [1, 1], [1, 1], [2, 2]);
    // Matching at half resolution: 3x3 patches, each scaled to unit norm.
    let small = features.slice(2, 0, h, 2).slice(3, 0, w, 2);
    let patches = small.im2col([3, 3], [1, 1], [1, 1], [1, 1]); // N x C*9 x L
    // max(|p|, 1e-4), clamped before the square root: an all-zero patch (common after the
    // ReLU-gated layer) would otherwise send 0 / 0 = NaN back through sqrt.
    let norms = patches
        .square()
        .sum_dim_intlist(1, true, Kind::Float)
        .clamp_min(1e-8)
        .sqrt();
    let kernels = &patches / norms;
    // scores[l, p]: source patch l against target position p (both row-major).
    let scores = kernels.transpose(1, 2).matmul(&patches); // N x L x L
    let scores = fuse(
        &fuse(&scores)
            .view([n, hs, ws, hs, ws])
            .permute([0, 2, 1, 4, 3])
            .reshape([n, l, l]),
    )
    .view([n, ws, hs, ws, hs])
    .permute([0, 2, 1, 4, 3])
    .reshape([n, l, l]);
    // Valid sources: 3x3 neighbourhoods of the sampled mask that hold no hole.
    let m = mask.to_kind(Kind::Float);
    let step = (m.size()[2] / hs).max(1);
    let m = m
        .slice(2, 0, m.size()[2], step)
        .slice(3, 0, m.size()[3], step);
    let valid = m
        .im2col([3, 3], [1, 1], [1, 1], [1, 1])
        .sum_dim_intlist(1, false, Kind::Float)
        .eq(0.0)
        .to_kind(features.kind())
        .view([n, l, 1]);
    let attention = (scores * &valid * 10.0).softmax(1, features.kind()) * &valid;
    let cols = raw.matmul(&attention); // N x C*16 x L
    let _ = c;
    cols.col2im([h, w], [4, 4], [1, 1], [1, 1], [2, 2]) / 4.0
}

/// Sums each score with its two diagonal neighbours in the (source, target) index plane, i.e.
/// s[l-1, p-1] + s[l, p] + s[l+1, p+1] (zero outside), a 3-tap identity-kernel convolution.
fn fuse(s: &Tensor) -> Tensor {
    let (_, l, p) = s.size3().expect("N x L x P");
    let padded = s.constant_pad_nd([1, 1, 1, 1]);
    padded.narrow(1, 0, l).narrow(2, 0, p) + s + padded.narrow(1, 2, l).narrow(2, 2, p)
}

/// A convolution whose weight is divided by its largest singular value (Miyato et al. 2018),
/// estimated by one power iteration per training-mode call with persistent vectors u and v
/// (torch.nn.utils.spectral_norm semantics: the stored weight is never rescaled, the gradient
/// flows through sigma).
#[derive(Debug)]
pub struct SpectralConv {
    pub weight: Tensor,
    pub bias: Tensor,
    u: Tensor,
    v: Tensor,
    stride: i64,
    padding: i64,
}

fn unit(t: &Tensor) -> Tensor {
    t / t.norm().clamp_min(1e-12)
}

impl SpectralConv {
    pub fn new(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> Self {
        let fan_in = (cin * k * k) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let weight = p.var(
            "weight_orig",
            &[cout, cin, k, k],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let bias = p.var(
            "bias",
            &[cout],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        // Power-iteration state: saved with the weights, never trained.
        let mut u = p.zeros_no_train("weight_u", &[cout]);
        let mut v = p.zeros_no_train("weight_v", &[cin * k * k]);
        tch::no_grad(|| {
            u.copy_(&unit(&u.randn_like()));
            v.copy_(&unit(&v.randn_like()));
        });
        SpectralConv {
            weight,
            bias,
            u,
            v,
            stride,
            padding: k / 2,
        }
    }

    /// sigma = u^T W v, after `iterations` power-iteration updates of u and v.
    pub fn sigma(&self, iterations: usize) -> Tensor {
        let wm = self.weight.view([self.weight.size()[0], -1]);
        if iterations > 0 {
            let (mut u, mut v) = (self.u.shallow_clone(), self.v.shallow_clone());
            tch::no_grad(|| {
                let wd = wm.detach();
                for _ in 0..iterations {
                    v.copy_(&unit(&wd.tr().mv(&u)));
                    u.copy_(&unit(&wd.mv(&v)));
                }
            });
        }
        self.u.dot(&wm.mv(&self.v))
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let sigma = self.sigma(usize::from(train));
        let w = &self.weight / sigma;
        x.conv2d(
            &w,
            Some(&self.bias),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn spectral_norm_state_is_saved_but_not_trained() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _conv = SpectralConv::new(vs.root() / "c", 2, 3, 5, 2);
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(
            names,
            ["c.bias", "c.weight_orig", "c.weight_u", "c.weight_v"]
        );
        let trained: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(trained, 3 * 2 * 25 + 3);
    }

    #[test]
    fn spectral_norm_sigma_matches_the_svd() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let conv = SpectralConv::new(vs.root() / "c", 8, 16, 5, 2);
        // Power iteration converges geometrically, slowly when the top singular values of a
        // random matrix are close: 1,000 training steps' worth.
        let sigma = conv.sigma(1000).double_value(&[]);
        let top = |w: &Tensor| w.view([16, -1]).svd(true, false).1.double_value(&[0]);
        let svd = top(&conv.weight);
        assert!(
            (sigma - svd).abs() / svd < 0.01,
            "power iteration {sigma}, SVD {svd}"
        );
        // The effective weight has spectral norm 1.
        let w = &conv.weight / conv.sigma(0);
        let top = top(&w);
        assert!((top - 1.0).abs() < 0.01, "{top}");
        // Evaluation mode leaves u and v alone.
        let before = conv.u.copy();
        let _ = conv.forward_t(
            &Tensor::rand([1, 8, 8, 8], (Kind::Float, Device::Cpu)),
            false,
        );
        assert!(conv.u.equal(&before));
        let _ = conv.forward_t(
            &Tensor::rand([1, 8, 8, 8], (Kind::Float, Device::Cpu)),
            true,
        );
        assert!(!conv.u.equal(&before) || conv.sigma(0).double_value(&[]) > 0.0);
    }

    #[test]
    fn contextual_attention_copies_the_matching_patch() {
        // An 8x8 feature map: pattern A at pixels (0..2, 0..2), an orthogonal pattern B at
        // (0..2, 2..4), both outside the hole, and a faint copy of B inside the hole at
        // (4..6, 4..6). The hole must be rebuilt from B, not from A.
        let c = 4;
        let cpu = (Kind::Float, Device::Cpu);
        let f = Tensor::zeros([1, c, 8, 8], cpu);
        let a = Tensor::from_slice(&[1.0f32, 1.0, 0.0, 0.0]).view([1, c, 1, 1]);
        let b = Tensor::from_slice(&[0.0f32, 0.0, 1.0, -1.0]).view([1, c, 1, 1]);
        let put = |top: i64, left: i64, v: &Tensor| {
            f.narrow(2, top, 2)
                .narrow(3, left, 2)
                .copy_(&v.expand([1, c, 2, 2], false));
        };
        put(0, 0, &a);
        put(0, 2, &b);
        put(4, 4, &(&b * 0.3));
        // The image-resolution mask (32x32): the bottom-right quadrant is the hole.
        let mask = Tensor::zeros([1, 1, 32, 32], cpu);
        let _ = mask.narrow(2, 16, 16).narrow(3, 16, 16).fill_(1.0);
        let out = contextual_attention(&f, &mask);
        assert_eq!(out.size(), [1, c, 8, 8]);
        let v = out.select(2, 5).select(2, 5).view([c]);
        let cos =
            |p: &Tensor| (v.dot(&p.view([c])) / (v.norm() * p.norm() + 1e-12)).double_value(&[]);
        assert!(cos(&b) > 0.9, "hole pixel {v} is not B (cos {})", cos(&b));
        assert!(cos(&a) < 0.3, "hole pixel {v} took A (cos {})", cos(&a));
        // All holes: no valid source, zero output.
        let out = contextual_attention(
            &f,
            &Tensor::ones([1, 1, 32, 32], (Kind::Float, Device::Cpu)),
        );
        assert_eq!(out.abs().max().double_value(&[]), 0.0);
        // No hole at all: plain self-attention, finite.
        let x = Tensor::randn([2, c, 8, 8], (Kind::Float, Device::Cpu));
        let out = contextual_attention(
            &x,
            &Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu)),
        );
        assert!(bool::try_from(out.isfinite().all()).unwrap());
    }

    #[test]
    fn contextual_attention_has_finite_gradients_on_all_zero_patches() {
        // ReLU-gated features are often exactly zero over a whole 3x3 patch; the patch norm's
        // gradient must stay finite there (it was 0 / 0 = NaN through sqrt, and a training run
        // diverged at step 88).
        let f = Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu));
        let _ = f.narrow(2, 0, 2).narrow(3, 0, 2).fill_(1.0);
        let f = f.set_requires_grad(true);
        let mask = Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu));
        let out = contextual_attention(&f, &mask);
        let g = Tensor::run_backward(&[out.sum(Kind::Float)], &[&f], false, false);
        assert!(
            bool::try_from(g[0].isfinite().all()).unwrap(),
            "NaN gradient"
        );
    }
}
