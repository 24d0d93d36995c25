//! One purifier interface over the two kinds: [`PurifierConfig`] (the architecture, tagged by
//! `kind`) and [`Purifier`] (the weights). Everything outside this module takes these; only
//! here is it asked which kind a purifier is.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Deserializer, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::ae::{AeConfig, AePurifier};
use super::gan::{GanConfig, GanPurifier, count, purified_from};
use super::{DISCRIMINATOR, GENERATOR, PurifierSidecar, SIDECAR, TRAINING_STATE_PREFIX};
use crate::models::checkpoint::{self, CheckpointError};
use crate::runtime::{Precision, autocast};
use crate::transforms::{Resize, Resolution, TransformConfig, Transformed};

/// A purifier's architecture: its kind and that kind's settings. In JSON and TOML the kind is
/// the field `kind` (`"gan"` or `"ae"`); a description without one is a GAN (every checkpoint
/// written before the AE existed).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PurifierConfig {
    Gan(GanConfig),
    Ae(AeConfig),
}

/// The same enum with the tag required: what [`PurifierConfig`] deserialises through.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Tagged {
    Gan(GanConfig),
    Ae(AeConfig),
}

impl<'de> Deserialize<'de> for PurifierConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut v = serde_json::Value::deserialize(d)?;
        if let Some(fields) = v.as_object_mut() {
            fields.entry("kind").or_insert_with(|| "gan".into());
        }
        Ok(
            match Tagged::deserialize(v).map_err(serde::de::Error::custom)? {
                Tagged::Gan(g) => PurifierConfig::Gan(g),
                Tagged::Ae(a) => PurifierConfig::Ae(a),
            },
        )
    }
}

impl Default for PurifierConfig {
    fn default() -> Self {
        PurifierConfig::Gan(GanConfig::default())
    }
}

impl From<GanConfig> for PurifierConfig {
    fn from(g: GanConfig) -> Self {
        PurifierConfig::Gan(g)
    }
}

impl From<AeConfig> for PurifierConfig {
    fn from(a: AeConfig) -> Self {
        PurifierConfig::Ae(a)
    }
}

impl PurifierConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            PurifierConfig::Gan(_) => "gan",
            PurifierConfig::Ae(_) => "ae",
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            PurifierConfig::Gan(g) => g.validate(),
            PurifierConfig::Ae(a) => a.validate(),
        }
    }

    pub fn resolution(&self) -> Resolution {
        match self {
            PurifierConfig::Gan(g) => g.resolution(),
            PurifierConfig::Ae(a) => a.resolution(),
        }
    }

    /// Checks that images of `h` x `w` can be purified under `transform`.
    pub fn check_images(&self, h: i64, w: i64, transform: &TransformConfig) -> Result<()> {
        match self {
            PurifierConfig::Gan(g) => g.check_images(h, w, transform),
            PurifierConfig::Ae(a) => a.check_images(h, w, transform),
        }
    }

    /// An error when a caller asked for a working size other than the one this purifier was
    /// trained at (`origin` names the checkpoint).
    pub fn expect_work_size(&self, requested: Option<usize>, origin: &str) -> Result<()> {
        let own = self.resolution().work_size;
        match requested {
            Some(r) if Some(r) != own => bail!(
                "{origin} was trained at {}, not at the requested work size {r}: its weights are tuned to that resolution (retrain it at {r}, or drop the work-size request)",
                match own {
                    Some(s) => format!("work size {s}"),
                    None => "the images' own size (no work_size)".into(),
                }
            ),
            _ => Ok(()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PurifierConfig::Gan(g) => g.describe(),
            PurifierConfig::Ae(a) => a.describe(),
        }
    }

    /// The GAN settings, or an error saying that `what` needs a GAN purifier.
    pub fn gan(&self, what: &str) -> Result<&GanConfig> {
        match self {
            PurifierConfig::Gan(g) => Ok(g),
            PurifierConfig::Ae(_) => {
                bail!("{what} is defined for the GAN purifier; this purifier is an AE")
            }
        }
    }

    /// A short name for default run folders: `c48` (GAN width), `ae-w128` (AE width).
    pub fn label(&self) -> String {
        match self {
            PurifierConfig::Gan(g) => format!("c{}", g.width),
            PurifierConfig::Ae(a) => format!("ae-w{}", a.width),
        }
    }

    /// An error naming `setting` where it needs a discriminator this purifier does not have
    /// (`weight` > 0 of the GAN term).
    pub fn check_gan_weight(&self, setting: &str, weight: f64) -> Result<()> {
        if weight > 0.0 && matches!(self, PurifierConfig::Ae(_)) {
            bail!(
                "{setting} = {weight}: the AE purifier has no discriminator (its loss is its reconstruction): set {setting} = 0"
            );
        }
        Ok(())
    }

    /// An error where `data_init` is asked of a kind without it.
    pub fn check_data_init(&self) -> Result<()> {
        match self {
            PurifierConfig::Gan(_) => Ok(()),
            PurifierConfig::Ae(_) => bail!(
                "data_init rescales the GAN generator's gated layers; the AE purifier has none: set data_init = false"
            ),
        }
    }

    /// Replaces the settings `o` names; a setting the kind does not have is refused by name.
    pub fn apply(&mut self, o: &ArchOverrides) -> Result<()> {
        fn set<T: Copy>(field: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *field = v;
            }
        }
        match self {
            PurifierConfig::Gan(g) => {
                set(&mut g.width, o.width);
                set(&mut g.disc_width, o.disc_width);
                set(&mut g.attention, o.attention);
                set(&mut g.stages, o.stages);
                set(&mut g.skips, o.skips);
                set(&mut g.group_norm, o.group_norm);
                set(&mut g.residual, o.residual);
                if o.work_size.is_some() {
                    g.work_size = o.work_size;
                }
                set(&mut g.resize_up, o.resize_up);
                set(&mut g.resize_down, o.resize_down);
            }
            PurifierConfig::Ae(a) => {
                if let Some(name) = o.gan_only() {
                    bail!(
                        "`{name}` is a setting of the GAN purifier; this purifier is an AE (set its architecture in a TOML config's [purifier] table)"
                    );
                }
                set(&mut a.work_size, o.work_size);
                set(&mut a.resize_up, o.resize_up);
                set(&mut a.resize_down, o.resize_down);
            }
        }
        Ok(())
    }
}

