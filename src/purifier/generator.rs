//! The DeepFillv2 generator (Yu et al. 2019) as AToP uses it: a coarse encoder-decoder of gated
//! convolutions with a dilated bottleneck, then a fine stage with a dilated branch and a
//! contextual-attention branch. Width `c` (the paper's 48 gives 4,052,478 parameters);
//! any input side divisible by 8.
//!
//! Input: the masked image in [-1,1], a ones channel and the mask (5 channels). Output: the
//! coarse image x1 and the fine image x2, both tanh in [-1,1].

use tch::Tensor;
use tch::nn::{self, Module};

use super::layers::{Act, GatedConv, contextual_attention, upsample2};

fn g(p: &nn::Path, name: &str, cin: i64, cout: i64, k: i64, stride: i64, dil: i64) -> GatedConv {
    GatedConv::new(p / name, cin, cout, k, stride, dil, Act::Elu)
}

/// Plain 3x3 convolution to RGB (the only ungated layers), followed by tanh in `forward`.
fn to_rgb(p: nn::Path, cin: i64) -> nn::Conv2D {
    nn::conv2d(
        p,
        cin,
        3,
        3,
        nn::ConvConfig {
            padding: 1,
            ..Default::default()
        },
    )
}

/// How the forward pass applies each gated layer: plainly, or with the data-dependent
/// initialisation first ([`Generator::normalise`]).
type Apply<'a> = &'a mut dyn FnMut(&GatedConv, &Tensor) -> Tensor;

fn run(layers: &[GatedConv], x: Tensor, apply: Apply) -> Tensor {
    layers.iter().fold(x, |x, l| apply(l, &x))
}

/// Encoder down to a quarter of the input side: a 5x5 gated conv to c/2 channels, then two
/// stride-2 stages ending at c and 2c channels, whose hidden widths differ between the stages of
/// DeepFillv2 (coarse c and 2c; fine dilated branch c/2 and c; attention branch c/2 and 2c).
fn encoder(p: &nn::Path, cin: i64, c: i64, hidden: [i64; 2]) -> Vec<GatedConv> {
    vec![
        g(p, "conv1", cin, c / 2, 5, 1, 1),
        g(p, "down1a", c / 2, hidden[0], 3, 2, 1),
        g(p, "down1b", hidden[0], c, 3, 1, 1),
        g(p, "down2a", c, hidden[1], 3, 2, 1),
        g(p, "down2b", hidden[1], 2 * c, 3, 1, 1),
    ]
}

/// Two nearest x2 up-samplings with two gated convs each, ending at c/4 channels.
fn decoder(p: &nn::Path, c: i64) -> [GatedConv; 4] {
    [
        g(p, "up1a", 2 * c, c, 3, 1, 1),
        g(p, "up1b", c, c, 3, 1, 1),
        g(p, "up2a", c, c / 2, 3, 1, 1),
        g(p, "up2b", c / 2, c / 4, 3, 1, 1),
    ]
}

fn decode(layers: &[GatedConv; 4], rgb: &nn::Conv2D, x: Tensor, apply: Apply) -> Tensor {
    let x = run(&layers[..2], upsample2(&x), apply);
    let x = run(&layers[2..], upsample2(&x), apply);
    rgb.forward(&x).tanh()
}

#[derive(Debug)]
pub struct Generator {
    coarse: Vec<GatedConv>,
    coarse_up: [GatedConv; 4],
    coarse_rgb: nn::Conv2D,
    /// Fine stage, dilated branch.
    dilated: Vec<GatedConv>,
    /// Fine stage, attention branch: encoder up to the ReLU-gated layer, then the two layers
    /// after the attention (None when attention is switched off: the branch is dropped and the
    /// merge sees the dilated branch only).
    attention: Option<(Vec<GatedConv>, [GatedConv; 2])>,
    merge: [GatedConv; 2],
    fine_up: [GatedConv; 4],
    fine_rgb: nn::Conv2D,
}

