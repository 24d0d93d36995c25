//! Replays the fuzz targets' seed files and every input a fuzz run found crashing (saved under
//! `fuzz/regressions/TARGET/` once fixed) through the same harness as `cargo fuzz`: none may
//! panic, and every seed (a valid file) must be accepted, so that fuzzing starts past the
//! parsers' first checks.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

#[test]
fn seeds_and_saved_crashes_run_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (name, run) in harness::TARGETS {
        let seeds = root.join("seeds").join(name);
        assert!(
            seeds.is_dir(),
            "fuzz target {name} has no seed folder {}",
            seeds.display()
        );
        for (folder, valid) in [(seeds, true), (root.join("regressions").join(name), false)] {
            let Ok(entries) = std::fs::read_dir(&folder) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| run(&bytes));
                assert!(outcome.is_ok(), "{name}: {} panics", path.display());
                if valid {
                    assert!(outcome.unwrap(), "{name}: seed {} refused", path.display());
                }
                replayed += 1;
            }
        }
    }
    assert!(
        replayed >= harness::TARGETS.len(),
        "only {replayed} inputs replayed"
    );
}
