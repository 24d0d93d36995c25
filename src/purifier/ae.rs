//! The AE purifier (DMAE-style, Wu et al. 2022): a ViT encoder over the visible patches of a
//! corrupted image and a light ViT decoder that reconstructs every patch. The corruption is the
//! random transform itself, drawn at the working size: its noise, and its block mask read as
//! the patches hidden from the encoder (the transform's grid is the patch grid, its
//! `missing_rate` the mask ratio). The network takes the visible patches from its caller
//! ([`AePurifier::pass`], or [`random_keep`] for the benches), so that a seeded draw and the
//! PyTorch twin (`bench/reference/ae.py`) see the same ones.
//!
//! Pre-LN transformer blocks (LayerNorm, multi-head self-attention, LayerNorm, GELU MLP, each
//! added to its input), learned position embeddings, a learned mask token, and a linear
//! prediction of each patch's pixels through tanh, mapped to [0, 1] like the GAN purifier's.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::transforms::{Resize, Resolution, TransformConfig, TransformKind, Transformed};

/// The architecture of an AE purifier and the side it works at. The share of hidden patches is
/// the transform's `missing_rate` (one setting for both purifier kinds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AeConfig {
    /// Side of a square patch, in pixels of the working size.
    pub patch: usize,
    /// Encoder width (embedding dimension), depth (blocks) and attention heads.
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    /// MLP hidden size as a multiple of the width (ViT: 4).
    pub mlp_ratio: usize,
    /// A global residual path for the visible patches: each is its (noisy) input plus the
    /// decoder's correction, clamped to the pixel range, while hidden patches are predicted
    /// whole (DMAE: off, every patch predicted whole). A trainability option like the GAN
    /// purifier's `residual`: the network starts near the identity on what it sees.
    pub residual: bool,
    /// Decoder width, depth and heads (MAE: a light decoder).
    pub decoder_width: usize,
    pub decoder_depth: usize,
    pub decoder_heads: usize,
    /// The side the transform is drawn at and the network runs at (its position embeddings are
    /// for this grid of patches): images are resized to it and the purified image back.
    pub work_size: usize,
    /// Resizing to the working size and back to the classifier's.
    pub resize_up: Resize,
    pub resize_down: Resize,
}

impl Default for AeConfig {
    /// A small CPU-sized network for 32 px images (8 x 8 patches of 4 px).
    fn default() -> Self {
        AeConfig {
            patch: 4,
            width: 128,
            depth: 4,
            heads: 4,
            mlp_ratio: 4,
            residual: false,
            decoder_width: 64,
            decoder_depth: 2,
            decoder_heads: 4,
            work_size: 32,
            resize_up: Resolution::default().up,
            resize_down: Resolution::default().down,
        }
    }
}

/// Bounds that keep a typo from allocating the machine away.
const MAX_WIDTH: usize = 4096;
const MAX_DEPTH: usize = 64;
/// Patches per image: attention is quadratic in them (4,096 = 1,024 px in 16 px patches, 16 x
/// ViT-B's 256 at 224-256 px).
const MAX_PATCHES: i64 = 4096;

