//! The defaults of a robust evaluation, declared once: `eval robust`'s flags and a study's
//! `[eval]` table read them (a plan or preset that sets a value overrides it).

/// Seeded test points.
pub const N: usize = 512;
/// R: independent draws of the model per scored image.
pub const DRAWS: usize = 10;
pub const BATCH_SIZE: usize = 128;
/// Points for the sanity checks that run PGD themselves (the study presets set 0 to fit
/// their time).
pub const CHECK_POINTS: usize = 128;

/// `eval robust`'s attacks and EOT: it takes any model, deterministic ones included, where
/// more EOT draws buy nothing (on a random model it warns that EOT is 1).
pub const ATTACKS: &str = "pgd,transfer";
/// A study's attacks and EOT: it always attacks a purifier pipeline, which is random, so the
/// strongest set for a random defence (whole-model PGD and selective EOT, with EOT), and the
/// classifier-only transfer attack as a check.
pub const STUDY_ATTACKS: &str = "pgd,selective-eot,transfer";
pub const STUDY_EOT: usize = 10;
