//! The defended model of AToP, `f(g(t(x)))`, as a pipeline stage in front of the classifier:
//! attacks see one [`Model`](crate::models::Model) and differentiate through the random
//! transform and the generator (exact gradients, with EOT for the randomness), or, wrapped in
//! [`Bpda`](crate::models::pipeline::Bpda), through the identity instead.

use tch::Tensor;

use super::GanPurifier;
use crate::models::pipeline::Stage;
use crate::transforms::TransformConfig;

/// Random transform followed by the purifier.
pub struct Purify<'a> {
    pub purifier: &'a GanPurifier,
    pub transform: TransformConfig,
}

impl Stage for Purify<'_> {
    fn apply(&self, images: &Tensor) -> Tensor {
        self.purifier.purify(images, &self.transform)
    }
    fn is_stochastic(&self) -> bool {
        self.transform.is_stochastic()
    }
    fn describe(&self) -> String {
        format!(
            "{} -> {}",
            self.transform.describe(),
            self.purifier.config.describe()
        )
    }
}
