//! Links the binaries with packed relative relocations (`DT_RELR`) where the toolchain and C
//! library support them.
//!
//! A position-independent executable carries a relocation for every pointer in its data, and
//! the dynamic loader reads them all at start: 1.6 MB of 24-byte `RELATIVE` entries for the
//! gateway, which then stay in its RSS as file pages. Packed, the same relocations take 25 KB,
//! and the binary stays position-independent (ASLR unchanged). Such a binary needs glibc 2.36.
//!
//! The linker adds that requirement without checking that the C library it links against has
//! it, so a link that succeeds proves nothing. A probe program is built the way rustc builds
//! the binaries (its own linker choice, the build's flags) and run: only a probe that starts
//! turns the packing on. A cross or static build is not probed and not packed unless asked.
//! `TOLLGATE_RELR=0` turns it off, `TOLLGATE_RELR=1` on without a probe.

use std::path::{Path, PathBuf};
use std::process::Command;

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TOLLGATE_RELR");
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    if env("CARGO_CFG_TARGET_OS") != "linux" || env("CARGO_CFG_TARGET_ENV") != "gnu" {
        return;
    }
    let pack = match env("TOLLGATE_RELR").as_str() {
        "0" => false,
        "1" => true,
        _ if env("HOST") != env("TARGET") || env("CARGO_CFG_TARGET_FEATURE").split(',').any(|f| f == "crt-static") => {
            println!("cargo:warning=a cross or static build: relocations not packed (TOLLGATE_RELR=1 packs them)");
            false
        }
        _ => match probe() {
            Ok(()) => true,
            Err(why) => {
                println!("cargo:warning=relocations not packed: {why}");
                false
            }
        },
    };
    if pack {
        // Examples too: the load benchmark's bare Pingora is measured beside the gateway.
        println!("cargo:rustc-link-arg-bins={FLAG}");
        println!("cargo:rustc-link-arg-examples={FLAG}");
    }
}

/// A program whose data holds a pointer (so it has a relocation to pack), built with the flag
/// as the binaries would be, and run.
fn probe() -> Result<(), String> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("no OUT_DIR")?);
    let source = out.join("relr_probe.rs");
    let program = out.join("relr_probe");
    std::fs::write(
        &source,
        "static WORD: &str = \"relr\";\n\
         fn main() { std::process::exit(if std::hint::black_box(WORD).len() == 4 { 0 } else { 1 }) }\n",
    )
    .map_err(|e| format!("cannot write the probe: {e}"))?;
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut build = Command::new(rustc);
    build.arg(&source).arg("-o").arg(&program);
    build.args(["--edition", "2021", "--target", &std::env::var("TARGET").unwrap_or_default()]);
    // The build's own flags, a linker chosen in them included.
    if let Ok(flags) = std::env::var("CARGO_ENCODED_RUSTFLAGS") {
        build.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    }
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        build.arg(format!("-Clinker={linker}"));
    }
    // An old GNU ld only warns that it ignores an unknown `-z` option.
    build.args(["-C", &format!("link-arg={FLAG}"), "-C", "link-arg=-Wl,--fatal-warnings"]);
    let built = build.output().map_err(|e| format!("cannot run rustc for the probe: {e}"))?;
    if !built.status.success() {
        let said = String::from_utf8_lossy(&built.stderr);
        let line = said.lines().rev().find(|l| l.contains("error") || l.contains("warning")).unwrap_or("failed");
        return Err(format!("the linker refused it ({})", line.trim()));
    }
    run(&program)
}

fn run(program: &Path) -> Result<(), String> {
    let ran = Command::new(program).output().map_err(|e| format!("the probe did not start: {e}"))?;
    if ran.status.success() {
        Ok(())
    } else {
        let said = String::from_utf8_lossy(&ran.stderr);
        Err(format!("the C library cannot load such a binary ({})", said.trim()))
    }
}
