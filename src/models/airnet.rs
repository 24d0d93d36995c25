//! `airnet-W1-W2-W3`: the small VGG-like network of Keller Jordan's CIFAR-10 speed runs
//! (airbench), chosen for the CPU presets because it reaches >90 % in a few epochs.
//!
//! Layout: a frozen 2x2 "whitening" convolution (filters set from the training data's patch
//! covariance, see [`AirNet::whiten_from`]), GELU, three groups of
//! `conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU`, a global max-pool, a bias-free
//! linear head whose logits are scaled by 1/9. BatchNorm has no scale (fixed at 1) and a
//! trainable bias; convolutions start as partial identities (Dirac init), which lets this
//! plain network train at a high learning rate without residual connections.

use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// 24 whitening filters: 12 eigen-directions of 2x2x3 patches and their negatives.
const WHITEN_OUT: i64 = 24;
const WHITEN_EPS: f64 = 5e-4;
const LOGIT_SCALE: f64 = 1.0 / 9.0;

#[derive(Debug)]
struct Norm {
    /// The fixed scale as a constant of ones, not None: CUDA's batch-norm backward returns an
    /// empty bias gradient when the weight is None ("invalid gradient at index 2"). Not a
    /// variable, so checkpoints keep their layout.
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl Norm {
    fn new(p: &nn::Path, c: i64) -> Norm {
        Norm {
            weight: Tensor::ones([c], (tch::Kind::Float, p.device())),
            bias: p.zeros("bias", &[c]),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        // Fast-moving statistics (PyTorch momentum 0.6): runs are only a few epochs long.
        Tensor::batch_norm(
            x,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            0.6,
            1e-12,
            false,
        )
    }
}

/// A 3x3 convolution whose first `min(cin, cout)` filters start as the identity.
fn dirac_conv(p: &nn::Path, cin: i64, cout: i64) -> nn::Conv2D {
    let conv = nn::conv2d(
        p,
        cin,
        cout,
        3,
        nn::ConvConfig {
            padding: 1,
            bias: false,
            ..Default::default()
        },
    );
    tch::no_grad(|| {
        let k = cin.min(cout);
        let mut head = conv.ws.narrow(0, 0, k);
        let _ = head.zero_();
        let idx = Tensor::arange(k, (Kind::Int64, conv.ws.device()));
        let one = Tensor::ones([k], (conv.ws.kind(), conv.ws.device()));
        let _ = head.index_put_(
            &[
                Some(idx.shallow_clone()),
                Some(idx),
                Some(Tensor::from(1i64)),
                Some(Tensor::from(1i64)),
            ],
            &one,
            false,
        );
    });
    conv
}

#[derive(Debug)]
struct Group {
    conv1: nn::Conv2D,
    norm1: Norm,
    conv2: nn::Conv2D,
    norm2: Norm,
}

impl Group {
    fn new(p: &nn::Path, cin: i64, cout: i64) -> Group {
        Group {
            conv1: dirac_conv(&(p / "conv1"), cin, cout),
            norm1: Norm::new(&(p / "norm1"), cout),
            conv2: dirac_conv(&(p / "conv2"), cout, cout),
            norm2: Norm::new(&(p / "norm2"), cout),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let h = x
            .apply(&self.conv1)
            .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        let h = self.norm1.forward_t(&h, train).gelu("none");
        self.norm2
            .forward_t(&h.apply(&self.conv2), train)
            .gelu("none")
    }
}

#[derive(Debug)]
pub struct AirNet {
    /// 24 x 3 x 2 x 2, not trained: set once from data by [`AirNet::whiten_from`].
    whiten: Tensor,
    groups: Vec<Group>,
    head: nn::Linear,
}

impl AirNet {
    pub fn new(p: &nn::Path, widths: [usize; 3], num_classes: usize) -> AirNet {
        // Until whitened from data the first layer is a fixed random projection.
        let whiten = (p / "whiten").var(
            "weight",
            &[WHITEN_OUT, 3, 2, 2],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.5,
            },
        );
        let _ = whiten.set_requires_grad(false);
        let mut cin = WHITEN_OUT;
        let mut groups = Vec::new();
        for (i, &w) in widths.iter().enumerate() {
            groups.push(Group::new(&(p / format!("group{}", i + 1)), cin, w as i64));
            cin = w as i64;
        }
        let head = nn::linear(
            p / "head",
            cin,
            num_classes as i64,
            nn::LinearConfig {
                bias: false,
                ..Default::default()
            },
        );
        AirNet {
            whiten,
            groups,
            head,
        }
    }
}

impl ModuleT for AirNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = x
            .conv2d(&self.whiten, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
            .gelu("none");
        for g in &self.groups {
            h = g.forward_t(&h, train);
        }
        h.adaptive_max_pool2d([1, 1])
            .0
            .flatten(1, -1)
            .apply(&self.head)
            * LOGIT_SCALE
    }
}

/// Whitening filters for normalised images `x` (N x 3 x H x W): the eigenvectors of the 2x2
/// patch covariance scaled by 1/sqrt(eigenvalue + eps), and their negatives.
pub fn whitening_filters(x: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let x = x.to_kind(Kind::Double);
        // N x 12 x L patches, channel-major (c, dy, dx) to match the conv weight layout.
        let patches = x.im2col([2, 2], [1, 1], [0, 0], [1, 1]);
        let patches = patches.transpose(1, 2).reshape([-1, 12]);
        let n = patches.size()[0] as f64;
        let centred = &patches - patches.mean_dim(0, true, Kind::Double);
        let cov = centred.transpose(0, 1).matmul(&centred) / n;
        let (eigvals, eigvecs) = cov.linalg_eigh("U");
        // Largest variance first; rows are the filters.
        let order = eigvals.argsort(0, true);
        let eigvals = eigvals.index_select(0, &order);
        let eigvecs = eigvecs.index_select(1, &order).transpose(0, 1);
        let scaled = eigvecs / (eigvals + WHITEN_EPS).sqrt().unsqueeze(1);
        let filters = Tensor::cat(&[&scaled, &(-&scaled)], 0);
        filters.view([WHITEN_OUT, 3, 2, 2]).to_kind(Kind::Float)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitened_patches_have_identity_covariance() {
        tch::manual_seed(0);
        // Correlated channels, so whitening has something to undo.
        let base = Tensor::randn([64, 1, 8, 8], (Kind::Float, tch::Device::Cpu));
        let x = Tensor::cat(
            &[
                &base,
                &(&base * 0.5 + Tensor::randn_like(&base) * 0.1),
                &(Tensor::randn_like(&base) * 3.0),
            ],
            1,
        );
        let w = whitening_filters(&x);
        assert_eq!(w.size(), vec![24, 3, 2, 2]);
        let out = x.conv2d(
            &w.narrow(0, 0, 12),
            None::<Tensor>,
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        );
        let flat = out.transpose(0, 1).reshape([12, -1]).to_kind(Kind::Double);
        let centred = &flat - flat.mean_dim(1, true, Kind::Double);
        let cov = centred.matmul(&centred.transpose(0, 1)) / flat.size()[1] as f64;
        // Decorrelated, with unit variance up to the eps regulariser (lambda / (lambda + eps)).
        let diag = cov.diagonal(0, 0, 1);
        let off = (&cov - diag.diag(0)).abs().max().double_value(&[]);
        assert!(off < 1e-6, "whitened channels still correlated: {off}");
        let (lo, hi) = (diag.min().double_value(&[]), diag.max().double_value(&[]));
        assert!(lo > 0.9 && hi <= 1.0 + 1e-9, "variances in [{lo}, {hi}]");
    }

    #[test]
    fn dirac_conv_is_identity_on_its_first_channels() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let conv = dirac_conv(&vs.root(), 4, 6);
        let x = Tensor::randn([2, 4, 5, 5], (Kind::Float, tch::Device::Cpu));
        let y = x.apply(&conv);
        let diff = (y.narrow(1, 0, 4) - &x).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "identity part differs by {diff}");
    }
}
