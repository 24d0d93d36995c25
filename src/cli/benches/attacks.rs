//! `atop bench attacks`: PGD and APGD-CE img/s, side by side with torchattacks on the same weights.

use super::*;
use atop::bench::attacks::{self, AttackBench, AttackRow};

pub(super) fn attacks(args: AttackBenchArgs, global: &Global) -> Result<()> {
    let rows = attacks::run(&AttackBench {
        arch: args.arch.clone(),
        batch: args.batch,
        batches: args.batches,
        pgd_steps: args.pgd_steps,
        apgd_steps: args.apgd_steps,
        noise: args.noise,
        eot: args.eot,
        rounds: args.rounds,
        reference: !args.no_reference,
        device: global.device,
    })?;
    print(&rows, &args, global, atop::runtime::threads())
}

/// The rows as a table (or JSON).
fn print(
    rows: &[AttackRow],
    args: &AttackBenchArgs,
    global: &Global,
    threads: usize,
) -> Result<()> {
    if global.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "device {:?}, threads {threads}, linf eps 8/255, f32, medians of {} alternating rounds",
        global.device, args.rounds
    );
    println!(
        "{:<20} {:<32} {:>7} {:>12} {:>14} {:>7}",
        "arch", "attack", "images", "atop img/s", "torchatt img/s", "ratio"
    );
    for r in rows {
        println!(
            "{:<20} {:<32} {:>7} {:>12.2} {:>14} {:>7}",
            r.arch,
            r.attack,
            r.images,
            r.atop_img_s,
            r.torchattacks_img_s
                .map_or("-".into(), |v| format!("{v:.2}")),
            r.ratio.map_or("-".into(), |v| format!("{v:.2}")),
        );
    }
    if let Some(f) = rows
        .iter()
        .filter_map(|r| r.first_draw_correct)
        .reduce(f64::min)
        && f < 1.0
    {
        println!(
            "note: one draw of the model classified {:.1} % of the points correctly; torchattacks' APGD attacks only those, atop all of them",
            100.0 * f
        );
    }
    Ok(())
}