/// Single architecture settings given over a preset's or a checkpoint's (command-line flags).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArchOverrides {
    pub width: Option<usize>,
    pub disc_width: Option<usize>,
    pub attention: Option<bool>,
    pub stages: Option<usize>,
    pub skips: Option<bool>,
    pub group_norm: Option<bool>,
    pub residual: Option<bool>,
    pub work_size: Option<usize>,
    pub resize_up: Option<Resize>,
    pub resize_down: Option<Resize>,
}

impl ArchOverrides {
    /// The first GAN-only setting given, by its name.
    fn gan_only(&self) -> Option<&'static str> {
        [
            ("width", self.width.is_some()),
            ("disc_width", self.disc_width.is_some()),
            ("attention", self.attention.is_some()),
            ("stages", self.stages.is_some()),
            ("skips", self.skips.is_some()),
            ("group_norm", self.group_norm.is_some()),
            ("residual", self.residual.is_some()),
        ]
        .into_iter()
        .find(|(_, given)| *given)
        .map(|(name, _)| name)
    }
}

/// A purifier with its weights: the network `g` that purifies (the GAN's generator, the AE's
/// encoder and decoder) and, for the GAN, the discriminator that trains it.
// A handful live at a time (one per run, two for an interpolation): their size is not worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Purifier {
    Gan(GanPurifier),
    Ae(AePurifier),
}

/// What a network produced on one drawn transform, for the kind's own losses.
enum Output {
    /// The generator's masks (one copy per mask for RT3) and coarse and fine outputs in [-1,1].
    Gan {
        masks: Tensor,
        x1: Tensor,
        x2: Tensor,
    },
    /// The reconstruction of every patch, in [0,1].
    Ae { out: Tensor },
}

/// One purification ([`Purifier::pass`]): what the trainers, the sample grids and `atop purify`
/// need besides the purified image.
pub struct Pass {
    /// The clean images at the working size, in [0,1].
    pub clean: Tensor,
    /// The transform, drawn at the working size.
    pub drawn: Transformed,
    /// The purified images in [0,1] at the working size.
    pub at_work: Tensor,
    /// The purified images in [0,1] at the input size.
    pub purified: Tensor,
    output: Output,
    resolution: Resolution,
    size: (i64, i64),
}

impl Pass {
    /// Working-size images back at the input size.
    pub fn at_input_size(&self, t: &Tensor) -> Tensor {
        self.resolution.to_image(t, self.size.0, self.size.1)
    }