impl Generator {
    /// `c` must be a positive multiple of 4 (checked by the purifier settings).
    pub fn new(p: &nn::Path, c: i64, attention: bool) -> Self {
        let cp = p / "coarse";
        let mut coarse = encoder(&cp, 5, c, [c, 2 * c]);
        for (i, d) in [1, 2, 4, 8, 16, 1, 1].into_iter().enumerate() {
            coarse.push(g(
                &cp,
                &format!("bottleneck{}", i + 1),
                2 * c,
                2 * c,
                3,
                1,
                d,
            ));
        }
        let coarse_up = decoder(&cp, c);
        let coarse_rgb = to_rgb(&cp / "to_rgb", c / 4);

        let fp = p / "fine";
        let dp = &fp / "dilated";
        let mut dilated = encoder(&dp, 3, c, [c / 2, c]);
        for (i, d) in [1, 2, 4, 8, 16].into_iter().enumerate() {
            dilated.push(g(
                &dp,
                &format!("bottleneck{}", i + 1),
                2 * c,
                2 * c,
                3,
                1,
                d,
            ));
        }
        let attention = attention.then(|| {
            let ap = &fp / "attention";
            let mut before = encoder(&ap, 3, c, [c / 2, 2 * c]);
            before.push(GatedConv::new(
                &ap / "relu",
                2 * c,
                2 * c,
                3,
                1,
                1,
                Act::Relu,
            ));
            let after = [
                g(&ap, "after1", 2 * c, 2 * c, 3, 1, 1),
                g(&ap, "after2", 2 * c, 2 * c, 3, 1, 1),
            ];
            (before, after)
        });
        let merged_in = if attention.is_some() { 4 * c } else { 2 * c };
        let merge = [
            g(&fp, "merge1", merged_in, 2 * c, 3, 1, 1),
            g(&fp, "merge2", 2 * c, 2 * c, 3, 1, 1),
        ];
        let fine_up = decoder(&fp, c);
        let fine_rgb = to_rgb(&fp / "to_rgb", c / 4);
        Generator {
            coarse,
            coarse_up,
            coarse_rgb,
            dilated,
            attention,
            merge,
            fine_up,
            fine_rgb,
        }
    }

    /// `image` in [-1,1] (N x 3 x H x W, any pixels in the hole), `mask` N x 1 x H x W with
    /// 1 = hole. Returns (x1, x2) in [-1,1].
    pub fn forward(&self, image: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
        self.forward_with(image, mask, &mut |l, x| l.forward(x))
    }

    /// Data-dependent initialisation on a batch of generator inputs: every gated layer, in
    /// forward order, is rescaled so that its pre-activations on this batch have unit standard
    /// deviation ([`GatedConv::normalise`]). Returns the outputs of the rescaled generator.
    pub fn normalise(&self, image: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            self.forward_with(image, mask, &mut |l, x| {
                l.normalise(x);
                l.forward(x)
            })
        })
    }

    fn forward_with(&self, image: &Tensor, mask: &Tensor, apply: Apply) -> (Tensor, Tensor) {
        let masked = image * (mask.ones_like() - mask);
        let input = Tensor::cat(&[&masked, &mask.ones_like(), mask], 1);
        let coarse = run(&self.coarse, input, apply);
        let x1 = decode(&self.coarse_up, &self.coarse_rgb, coarse, apply);
        // The fine stage sees the coarse result in the hole and the input elsewhere.
        let fine_in = &x1 * mask + &masked;
        let a = run(&self.dilated, fine_in.shallow_clone(), apply);
        let merged = match &self.attention {
            Some((before, after)) => {
                let f = run(before, fine_in, apply);
                let b = run(after, contextual_attention(&f, mask), apply);
                Tensor::cat(&[a, b], 1)
            }
            None => a,
        };
        let merged = run(&self.merge, merged, apply);
        let x2 = decode(&self.fine_up, &self.fine_rgb, merged, apply);
        (x1, x2)
    }
}
