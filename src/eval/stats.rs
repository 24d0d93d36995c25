//! Exact binomial intervals for accuracies measured on n test points, and paired comparisons
//! of two models scored on the same points and draws.

use serde::{Deserialize, Serialize};

/// A proportion k/n with its two-sided Clopper-Pearson interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Proportion {
    pub k: usize,
    pub n: usize,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Proportion {
    /// k successes of n with the 95 % interval.
    pub fn new(k: usize, n: usize) -> Self {
        let (lo, hi) = clopper_pearson(k, n, 0.05);
        Proportion {
            k,
            n,
            value: k as f64 / n.max(1) as f64,
            lo,
            hi,
        }
    }

    /// "12.50 % [9.81, 15.66]".
    pub fn show(&self) -> String {
        format!(
            "{:.2} % [{:.2}, {:.2}]",
            100.0 * self.value,
            100.0 * self.lo,
            100.0 * self.hi
        )
    }
}

/// The exact (Clopper-Pearson) two-sided 1 - alpha interval of a binomial proportion: the
/// alpha/2 and 1 - alpha/2 quantiles of Beta(k, n - k + 1) and Beta(k + 1, n - k).
pub fn clopper_pearson(k: usize, n: usize, alpha: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k.min(n) as f64, n as f64);
    let lo = if k == 0.0 {
        0.0
    } else {
        beta_quantile(alpha / 2.0, k, n - k + 1.0)
    };
    let hi = if k == n {
        1.0
    } else {
        beta_quantile(1.0 - alpha / 2.0, k + 1.0, n - k)
    };
    (lo, hi)
}

/// The p-quantile of Beta(a, b), by bisection on the regularized incomplete beta function
/// (monotone in x, so 60 halvings reach double precision).
fn beta_quantile(p: f64, a: f64, b: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if inc_beta(mid, a, b) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The regularized incomplete beta function I_x(a, b), by Lentz's continued fraction on the
/// side where it converges fast.
fn inc_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_fraction(x, a, b) / a
    } else {
        1.0 - ln_front.exp() * beta_fraction(1.0 - x, b, a) / b
    }
}

fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        for aa in [
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ] {
            d = 1.0 + aa * d;
            if d.abs() < TINY {
                d = TINY;
            }
            c = 1.0 + aa / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// ln Gamma(x) for x > 0 (Lanczos, g = 7, n = 9; relative error below 1e-14).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut s = G[0];
    for (i, g) in G.iter().enumerate().skip(1) {
        s += g / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

/// Two models compared point by point on the same points (and the same scoring draws): per
/// point a score of each in [0, 1] (the share of draws right), their mean difference (second
/// minus first) with a 95 % paired-bootstrap interval, and how many points moved which way.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedDifference {
    pub n: usize,
    /// mean(b_i - a_i).
    pub mean: f64,
    /// Percentile interval of the mean over 10,000 resamples of the points (seeded).
    pub lo: f64,
    pub hi: f64,
    /// Points where the second scores higher, lower.
    pub better: usize,
    pub worse: usize,
}

impl PairedDifference {
    /// The 95 % interval excludes 0.
    pub fn significant(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }

    /// "+3.20 points [+0.8, +5.6]".
    pub fn show(&self) -> String {
        format!(
            "{:+.2} points [{:+.2}, {:+.2}]",
            100.0 * self.mean,
            100.0 * self.lo,
            100.0 * self.hi
        )
    }
}

/// Resamples drawn by [`paired_difference`].
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;

/// The paired comparison of per-point scores `a` (first model) and `b` (second), which must
/// be of the same points in the same order. Deterministic: the resamples are seeded.
pub fn paired_difference(a: &[f64], b: &[f64]) -> PairedDifference {
    use rand::{RngExt, SeedableRng};
    assert_eq!(a.len(), b.len(), "paired scores of different point sets");
    let n = a.len();
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let mean = d.iter().sum::<f64>() / n.max(1) as f64;
    let (lo, hi) = if n == 0 {
        (0.0, 0.0)
    } else {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x9a1_2ed);
        let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
            .map(|_| (0..n).map(|_| d[rng.random_range(0..n)]).sum::<f64>() / n as f64)
            .collect();
        means.sort_by(f64::total_cmp);
        let at = |q: f64| means[((q * (BOOTSTRAP_RESAMPLES - 1) as f64).round()) as usize];
        (at(0.025), at(0.975))
    };
    PairedDifference {
        n,
        mean,
        lo,
        hi,
        better: d.iter().filter(|&&x| x > 0.0).count(),
        worse: d.iter().filter(|&&x| x < 0.0).count(),
    }
}

