//! Makes the `atop` binaries, tests and benches find libtorch at run time without LD_LIBRARY_PATH.
//!
//! torch-sys (links = "tch") exports the libtorch library folder it linked against as
//! DEP_TCH_LIBTORCH_LIB to crates that depend on it directly; we bake that folder into the rpath.
//! We also force libtorch_cuda to stay linked: rustc passes --as-needed and nothing in our code
//! references a CUDA symbol directly, so without this CUDA would silently be unavailable.

use std::path::Path;

const EXPECTED_TORCH: &str = "2.11.0";

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        // torch-sys built in doc-only mode: nothing to link.
        return;
    };
    let lib = Path::new(&lib);
    let version = check_torch_version(lib);
    println!(
        "cargo:rustc-env=ATOP_TORCH_VERSION={}",
        version.as_deref().unwrap_or("unknown")
    );
    println!("cargo:rustc-env=ATOP_LIBTORCH_LIB={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}

/// torch-sys only checks the version of a standalone libtorch (its build-version file); a PyPI
/// wheel has torch/version.py instead, so check that here and say how to fix a mismatch.
fn check_torch_version(lib: &Path) -> Option<String> {
    let version_py = lib.join("../version.py");
    println!("cargo:rerun-if-changed={}", version_py.display());
    let Ok(text) = std::fs::read_to_string(&version_py) else {
        return None;
    };
    let found = text
        .lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| {
            v.trim()
                .trim_matches(['\'', '"'])
                .split('+')
                .next()
                .unwrap_or("")
                .to_string()
        });
    if let Some(found) = found.as_deref().filter(|f| *f != EXPECTED_TORCH) {
        panic!(
            "\n\natop needs torch {EXPECTED_TORCH} (the libtorch that tch 0.24 is built for), \
             but {} is torch {found}.\nFix: run `scripts/setup.sh` (it installs torch=={EXPECTED_TORCH} \
             into its venv and points the build at it).\n",
            lib.display()
        );
    }
    found
}