    /// The transformed images (holes grey; RT3: the first masked copy) at the input size.
    pub fn shown(&self) -> Tensor {
        self.at_input_size(&self.drawn.shown())
    }

    /// A named intermediate image for sample grids (the GAN's coarse output, first copy), at
    /// the input size.
    pub fn intermediate(&self) -> Option<(&'static str, Tensor)> {
        match &self.output {
            Output::Gan { x1, .. } => {
                let n = self.drawn.noisy.size()[0];
                let x1 = ((x1.narrow(0, 0, n) + 1.0) * 0.5).clamp(0.0, 1.0);
                Some(("coarse x1", self.at_input_size(&x1)))
            }
            Output::Ae { .. } => None,
        }
    }
}

/// The terms of a purifier's own loss on a pass (L_df of Eq. 9 for the GAN, the reconstruction
/// for the AE), scalars.
pub struct OwnTerms {
    /// The GAN term -mean D(x2) (zero for the AE or when not asked for).
    pub gan: Tensor,
    /// The reconstruction term: GAN: L1 of x1 and of x2 to the reference in [-1,1]; AE: L1 of
    /// its reconstruction to the reference on the same scale.
    pub l1: Tensor,
}

impl Purifier {
    /// A freshly initialised purifier (libtorch's generator draws the weights).
    pub fn new(config: PurifierConfig, device: Device) -> Result<Self> {
        Ok(match config {
            PurifierConfig::Gan(g) => Purifier::Gan(GanPurifier::new(g, device)?),
            PurifierConfig::Ae(a) => Purifier::Ae(AePurifier::new(a, device)?),
        })
    }

    pub fn config(&self) -> PurifierConfig {
        match self {
            Purifier::Gan(p) => p.config.clone().into(),
            Purifier::Ae(p) => p.config.clone().into(),
        }
    }

    pub fn describe(&self) -> String {
        self.config().describe()
    }

    /// Where it works (read from its settings in place: every pass asks).
    pub fn resolution(&self) -> Resolution {
        match self {
            Purifier::Gan(p) => p.config.resolution(),
            Purifier::Ae(p) => p.config.resolution(),
        }
    }

    pub fn device(&self) -> Device {
        self.weights().device()
    }

    /// The purifying network's weights (what AToP fine-tunes, averages and exports).
    pub fn weights(&self) -> &VarStore {
        match self {
            Purifier::Gan(p) => &p.g_vs,
            Purifier::Ae(p) => &p.vs,
        }
    }

    fn weights_mut(&mut self) -> &mut VarStore {
        match self {
            Purifier::Gan(p) => &mut p.g_vs,
            Purifier::Ae(p) => &mut p.vs,
        }
    }

    /// The discriminator's weights, for its optimizer (None: the kind trains without one).
    pub fn critic(&self) -> Option<&VarStore> {
        match self {
            Purifier::Gan(p) => Some(&p.d_vs),
            Purifier::Ae(_) => None,
        }
    }

    /// Parameters of the purifying network and of the discriminator (0 without one).
    pub fn parameters(&self) -> (i64, i64) {
        (count(self.weights()), self.critic().map_or(0, count))
    }

    /// Every weight copied from `other` (of the same architecture).
    pub fn copy_from(&mut self, other: &Purifier) -> Result<()> {
        self.weights_mut().copy(other.weights())?;
        if let (Purifier::Gan(a), Purifier::Gan(b)) = (self, other) {
            a.d_vs.copy(&b.d_vs)?;
        }
        Ok(())
    }

    /// This purifier widened to `width` channels computing the same function (GAN only).
    pub fn widened(&self, width: usize) -> Result<Purifier> {
        match self {
            Purifier::Gan(p) => Ok(Purifier::Gan(p.widened(width)?)),
            Purifier::Ae(_) => bail!(
                "widen = {width}: widening is defined for the GAN purifier's generator; this purifier is an AE (train a wider AE instead)"
            ),
        }
    }

