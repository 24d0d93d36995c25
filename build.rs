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
    compile_shim(lib);
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}

/// csrc/: the few libtorch calls tch does not wrap (device-generic autocast).
fn compile_shim(lib: &Path) {
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    let torch = lib.parent().expect("libtorch lib folder has a parent");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!(
            "-D_GLIBCXX_USE_CXX11_ABI={}",
            std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())
        ))
        .file("csrc/autocast.cpp")
        .compile("atop_shim");
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
