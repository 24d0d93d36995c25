//! Attacks on any [`Model`](crate::models::Model), at the reference budgets of the papers that
//! introduced them. One file per attack; [`sweep`] runs a list of them over points in batches
//! (the loop under every evaluation), [`compositions`] names AutoAttack's.
//!
//! Every attack returns images inside the eps-ball around the input and inside [0,1]; the
//! sweep checks this again before it records a result.

pub mod apgd;
pub mod compositions;
pub mod cw;
pub mod fab;
pub mod fgsm;
pub mod grad;
pub mod loss;
pub mod norm;
pub mod pgd;
pub mod select;
pub mod selective;
pub mod square;
pub mod sweep;

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::models::Model;
pub use grad::GradStats;
pub use norm::Norm;
pub use select::Selection;

/// A perturbation budget: `||x_adv - x||_norm <= eps`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    pub norm: Norm,
    pub eps: f64,
}

impl Budget {
    /// Validated budget: eps finite and non-negative; Linf eps at most 1 (the image range).
    pub fn new(norm: Norm, eps: f64) -> Result<Self> {
        if !eps.is_finite() || eps < 0.0 {
            bail!("eps = {eps}: expected a finite, non-negative number (e.g. 8/255 or 0.5)");
        }
        if norm == Norm::Linf && eps > 1.0 {
            bail!(
                "eps = {eps} for linf: pixels live in [0,1], so eps above 1 is meaningless (did you mean {}/255?)",
                eps
            );
        }
        Ok(Budget { norm, eps })
    }
}

/// Parses `8/255`, `0.031`, `0.5`.
pub fn parse_eps(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let v = match s.split_once('/') {
        Some((a, b)) => {
            let a: f64 = a.trim().parse().map_err(|_| bad_eps(s))?;
            let b: f64 = b.trim().parse().map_err(|_| bad_eps(s))?;
            if b == 0.0 {
                return Err(format!("eps '{s}': division by zero"));
            }
            a / b
        }
        None => s.parse().map_err(|_| bad_eps(s))?,
    };
    if !v.is_finite() || v < 0.0 {
        return Err(format!(
            "eps '{s}' = {v}: expected a finite, non-negative number"
        ));
    }
    Ok(v)
}

fn bad_eps(s: &str) -> String {
    format!("eps '{s}': expected a number or a fraction such as 8/255")
}

/// What an attack hands back: adversarial images, what it claims of them, and what it saw of
/// the gradients.
pub struct AttackOutput {
    pub x_adv: Tensor,
    /// Per point, the share of model draws the attack believes its image fools: on a
    /// deterministic model (or with the first-draw rule) 1 where it counted the point broken and
    /// 0 elsewhere; on a random model the share of K fresh draws ([`select::Keeper`]).
    /// `eval robust` sets it against the R scoring draws (the check "attack success survives
    /// fresh draws").
    pub claimed: Tensor,
    pub grad: GradStats,
}

/// An attack on a batch: images in [0,1] and their labels (int64 on the model's device).
pub trait Attack {
    fn name(&self) -> String;
    fn budget(&self) -> Budget;
    /// `seed` fixes every random choice the attack makes (random starts, restarts).
    fn run(&self, model: &dyn Model, x: &Tensor, y: &Tensor, seed: u64) -> Result<AttackOutput>;
}