    /// The purifier `alpha` of the way from `start` to this one (weight-space ensembling).
    pub fn interpolated(&self, start: &Purifier, alpha: f64) -> Result<Purifier> {
        match (self, start) {
            (Purifier::Gan(t), Purifier::Gan(s)) => Ok(Purifier::Gan(t.interpolated(s, alpha)?)),
            (Purifier::Ae(t), Purifier::Ae(s)) => {
                super::check_alpha(alpha)?;
                if t.config != s.config {
                    bail!(
                        "the start ({}) is not the tuned purifier's architecture ({})",
                        s.config.describe(),
                        t.config.describe()
                    );
                }
                let mixed = AePurifier::new(t.config.clone(), t.vs.device())?;
                let (from, to) = (s.vs.variables(), t.vs.variables());
                tch::no_grad(|| {
                    for (name, mut w) in mixed.vs.variables() {
                        w.copy_(&(&from[&name] * (1.0 - alpha) + &to[&name] * alpha));
                    }
                });
                Ok(Purifier::Ae(mixed))
            }
            _ => bail!(
                "the start's kind is {}, the tuned purifier's {}: interpolation needs one architecture",
                start.config().kind(),
                self.config().kind()
            ),
        }
    }

    /// Data-dependent initialisation on a batch of clean images (the GAN's `data_init`).
    pub fn normalise(&self, x: &Tensor, transform: &TransformConfig) -> Result<()> {
        match self {
            Purifier::Gan(p) => {
                p.normalise(x, transform);
                Ok(())
            }
            Purifier::Ae(_) => bail!(
                "data_init rescales the GAN generator's gated layers; the AE purifier has none: set data_init = false"
            ),
        }
    }

    /// The network on a transform drawn at the working size: the purified images there, in
    /// [0,1] (RT3's masked copies assembled).
    pub fn on_drawn(&self, drawn: &Transformed) -> Tensor {
        self.run(drawn).0
    }

    fn run(&self, drawn: &Transformed) -> (Tensor, Output) {
        match self {
            Purifier::Gan(p) => gan_output(p, drawn),
            Purifier::Ae(p) => ae_output(p, drawn),
        }
    }

    /// The whole purification of `x` (N x 3 x H x W in [0,1]), differentiable in `x`: resized
    /// to the working size, transformed there, purified there, and resized back to H x W.
    pub fn pass(&self, x: &Tensor, transform: &TransformConfig) -> Pass {
        pass_with(self.resolution(), x, transform, |d| self.run(d))
    }

    /// Draws `transform` on `x` and purifies it ([`Purifier::pass`]).
    pub fn purify(&self, x: &Tensor, transform: &TransformConfig) -> Tensor {
        self.pass(x, transform).purified
    }

    /// The discriminator's hinge loss on the `reference` images (at the working size, in
    /// [0,1]) against the pass's output, detached from the generator, in training mode; None
    /// for a kind without a discriminator. The caller steps the discriminator's optimizer on it.
    pub fn critic_loss(
        &mut self,
        pass: &Pass,
        reference: &Tensor,
        precision: Precision,
    ) -> Option<Tensor> {
        let (Purifier::Gan(p), Output::Gan { masks, x2, .. }) = (self, &pass.output) else {
            return None;
        };
        p.d_vs.unfreeze();
        let target = gan_target(reference, masks);
        let scores = autocast(p.g_vs.device(), precision, || {
            p.discriminator.forward_t(
                &Tensor::cat(&[&target, &x2.to_kind(Kind::Float).detach()], 0),
                &Tensor::cat(&[masks, masks], 0),
                true,
            )
        })
        .to_kind(Kind::Float);
        let halves = scores.split(scores.size()[0] / 2, 0);
        Some(
            (halves[0].neg() + 1.0).relu().mean(Kind::Float)
                + (&halves[1] + 1.0).relu().mean(Kind::Float),
        )
    }

    /// The purifier's own loss terms on a pass against `reference` (the working-size images it
    /// should reproduce, in [0,1]); with `gan`, the GAN term through the discriminator, frozen
    /// so that the backward reaches only the purifying network.
    pub fn own_terms(
        &mut self,
        pass: &Pass,
        reference: &Tensor,
        gan: bool,
        precision: Precision,
    ) -> OwnTerms {
        let zero = Tensor::zeros([], (Kind::Float, reference.device()));
        match (self, &pass.output) {
            (Purifier::Gan(p), Output::Gan { masks, x1, x2 }) => {
                let target = gan_target(reference, masks);
                let (x1, x2) = (x1.to_kind(Kind::Float), x2.to_kind(Kind::Float));
                let gan = if gan {
                    p.d_vs.freeze();
                    -autocast(p.g_vs.device(), precision, || {
                        p.discriminator.forward_t(&x2, masks, true)
                    })
                    .to_kind(Kind::Float)
                    .mean(Kind::Float)
                } else {
                    zero
                };
                let l1 = (&x1 - &target).abs().mean(Kind::Float)
                    + (&x2 - &target).abs().mean(Kind::Float);
                OwnTerms { gan, l1 }
            }
            (_, Output::Ae { out }) => OwnTerms {
                gan: zero,
                l1: ((out.to_kind(Kind::Float) - reference) * 2.0)
                    .abs()
                    .mean(Kind::Float),
            },
            _ => unreachable!("a pass is read by the purifier that made it"),
        }
    }

