//! SN-PatchGAN (Yu et al. 2019): six 5x5 stride-2 spectrally normalised convolutions with
//! LeakyReLU(0.2) (the last included) over [image in [-1,1], mask]; every output value scores
//! one patch. Channels 4 -> w -> 2w -> 4w -> 4w -> 4w -> 4w (w = 64 in DeepFillv2).

use tch::Tensor;
use tch::nn;

use super::layers::SpectralConv;

#[derive(Debug)]
pub struct Discriminator {
    layers: Vec<SpectralConv>,
}

impl Discriminator {
    pub fn new(p: &nn::Path, width: i64) -> Self {
        let widths = [
            4,
            width,
            2 * width,
            4 * width,
            4 * width,
            4 * width,
            4 * width,
        ];
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| SpectralConv::new(p / format!("conv{}", i + 1), w[0], w[1], 5, 2))
            .collect();
        Discriminator { layers }
    }

    /// Patch scores, flattened per sample (N x K). `train` advances the spectral-norm power
    /// iteration.
    pub fn forward_t(&self, image: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let x = Tensor::cat(&[image, mask], 1);
        let x = self.layers.iter().fold(x, |x, l| {
            let y = l.forward_t(&x, train);
            y.maximum(&(&y * 0.2))
        });
        x.flatten(1, -1)
    }
}
