//! Links the binaries with packed relative relocations (`DT_RELR`) where the linker and C
//! library support them.
//!
//! A position-independent executable carries a relocation for every pointer in its data, and
//! the dynamic loader reads them all at start: 1.6 MB of 24-byte `RELATIVE` entries for the
//! gateway, which then stay in its RSS as file pages. Packed, the same relocations take a few
//! KB, and the binary stays position-independent (ASLR unchanged). glibc 2.36 and binutils 2.38
//! (or lld 15) are needed; where the linker refuses the flag, or only warns about it, the
//! binaries link as before.

use std::path::PathBuf;
use std::process::Command;

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if target_os != "linux" || target_env != "gnu" {
        return;
    }
    if linker_accepts(FLAG) {
        println!("cargo:rustc-link-arg-bins={FLAG}");
    } else {
        println!("cargo:warning=the linker does not pack relative relocations; linking without DT_RELR");
    }
}

/// Whether the C compiler driver rustc links with accepts `flag` on an empty program, with no
/// warning (an old `ld` warns about an unknown `-z` option and ignores it).
fn linker_accepts(flag: &str) -> bool {
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else { return false };
    let linker = std::env::var("RUSTC_LINKER").unwrap_or_else(|_| "cc".into());
    let source = out.join("relr-probe.c");
    if std::fs::write(&source, "int main(void) { return 0; }\n").is_err() {
        return false;
    }
    Command::new(linker)
        .arg(&source)
        .arg("-o")
        .arg(out.join("relr-probe"))
        .args(["-pie", "-fPIE", flag, "-Wl,--fatal-warnings"])
        .output()
        .is_ok_and(|o| o.status.success() && o.stderr.is_empty())
}
