//! The robust evaluation as a report a reader understands without the code (Markdown) and as
//! per-point records (CSV).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::attacks::Norm;
use crate::eval::robust::{Draws, RobustEvaluation, Scores, Target};
use crate::eval::run::{Provenance, RobustResults, Run, read_results};

fn row(name: &str, s: &Scores) -> String {
    format!(
        "| {name} | {:.2} % ± {:.2} [{:.2}, {:.2}] | {} | {} |",
        100.0 * s.single.value,
        100.0 * s.single_std,
        100.0 * s.single.lo,
        100.0 * s.single.hi,
        s.majority.show(),
        s.worst_of_r.show()
    )
}

/// The name of the worst-case row: robust accuracy only where an attack differentiated the
/// defended model; with transfer attacks alone it is transfer accuracy.
pub fn worst_label(e: &RobustEvaluation, bold: bool) -> String {
    let label = if e.adaptive() {
        "worst case per point (clean and all attacks)"
    } else {
        "transfer accuracy, worst case per point (not robust accuracy: no attack differentiated the defended model)"
    };
    if bold {
        format!("**{label}**")
    } else {
        label.into()
    }
}

/// Which attack broke the most points, in words.
pub fn strongest_line(e: &RobustEvaluation) -> Option<String> {
    let (ai, alone) = e.strongest()?;
    let a = &e.attacks[ai];
    Some(format!(
        "Strongest attack: {} ({:.2} % single-draw accuracy, {} of {} points broken on an average draw; {} broken by it alone, majority vote).",
        a.attack,
        100.0 * a.scores.single.value,
        ((1.0 - a.scores.single.value) * e.n as f64).round(),
        e.n,
        alone
    ))
}

/// The budget line: norm, eps (also as k/255 for Linf), iterations, EOT, restarts.
pub fn budget(e: &RobustEvaluation) -> String {
    let s = &e.config.settings;
    let eps = s.budget.eps;
    let eps = if s.budget.norm == Norm::Linf {
        format!("{eps:.5} ({:.2}/255)", eps * 255.0)
    } else {
        format!("{eps:.5}")
    };
    let per_attack: Vec<String> = e
        .attacks
        .iter()
        .map(|a| format!("{} {}", a.attack, a.budget))
        .collect();
    format!(
        "{} eps {eps}; {}; R = {} draws per scored image{}",
        s.budget.norm,
        per_attack.join("; "),
        e.config.draws,
        e.config
            .plan
            .as_ref()
            .map_or(String::new(), |p| format!(" (plan: {p})"))
    )
}

/// The labels of the evaluated points, counted ("label 2 x 16, 3 x 61"): a shard is a slice of
/// the points in index order, and a split stored class by class gives it a few classes only.
fn label_counts(e: &RobustEvaluation) -> String {
    let mut counts = std::collections::BTreeMap::<i64, usize>::new();
    for r in &e.records {
        *counts.entry(r.label).or_default() += 1;
    }
    let each: Vec<String> = counts.iter().map(|(l, c)| format!("{l} x {c}")).collect();
    format!(
        "label{} {}",
        if counts.len() == 1 { "" } else { "s" },
        each.join(", ")
    )
}

pub fn markdown(e: &RobustEvaluation, p: &Provenance) -> String {
    let mut s = String::new();
    header(&mut s, e, p);
    accuracy(&mut s, e);
    attacks(&mut s, e);
    checks(&mut s, e);
    let _ = writeln!(
        s,
        "\nThe grid (`grid.png`) shows, for the points the strongest attack broke first: clean, \
         adversarial, and where a purifier is present the transformed and purified images, then \
         the perturbation amplified to the full range."
    );
    s
}