impl AeConfig {
    /// Every setting in range; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let within = |name: &str, v: usize, hi: usize| -> Result<()> {
            if v == 0 || v > hi {
                bail!("ae {name} = {v}: expected 1 to {hi}");
            }
            Ok(())
        };
        within("patch", self.patch, 256)?;
        within("width", self.width, MAX_WIDTH)?;
        within("depth", self.depth, MAX_DEPTH)?;
        within("heads", self.heads, MAX_WIDTH)?;
        within("mlp_ratio", self.mlp_ratio, 16)?;
        within("decoder_width", self.decoder_width, MAX_WIDTH)?;
        within("decoder_depth", self.decoder_depth, MAX_DEPTH)?;
        within("decoder_heads", self.decoder_heads, MAX_WIDTH)?;
        for (name, width, heads) in [
            ("heads", self.width, self.heads),
            ("decoder_heads", self.decoder_width, self.decoder_heads),
        ] {
            if !width.is_multiple_of(heads) {
                bail!("ae {name} = {heads} does not divide its width {width}");
            }
        }
        if self.work_size == 0 || self.work_size > super::MAX_WORK_SIZE {
            bail!(
                "ae work_size = {}: expected 1 to {} pixels",
                self.work_size,
                super::MAX_WORK_SIZE
            );
        }
        self.grid(self.work_size as i64)?;
        Ok(())
    }

    pub fn resolution(&self) -> Resolution {
        Resolution {
            work_size: Some(self.work_size),
            up: self.resize_up,
            down: self.resize_down,
        }
    }

    /// Checks that images of `h` x `w` can be purified under `transform`: the working size is
    /// not below the images', and a masking transform's blocks are the patches.
    pub fn check_images(&self, h: i64, w: i64, transform: &TransformConfig) -> Result<()> {
        let r = self.resolution();
        r.check(h, w, self.patch as i64, "the ae patch")?;
        let side = self.work_size as i64;
        transform.validate(Some(side))?;
        let grid = self.grid(side)?;
        match transform.kind {
            TransformKind::Rt3 => bail!(
                "transform rt3 purifies several masked copies and assembles them; the AE purifier reconstructs every patch from one masking: use rt1, rt2, noise or none"
            ),
            TransformKind::Rt1 | TransformKind::Rt2 if transform.grid as i64 != grid => bail!(
                "transform grid = {}: the AE purifier hides whole patches, so the grid must be its {grid} patches per side ({side} px / patch {}): set the transform's grid to {grid}",
                transform.grid,
                self.patch
            ),
            _ => Ok(()),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "ae-purifier(patch {}, {} x {} heads {}, decoder {} x {} heads {}{}, {})",
            self.patch,
            self.width,
            self.depth,
            self.heads,
            self.decoder_width,
            self.decoder_depth,
            self.decoder_heads,
            if self.residual { ", residual" } else { "" },
            self.resolution().describe()
        )
    }

    /// Patches per side of a `side` px image: an error unless the patch divides it.
    pub fn grid(&self, side: i64) -> Result<i64> {
        let p = self.patch as i64;
        if side <= 0 || side % p != 0 {
            bail!(
                "a {side} px image is not divisible by the ae patch = {p}: choose a patch that divides the working size"
            );
        }
        let grid = side / p;
        if grid * grid > MAX_PATCHES {
            bail!(
                "a {side} px image in ae patch = {p} patches is {} patches, above {MAX_PATCHES} (attention grows with their square): choose a larger patch or a smaller working size",
                grid * grid
            );
        }
        Ok(grid)
    }
}

/// Visible patches of `patches` with `mask_ratio` of them hidden: at least one.
pub fn visible(patches: i64, mask_ratio: f64) -> i64 {
    ((patches as f64 * (1.0 - mask_ratio)).round() as i64).clamp(1, patches)
}

/// One pre-LN transformer block.
#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
}

fn layer_norm(p: nn::Path, dim: i64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        },
    )
}

impl Block {
    fn new(p: &nn::Path, width: i64, heads: i64, mlp_ratio: i64) -> Block {
        let lin = |name: &str, i: i64, o: i64| nn::linear(p / name, i, o, Default::default());
        Block {
            norm1: layer_norm(p / "norm1", width),
            qkv: lin("qkv", width, 3 * width),
            proj: lin("proj", width, width),
            norm2: layer_norm(p / "norm2", width),
            fc1: lin("fc1", width, mlp_ratio * width),
            fc2: lin("fc2", mlp_ratio * width, width),
            heads,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("tokens are B x N x C");
        let h = self.heads;
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x))
            .view([b, n, 3, h, c / h])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let scale = 1.0 / ((c / h) as f64).sqrt();
        let attn = (q.matmul(&k.transpose(-2, -1)) * scale).softmax(-1, Kind::Float);
        let y = attn.matmul(&v).transpose(1, 2).reshape([b, n, c]);
        let x = x + self.proj.forward(&y);
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x)).gelu("none"));
        x + m
    }
}

