//! `atop data inspect`: what a dataset split holds (images, size, classes and their counts,
//! skipped files) and a grid of seeded samples per class.

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use super::subset::seeded_subset;
use super::{DataConfig, ImageSet, Skipped, Split};
use crate::figures::grid::{self, Row};

/// What to look at.
#[derive(Debug, Clone)]
pub struct InspectSpec {
    pub data: DataConfig,
    pub split: Split,
    /// A seeded random subset of this many images.
    pub subset: Option<usize>,
    /// Seed of the subset and of the grid's samples.
    pub seed: u64,
    /// Samples per class in the grid.
    pub per_class: usize,
    /// At most this many classes (rows) in the grid.
    pub max_classes: usize,
    /// Where to write the grid (default: <dataset>-<split>-grid.png).
    pub grid: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct ClassCount {
    pub label: usize,
    pub class: String,
    pub name: String,
    pub count: usize,
}

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub dataset: String,
    pub split: Split,
    pub source: PathBuf,
    pub images: usize,
    pub height: usize,
    pub width: usize,
    pub classes: Vec<ClassCount>,
    pub coarse_classes: Option<Vec<String>>,
    pub skipped: Vec<Skipped>,
    pub subset_seed: Option<u64>,
    pub subset_indices: Option<Vec<usize>>,
    pub grid: PathBuf,
    /// Loading time.
    pub seconds: f64,
}

/// Loads the split (or its subset), writes the sample grid and returns the report.
pub fn inspect(spec: &InspectSpec) -> Result<InspectReport> {
    let start = std::time::Instant::now();
    let full = spec.data.load(spec.split)?;
    let seconds = start.elapsed().as_secs_f64();
    let (set, indices) = match spec.subset {
        Some(n) => {
            let idx = seeded_subset(full.len(), n, spec.seed)?;
            (full.select(&idx), Some(idx))
        }
        None => (full, None),
    };
    let grid_path = spec
        .grid
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}-{}-grid.png", set.name, spec.split.as_str())));
    let img = sample_grid(&set, spec.per_class, spec.max_classes, spec.seed);
    grid::save_png(&img, &grid_path)?;
    let classes = set
        .class_counts()
        .iter()
        .enumerate()
        .map(|(i, &count)| ClassCount {
            label: i,
            class: set.classes[i].clone(),
            name: set.class_names[i].clone(),
            count,
        })
        .collect();
    Ok(InspectReport {
        dataset: set.name.clone(),
        split: spec.split,
        source: set.source.clone(),
        images: set.len(),
        height: set.height,
        width: set.width,
        classes,
        coarse_classes: set.coarse.as_ref().map(|c| c.classes.clone()),
        skipped: set.skipped.clone(),
        subset_seed: spec.subset.map(|_| spec.seed),
        subset_indices: indices,
        grid: grid_path,
        seconds,
    })
}

/// `per_class` seeded samples of each of the first `max_classes` classes, one row per class.
fn sample_grid(set: &ImageSet, per_class: usize, max_classes: usize, seed: u64) -> image::RgbImage {
    let classes = set.num_classes().min(max_classes);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in set.labels.iter().enumerate() {
        if (l as usize) < classes {
            by_class[l as usize].push(i);
        }
    }
    let rows: Vec<Row> = by_class
        .iter()
        .enumerate()
        .map(|(c, members)| {
            let k = per_class.min(members.len());
            let picks = seeded_subset(members.len(), k, seed).expect("k <= len");
            Row {
                label: set.class_names[c].clone(),
                images: picks.iter().map(|&p| set.image(members[p])).collect(),
            }
        })
        .collect();
    grid::labelled_rows(&rows, set.height, set.width)
}