/// What was evaluated, how, where and when.
fn header(s: &mut String, e: &RobustEvaluation, p: &Provenance) {
    let _ = writeln!(s, "# Robust evaluation\n");
    let _ = writeln!(s, "- model: `{}`", p.model);
    let _ = writeln!(s, "- defence: {}", p.defence);
    let _ = writeln!(
        s,
        "- data: {} ({} points; indices in results.json)",
        p.data, e.n
    );
    if let Some(sh) = e.shard {
        let _ = writeln!(
            s,
            "- shard {sh}: this report covers its {} points only ({}), a slice of the seeded points \
             in index order, not a sample of them; `atop eval merge` joins the shards",
            e.n,
            label_counts(e)
        );
    }
    let _ = writeln!(s, "- budget: {}", budget(e));
    let _ = writeln!(
        s,
        "- randomness (measured): {} (two calls on the same images differ by up to {:.3e} in a logit)",
        if e.stochastic {
            "random"
        } else {
            "deterministic"
        },
        e.max_logit_change
    );
    let _ = writeln!(
        s,
        "- atop {}, torch {}, {} with {} threads on {} (allocator: {}); started {}; {:.0} s\n",
        p.atop_version,
        p.torch_version,
        p.device,
        p.threads,
        if p.cpu.is_empty() {
            "an unrecorded CPU"
        } else {
            &p.cpu
        },
        if p.allocator_tuned {
            "memory kept for reuse"
        } else {
            "defaults"
        },
        p.started,
        e.seconds
    );
}

/// The three scores of the clean images, each attack and the worst case.
fn accuracy(s: &mut String, e: &RobustEvaluation) {
    let _ = writeln!(s, "## Accuracy\n");
    let _ = writeln!(
        s,
        "Every image, clean or adversarial, is classified by R = {} independent draws of the model. \
         Single draw: the mean over draws of one draw's accuracy, ± its std over draws, with the \
         Clopper-Pearson interval of the mean as a proportion of n. Majority: the most frequent \
         prediction is right (a tie is wrong). Worst of R: all R draws are right. Intervals are \
         95 % Clopper-Pearson over the n points. Every attack runs on every point.\n",
        e.config.draws
    );
    let _ = writeln!(s, "| images | single draw | majority of R | worst of R |");
    let _ = writeln!(s, "|---|---|---|---|");
    let _ = writeln!(s, "{}", row("clean", &e.clean));
    for a in &e.attacks {
        let name = match a.target {
            Target::Whole => format!("{} (whole model)", a.attack),
            Target::Transfer => format!("{} (transfer attack: classifier only)", a.attack),
            Target::Bpda => format!("{} (BPDA: identity backward through the defence)", a.attack),
        };
        let _ = writeln!(s, "{}", row(&name, &a.scores));
    }
    let _ = writeln!(s, "{}\n", row(&worst_label(e, true), &e.worst_case));
    if let Some(line) = strongest_line(e) {
        let _ = writeln!(s, "{line}\n");
    }
}

/// Each attack: its target, budget, cost and gradient tally.
fn attacks(s: &mut String, e: &RobustEvaluation) {
    let _ = writeln!(s, "## Attacks\n");
    let _ = writeln!(
        s,
        "| attack | target | budget | gradient evaluations per point (at most) | queries per point (at most) | zero / non-finite gradients | seconds |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for a in &e.attacks {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} / {} of {} | {:.1} |",
            a.attack,
            match a.target {
                Target::Whole if a.attack == "square" => "whole model, queries only",
                Target::Whole => "whole model, exact gradients",
                Target::Transfer => "classifier alone (transfer)",
                Target::Bpda => "whole model, identity backward through the defence",
            },
            a.budget,
            a.gradient_evaluations_per_point
                .map_or("-".into(), |v| v.to_string()),
            a.queries_per_point.map_or("-".into(), |v| v.to_string()),
            a.grad.zero,
            a.grad.non_finite,
            a.grad.evaluations,
            a.seconds
        );
    }
}

