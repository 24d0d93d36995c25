//! ResNet-18/34/50 with torchvision's parameter names (`conv1`, `bn1`, `layer{1..4}.{i}.{conv1,
//! bn1,conv2,bn2[,conv3,bn3],downsample.{0,1}}`, `fc`). The CIFAR stem is a 3x3 stride-1 conv
//! without max-pool; the ImageNet stem is torchvision's 7x7 stride-2 conv + 3x3 max-pool.

use tch::Tensor;
use tch::nn::{self, ModuleT};

use super::{Stem, conv_cfg};

#[derive(Debug)]
struct Block {
    convs: Vec<(nn::Conv2D, nn::BatchNorm)>,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl Block {
    /// Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 with 4x expansion; stride on the 3x3).
    fn new(p: &nn::Path, cin: i64, width: i64, stride: i64, bottleneck: bool) -> (Block, i64) {
        let bn = |name: &str, c: i64| nn::batch_norm2d(p / name, c, Default::default());
        let (convs, cout) = if bottleneck {
            let cout = width * 4;
            (
                vec![
                    (
                        nn::conv2d(p / "conv1", cin, width, 1, conv_cfg(1, 0)),
                        bn("bn1", width),
                    ),
                    (
                        nn::conv2d(p / "conv2", width, width, 3, conv_cfg(stride, 1)),
                        bn("bn2", width),
                    ),
                    (
                        nn::conv2d(p / "conv3", width, cout, 1, conv_cfg(1, 0)),
                        bn("bn3", cout),
                    ),
                ],
                cout,
            )
        } else {
            (
                vec![
                    (
                        nn::conv2d(p / "conv1", cin, width, 3, conv_cfg(stride, 1)),
                        bn("bn1", width),
                    ),
                    (
                        nn::conv2d(p / "conv2", width, width, 3, conv_cfg(1, 1)),
                        bn("bn2", width),
                    ),
                ],
                width,
            )
        };
        let downsample = (stride != 1 || cin != cout).then(|| {
            let d = p / "downsample";
            (
                nn::conv2d(&d / 0, cin, cout, 1, conv_cfg(stride, 0)),
                nn::batch_norm2d(&d / 1, cout, Default::default()),
            )
        });
        (Block { convs, downsample }, cout)
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut h = x.shallow_clone();
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            h = h.apply(conv).apply_t(bn, train);
            if i < last {
                h = h.relu();
            }
        }
        let skip = match &self.downsample {
            Some((conv, bn)) => x.apply(conv).apply_t(bn, train),
            None => x.shallow_clone(),
        };
        (h + skip).relu()
    }
}

#[derive(Debug)]
pub struct ResNet {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    max_pool: bool,
    blocks: Vec<Block>,
    fc: nn::Linear,
}

impl ResNet {
    pub fn new(p: &nn::Path, depth: usize, stem: Stem, num_classes: usize) -> ResNet {
        let (counts, bottleneck) = match depth {
            18 => ([2, 2, 2, 2], false),
            34 => ([3, 4, 6, 3], false),
            50 => ([3, 4, 6, 3], true),
            _ => unreachable!("depth validated by Arch::from_str"),
        };
        let conv1 = match stem {
            Stem::Cifar => nn::conv2d(p / "conv1", 3, 64, 3, conv_cfg(1, 1)),
            Stem::Imagenet => nn::conv2d(p / "conv1", 3, 64, 7, conv_cfg(2, 3)),
        };
        let mut blocks = Vec::new();
        let mut cin = 64;
        for (stage, &count) in counts.iter().enumerate() {
            let width = 64 << stage;
            for i in 0..count {
                let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                let (block, cout) = Block::new(
                    &(p / format!("layer{}", stage + 1) / i),
                    cin,
                    width,
                    stride,
                    bottleneck,
                );
                blocks.push(block);
                cin = cout;
            }
        }
        ResNet {
            conv1,
            bn1: nn::batch_norm2d(p / "bn1", 64, Default::default()),
            max_pool: stem == Stem::Imagenet,
            blocks,
            fc: nn::linear(p / "fc", cin, num_classes as i64, Default::default()),
        }
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = x.apply(&self.conv1).apply_t(&self.bn1, train).relu();
        if self.max_pool {
            h = h.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for b in &self.blocks {
            h = b.forward_t(&h, train);
        }
        h.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.fc)
    }
}
