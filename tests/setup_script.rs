//! scripts/setup.sh: a wrong or missing torch gives one clear message saying what is expected
//! and how to fix it. Run against fake venvs, so no network and no change to the real set-up.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn setup() -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/setup.sh"));
    cmd
}

fn fake_python(path: &Path, torch_version: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let script = format!(
        "#!/bin/sh\ncase \"$*\" in\n  *'import torch'*) echo {torch_version};;\n  *'-m pip'*) echo 'pip: no network here' >&2; exit 1;;\nesac\n"
    );
    std::fs::write(path, script).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn wrong_torch_in_the_venv_is_named_with_the_expected_version() {
    let tmp = tempfile::tempdir().unwrap();
    let venv = tmp.path().join("venv");
    fake_python(&venv.join("bin/python"), "2.10.0");
    let out = setup().env("ATOP_VENV", &venv).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("venv has torch 2.10.0, atop needs 2.11.0: reinstalling"),
        "{err}"
    );
    assert!(
        err.contains("could not install torch==2.11.0")
            && err.contains(&venv.display().to_string()),
        "{err}"
    );
}

#[test]
fn missing_python_is_named_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let out = setup()
        .env("ATOP_VENV", tmp.path().join("venv"))
        .env("ATOP_PYTHON", "/nonexistent/python3")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no '/nonexistent/python3'")
            && err.contains("torch==2.11.0")
            && err.contains("ATOP_PYTHON"),
        "{err}"
    );
}