/// The network: patch embedding, encoder, decoder, patch prediction.
#[derive(Debug)]
pub struct AeNet {
    pub config: AeConfig,
    /// Patches per side.
    grid: i64,
    embed: nn::Linear,
    pos: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    to_decoder: nn::Linear,
    mask_token: Tensor,
    decoder_pos: Tensor,
    decoder_blocks: Vec<Block>,
    decoder_norm: nn::LayerNorm,
    head: nn::Linear,
}

impl AeNet {
    /// A freshly initialised network for `side` px images (the working size).
    pub fn new(p: &nn::Path, config: &AeConfig, side: i64) -> Result<AeNet> {
        config.validate()?;
        let grid = config.grid(side)?;
        let n = grid * grid;
        let (w, dw) = (config.width as i64, config.decoder_width as i64);
        let pixels = (config.patch * config.patch * 3) as i64;
        let ratio = config.mlp_ratio as i64;
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let enc = p / "encoder";
        let dec = p / "decoder";
        Ok(AeNet {
            config: config.clone(),
            grid,
            embed: nn::linear(&enc / "embed", pixels, w, Default::default()),
            pos: enc.var("pos", &[1, n, w], init),
            blocks: (0..config.depth)
                .map(|i| Block::new(&(&enc / "blocks" / i), w, config.heads as i64, ratio))
                .collect(),
            norm: layer_norm(&enc / "norm", w),
            to_decoder: nn::linear(&dec / "embed", w, dw, Default::default()),
            mask_token: dec.var("mask_token", &[1, 1, dw], init),
            decoder_pos: dec.var("pos", &[1, n, dw], init),
            decoder_blocks: (0..config.decoder_depth)
                .map(|i| {
                    Block::new(
                        &(&dec / "blocks" / i),
                        dw,
                        config.decoder_heads as i64,
                        ratio,
                    )
                })
                .collect(),
            decoder_norm: layer_norm(&dec / "norm", dw),
            // With the residual path a zero head starts at the identity on visible patches.
            head: nn::linear(
                &dec / "head",
                dw,
                pixels,
                if config.residual {
                    nn::LinearConfig {
                        ws_init: nn::Init::Const(0.0),
                        bs_init: Some(nn::Init::Const(0.0)),
                        bias: true,
                    }
                } else {
                    Default::default()
                },
            ),
        })
    }

    /// B x 3 x S x S -> B x N x (p * p * 3), patches in row-major order, pixels (row, column,
    /// channel) within a patch.
    fn patchify(&self, x: &Tensor) -> Tensor {
        let (b, p, g) = (x.size()[0], self.config.patch as i64, self.grid);
        x.view([b, 3, g, p, g, p])
            .permute([0, 2, 4, 3, 5, 1])
            .reshape([b, g * g, p * p * 3])
    }

    /// The inverse of [`AeNet::patchify`].
    fn unpatchify(&self, t: &Tensor) -> Tensor {
        let (b, p, g) = (t.size()[0], self.config.patch as i64, self.grid);
        t.view([b, g, g, p, p, 3])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, 3, g * p, g * p])
    }

    /// Reconstructs `x` (B x 3 x S x S in [0, 1], already corrupted by noise) from its visible
    /// patches `keep` (B x K patch indices, int64): every patch predicted, in [0, 1].
    pub fn forward(&self, x: &Tensor, keep: &Tensor) -> Tensor {
        let tokens = self.embed.forward(&self.patchify(&(x * 2.0 - 1.0))) + &self.pos;
        let (b, n, w) = tokens.size3().expect("B x N x C");
        let k = keep.size()[1];
        let index = keep.unsqueeze(-1);
        let mut h = tokens.gather(1, &index.expand([b, k, w], false), false);
        for block in &self.blocks {
            h = block.forward(&h);
        }
        let h = self.to_decoder.forward(&self.norm.forward(&h));
        let dw = h.size()[2];
        // Under autocast the encoder's tokens may be bf16: the mask token follows them.
        let full = self
            .mask_token
            .to_kind(h.kind())
            .expand([b, n, dw], false)
            .scatter(1, &index.expand([b, k, dw], false), &h);
        let mut d = full + &self.decoder_pos;
        for block in &self.decoder_blocks {
            d = block.forward(&d);
        }
        let head = self.head.forward(&self.decoder_norm.forward(&d));
        let mut pred = head.tanh();
        if self.config.residual {
            // Visible patches: their input plus a correction; hidden ones predicted whole.
            let seen = Tensor::zeros([b, n, 1], (head.kind(), head.device()))
                .scatter_value(1, &index, 1.0);
            let input = self.patchify(&(x * 2.0 - 1.0)).to_kind(head.kind());
            pred = &seen * (input + &head).clamp(-1.0, 1.0) + (seen.ones_like() - &seen) * pred;
        }
        (self.unpatchify(&pred) + 1.0) / 2.0
    }

    /// Patches per image.
    pub fn patches(&self) -> i64 {
        self.grid * self.grid
    }
}

