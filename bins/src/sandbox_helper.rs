//! `pond-sandbox-helper SPEC`: the helper process of one OCI sandbox (see
//! `pond_sandbox::oci`). The same as `pond sandbox run SPEC`, in a binary a tenth of pond's
//! size, so a sandbox's start pays less for loading and forking it.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() != 2 {
        eprintln!("usage: pond-sandbox-helper SPEC (started by pond for each sandbox)");
        std::process::exit(2);
    }
    std::process::exit(pond_sandbox::oci::run_helper(std::path::Path::new(&args[1])));
}
