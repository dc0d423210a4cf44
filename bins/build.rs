//! Link settings of the `pond-sandbox-helper` binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if linux_gnu {
        // Every OCI sandbox starts one helper process, and its dynamic loader applied ~22,000
        // relative relocations from a 520 KB table on each start; packed (DT_RELR, glibc ≥ 2.36,
        // GNU ld ≥ 2.38 — older linkers ignore the option with a warning) the table is a few KB.
        // Measured: ~0.2 ms of each sandbox's start (BENCHMARKS.md, "OCI sandbox start").
        println!("cargo:rustc-link-arg-bin=pond-sandbox-helper=-Wl,-z,pack-relative-relocs");
    }
}
