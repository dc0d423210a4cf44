//! Link settings of the `pond-sandbox-helper` binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=POND_HELPER_PLAIN_RELOCS");
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if linux_gnu && std::env::var_os("POND_HELPER_PLAIN_RELOCS").is_none() && libc_loads_packed_relocations() {
        // Every OCI sandbox starts one helper process, and its dynamic loader applied ~22,000
        // relative relocations from a 520 KB table on each start; packed (DT_RELR) the table is
        // a few KB: ~0.2 ms of each sandbox's start (BENCHMARKS.md, "OCI sandbox start"). Only
        // where the C library being linked against loads them (glibc ≥ 2.36); like any binary,
        // the helper then runs on that glibc or a newer one. POND_HELPER_PLAIN_RELOCS=1 opts out.
        println!("cargo:rustc-link-arg-bin=pond-sandbox-helper=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether the libc.so.6 the C compiler links against has the `GLIBC_ABI_DT_RELR` version
/// (glibc 2.36 and later), which a binary with packed relocations requires.
fn libc_loads_packed_relocations() -> bool {
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let Ok(out) = std::process::Command::new(compiler).arg("-print-file-name=libc.so.6").output() else {
        return false;
    };
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let Ok(bytes) = std::fs::read(&path) else { return false };
    let needle = b"GLIBC_ABI_DT_RELR";
    bytes.windows(needle.len()).any(|w| w == needle)
}
