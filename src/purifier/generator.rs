//! The DeepFillv2 generator (Yu et al. 2019) as AToP uses it: a coarse encoder-decoder of gated
//! convolutions with a dilated bottleneck, then a fine stage with a dilated branch and a
//! contextual-attention branch. Width `c` (the paper's 48 gives 4,052,478 parameters).
//!
//! Input: the masked image in [-1,1], a ones channel and the mask (5 channels). Output: the
//! coarse image x1 and the fine image x2, both in [-1,1].
//!
//! [`Layout`] holds the authors' layout by default and four trainability options, each measured
//! in docs/purifier.md: one stride-2 stage instead of two (a finer bottleneck for small images),
//! skip connections from each encoder to its decoder (U-Net style, concatenated), group
//! normalisation of every gated layer's features, and a global residual path (each stage
//! outputs its input plus a correction, clamped to [-1,1], instead of tanh of the correction).

use tch::Tensor;
use tch::nn::{self, Module};

use super::layers::{Act, GatedConv, contextual_attention, copy_block, offsets, upsample2};

/// The generator's architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Width c, a positive multiple of 4.
    pub width: i64,
    pub attention: bool,
    /// Stride-2 stages of each encoder: 2 (DeepFillv2) or 1.
    pub stages: i64,
    pub skips: bool,
    pub norm: bool,
    pub residual: bool,
}

impl Layout {
    /// The authors' layout at width `c`.
    pub fn deepfill(c: i64) -> Self {
        Layout {
            width: c,
            attention: true,
            stages: 2,
            skips: false,
            norm: false,
            residual: false,
        }
    }

    /// Image sides must be multiples of this: the encoders halve `stages` times and the
    /// attention's matching halves once more.
    pub fn side_multiple(&self) -> i64 {
        1 << (self.stages + 1)
    }
}

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

struct Builder<'a> {
    layout: &'a Layout,
}

impl Builder<'_> {
    /// A gated conv with ELU features; `shape` is (kernel, stride, dilation).
    fn gated(
        &self,
        p: &nn::Path,
        name: &str,
        cin: i64,
        cout: i64,
        shape: (i64, i64, i64),
    ) -> GatedConv {
        let (k, stride, dil) = shape;
        GatedConv::new(
            p / name,
            cin,
            cout,
            k,
            stride,
            dil,
            Act::Elu,
            self.layout.norm,
        )
    }

    /// A 3x3 gated conv whose input is the concatenation of `parts` channels.
    fn joined(&self, p: &nn::Path, name: &str, parts: &[i64], cout: i64) -> GatedConv {
        self.gated(p, name, parts.iter().sum(), cout, (3, 1, 1))
            .joined(parts)
    }

    /// Encoder down to the bottleneck: a 5x5 gated conv to c/2 channels (full resolution), then
    /// two pairs ending at c (half resolution) and 2c channels; the first layer of each pair
    /// has stride 2, except the second pair's with one stage. Hidden widths differ between the
    /// stages of DeepFillv2 (coarse c and 2c; fine dilated branch c/2 and c; attention branch c/2
    /// and 2c).
    fn encoder(&self, p: &nn::Path, cin: i64, hidden: [i64; 2]) -> Vec<GatedConv> {
        let c = self.layout.width;
        let second = if self.layout.stages == 2 { 2 } else { 1 };
        vec![
            self.gated(p, "conv1", cin, c / 2, (5, 1, 1)),
            self.gated(p, "down1a", c / 2, hidden[0], (3, 2, 1)),
            self.gated(p, "down1b", hidden[0], c, (3, 1, 1)),
            self.gated(p, "down2a", c, hidden[1], (3, second, 1)),
            self.gated(p, "down2b", hidden[1], 2 * c, (3, 1, 1)),
        ]
    }

    /// Two up-sampling pairs of gated convs ending at c/4 channels, then the RGB conv. With skips
    /// the first layer of each pair also sees the encoder's features at its resolution.
    fn decoder(&self, p: &nn::Path) -> Decoder {
        let c = self.layout.width;
        let (s1, s2) = if self.layout.skips {
            (c, c / 2)
        } else {
            (0, 0)
        };
        Decoder {
            layers: [
                self.joined(p, "up1a", &parts(2 * c, s1), c),
                self.gated(p, "up1b", c, c, (3, 1, 1)),
                self.joined(p, "up2a", &parts(c, s2), c / 2),
                self.gated(p, "up2b", c / 2, c / 4, (3, 1, 1)),
            ],
            rgb: to_rgb(p / "to_rgb", c / 4),
        }
    }
}

