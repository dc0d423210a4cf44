#[test]
fn splits_on_whitespace() {
    assert_eq!(widgets::parser::parse("a b"), vec!["a", "b"]);
}
