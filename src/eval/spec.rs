//! What a robust evaluation runs: the attacked targets, the attack list, the config, shards.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::attacks::{AttackName, AttackSettings};
use crate::models::Model;

/// Which model an attack differentiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The whole evaluated model (adaptive, exact gradients, EOT from the settings).
    Whole,
    /// The undefended classifier; the images are then scored on the whole model: a transfer
    /// attack, never a robustness claim on its own.
    Transfer,
    /// The whole model with the defence stages differentiated as the identity (BPDA), with EOT
    /// from the settings; scored on the whole model.
    Bpda,
}

/// The models attacks may differentiate instead of the evaluated one.
#[derive(Clone, Copy, Default)]
pub struct Surrogates<'a> {
    /// The classifier alone (transfer attacks).
    pub classifier: Option<&'a dyn Model>,
    /// The model with an identity backward through its defence (BPDA attacks).
    pub bpda: Option<&'a dyn Model>,
}

/// A deterministic slice of an evaluation: the batches b (in order of the seeded points) with
/// b mod count == index. Every batch is attacked and drawn exactly as in the whole run, so merged
/// shards give the whole run's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("shard '{s}': expected i/n with 0 <= i < n (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    pub(crate) fn owns(self, batch: usize) -> bool {
        batch % self.count == self.index
    }
}

/// One attack of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackSpec {
    pub attack: AttackName,
    pub target: Target,
}

impl AttackSpec {
    pub fn label(&self) -> String {
        match self.target {
            Target::Whole => self.attack.to_string(),
            Target::Transfer => format!("transfer-{}", self.attack),
            Target::Bpda => format!("bpda-{}", self.attack),
        }
    }

    /// Black-box (queries only).
    pub(crate) fn black_box(&self) -> bool {
        self.attack == AttackName::Square
    }
}

/// Parses `pgd,apgd-ce,transfer,bpda,...`: attack names, AutoAttack compositions, `transfer`
/// (PGD on the classifier alone) and `bpda` (PGD with the identity backward through the
/// defence). Compositions may raise the settings' EOT (`autoattack-rand`).
pub fn parse_attacks(list: &str, settings: &mut AttackSettings) -> Result<Vec<AttackSpec>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let special = match part.to_ascii_lowercase().as_str() {
            "transfer" => Some(Target::Transfer),
            "bpda" => Some(Target::Bpda),
            _ => None,
        };
        if let Some(target) = special {
            out.push(AttackSpec {
                attack: AttackName::Pgd,
                target,
            });
            continue;
        }
        for attack in crate::attacks::compositions::expand(part, settings)? {
            out.push(AttackSpec {
                attack,
                target: Target::Whole,
            });
        }
    }
    if out.is_empty() {
        bail!("`attack`: no attack given");
    }
    let mut seen = std::collections::HashSet::new();
    for a in &out {
        if !seen.insert(a.label()) {
            bail!("`attack`: {} is listed twice", a.label());
        }
    }
    Ok(out)
}

/// R beyond this buys nothing measurable at n <= 10,000 and only costs time and memory.
pub const MAX_DRAWS: usize = 1000;

/// Everything that defines an evaluation (a resumed one must match it exactly).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RobustConfig {
    pub attacks: Vec<AttackSpec>,
    pub settings: AttackSettings,
    /// R: independent draws of the model per scored image.
    pub draws: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Points (the first of the evaluated ones) for the checks that need their own PGD runs:
    /// an eps grid and unbounded eps, doubled iterations, doubled EOT, one fixed draw. 0: none.
    #[serde(default)]
    pub check_points: usize,
    /// Identifies the model (its files' content hash where known) and the data.
    pub model: String,
    pub data: String,
    /// The plan (`--preset` / `--config`) the attacks and budgets came from, in words.
    #[serde(default)]
    pub plan: Option<String>,
    /// AutoAttack's order: each attack sees only the points still right on every draw so far
    /// (`atop attack`); otherwise every attack sees every point.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cascade: bool,
}

impl RobustConfig {
    pub fn validate(&self) -> Result<()> {
        self.settings.validate()?;
        if !(1..=MAX_DRAWS).contains(&self.draws) {
            bail!(
                "draws = {}: expected 1 <= R <= {MAX_DRAWS} draws of the model per image",
                self.draws
            );
        }
        if self.batch_size == 0 {
            bail!("batch_size = 0: expected at least 1");
        }
        if self.attacks.is_empty() {
            bail!("no attack given");
        }
        for a in &self.attacks {
            self.settings.for_attack(a.attack).build(a.attack)?;
        }
        Ok(())
    }
}

/// Gradient evaluations per point an attack spends at most (steps x EOT x restarts), where
/// the attack has such a budget.
/// The settings an attack of `config` runs with: its overrides applied, and one EOT draw
/// where more are the same draw (the classifier alone; a model measured deterministic).
pub(super) fn attack_settings(
    config: &RobustConfig,
    spec: &AttackSpec,
    stochastic: bool,
) -> AttackSettings {
    let mut s = config.settings.for_attack(spec.attack);
    if spec.target == Target::Transfer || !stochastic {
        s.eot = 1;
    }
    s
}

/// The smallest EOT of the whole-model gradient attacks (None: there are none).
pub(super) fn min_white_box_eot(config: &RobustConfig, stochastic: bool) -> Option<usize> {
    config
        .attacks
        .iter()
        .filter(|a| a.target == Target::Whole && !a.black_box())
        .map(|a| attack_settings(config, a, stochastic).eot)
        .min()
}

/// What an attack may spend per point.
pub(super) struct Cost {
    pub(super) words: String,
    pub(super) gradients: Option<usize>,
    pub(super) queries: Option<usize>,
}

pub(super) fn cost(attack: AttackName, s: &AttackSettings) -> Cost {
    let eot = s.eot;
    let per_draw = |steps: usize, runs: usize, what: String| Cost {
        words: format!("{what} x EOT {eot}"),
        gradients: Some(steps * runs * eot),
        queries: None,
    };
    let runs = |targets: usize| {
        let mut w = String::new();
        if targets > 1 {
            w += &format!(", {targets} targets");
        }
        if s.restarts > 1 {
            w += &format!(", {} restarts", s.restarts);
        }
        w
    };
    match attack {
        AttackName::Fgsm => per_draw(1, 1, "1 step".into()),
        AttackName::Pgd | AttackName::SelectiveEot => {
            let steps = s.steps.unwrap_or(20);
            per_draw(steps, s.restarts, format!("{steps} steps{}", runs(1)))
        }
        AttackName::ApgdCe | AttackName::ApgdDlr | AttackName::ApgdCw => {
            let steps = s.steps.unwrap_or(100);
            per_draw(steps, s.restarts, format!("{steps} iterations{}", runs(1)))
        }
        AttackName::ApgdT | AttackName::FabT => {
            let steps = s.steps.unwrap_or(100);
            per_draw(
                steps,
                s.restarts * s.targets,
                format!("{steps} iterations{}", runs(s.targets)),
            )
        }
        AttackName::Cw => {
            let steps = s.steps.unwrap_or(1000);
            per_draw(
                steps,
                s.search_steps,
                format!("{} x {steps} Adam steps", s.search_steps),
            )
        }
        AttackName::Square => Cost {
            words: format!("{} queries{}", s.queries, runs(1)),
            gradients: None,
            queries: Some(s.queries * s.restarts),
        },
    }
}
