//! Builds microvm's guest init (resources/init) as a static binary and leaves it at
//! `$OUT_DIR/microvm-init` for vmm/src/guestinit.rs to embed with `include_bytes!`.
//!
//! A nested `cargo build` with its own target dir under OUT_DIR: the init needs another
//! target (static musl, or static glibc) and its own profile (size-optimised, stripped,
//! panic=abort), which an artifact dependency could give only on nightly. The separate
//! target dir keeps it clear of the outer cargo's lock; the outer jobserver
//! (CARGO_MAKEFLAGS) is inherited, so it does not add jobs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Preferred: musl gives a ~0.5 MB init. Fallback, always installed: glibc linked
/// statically (~1.2 MB; fine because the init uses no NSS: no getpwnam, no DNS via libc).
const MUSL: &str = "x86_64-unknown-linux-musl";
const GNU: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().expect("vmm/ has a parent");
    let init_dir = workspace.join("resources/init");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed={}", init_dir.display());
    println!("cargo:rerun-if-changed={}", workspace.join("Cargo.lock").display());

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let target = if target_installed(&rustc, MUSL) { MUSL } else { GNU };
    let target_dir = out.join("init-target");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace)
        .args(["build", "--release", "--locked", "-p", "microvm-init", "--target", target])
        .arg("--target-dir")
        .arg(&target_dir);
    // What the outer build set for itself must not leak into this one.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", ["-C", "target-feature=+crt-static", "-C", "relocation-model=static"].join("\x1f"))
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true");
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cargo:?} to build resources/init: {e}"));
    assert!(status.success(), "building microvm's guest init (resources/init) for {target} failed");
    let built = target_dir.join(target).join("release/microvm-init");
    std::fs::copy(&built, out.join("microvm-init"))
        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
}

/// Whether rustup (or the distribution) installed the standard library for `target`.
fn target_installed(rustc: &std::ffi::OsStr, target: &str) -> bool {
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot).join("lib/rustlib").join(target).join("lib").is_dir()
}