/// Runs `runs` attempts (restarts, or one per target class), each on the samples no earlier
/// attempt broke. `attempt(r, idx, x[idx], y[idx])` returns (images, claims): per sample the
/// share of draws its image fools, 0 or 1 on a deterministic model (see [`AttackOutput`]).
/// The first attempt's images are kept for every sample, a later one's where it claims more;
/// a sample is done once its claim is 1 (every draw fooled). Each attempt reseeds libtorch's
/// generator from `seed`, so results do not depend on batching history. Returns (images,
/// claims) for the whole batch.
pub(crate) fn on_remaining(
    x: &Tensor,
    y: &Tensor,
    runs: usize,
    seed: u64,
    mut attempt: impl FnMut(usize, &Tensor, &Tensor, &Tensor) -> (Tensor, Tensor),
) -> (Tensor, Tensor) {
    let n = x.size()[0];
    let mut best = x.copy();
    let mut claimed = Tensor::zeros([n], (tch::Kind::Float, x.device()));
    for r in 0..runs {
        tch::manual_seed(seed.wrapping_mul(1_000_003).wrapping_add(r as u64) as i64);
        let idx = if r == 0 {
            Tensor::arange(n, (tch::Kind::Int64, x.device()))
        } else {
            claimed.lt(1.0).nonzero().squeeze_dim(1)
        };
        if idx.size()[0] == 0 {
            break;
        }
        let (adv, claim) = attempt(r, &idx, &x.index_select(0, &idx), &y.index_select(0, &idx));
        let claim = claim.to_kind(tch::Kind::Float);
        let take = if r == 0 {
            claim.ones_like().to_kind(tch::Kind::Bool)
        } else {
            claim.gt_tensor(&claimed.index_select(0, &idx))
        };
        let rows = idx.masked_select(&take);
        let picked = take.nonzero().squeeze_dim(1);
        best = best.index_copy(0, &rows, &adv.index_select(0, &picked));
        claimed = claimed.index_copy(0, &rows, &claim.index_select(0, &picked));
    }
    (best, claimed)
}

/// Target classes of the targeted attacks (APGD-T, FAB-T): the other classes by decreasing
/// clean logit, the true one last. On a correctly classified point these are AutoAttack's
/// 2nd, 3rd, ... highest logits; on a misclassified one (every point is attacked in `eval
/// robust`, and a random model may err on one draw) the true class is never a target, whose
/// targeted loss would be constant and its gradient zero.
pub(crate) fn target_order(model: &dyn Model, x: &Tensor, y: &Tensor) -> Tensor {
    let logits = tch::no_grad(|| model.logits(x)).to_kind(tch::Kind::Float);
    let masked = logits.scatter_value(1, &y.unsqueeze(1), f64::NEG_INFINITY);
    masked.argsort(1, true)
}

/// Attack names accepted on the command line and in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackName {
    Fgsm,
    Pgd,
    ApgdCe,
    ApgdDlr,
    ApgdCw,
    ApgdT,
    FabT,
    Square,
    Cw,
    SelectiveEot,
}

impl AttackName {
    pub const ALL: &'static [(&'static str, AttackName)] = &[
        ("fgsm", AttackName::Fgsm),
        ("pgd", AttackName::Pgd),
        ("apgd-ce", AttackName::ApgdCe),
        ("apgd-dlr", AttackName::ApgdDlr),
        ("apgd-cw", AttackName::ApgdCw),
        ("apgd-t", AttackName::ApgdT),
        ("fab-t", AttackName::FabT),
        ("square", AttackName::Square),
        ("cw", AttackName::Cw),
        ("selective-eot", AttackName::SelectiveEot),
    ];
}

impl fmt::Display for AttackName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = AttackName::ALL
            .iter()
            .find(|(_, a)| a == self)
            .map(|(n, _)| *n)
            .expect("every attack is listed");
        f.write_str(name)
    }
}

impl FromStr for AttackName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        AttackName::ALL
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                let names: Vec<&str> = AttackName::ALL.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown attack '{s}': expected one of {} or a composition ({})",
                    names.join(", "),
                    compositions::COMPOSITIONS.join(", ")
                )
            })
    }
}

/// Ceilings on an attack's budget: each is 10 to 100 times what published evaluations use
/// (PGD-1000, EOT 200, Square 100,000 queries), and beyond them a typo runs for days.
pub const MAX_STEPS: usize = 100_000;
pub const MAX_EOT: usize = 10_000;
pub const MAX_RESTARTS: usize = 1_000;
pub const MAX_QUERIES: usize = 10_000_000;

/// Refuses `steps` or `eot` beyond the ceilings; `what` prefixes the setting names
/// (e.g. `adversary`).
pub fn check_caps(what: &str, steps: usize, eot: usize) -> Result<()> {
    if steps > MAX_STEPS || eot > MAX_EOT {
        bail!(
            "{what}.steps = {steps}, {what}.eot = {eot}: at most {MAX_STEPS} steps and {MAX_EOT} draws per step"
        );
    }
    Ok(())
}

