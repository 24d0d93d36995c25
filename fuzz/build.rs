//! The fuzz binaries link libtorch through atop; bake its folder into their rpath, as atop's own
//! build script does for its binaries (link arguments do not pass to dependent crates).
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