/// An AE purifier: its network in one VarStore (no discriminator).
pub struct AePurifier {
    pub config: AeConfig,
    pub vs: nn::VarStore,
    pub net: AeNet,
}

impl AePurifier {
    pub fn new(config: AeConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let net = AeNet::new(&vs.root(), &config, config.work_size as i64)?;
        Ok(AePurifier { config, vs, net })
    }

    /// The patches the encoder sees under a drawn transform (B x K, sorted): those outside the
    /// block mask's holes (the transform's grid is the patch grid, [`AeConfig::check_images`]),
    /// every patch without a mask.
    pub fn visible_patches(&self, drawn: &Transformed) -> Tensor {
        let n = self.net.patches();
        let b = drawn.noisy.size()[0];
        let device = drawn.noisy.device();
        let mask = &drawn.masks[0];
        let p = self.config.patch as i64;
        let side = mask.size()[2];
        // One pixel per patch: 1 where the patch is a hole.
        let holes = mask
            .select(1, 0)
            .slice(1, 0, side, p)
            .slice(2, 0, side, p)
            .reshape([b, n]);
        // The draw's own count where it has one (no device sync); else counted on image 0.
        let hidden = match drawn.hidden {
            Some(k) => k as i64,
            None => holes.get(0).sum(Kind::Float).double_value(&[]).round() as i64,
        };
        if hidden == 0 {
            return Tensor::arange(n, (Kind::Int64, device)).expand([b, n], false);
        }
        // A stable sort puts the visible patches (0) first, in their order.
        holes
            .argsort_stable(true, 1, false)
            .narrow(1, 0, (n - hidden).max(1))
    }
}