/// The input parts of a layer that sees `a` channels, then `b` concatenated ones if any.
fn parts(a: i64, b: i64) -> Vec<i64> {
    if b > 0 { vec![a, b] } else { vec![a] }
}

#[derive(Debug)]
struct Decoder {
    layers: [GatedConv; 4],
    rgb: nn::Conv2D,
}

/// Encoder features kept for the skip connections: full resolution (after conv1) and half
/// resolution (after down1b).
type Skips = Option<[Tensor; 2]>;

/// Runs an encoder (and what follows it in `layers`), keeping the skip features if asked.
fn encode(layers: &[GatedConv], x: Tensor, keep: bool, apply: Apply) -> (Tensor, Skips) {
    if !keep {
        return (run(layers, x, apply), None);
    }
    let full = apply(&layers[0], &x);
    let half = run(&layers[1..3], full.shallow_clone(), apply);
    let out = run(&layers[3..], half.shallow_clone(), apply);
    (out, Some([full, half]))
}

/// The residual base a stage's output is added to, or None for tanh.
type Base<'a> = Option<&'a Tensor>;

impl Decoder {
    fn decode(&self, x: Tensor, stages: i64, skips: &Skips, base: Base, apply: Apply) -> Tensor {
        let cat = |x: Tensor, i: usize| match skips {
            Some(s) => Tensor::cat(&[&x, &s[i]], 1),
            None => x,
        };
        let x = if stages == 2 { upsample2(&x) } else { x };
        let x = run(&self.layers[..2], cat(x, 1), apply);
        let x = run(&self.layers[2..], cat(upsample2(&x), 0), apply);
        let rgb = self.rgb.forward(&x);
        match base {
            Some(b) => (b + rgb).clamp(-1.0, 1.0),
            None => rgb.tanh(),
        }
    }
}

#[derive(Debug)]
pub struct Generator {
    layout: Layout,
    coarse: Vec<GatedConv>,
    coarse_up: Decoder,
    /// Fine stage, dilated branch.
    dilated: Vec<GatedConv>,
    /// Fine stage, attention branch: encoder up to the ReLU-gated layer, then the two layers
    /// after the attention (None when attention is switched off: the branch is dropped and the
    /// merge sees the dilated branch only).
    attention: Option<(Vec<GatedConv>, [GatedConv; 2])>,
    merge: [GatedConv; 2],
    fine_up: Decoder,
}

