//! What an `eval robust` runs when it follows a plan (`--preset NAME` or `--config FILE`): the
//! attacks, their iterations, EOT draws, targets and queries, the number of points, draws and
//! check points. The presets are the TOML files of `presets/eval-robust-*.toml`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::robust::{AttackSpec, Target, parse_attacks};
use crate::attacks::{AttackName, AttackOverride, AttackSettings};

/// The named plans.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "eval-robust-full",
        include_str!("../../presets/eval-robust-full.toml"),
    ),
    (
        "eval-robust-cpu",
        include_str!("../../presets/eval-robust-cpu.toml"),
    ),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The budgets in words, for the report.
    pub description: String,
    /// Attack names as for `--attack` (compositions, `bpda` and `transfer` included).
    pub attacks: Vec<String>,
    /// Seeded test points.
    pub n: usize,
    /// R: draws of the model per scored image.
    pub draws: usize,
    pub check_points: usize,
    /// EOT draws per step of every gradient attack on a random model.
    pub eot: usize,
    /// APGD-T and FAB-T target classes.
    pub targets: usize,
    /// Square's queries per point.
    pub queries: usize,
    /// Iterations per attack name (an attack not listed runs its reference default).
    #[serde(default)]
    pub steps: BTreeMap<String, usize>,
}

impl Plan {
    pub fn preset(name: &str) -> Result<Plan> {
        let Some((_, text)) = PRESETS.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            bail!(
                "unknown preset '{name}': expected one of {}",
                names.join(", ")
            );
        };
        toml::from_str(text).with_context(|| format!("preset {name}: not a valid evaluation plan"))
    }

    pub fn from_file(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// A plan from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Plan> {
        toml::from_str(text).with_context(|| {
            format!("{origin}: not a valid evaluation plan (see presets/eval-robust-cpu.toml)")
        })
    }

    /// The attacks, and `base` (the budget and every setting the plan does not name) with the
    /// plan's EOT, targets, queries and per-attack steps. Without a defence stage (`defended`
    /// false) `bpda` and `transfer` are left out: both would attack the classifier itself.
    pub fn attacks(
        &self,
        base: AttackSettings,
        defended: bool,
    ) -> Result<(Vec<AttackSpec>, AttackSettings)> {
        let mut settings = base;
        settings.eot = self.eot;
        settings.targets = self.targets;
        settings.queries = self.queries;
        for (name, &steps) in &self.steps {
            let attack: AttackName = name
                .parse()
                .map_err(|e: String| anyhow::anyhow!("[steps] {name}: {e}"))?;
            if steps == 0 {
                bail!("[steps] {name} = 0: expected at least 1 iteration");
            }
            settings.overrides.push(AttackOverride {
                steps: Some(steps),
                ..AttackOverride::none(attack)
            });
        }
        let mut attacks =
            parse_attacks(&self.attacks.join(","), &mut settings).context("the plan's attacks")?;
        if !defended {
            attacks.retain(|a| a.target == Target::Whole);
        }
        settings.validate()?;
        if self.n == 0 || self.draws == 0 {
            bail!(
                "n = {}, draws = {}: expected at least one point and one draw",
                self.n,
                self.draws
            );
        }
        Ok((attacks, settings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attacks::{Budget, Norm};

    #[test]
    fn presets_parse_and_give_per_attack_budgets() {
        let budget = Budget::new(Norm::Linf, 8.0 / 255.0).unwrap();
        for (name, _) in PRESETS {
            let plan = Plan::preset(name).unwrap();
            let (attacks, settings) = plan.attacks(AttackSettings::new(budget), true).unwrap();
            assert_eq!(attacks.len(), plan.attacks.len(), "{name}");
            let (undefended, _) = plan.attacks(AttackSettings::new(budget), false).unwrap();
            assert!(undefended.iter().all(|a| a.target == Target::Whole));
            assert_eq!(undefended.len(), attacks.len() - 2, "{name}");
            for (attack, &steps) in &plan.steps {
                let s = settings.for_attack(attack.parse().unwrap());
                assert_eq!(s.steps, Some(steps), "{name} {attack}");
                assert_eq!(s.eot, plan.eot);
            }
        }
        let full = Plan::preset("eval-robust-full").unwrap();
        assert_eq!((full.eot, full.steps["pgd"], full.queries), (20, 200, 5000));
        assert!(
            Plan::preset("nope")
                .unwrap_err()
                .to_string()
                .contains("eval-robust-cpu")
        );
    }

    #[test]
    fn bad_plans_name_the_field() {
        let budget = Budget::new(Norm::Linf, 8.0 / 255.0).unwrap();
        let mut plan = Plan::preset("eval-robust-cpu").unwrap();
        plan.steps.insert("deepfool".into(), 10);
        let e = format!(
            "{:#}",
            plan.attacks(AttackSettings::new(budget), true).unwrap_err()
        );
        assert!(e.contains("deepfool"), "{e}");
        let mut plan = Plan::preset("eval-robust-cpu").unwrap();
        plan.steps.insert("pgd".into(), 0);
        assert!(
            plan.attacks(AttackSettings::new(budget), true)
                .unwrap_err()
                .to_string()
                .contains("pgd = 0")
        );
        let mut plan = Plan::preset("eval-robust-cpu").unwrap();
        plan.eot = 0;
        assert!(
            plan.attacks(AttackSettings::new(budget), true)
                .unwrap_err()
                .to_string()
                .contains("eot")
        );
        let e = toml::from_str::<Plan>("attacks = [\"pgd\"]\nbogus = 1").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
