//! The embedding example is built and run as a real process, so CI keeps it working.

#[test]
fn the_embedding_example_analyses_the_example_repository() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_embed")).output().expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("state: succeeded"), "{stdout}");
    assert!(stdout.contains("todo_scan: 5 markers"), "{stdout}");
    assert!(stdout.contains("{\"area\":\"src\",\"files\":3"), "{stdout}");
}
