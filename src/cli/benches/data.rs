//! `atop bench data`: decoding the data sets into memory and the training iterator's batches/s.

use super::*;
use atop::bench::data::{self, DataBench};

pub(super) fn data(args: DataBenchArgs, global: &Global) -> Result<()> {
    let rows = data::run(&DataBench {
        cifar10: args.cifar10,
        imagenette: args.imagenette,
        imagenette_size: args.imagenette_size,
        batch_size: args.batch_size,
        batches: args.batches,
    })?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("threads: {}", atop::runtime::threads());
        for r in &rows {
            println!("{:<70} {:>10.2} {}", r.what, r.value, r.unit);
        }
    }
    Ok(())
}