/// The sanity checks and the check runs behind them.
fn checks(s: &mut String, e: &RobustEvaluation) {
    let _ = writeln!(s, "\n## Sanity checks\n");
    let _ = writeln!(s, "| check | status | numbers |");
    let _ = writeln!(s, "|---|---|---|");
    for c in &e.checks {
        let _ = writeln!(s, "| {} | {} | {} |", c.name, c.status, c.detail);
    }
    let c = &e.curves;
    if c.points > 0 {
        let _ = writeln!(
            s,
            "\n## Check runs\n\nWhole-model PGD on the first {} points, single-draw accuracy (mean over R draws); plotted in `checks.png`.\n",
            c.points
        );
        let _ = writeln!(s, "| run | accuracy |");
        let _ = writeln!(s, "|---|---|");
        let last = c.eps.len().saturating_sub(1);
        for (i, (eps, a)) in c.eps.iter().enumerate() {
            let what = if i == last { "unbounded eps" } else { "eps" };
            let _ = writeln!(s, "| {what} {eps:.5} | {:.2} % |", 100.0 * a);
        }
        for (k, a) in &c.iterations {
            let _ = writeln!(s, "| {k:.0} iterations | {:.2} % |", 100.0 * a);
        }
        for (k, a) in &c.eot {
            let _ = writeln!(s, "| EOT {k:.0} | {:.2} % |", 100.0 * a);
        }
        if let Some(f) = c.fixed_draw {
            let _ = writeln!(
                s,
                "| one fixed draw (attacked and scored) | {:.2} % |",
                100.0 * f
            );
        }
    }
}

/// One row per point and image set (clean, then each attack): the R predictions joined by `;`.
pub fn csv(e: &RobustEvaluation) -> String {
    let mut s =
        String::from("index,label,images,preds,plurality,correct_draws,draws,perturbation_norm\n");
    for r in &e.records {
        let mut line = |name: &str, d: &Draws, norm: f64| {
            let correct = d.preds.iter().filter(|&&p| p == r.label).count();
            let joined: Vec<String> = d.preds.iter().map(i64::to_string).collect();
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{:.6}",
                r.index,
                r.label,
                name,
                joined.join(";"),
                d.plurality(),
                correct,
                d.preds.len(),
                norm
            );
        };
        line("clean", &r.clean, 0.0);
        for (a, (d, n)) in e
            .attacks
            .iter()
            .zip(r.attacks.iter().zip(&r.perturbation_norms))
        {
            line(&a.attack, d, *n);
        }
    }
    s
}

/// The summary `eval robust` prints on a terminal: the budget, the three scores of the clean
/// images, each attack and the worst case, and the checks.
pub fn terminal(e: &RobustEvaluation, p: &Provenance) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} [{}] on {} points{}; {}",
        p.model,
        p.defence,
        e.n,
        e.shard.map_or(String::new(), |sh| format!(
            " (shard {sh}: {})",
            label_counts(e)
        )),
        budget(e)
    );
    let _ = writeln!(
        s,
        "{:<34} {:>24} {:>24} {:>24}",
        "images", "single draw (mean, CI)", "majority of R", "worst of R"
    );
    let mut line = |name: &str, sc: &Scores| {
        let _ = writeln!(
            s,
            "{:<34} {:>24} {:>24} {:>24}",
            name,
            sc.single.show(),
            sc.majority.show(),
            sc.worst_of_r.show()
        );
    };
    line("clean", &e.clean);
    for r in &e.attacks {
        let name = match r.target {
            Target::Whole => r.attack.clone(),
            Target::Transfer => format!("{} (transfer)", r.attack),
            Target::Bpda => format!("{} (BPDA)", r.attack),
        };
        line(&name, &r.scores);
    }
    line(&worst_label(e, false), &e.worst_case);
    if let Some(l) = strongest_line(e) {
        let _ = writeln!(s, "{l}");
    }
    for c in &e.checks {
        let _ = writeln!(s, "  [{}] {}: {}", c.status, c.name, c.detail);
    }
    s
}