impl Generator {
    /// The layout's width must be a positive multiple of 4 and its stages 1 or 2 (checked by
    /// the purifier settings).
    pub fn new(p: &nn::Path, layout: Layout) -> Self {
        let c = layout.width;
        let b = Builder { layout: &layout };
        let cp = p / "coarse";
        let mut coarse = b.encoder(&cp, 5, [c, 2 * c]);
        for (i, d) in [1, 2, 4, 8, 16, 1, 1].into_iter().enumerate() {
            coarse.push(b.gated(
                &cp,
                &format!("bottleneck{}", i + 1),
                2 * c,
                2 * c,
                (3, 1, d),
            ));
        }
        let coarse_up = b.decoder(&cp);

        let fp = p / "fine";
        let dp = &fp / "dilated";
        let mut dilated = b.encoder(&dp, 3, [c / 2, c]);
        for (i, d) in [1, 2, 4, 8, 16].into_iter().enumerate() {
            dilated.push(b.gated(
                &dp,
                &format!("bottleneck{}", i + 1),
                2 * c,
                2 * c,
                (3, 1, d),
            ));
        }
        let attention = layout.attention.then(|| {
            let ap = &fp / "attention";
            let mut before = b.encoder(&ap, 3, [c / 2, 2 * c]);
            before.push(GatedConv::new(
                &ap / "relu",
                2 * c,
                2 * c,
                3,
                1,
                1,
                Act::Relu,
                layout.norm,
            ));
            let after = [
                b.gated(&ap, "after1", 2 * c, 2 * c, (3, 1, 1)),
                b.gated(&ap, "after2", 2 * c, 2 * c, (3, 1, 1)),
            ];
            (before, after)
        });
        let merged = parts(2 * c, if attention.is_some() { 2 * c } else { 0 });
        let merge = [
            b.joined(&fp, "merge1", &merged, 2 * c),
            b.gated(&fp, "merge2", 2 * c, 2 * c, (3, 1, 1)),
        ];
        let fine_up = b.decoder(&fp);
        Generator {
            layout,
            coarse,
            coarse_up,
            dilated,
            attention,
            merge,
            fine_up,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Every gated layer, in a fixed order (the same for every width of one layout).
    fn gated_layers(&self) -> Vec<&GatedConv> {
        let mut all: Vec<&GatedConv> = self.coarse.iter().collect();
        all.extend(&self.coarse_up.layers);
        all.extend(&self.dilated);
        if let Some((before, after)) = &self.attention {
            all.extend(before);
            all.extend(after);
        }
        all.extend(&self.merge);
        all.extend(&self.fine_up.layers);
        all
    }

    /// Function-preserving widening (in the spirit of Net2Net, Chen et al. 2016): sets this
    /// generator's weights so that it computes exactly what `narrow` computes, `narrow` being
    /// the same layout at a smaller width. The extra channels start at zero and learn from the
    /// next step on, so fine-tuning starts from the pre-trained function with more capacity.
    /// (Except behind the attention branch's ReLU-gated layer, whose gradient at zero is zero:
    /// its extra channels stay off.)
    pub fn widen_from(&self, narrow: &Generator) -> anyhow::Result<()> {
        let (w, n) = (self.layout, narrow.layout);
        if (Layout {
            width: w.width,
            ..n
        }) != w
            || w.width < n.width
        {
            anyhow::bail!(
                "cannot widen a generator of layout {n:?} into one of layout {w:?}: only the width may grow"
            );
        }
        for (wide, small) in self.gated_layers().into_iter().zip(narrow.gated_layers()) {
            wide.widen_from(small)?;
        }
        // The RGB convs read the last decoder layer's c/4 channels, the extra ones all zero.
        for (wide, small) in [
            (&self.coarse_up.rgb, &narrow.coarse_up.rgb),
            (&self.fine_up.rgb, &narrow.fine_up.rgb),
        ] {
            let cols = offsets(&[n.width / 4], &[w.width / 4]);
            tch::no_grad(|| copy_block(wide, small, &[(0, 0, 3)], &cols));
        }
        Ok(())
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
        let Layout {
            stages,
            skips,
            residual,
            ..
        } = self.layout;
        let ones = mask.ones_like();
        let masked = image * (&ones - mask);
        let input = Tensor::cat(&[&masked, &ones, mask], 1);
        let (coarse, coarse_skips) = encode(&self.coarse, input, skips, apply);
        let x1 = self.coarse_up.decode(
            coarse,
            stages,
            &coarse_skips,
            residual.then_some(&masked),
            apply,
        );
        // The fine stage sees the coarse result in the hole and the input elsewhere.
        let fine_in = &x1 * mask + &masked;
        let (a, fine_skips) = encode(&self.dilated, fine_in.shallow_clone(), skips, apply);
        let merged = match &self.attention {
            Some((before, after)) => {
                let f = run(before, fine_in.shallow_clone(), apply);
                let b = run(after, contextual_attention(&f, mask), apply);
                Tensor::cat(&[a, b], 1)
            }
            None => a,
        };
        let merged = run(&self.merge, merged, apply);
        let x2 = self.fine_up.decode(
            merged,
            stages,
            &fine_skips,
            residual.then_some(&fine_in),
            apply,
        );
        (x1, x2)
    }
}
