//! `atop bench data`: decoding the data sets into memory and the training iterator's batches/s.

use super::*;

pub(super) fn data(args: DataBenchArgs, global: &Global) -> Result<()> {
    let mut rows = Vec::new();
    let cifar = DataConfig {
        root: args.cifar10.clone(),
        ..DataConfig::new(DatasetKind::Cifar10)
    };
    let t = Instant::now();
    let train = cifar.load(Split::Train)?;
    let test = cifar.load(Split::Test)?;
    let secs = t.elapsed().as_secs_f64();
    let n = train.len() + test.len();
    rows.push(Row {
        what: format!(
            "CIFAR-10 decode all {n} images ({})",
            train.source.display()
        ),
        value: secs,
        unit: "s",
    });
    rows.push(Row {
        what: "CIFAR-10 decode rate".into(),
        value: n as f64 / secs,
        unit: "img/s",
    });
    let train = Arc::new(train);
    rows.push(iterate(
        "CIFAR-10 train iterator, crop+flip",
        Loader::new(
            train,
            LoaderConfig::train(args.batch_size, Augment::cifar(), 0),
        ),
        args.batches,
    ));

    let nette = DataConfig {
        root: args.imagenette.clone(),
        ..DataConfig::new(DatasetKind::Imagenette)
    };
    if nette.resolve_root().is_ok() {
        let t = Instant::now();
        let set = nette.load(Split::Train)?;
        let secs = t.elapsed().as_secs_f64();
        rows.push(Row {
            what: format!(
                "ImageNette decode {} train images at {}px",
                set.len(),
                set.height
            ),
            value: secs,
            unit: "s",
        });
        let size = args.imagenette_size;
        rows.push(iterate(
            &format!("ImageNette train iterator, random-resized-crop {size}px + flip"),
            Loader::new(
                Arc::new(set),
                LoaderConfig::train(args.batch_size, Augment::resized_crop(size), 0),
            ),
            args.batches,
        ));
    }

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

fn iterate(what: &str, loader: Loader, batches: usize) -> Row {
    let batches = batches.min(loader.batches_per_epoch());
    let t = Instant::now();
    let mut seen = 0;
    for batch in loader.epoch(0).take(batches) {
        seen += batch.indices.len();
    }
    let secs = t.elapsed().as_secs_f64();
    Row {
        what: format!("{what}: {batches} batches ({seen} images)"),
        value: batches as f64 / secs,
        unit: "batches/s",
    }
}
