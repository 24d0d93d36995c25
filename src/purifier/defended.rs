//! The defended model of AToP, `f(down(g(t(up(x)))))`, and every lighter defence in front of a
//! classifier, built in one place ([`defended`]) for the CLI, the trainers and the evaluators:
//! attacks see one [`Model`] and differentiate through the random transform and the generator
//! (exact gradients, with EOT for the randomness), or, with BPDA, through the identity instead.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::Purifier;
use crate::models::Model;
use crate::models::pipeline::{Bpda, Pipeline, Quantize, Stage};
use crate::transforms::{Resolution, TransformConfig, TransformStage};

/// Random transform followed by the purifier, on the purifier's resolution pipeline.
pub struct Purify<'a> {
    pub purifier: &'a Purifier,
    pub transform: TransformConfig,
}

impl Stage for Purify<'_> {
    fn apply(&self, images: &Tensor) -> Tensor {
        self.purifier.purify(images, &self.transform)
    }
    fn is_stochastic(&self) -> bool {
        self.transform.is_stochastic()
    }
    fn draws_per_sample(&self) -> bool {
        self.transform.draws_per_sample()
    }
    fn work_size(&self) -> Option<usize> {
        self.purifier.resolution().work_size
    }
    fn describe(&self) -> String {
        format!(
            "{} -> {}",
            self.transform.describe(),
            self.purifier.describe()
        )
    }
}

/// What stands in front of the classifier (the purifier itself is passed to [`defended`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Defence {
    /// The random transform: in front of the purifier, or alone (holes grey) without one.
    /// With a purifier, None means the transform it was trained with.
    pub transform: Option<TransformConfig>,
    /// Without a purifier: the side the transform is drawn at (None: the image's). With one:
    /// the working size the caller expects, checked against the purifier's.
    pub work_size: Option<usize>,
    /// Input quantisation to this many grey levels (a non-differentiable toy defence).
    pub quantize: Option<u32>,
    /// Differentiate through the defence stage as the identity (BPDA).
    pub bpda: bool,
}

/// Builds `classifier` behind the defence for images of `h` x `w`, checking every combination
/// and size before any work: the quantisation or the transform (with or without `purifier`,
/// whose training transform is `trained`), optionally wrapped in BPDA.
pub fn defended<'a>(
    classifier: &'a dyn Model,
    purifier: Option<(&'a Purifier, &TransformConfig)>,
    defence: &Defence,
    (h, w): (i64, i64),
) -> Result<Pipeline<'a>> {
    if defence.quantize.is_some() && (purifier.is_some() || defence.transform.is_some()) {
        bail!(
            "quantisation (`quantize`) and a transform or purifier are different defences: choose one"
        );
    }
    let stage: Option<Box<dyn Stage + 'a>> = match (defence.quantize, purifier, &defence.transform)
    {
        (Some(levels), _, _) => {
            if levels < 2 {
                bail!("quantize = {levels}: expected at least 2 grey levels (`quantize`)");
            }
            Some(Box::new(Quantize { levels }))
        }
        (None, Some((p, trained)), _) => {
            let transform = defence.transform.clone().unwrap_or_else(|| trained.clone());
            let config = p.config();
            config.expect_work_size(defence.work_size, "the purifier")?;
            config.check_images(h, w, &transform)?;
            Some(Box::new(Purify {
                purifier: p,
                transform,
            }))
        }
        (None, None, Some(t)) => {
            let resolution = Resolution::at(defence.work_size);
            resolution.check(h, w, 1, "the working size")?;
            let (wh, ww) = resolution.work_dims(h, w);
            t.validate(Some(wh))?;
            t.validate(Some(ww))?;
            Some(Box::new(TransformStage {
                transform: t.clone(),
                resolution,
            }))
        }
        (None, None, None) => None,
    };
    let stages: Vec<Box<dyn Stage + 'a>> = match (stage, defence.bpda) {
        (Some(s), true) => vec![Box::new(Bpda::identity(s))],
        (Some(s), false) => vec![s],
        (None, true) => bail!(
            "BPDA needs a stage to approximate: a quantisation (`quantize` 8), a transform (`transform` rt2) or a purifier (`purifier` CKPT)"
        ),
        (None, false) => Vec::new(),
    };
    Ok(Pipeline {
        stages,
        model: classifier,
    })
}
