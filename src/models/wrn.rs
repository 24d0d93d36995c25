//! WideResNet-depth-widen for 32x32 inputs, laid out exactly as RobustBench's `WideResNet`
//! (the TRADES code): `conv1`, `block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}`,
//! `bn1`, `fc`. A RobustBench state dict therefore loads without renaming.

use tch::Tensor;
use tch::nn::{self, ModuleT};

use super::conv_cfg;

#[derive(Debug)]
struct Block {
    bn1: nn::BatchNorm,
    conv1: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv2: nn::Conv2D,
    /// 1x1 projection when the block changes width or resolution.
    shortcut: Option<nn::Conv2D>,
}

impl Block {
    fn new(p: &nn::Path, cin: i64, cout: i64, stride: i64) -> Block {
        Block {
            bn1: nn::batch_norm2d(p / "bn1", cin, Default::default()),
            conv1: nn::conv2d(p / "conv1", cin, cout, 3, conv_cfg(stride, 1)),
            bn2: nn::batch_norm2d(p / "bn2", cout, Default::default()),
            conv2: nn::conv2d(p / "conv2", cout, cout, 3, conv_cfg(1, 1)),
            shortcut: (cin != cout)
                .then(|| nn::conv2d(p / "convShortcut", cin, cout, 1, conv_cfg(stride, 0))),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        // Pre-activation; with a projection the shortcut also sees the activated input.
        let act = x.apply_t(&self.bn1, train).relu();
        let out = act
            .apply(&self.conv1)
            .apply_t(&self.bn2, train)
            .relu()
            .apply(&self.conv2);
        match &self.shortcut {
            Some(proj) => act.apply(proj) + out,
            None => x + out,
        }
    }
}

#[derive(Debug)]
pub struct WideResNet {
    conv1: nn::Conv2D,
    blocks: Vec<Block>,
    bn1: nn::BatchNorm,
    fc: nn::Linear,
}

impl WideResNet {
    pub fn new(p: &nn::Path, depth: usize, widen: usize, num_classes: usize) -> WideResNet {
        let n = (depth - 4) / 6;
        let k = widen as i64;
        let widths = [16, 16 * k, 32 * k, 64 * k];
        let mut blocks = Vec::new();
        for g in 0..3 {
            let group = p / format!("block{}", g + 1) / "layer";
            for i in 0..n {
                let cin = if i == 0 { widths[g] } else { widths[g + 1] };
                let stride = if i == 0 && g > 0 { 2 } else { 1 };
                blocks.push(Block::new(&(&group / i), cin, widths[g + 1], stride));
            }
        }
        let fc_cfg = nn::LinearConfig {
            bs_init: Some(nn::Init::Const(0.0)),
            ..Default::default()
        };
        WideResNet {
            conv1: nn::conv2d(p / "conv1", 3, 16, 3, conv_cfg(1, 1)),
            blocks,
            bn1: nn::batch_norm2d(p / "bn1", widths[3], Default::default()),
            fc: nn::linear(p / "fc", widths[3], num_classes as i64, fc_cfg),
        }
    }
}

impl ModuleT for WideResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = x.apply(&self.conv1);
        for b in &self.blocks {
            h = b.forward_t(&h, train);
        }
        h.apply_t(&self.bn1, train)
            .relu()
            .adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
            .apply(&self.fc)
    }
}