/// Settings shared by the attacks; each attack reads the ones it uses. The defaults are the
/// reference budgets (PGD 20 steps of eps/4; APGD 100 iterations, 9 target classes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackSettings {
    pub budget: Budget,
    /// Iterations (PGD default 20, APGD default 100).
    pub steps: Option<usize>,
    /// PGD step size (default eps/4).
    pub step_size: Option<f64>,
    /// Random restarts (PGD and APGD; default 1 run).
    pub restarts: usize,
    /// PGD random start.
    pub random_start: bool,
    /// PGD loss.
    pub loss: loss::LossKind,
    /// APGD-T: number of target classes (default 9).
    pub targets: usize,
    /// Gradient samples averaged per step (EOT), for stochastic models.
    pub eot: usize,
    /// Square: model queries per sample (default 5,000) and initial window fraction (0.8).
    pub queries: usize,
    pub p_init: f64,
    /// Square: stretch the window schedule as if the budget were 10,000 queries (the original
    /// Square code and torchattacks); AutoAttack does not.
    #[serde(default)]
    pub square_rescale: bool,
    /// APGD with the L1 norm: iterate at 3 eps, 2 eps, then eps (AutoAttack's L1 standard).
    #[serde(default)]
    pub large_eps: bool,
    /// C&W: binary-search steps over the constant c, its starting value, and the confidence.
    #[serde(default = "default_search_steps")]
    pub search_steps: usize,
    #[serde(default = "default_initial_const")]
    pub initial_const: f64,
    #[serde(default)]
    pub kappa: f64,
    /// Which iterate an attack returns on a model measured random ([`select`]). Settings
    /// recorded before the rule existed read as the first-draw rule they were made with.
    #[serde(default = "Selection::before_rule")]
    pub selection: Selection,
    /// Settings that differ for one attack of a list (AutoAttack's L1 version runs APGD-CE with
    /// 5 restarts but FAB-T with 1, APGD-T with 5 targets but FAB-T with 9).
    #[serde(default)]
    pub overrides: Vec<AttackOverride>,
}

/// Per-attack exceptions to [`AttackSettings`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackOverride {
    pub attack: AttackName,
    pub restarts: Option<usize>,
    pub targets: Option<usize>,
    pub large_eps: Option<bool>,
    /// Iterations, EOT draws and Square queries of this attack (the presets of `eval robust`
    /// give PGD 200 steps and APGD 100).
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub eot: Option<usize>,
    #[serde(default)]
    pub queries: Option<usize>,
}

impl AttackOverride {
    /// No exception yet for `attack`.
    pub fn none(attack: AttackName) -> Self {
        AttackOverride {
            attack,
            restarts: None,
            targets: None,
            large_eps: None,
            steps: None,
            eot: None,
            queries: None,
        }
    }
}

/// Every attack setting's default, declared once: [`AttackSettings::new`], serde and the
/// CLI's flags (and the AToP adversary's budget) read them.
pub mod defaults {
    use super::{Norm, Selection, loss::LossKind};

    pub const NORM: Norm = Norm::Linf;
    /// The budget as the flags write it, and as a number (a test ties the two).
    pub const EPS_TEXT: &str = "8/255";
    pub const EPS: f64 = 8.0 / 255.0;
    pub const RESTARTS: usize = 1;
    pub const RANDOM_START: bool = true;
    pub const LOSS: LossKind = LossKind::Ce;
    /// APGD-T and FAB-T target classes (AutoAttack's).
    pub const TARGETS: usize = 9;
    pub const EOT: usize = 1;
    /// Square: queries per point and the initial window fraction (AutoAttack's).
    pub const QUERIES: usize = 5000;
    pub const P_INIT: f64 = 0.8;
    /// C&W: binary-search steps, first constant, confidence margin (torchattacks' CW uses
    /// the same search).
    pub const SEARCH_STEPS: usize = 9;
    pub const INITIAL_CONST: f64 = 1e-3;
    pub const KAPPA: f64 = 0.0;
    pub const SELECTION: Selection = Selection::Last;
}

fn default_search_steps() -> usize {
    defaults::SEARCH_STEPS
}