    /// Patch scores per image of the discriminator on a pass (None without one).
    pub fn critic_scores_per_image(&self, pass: &Pass) -> Option<i64> {
        match (self, &pass.output) {
            (Purifier::Gan(p), Output::Gan { masks, x2, .. }) => {
                Some(tch::no_grad(|| p.discriminator.forward_t(x2, masks, false)).size()[1])
            }
            _ => None,
        }
    }

    /// Writes the checkpoint folder: the weight files, then the sidecar (last, so a folder
    /// with a sidecar is complete).
    pub fn save(&self, dir: &Path, sidecar: &PurifierSidecar) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        checkpoint::save_vars(self.weights(), &dir.join(GENERATOR))?;
        if let Some(d) = self.critic() {
            checkpoint::save_vars(d, &dir.join(DISCRIMINATOR))?;
        }
        crate::io::write_json(&dir.join(SIDECAR), sidecar)
    }

    /// Loads weights saved by [`Purifier::save`] into this purifier (strict names/shapes).
    pub fn load_weights(&mut self, dir: &Path) -> Result<(), CheckpointError> {
        self.load_network(&dir.join(GENERATOR))?;
        self.load_critic(dir)
    }

    pub(super) fn load_critic(&mut self, dir: &Path) -> Result<(), CheckpointError> {
        let what = self.describe();
        if let Some(d) = self.critic() {
            let file = dir.join(DISCRIMINATOR);
            checkpoint::copy_into(
                d,
                &format!("{what} discriminator"),
                checkpoint::read_tensors(&file)?,
                &file,
            )?;
        }
        Ok(())
    }

    /// Loads the purifying network's weights from `file` (strict names/shapes), skipping the
    /// training state that may sit beside them ([`TRAINING_STATE_PREFIX`]).
    pub fn load_network(&mut self, file: &Path) -> Result<(), CheckpointError> {
        let weights = checkpoint::read_tensors(file)?
            .into_iter()
            .filter(|(k, _)| !k.starts_with(TRAINING_STATE_PREFIX))
            .collect();
        let what = match self {
            Purifier::Gan(_) => "generator",
            Purifier::Ae(_) => "network",
        };
        checkpoint::copy_into(
            self.weights(),
            &format!("{} {what}", self.describe()),
            weights,
            file,
        )
    }
}

fn gan_output(p: &GanPurifier, drawn: &Transformed) -> (Tensor, Output) {
    let (masks, x1, x2) = p.on_drawn(drawn);
    (purified_from(&x2, drawn), Output::Gan { masks, x1, x2 })
}

fn ae_output(p: &AePurifier, drawn: &Transformed) -> (Tensor, Output) {
    let out = p.net.forward(&drawn.noisy, &p.visible_patches(drawn));
    (out.shallow_clone(), Output::Ae { out })
}

/// A pass of `x` through a network `run` on a transform drawn at `resolution`'s working size.
fn pass_with(
    resolution: Resolution,
    x: &Tensor,
    transform: &TransformConfig,
    run: impl Fn(&Transformed) -> (Tensor, Output),
) -> Pass {
    let clean = resolution.to_work(x);
    let drawn = transform.sample(&clean);
    let (at_work, output) = run(&drawn);
    let (h, w) = (x.size()[2], x.size()[3]);
    let purified = resolution.to_image(&at_work, h, w);
    Pass {
        clean,
        drawn,
        at_work,
        purified,
        output,
        resolution,
        size: (h, w),
    }
}

impl GanPurifier {
    /// [`Purifier::pass`] of a GAN purifier held on its own.
    pub fn pass(&self, x: &Tensor, transform: &TransformConfig) -> Pass {
        pass_with(self.config.resolution(), x, transform, |d| {
            gan_output(self, d)
        })
    }

