//! Progress bars (with rate and ETA) that `--quiet` and `--json` switch off in one place.

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// A bar counting `len` items; hidden when quiet.
pub fn bar(len: u64, message: &str) -> ProgressBar {
    styled(
        len,
        message,
        "{msg} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}",
    )
}

/// A bar counting bytes; hidden when quiet.
pub fn bytes_bar(len: u64, message: &str) -> ProgressBar {
    styled(
        len,
        message,
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    )
}

fn styled(len: u64, message: &str, template: &str) -> ProgressBar {
    if quiet() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}