/// Paired binary outcomes of two models on the same points: `b` right only under the second,
/// `c` right only under the first, and the exact McNemar p-value of no difference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct McNemar {
    pub b: usize,
    pub c: usize,
    pub p: f64,
}

impl McNemar {
    pub fn of(first: &[bool], second: &[bool]) -> McNemar {
        assert_eq!(
            first.len(),
            second.len(),
            "paired outcomes of different point sets"
        );
        let b = first
            .iter()
            .zip(second)
            .filter(|(f, s)| !**f && **s)
            .count();
        let c = first
            .iter()
            .zip(second)
            .filter(|(f, s)| **f && !**s)
            .count();
        McNemar {
            b,
            c,
            p: mcnemar_exact(b, c),
        }
    }
}

/// The exact two-sided McNemar test of paired binary outcomes: `b` points right only under
/// the second model, `c` only under the first. Under no difference each discordant point is a
/// fair coin: p = P(|X - m/2| >= |b - m/2|) for X ~ Binomial(m = b + c, 1/2), at most 1.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let m = b + c;
    if m == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // P(X <= k) by summing binomial terms in log space.
    let ln_half = -(m as f64) * std::f64::consts::LN_2;
    let ln_choose = |j: usize| {
        ln_gamma(m as f64 + 1.0) - ln_gamma(j as f64 + 1.0) - ln_gamma((m - j) as f64 + 1.0)
    };
    let tail: f64 = (0..=k).map(|j| (ln_choose(j) + ln_half).exp()).sum();
    (2.0 * tail).min(1.0)
}

/// A p-value as a report prints it: three decimals, or "< 0.001" below that (never "0.000").
pub fn p_value(p: f64) -> String {
    if p < 0.001 {
        "< 0.001".into()
    } else {
        format!("{p:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clopper_pearson_matches_published_values() {
        // Values from scipy.stats.beta.ppf (the textbook definition).
        let close = |a: f64, b: f64| (a - b).abs() < 5e-5;
        let (lo, hi) = clopper_pearson(5, 10, 0.05);
        assert!(close(lo, 0.187_086) && close(hi, 0.812_914), "{lo} {hi}");
        let (lo, hi) = clopper_pearson(0, 10, 0.05);
        assert!(lo == 0.0 && close(hi, 0.308_497), "{hi}");
        let (lo, hi) = clopper_pearson(10, 10, 0.05);
        assert!(close(lo, 0.691_503) && hi == 1.0, "{lo}");
        let (lo, hi) = clopper_pearson(1, 100, 0.05);
        assert!(close(lo, 0.000_253) && close(hi, 0.054_460), "{lo} {hi}");
        let (lo, hi) = clopper_pearson(256, 512, 0.05);
        assert!(close(lo, 0.455_866) && close(hi, 0.544_134), "{lo} {hi}");
        assert_eq!(clopper_pearson(0, 0, 0.05), (0.0, 1.0));
    }

    #[test]
    fn ln_gamma_is_accurate() {
        assert!((ln_gamma(1.0)).abs() < 1e-13);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
        assert!((ln_gamma(100.0) - 359.134_205_369_575_4).abs() < 1e-9);
    }

    #[test]
    fn mcnemar_matches_the_binomial_tail() {
        // b = 0, c = 5: p = 2 / 32.
        assert!((mcnemar_exact(0, 5) - 0.0625).abs() < 1e-12);
        // b = 2, c = 8 (m = 10): 2 * (1 + 10 + 45) / 1024.
        assert!((mcnemar_exact(2, 8) - 112.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(3, 3), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
    }

    #[test]
    fn paired_differences_see_a_shift_the_unpaired_intervals_miss() {
        // 200 points; the second model is right on 12 more (and wrong on 2 others).
        let a: Vec<f64> = (0..200).map(|i| f64::from(u8::from(i % 2 == 0))).collect();
        let mut b = a.clone();
        for v in b.iter_mut().skip(1).step_by(2).take(12) {
            *v = 1.0;
        }
        b[0] = 0.0;
        b[2] = 0.0;
        let d = paired_difference(&a, &b);
        assert_eq!((d.better, d.worse), (12, 2));
        assert!((d.mean - 0.05).abs() < 1e-12);
        assert!(d.significant() && d.lo > 0.0 && d.hi > d.mean, "{d:?}");
        // Unpaired, the two accuracies' intervals overlap.
        let (pa, pb) = (Proportion::new(100, 200), Proportion::new(110, 200));
        assert!(pb.lo < pa.hi);
        // The same scores: no difference, an interval of zero width.
        let same = paired_difference(&a, &a);
        assert!(!same.significant() && same.lo == 0.0 && same.hi == 0.0);
    }
}