/// Accuracy vs eps, vs iterations and vs EOT samples of the check runs, side by side.
pub fn curves_png(e: &RobustEvaluation) -> Option<image::RgbImage> {
    use crate::figures::plot::{Series, hconcat, line_chart};
    let c = &e.curves;
    if c.points == 0 || c.eps.len() < 2 {
        return None;
    }
    let pct = |v: &[(f64, f64)]| v.iter().map(|&(x, a)| (x, 100.0 * a)).collect::<Vec<_>>();
    let bounded = &c.eps[..c.eps.len() - 1];
    let mut charts = vec![line_chart(
        "PGD accuracy (%) vs eps",
        "eps",
        &[Series {
            name: "single draw".into(),
            points: pct(bounded),
        }],
    )];
    if c.iterations.len() >= 2 {
        charts.push(line_chart(
            "PGD accuracy (%) vs iterations",
            "iterations",
            &[Series {
                name: "single draw".into(),
                points: pct(&c.iterations),
            }],
        ));
    }
    if c.eot.len() >= 2 {
        charts.push(line_chart(
            "PGD accuracy (%) vs EOT samples",
            "EOT samples per step",
            &[Series {
                name: "single draw".into(),
                points: pct(&c.eot),
            }],
        ));
    }
    Some(hconcat(&charts))
}

/// Writes `records.csv`, `report.md` and `checks.png` into `out`, each atomically, then
/// `results.json`, then `complete.json` (each output's SHA-256, grid.png's where it was
/// written first: the record that the folder is finished); returns the path of `results.json`.
pub fn write_results(out: &Path, results: &RobustResults) -> Result<PathBuf> {
    let e = &results.evaluation;
    let write_text = |name: &str, text: String| {
        crate::io::write_atomic(&out.join(name), |w| {
            std::io::Write::write_all(w, text.as_bytes())
                .with_context(|| format!("cannot write {name}"))
        })
    };
    write_text("records.csv", csv(e))?;
    write_text("report.md", markdown(e, &results.provenance))?;
    let mut files = vec!["records.csv", "report.md", crate::eval::run::RESULTS];
    if let Some(img) = curves_png(e) {
        crate::figures::grid::save_png(&img, &out.join("checks.png"))?;
        files.push("checks.png");
    }
    if out.join("grid.png").exists() {
        files.push("grid.png");
    }
    let path = crate::eval::run::write_results_json(out, results)?;
    // Last: the record that every output is there.
    crate::folder::Complete::write(out, &files)?;
    Ok(path)
}

/// The files of an evaluation [`crate::eval::run::evaluate_into`] just finished in `out`: the
/// report and results ([`write_results`]) and `grid.png`. One read back finished is left as
/// it is. Returns the path of `results.json`.
pub fn write_run(out: &Path, run: &Run, target: &crate::eval::target::Target) -> Result<PathBuf> {
    let Some(x_adv) = &run.x_adv else {
        return Ok(out.join(crate::eval::run::RESULTS));
    };
    write_grid(
        &run.results.evaluation,
        &target.x,
        x_adv,
        // The purifier behind the transform the model runs with (by default its own).
        target.purifier.as_ref().map(|(p, sidecar)| {
            (
                p,
                target
                    .defence
                    .transform
                    .as_ref()
                    .unwrap_or(&sidecar.transform),
            )
        }),
        &out.join("grid.png"),
    )?;
    write_results(out, &run.results)
}