    pub fn purify(&self, x: &Tensor, transform: &TransformConfig) -> Tensor {
        self.pass(x, transform).purified
    }
}

/// The GAN's reconstruction target: `reference` in [-1,1], once per mask copy.
fn gan_target(reference: &Tensor, masks: &Tensor) -> Tensor {
    let copies = masks.size()[0] / reference.size()[0];
    (reference * 2.0 - 1.0).repeat([copies, 1, 1, 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::TransformKind;

    #[test]
    fn the_kind_is_named_and_a_description_without_one_is_a_gan() {
        let gan: PurifierConfig = serde_json::from_str(r#"{"width": 16}"#).unwrap();
        assert_eq!(gan.gan("test").unwrap().width, 16);
        let ae: PurifierConfig = toml::from_str("kind = \"ae\"\nwidth = 64\nheads = 2").unwrap();
        assert_eq!(ae.kind(), "ae");
        assert_eq!(ae.label(), "ae-w64");
        for c in [&gan, &ae] {
            let text = serde_json::to_string(c).unwrap();
            assert!(
                text.contains(&format!("\"kind\":\"{}\"", c.kind())),
                "{text}"
            );
            assert_eq!(&serde_json::from_str::<PurifierConfig>(&text).unwrap(), c);
        }
        let bad = |text: &str| {
            serde_json::from_str::<PurifierConfig>(text)
                .unwrap_err()
                .to_string()
        };
        assert!(bad(r#"{"kind": "ae", "disc_width": 8}"#).contains("unknown field `disc_width`"));
        assert!(bad(r#"{"patch": 4}"#).contains("unknown field `patch`"));
        assert!(bad(r#"{"kind": "vae"}"#).contains("unknown variant `vae`"));
        // Flags of the other kind are refused by name.
        let mut a = ae.clone();
        let e = a
            .apply(&ArchOverrides {
                disc_width: Some(8),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`disc_width` is a setting of the GAN purifier"),
            "{e}"
        );
        a.apply(&ArchOverrides {
            work_size: Some(64),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(a.resolution().work_size, Some(64));
        assert!(ae.check_gan_weight("gan_weight", 0.1).is_err());
        assert!(gan.check_gan_weight("gan_weight", 0.1).is_ok());
    }

    fn tiny_ae() -> Purifier {
        Purifier::new(
            AeConfig {
                width: 16,
                depth: 1,
                heads: 2,
                decoder_width: 8,
                decoder_depth: 1,
                decoder_heads: 2,
                ..Default::default()
            }
            .into(),
            Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn the_ae_purifies_differentiably_and_interpolates_between_its_weights() {
        tch::manual_seed(2);
        let mut p = tiny_ae();
        assert!(p.critic().is_none() && p.parameters().1 == 0);
        assert!(p.widened(32).err().unwrap().to_string().contains("an AE"));
        let x = Tensor::rand([3, 3, 32, 32], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let rt2 = TransformConfig::default();
        let pass = p.pass(&x, &rt2);
        assert_eq!(pass.purified.size(), [3, 3, 32, 32]);
        assert!(pass.intermediate().is_none());
        assert!(p.critic_loss(&pass, &pass.clean, Precision::F32).is_none());
        let own = p.own_terms(&pass, &pass.clean, true, Precision::F32);
        assert_eq!(own.gan.double_value(&[]), 0.0);
        let grad = Tensor::run_backward(&[own.l1], &[&x], false, false).remove(0);
        assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        // Alpha 0 is the start, 1 the tuned weights; another kind is refused.
        let tuned = tiny_ae();
        let x = x.detach();
        let none = TransformConfig::with_kind(TransformKind::None);
        let out = |q: &Purifier| tch::no_grad(|| q.purify(&x, &none));
        for (alpha, want) in [(0.0, &p), (1.0, &tuned)] {
            let mixed = tuned.interpolated(&p, alpha).unwrap();
            assert!(
                out(&mixed).allclose(&out(want), 1e-5, 1e-6, false),
                "alpha {alpha}"
            );
        }
        let gan = Purifier::new(PurifierConfig::default(), Device::Cpu).unwrap();
        let e = tuned.interpolated(&gan, 0.5).err().unwrap().to_string();
        assert!(
            e.contains("the start's kind is gan, the tuned purifier's ae"),
            "{e}"
        );
        p.copy_from(&tuned).unwrap();
        assert!(out(&p).equal(&out(&tuned)));
    }
}