/// `visible` patch indices of `n`, drawn uniformly without replacement for each of `b` images
/// (sorted), from torch's generator (seeded by the caller).
pub fn random_keep(b: i64, n: i64, visible: i64, device: tch::Device) -> Tensor {
    let order = Tensor::rand([b, n], (Kind::Float, device)).argsort(1, false);
    order.narrow(1, 0, visible).sort(1, false).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_out_of_range_are_refused_by_name() {
        let bad = |c: AeConfig| c.validate().unwrap_err().to_string();
        assert!(
            bad(AeConfig {
                heads: 3,
                ..Default::default()
            })
            .contains("heads = 3 does not divide")
        );
        assert!(
            bad(AeConfig {
                work_size: 30,
                ..Default::default()
            })
            .contains("not divisible by the ae patch = 4")
        );
        let rt2 = TransformConfig::default();
        let ae = AeConfig::default();
        let e = ae
            .check_images(
                32,
                32,
                &TransformConfig {
                    grid: 4,
                    ..rt2.clone()
                },
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("transform grid = 4") && e.contains("its 8 patches"),
            "{e}"
        );
        let e = ae
            .check_images(
                32,
                32,
                &TransformConfig {
                    kind: TransformKind::Rt3,
                    ..rt2.clone()
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("rt3"), "{e}");
        let e = ae.check_images(64, 64, &rt2).unwrap_err().to_string();
        assert!(e.contains("work_size 32 is smaller"), "{e}");
        ae.check_images(32, 32, &rt2).unwrap();
        assert!(
            bad(AeConfig {
                width: 0,
                ..Default::default()
            })
            .contains("width = 0")
        );
        let e = AeConfig::default().grid(30).unwrap_err().to_string();
        assert!(e.contains("not divisible by the ae patch = 4"), "{e}");
        let e = AeConfig::default().grid(4096).unwrap_err().to_string();
        assert!(e.contains("1048576 patches, above 4096"), "{e}");
        assert_eq!(AeConfig::default().grid(256).unwrap(), 64);
    }

    #[test]
    fn patches_round_trip_and_only_visible_patches_reach_the_encoder() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let cfg = AeConfig {
            width: 16,
            depth: 1,
            heads: 2,
            decoder_width: 8,
            decoder_depth: 1,
            decoder_heads: 2,
            ..Default::default()
        };
        let net = AeNet::new(&vs.root(), &cfg, 32).unwrap();
        let x = Tensor::rand([2, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
        assert!(net.unpatchify(&net.patchify(&x)).equal(&x));
        tch::manual_seed(0);
        let keep = random_keep(
            2,
            net.patches(),
            visible(net.patches(), 0.5),
            tch::Device::Cpu,
        );
        assert_eq!(keep.size(), [2, 32]);
        let out = net.forward(&x, &keep);
        assert_eq!(out.size(), [2, 3, 32, 32]);
        assert!(out.min().double_value(&[]) >= 0.0 && out.max().double_value(&[]) <= 1.0);
        // A hidden patch's pixels (of the first image) do not change the output.
        let hidden: Vec<i64> = (0..64)
            .filter(|i| !Vec::<i64>::try_from(keep.get(0)).unwrap().contains(i))
            .collect();
        let (row, col) = (hidden[0] / 8, hidden[0] % 8);
        let y = x.copy();
        let _ = y
            .narrow(0, 0, 1)
            .narrow(2, row * 4, 4)
            .narrow(3, col * 4, 4)
            .fill_(0.5);
        assert!(net.forward(&y, &keep).allclose(&out, 1e-6, 1e-6, false));
    }

    #[test]
    fn the_transforms_holes_are_the_hidden_patches() {
        let p = AePurifier::new(AeConfig::default(), tch::Device::Cpu).unwrap();
        let rt2 = TransformConfig::default();
        tch::manual_seed(3);
        let drawn = rt2.sample(&Tensor::rand(
            [5, 3, 32, 32],
            (Kind::Float, tch::Device::Cpu),
        ));
        let keep = p.visible_patches(&drawn);
        // 25 % of the 64 patches hidden: 48 visible, sorted, none of them under a hole.
        assert_eq!(keep.size(), [5, 48]);
        for i in 0..5 {
            let k = Vec::<i64>::try_from(keep.get(i)).unwrap();
            assert!(k.windows(2).all(|w| w[0] < w[1]));
            for patch in 0..64 {
                let hole = drawn.masks[0]
                    .get(i)
                    .get(0)
                    .get(patch / 8 * 4)
                    .get(patch % 8 * 4)
                    .double_value(&[])
                    > 0.5;
                assert_eq!(hole, !k.contains(&patch), "image {i} patch {patch}");
            }
        }
        // The draw's count and the one read off the mask give the same patches.
        assert_eq!(drawn.hidden, Some(16));
        let counted = Transformed {
            hidden: None,
            ..drawn
        };
        assert!(p.visible_patches(&counted).equal(&keep));
        let none = TransformConfig::with_kind(TransformKind::None).sample(&Tensor::rand(
            [2, 3, 32, 32],
            (Kind::Float, tch::Device::Cpu),
        ));
        assert_eq!(p.visible_patches(&none).size(), [2, 64]);
    }
}