/// The image grid of an evaluation: rows clean, adversarial (from the strongest whole-model
/// attack by single-draw accuracy), the transformed and purified images when `purify` is
/// given, and the perturbation amplified to the full range; up to 8 points, those the attack
/// broke on the most draws first. `x_clean` holds the evaluated points in record order and
/// `x_adv` one such tensor per attack. Nothing is written without a whole-model attack.
pub fn write_grid(
    e: &RobustEvaluation,
    x_clean: &tch::Tensor,
    x_adv: &[tch::Tensor],
    purify: Option<(
        &crate::purifier::Purifier,
        &crate::transforms::TransformConfig,
    )>,
    path: &Path,
) -> Result<()> {
    use tch::{Device, Kind, Tensor};
    let Some((ai, _)) = e
        .attacks
        .iter()
        .enumerate()
        .filter(|(_, a)| a.target == Target::Whole)
        .min_by(|a, b| a.1.scores.single.value.total_cmp(&b.1.scores.single.value))
    else {
        return Ok(());
    };
    let broken = |i: usize| {
        let r = &e.records[i];
        r.attacks[ai]
            .preds
            .iter()
            .filter(|&&p| p != r.label)
            .count()
    };
    let mut order: Vec<usize> = (0..e.n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(broken(i)));
    order.truncate(8);
    let pos = Tensor::from_slice(&order.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let clean = x_clean.index_select(0, &pos).to_kind(Kind::Float);
    let adv = x_adv[ai].index_select(0, &pos);
    let amplified = crate::figures::grid::amplified(&(&adv - &clean));
    let mut rows = vec![("clean", clean), ("adversarial", adv.shallow_clone())];
    if let Some((p, t)) = purify {
        tch::manual_seed(e.config.seed as i64);
        let pass = tch::no_grad(|| p.pass(&adv.to_device(p.device()), t));
        rows.push(("transformed", pass.shown().to_device(Device::Cpu)));
        rows.push(("purified", pass.purified.to_device(Device::Cpu)));
    }
    rows.push(("perturbation", amplified));
    crate::figures::grid::save_tensor_rows(&rows, path)
}

/// Each of `others` against `first` (`atop eval compare`): finished evaluations (folders of
/// `results.json`) of the same points, draws and budget, named by their folders.
pub fn compare_results(
    first: &Path,
    others: &[PathBuf],
) -> Result<Vec<crate::eval::compare::Comparison>> {
    use crate::eval::compare::{Comparison, eps_label};
    let name = |p: &Path| {
        p.file_name()
            .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
    };
    let base = read_results(first)?.evaluation;
    let budget = base.config.settings.budget;
    others
        .iter()
        .map(|dir| {
            let other = read_results(dir)?.evaluation;
            let b = other.config.settings.budget;
            if b.norm != budget.norm || b.eps != budget.eps {
                anyhow::bail!(
                    "{} is at {} eps {}, {} at {} eps {}: compare evaluations at one budget",
                    dir.display(),
                    b.norm,
                    eps_label(b.eps),
                    first.display(),
                    budget.norm,
                    eps_label(budget.eps)
                );
            }
            Comparison::of(
                &eps_label(budget.eps),
                (&name(first), &base),
                (&name(dir), &other),
            )
        })
        .collect()
}

/// The paired table of [`compare_results`] (one row per comparison) and its sentences.
pub fn comparison_markdown(cs: &[crate::eval::compare::Comparison]) -> String {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "| second vs first | eps | points | clean, single draw: difference [95 %] | points better / worse | robust, single draw: difference [95 %] | points better / worse | robust majority: only second / only first (McNemar p) |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|");
    for c in cs {
        let _ = writeln!(
            m,
            "| {} vs {} | {} | {} | {} | {} / {} | {} | {} / {} | {} / {} ({}) |",
            c.second,
            c.first,
            c.eps,
            c.robust.n,
            c.clean.show(),
            c.clean.better,
            c.clean.worse,
            c.robust.show(),
            c.robust.better,
            c.robust.worse,
            c.robust_majority.b,
            c.robust_majority.c,
            crate::eval::stats::p_value(c.robust_majority.p)
        );
    }
    let _ = writeln!(
        m,
        "\nPer point, the share of its R draws right (robust: on the clean image and every attacked image on the same draw), second minus first, averaged; 95 % interval from {} seeded bootstrap resamples of the points.\n",
        crate::eval::stats::BOOTSTRAP_RESAMPLES
    );
    for c in cs {
        let _ = writeln!(m, "- {}", c.sentence());
    }
    m
}
