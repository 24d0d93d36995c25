//! AutoAttack's named compositions, expanded to their attacks and the settings they imply.

use anyhow::{Result, bail};

use super::{AttackName, AttackSettings};

/// Named compositions.
pub const COMPOSITIONS: &[&str] = &["autoattack-standard", "autoattack-rand"];

/// Expands a comma-separated list of attacks and compositions, with the settings a
/// composition implies: AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square at the
/// settings' budgets, by default 100 iterations, 9 targets, 5,000 queries) and its rand version
/// (APGD-CE and APGD-DLR with EOT 20).
pub fn expand(list: &str, settings: &mut AttackSettings) -> Result<Vec<AttackName>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.to_ascii_lowercase().as_str() {
            "autoattack-rand" => {
                out.extend([AttackName::ApgdCe, AttackName::ApgdDlr]);
                if settings.eot == 1 {
                    settings.eot = 20;
                }
            }
            "autoattack-standard" => {
                if settings.budget.norm == super::Norm::L1 {
                    // AutoAttack's L1 version: APGD on the 3/2/1 eps schedule, APGD-CE with 5
                    // restarts, APGD-T with 5 targets.
                    let tweak = |attack, restarts, targets| super::AttackOverride {
                        restarts,
                        targets,
                        large_eps: Some(true),
                        ..super::AttackOverride::none(attack)
                    };
                    settings.overrides.extend([
                        tweak(AttackName::ApgdCe, Some(5), None),
                        tweak(AttackName::ApgdT, None, Some(5)),
                    ]);
                }
                out.extend([
                    AttackName::ApgdCe,
                    AttackName::ApgdT,
                    AttackName::FabT,
                    AttackName::Square,
                ]);
            }
            other => out.push(other.parse().map_err(anyhow::Error::msg)?),
        }
    }
    if out.is_empty() {
        bail!("`attack`: no attack given");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attacks::{Budget, Norm};

    #[test]
    fn autoattack_compositions_expand_to_their_attacks_and_settings() {
        let mut s = AttackSettings::new(Budget::new(Norm::Linf, 8.0 / 255.0).unwrap());
        let list = expand("autoattack-standard", &mut s).unwrap();
        assert_eq!(
            list,
            [
                AttackName::ApgdCe,
                AttackName::ApgdT,
                AttackName::FabT,
                AttackName::Square
            ]
        );
        assert!(s.overrides.is_empty() && s.eot == 1 && !s.square_rescale);
        let list = expand("autoattack-rand", &mut s).unwrap();
        assert_eq!(list, [AttackName::ApgdCe, AttackName::ApgdDlr]);
        assert_eq!(s.eot, 20);
        // L1: APGD-CE with 5 restarts and APGD-T with 5 targets, both on the 3/2/1 eps
        // schedule; FAB-T keeps 1 restart and 9 targets.
        let mut s = AttackSettings::new(Budget::new(Norm::L1, 12.0).unwrap());
        expand("autoattack-standard", &mut s).unwrap();
        let ce = s.for_attack(AttackName::ApgdCe);
        assert_eq!((ce.restarts, ce.targets, ce.large_eps), (5, 9, true));
        let t = s.for_attack(AttackName::ApgdT);
        assert_eq!((t.restarts, t.targets, t.large_eps), (1, 5, true));
        let fab = s.for_attack(AttackName::FabT);
        assert_eq!((fab.restarts, fab.targets, fab.large_eps), (1, 9, false));
        assert!(s.build(AttackName::FabT).is_ok() && s.build(AttackName::ApgdT).is_ok());
    }
}