fn default_initial_const() -> f64 {
    defaults::INITIAL_CONST
}

impl AttackSettings {
    pub fn new(budget: Budget) -> Self {
        AttackSettings {
            budget,
            steps: None,
            step_size: None,
            restarts: defaults::RESTARTS,
            random_start: defaults::RANDOM_START,
            loss: defaults::LOSS,
            targets: defaults::TARGETS,
            eot: defaults::EOT,
            queries: defaults::QUERIES,
            p_init: defaults::P_INIT,
            square_rescale: false,
            large_eps: false,
            search_steps: defaults::SEARCH_STEPS,
            initial_const: defaults::INITIAL_CONST,
            kappa: defaults::KAPPA,
            selection: defaults::SELECTION,
            overrides: Vec::new(),
        }
    }

    /// These settings with `name`'s overrides applied.
    pub fn for_attack(&self, name: AttackName) -> AttackSettings {
        let mut s = self.clone();
        for o in self.overrides.iter().filter(|o| o.attack == name) {
            s.restarts = o.restarts.unwrap_or(s.restarts);
            s.targets = o.targets.unwrap_or(s.targets);
            s.large_eps = o.large_eps.unwrap_or(s.large_eps);
            s.steps = o.steps.or(s.steps);
            s.eot = o.eot.unwrap_or(s.eot);
            s.queries = o.queries.unwrap_or(s.queries);
        }
        s.overrides.clear();
        s
    }

    pub fn validate(&self) -> Result<()> {
        if self.steps == Some(0) {
            bail!("steps = 0: expected at least 1");
        }
        if let Some(steps) = self.steps
            && steps > MAX_STEPS
        {
            bail!("steps = {steps}: at most {MAX_STEPS} iterations per attack run");
        }
        if self.eot > MAX_EOT {
            bail!(
                "eot = {}: at most {MAX_EOT} gradient samples per step",
                self.eot
            );
        }
        if self.restarts > MAX_RESTARTS || self.queries > MAX_QUERIES {
            bail!(
                "restarts = {}, queries = {}: at most {MAX_RESTARTS} restarts and {MAX_QUERIES} queries",
                self.restarts,
                self.queries
            );
        }
        if self.restarts == 0 {
            bail!("restarts = 0: expected at least 1");
        }
        if self.eot == 0 {
            bail!("eot = 0: expected at least 1 gradient sample per step");
        }
        if let Some(a) = self.step_size
            && !(a.is_finite() && a > 0.0)
        {
            bail!("step_size = {a}: expected a positive number");
        }
        if self.queries == 0 {
            bail!("queries = 0: expected at least 1");
        }
        if !(self.p_init > 0.0 && self.p_init <= 1.0) {
            bail!("p_init = {}: expected a fraction in (0, 1]", self.p_init);
        }
        if self.search_steps == 0 {
            bail!("search_steps = 0: C&W needs at least one binary-search step");
        }
        if !(self.initial_const.is_finite() && self.initial_const > 0.0) {
            bail!(
                "initial_const = {}: expected a positive number (C&W's c)",
                self.initial_const
            );
        }
        if !(self.kappa.is_finite() && self.kappa >= 0.0) {
            bail!(
                "kappa = {}: expected a non-negative confidence margin",
                self.kappa
            );
        }
        if self.targets == 0 {
            bail!("targets = 0: APGD-T needs at least one target class");
        }
        if self.large_eps && self.budget.norm != Norm::L1 {
            bail!(
                "large_eps is the schedule of APGD with the l1 norm; the norm is {}",
                self.budget.norm
            );
        }
        for o in &self.overrides {
            self.for_attack(o.attack).validate()?;
        }
        Ok(())
    }

    /// Checks what depends on the model: targeted attacks need more classes than targets.
    pub fn fit_model(&self, name: AttackName, classes: usize) -> Result<()> {
        let s = self.for_attack(name);
        if matches!(name, AttackName::ApgdT | AttackName::FabT)
            && s.targets > classes.saturating_sub(1)
        {
            bail!(
                "targets = {}: the model has {classes} classes, so {name} has at most {} target classes",
                s.targets,
                classes.saturating_sub(1)
            );
        }
        Ok(())
    }

