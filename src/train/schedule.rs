//! Learning-rate schedules as a pure function of the step, so a resumed run continues on the
//! same curve.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Linear warm-up from 0, then cosine decay to 0.
    Cosine,
    /// Linear warm-up from 0 to the peak, then linear decay to 0 (one cycle).
    OneCycle,
    /// Linear warm-up, then constant.
    Constant,
}

/// Learning rate for step `step` (0-based) of `total`, peaking at `peak` after `warmup` steps.
pub fn lr_at(schedule: Schedule, peak: f64, step: usize, total: usize, warmup: usize) -> f64 {
    let s = step as f64 + 1.0;
    if step < warmup {
        return peak * s / warmup as f64;
    }
    let rest = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / rest).clamp(0.0, 1.0);
    match schedule {
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        Schedule::OneCycle => peak * (1.0 - t),
        Schedule::Constant => peak,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_peak_and_decay() {
        for s in [Schedule::Cosine, Schedule::OneCycle, Schedule::Constant] {
            assert!((lr_at(s, 0.1, 0, 100, 10) - 0.01).abs() < 1e-12);
            assert!((lr_at(s, 0.1, 9, 100, 10) - 0.1).abs() < 1e-12);
            assert!((lr_at(s, 0.1, 10, 100, 10) - 0.1).abs() < 1e-12);
        }
        assert!(lr_at(Schedule::Cosine, 0.1, 99, 100, 10) < 1e-3);
        assert!((lr_at(Schedule::Cosine, 0.1, 55, 100, 10) - 0.05).abs() < 1e-12);
        assert!((lr_at(Schedule::OneCycle, 0.1, 55, 100, 10) - 0.05).abs() < 1e-12);
        // Monotone after the warm-up.
        let lrs: Vec<f64> = (10..100)
            .map(|i| lr_at(Schedule::Cosine, 0.1, i, 100, 10))
            .collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
        assert_eq!(lr_at(Schedule::Constant, 0.1, 99, 100, 0), 0.1);
    }
}
