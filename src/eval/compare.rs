//! Two robust evaluations of the same points compared point by point (`atop eval compare`,
//! the study report's AToP-vs-pre-trained table, the acceptance scripts' paired lines).
//!
//! Pairing is what makes the comparison sharp: both models are scored on the same points and,
//! because the scoring draws' seeds depend on the evaluation seed, the image set and the batch
//! (not on the model), on the same draws. The per-point differences then carry the comparison,
//! not two independent intervals.

use anyhow::{Result, bail};
use serde::Serialize;

use super::robust::{PointScores, RobustEvaluation};
use super::stats::{McNemar, PairedDifference, paired_difference};

/// The second evaluation against the first, on the same points and scoring draws.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Names of the two models in sentences ("the pre-trained purifier", "AToP").
    pub first: String,
    pub second: String,
    pub eps: String,
    /// Set when both are the same shard: the comparison covers its points only.
    pub shard: Option<super::spec::Shard>,
    /// Per-point share of draws right on the clean image: second minus first.
    pub clean: PairedDifference,
    /// Per-point share of draws right on the clean and every attacked image.
    pub robust: PairedDifference,
    /// Majority-vote robustness and clean correctness, right only under the second (b) or only
    /// under the first (c), with the exact McNemar test.
    pub robust_majority: McNemar,
    pub clean_majority: McNemar,
}

/// Why two evaluations cannot be compared point by point, or None when they can: the same
/// data, points (in the same order, with the same labels), seed, draws and batches, and the
/// same slice: both whole, or both the same shard (the same points on the same draws, so the
/// pairing holds on them; a shard is a slice of the points in index order, not a sample).
pub fn unpaired(a: &RobustEvaluation, b: &RobustEvaluation) -> Option<String> {
    let differs = [
        (a.config.data != b.config.data, "data"),
        (a.indices != b.indices, "points"),
        (a.config.seed != b.config.seed, "seed"),
        (a.config.draws != b.config.draws, "draws (R)"),
        (a.config.batch_size != b.config.batch_size, "batch size"),
        (
            a.records.len() != b.records.len()
                || a.records
                    .iter()
                    .zip(&b.records)
                    .any(|(x, y)| x.position != y.position || x.label != y.label),
            "records",
        ),
    ];
    if a.shard != b.shard {
        let slice = |e: &RobustEvaluation| {
            e.shard.map_or("the whole".to_string(), |s| {
                format!("shard {}/{}", s.index, s.count)
            })
        };
        return Some(format!(
            "one is {} and the other {} of the points (merge the shards first: atop eval merge)",
            slice(a),
            slice(b)
        ));
    }
    let what: Vec<&str> = differs.iter().filter(|d| d.0).map(|d| d.1).collect();
    (!what.is_empty()).then(|| format!("they differ in {}", what.join(", ")))
}

impl Comparison {
    /// `second` against `first`; an error if they are not of the same points and draws.
    pub fn of(
        eps: &str,
        (first_name, first): (&str, &RobustEvaluation),
        (second_name, second): (&str, &RobustEvaluation),
    ) -> Result<Comparison> {
        if let Some(why) = unpaired(first, second) {
            bail!(
                "{second_name} and {first_name} at {eps} cannot be compared point by point: {why}"
            );
        }
        let scores =
            |e: &RobustEvaluation| e.records.iter().map(|r| r.scores()).collect::<Vec<_>>();
        let (a, b) = (scores(first), scores(second));
        let col =
            |v: &[PointScores], f: fn(&PointScores) -> f64| v.iter().map(f).collect::<Vec<_>>();
        let bits =
            |v: &[PointScores], f: fn(&PointScores) -> bool| v.iter().map(f).collect::<Vec<_>>();
        Ok(Comparison {
            first: first_name.into(),
            second: second_name.into(),
            eps: eps.into(),
            shard: first.shard,
            clean: paired_difference(&col(&a, |p| p.clean_single), &col(&b, |p| p.clean_single)),
            robust: paired_difference(&col(&a, |p| p.robust_single), &col(&b, |p| p.robust_single)),
            robust_majority: McNemar::of(
                &bits(&a, |p| p.robust_majority),
                &bits(&b, |p| p.robust_majority),
            ),
            clean_majority: McNemar::of(
                &bits(&a, |p| p.clean_majority),
                &bits(&b, |p| p.clean_majority),
            ),
        })
    }

    /// The sentence under a table, as the paired test reads.
    pub fn sentence(&self) -> String {
        let verdict = |d: &PairedDifference| {
            if !d.significant() {
                "no difference these points can resolve (the paired interval includes 0)"
            } else if d.mean > 0.0 {
                "a gain (the paired interval excludes 0)"
            } else {
                "a loss (the paired interval excludes 0)"
            }
        };
        let m = &self.robust_majority;
        format!(
            "At {}, point by point on the same {} points{} and scoring draws: {} changes robust accuracy (single draw, worst case over the attacks) by {}: {}; clean accuracy by {}: {}. Majority vote: robust under {} only on {} points, under {} only on {} (exact McNemar p {}).",
            self.eps,
            self.robust.n,
            self.shard.map_or(String::new(), |s| format!(
                " (shard {}/{} of the seeded points)",
                s.index, s.count
            )),
            self.second,
            self.robust.show(),
            verdict(&self.robust),
            self.clean.show(),
            verdict(&self.clean),
            self.second,
            m.b,
            self.first,
            m.c,
            match m.p {
                p if p < 0.001 => "< 0.001".to_string(),
                p => format!("= {}", super::stats::p_value(p)),
            }
        )
    }
}

/// An eps label for names and tables: "8/255" where eps is k/255, else the number.
pub fn eps_label(eps: f64) -> String {
    let k = eps * 255.0;
    if (k - k.round()).abs() < 1e-6 {
        format!("{}/255", k.round() as i64)
    } else {
        format!("{eps}")
    }
}