    pub fn build(&self, name: AttackName) -> Result<Box<dyn Attack>> {
        if !self.overrides.is_empty() {
            return self.for_attack(name).build(name);
        }
        self.validate()?;
        let b = self.budget;
        Ok(match name {
            AttackName::Fgsm => Box::new(fgsm::Fgsm {
                budget: b,
                eot: self.eot,
                selection: self.selection,
            }),
            AttackName::Pgd => Box::new(pgd::Pgd {
                budget: b,
                steps: self.steps.unwrap_or(20),
                step_size: self.step_size.unwrap_or(b.eps / 4.0),
                random_start: self.random_start,
                restarts: self.restarts,
                loss: self.loss,
                target: None,
                eot: self.eot,
                selection: self.selection,
            }),
            AttackName::Cw if b.norm != Norm::L2 => bail!(
                "cw is the L2 attack of Carlini & Wagner (the norm is {}); for linf, pgd with `loss` margin uses the same objective",
                b.norm
            ),
            AttackName::Cw => Box::new(cw::CarliniWagner {
                search_steps: self.search_steps,
                initial_const: self.initial_const,
                kappa: self.kappa,
                selection: self.selection,
                ..cw::CarliniWagner::new(b, self.steps.unwrap_or(1000), self.eot)
            }),
            AttackName::FabT => Box::new(fab::FabT {
                selection: self.selection,
                ..fab::FabT::new(
                    b,
                    self.steps.unwrap_or(100),
                    self.targets,
                    self.restarts,
                    self.eot,
                )
            }),
            AttackName::SelectiveEot => Box::new(selective::SelectiveEot {
                budget: b,
                steps: self.steps.unwrap_or(20),
                step_size: self.step_size.unwrap_or(b.eps / 4.0),
                random_start: self.random_start,
                eot: self.eot,
                selection: self.selection,
            }),
            AttackName::Square => Box::new(square::Square {
                budget: b,
                queries: self.queries,
                p_init: self.p_init,
                restarts: self.restarts,
                rescale: self.square_rescale,
                eot: self.eot,
                selection: self.selection,
            }),
            AttackName::ApgdCe | AttackName::ApgdDlr | AttackName::ApgdCw | AttackName::ApgdT => {
                Box::new(apgd::Apgd {
                    budget: b,
                    steps: self.steps.unwrap_or(100),
                    restarts: self.restarts,
                    loss: match name {
                        AttackName::ApgdCe => apgd::ApgdLoss::Ce,
                        AttackName::ApgdDlr => apgd::ApgdLoss::Dlr,
                        AttackName::ApgdCw => apgd::ApgdLoss::Margin,
                        _ => apgd::ApgdLoss::DlrTargeted {
                            targets: self.targets,
                        },
                    },
                    eot: self.eot,
                    rho: 0.75,
                    momentum: 0.75,
                    large_eps: self.large_eps,
                    selection: self.selection,
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eps_parses_fractions_and_rejects_nonsense() {
        assert!((parse_eps("8/255").unwrap() - 8.0 / 255.0).abs() < 1e-15);
        assert_eq!(parse_eps(defaults::EPS_TEXT).unwrap(), defaults::EPS);
        assert_eq!(parse_eps("0.5").unwrap(), 0.5);
        assert!(parse_eps("-1").unwrap_err().contains("non-negative"));
        assert!(parse_eps("nan").unwrap_err().contains("finite"));
        assert!(parse_eps("8/0").unwrap_err().contains("division by zero"));
        assert!(parse_eps("eight").unwrap_err().contains("8/255"));
        assert!(
            Budget::new(Norm::Linf, 8.0)
                .unwrap_err()
                .to_string()
                .contains("8/255")
        );
        assert!(Budget::new(Norm::L2, 8.0).is_ok());
    }

    #[test]
    fn attack_names_round_trip() {
        for (n, a) in AttackName::ALL {
            assert_eq!(a.to_string(), *n);
            assert_eq!(n.parse::<AttackName>().unwrap(), *a);
        }
        assert!(
            "deepfool"
                .parse::<AttackName>()
                .unwrap_err()
                .contains("apgd-ce")
        );
    }
}
