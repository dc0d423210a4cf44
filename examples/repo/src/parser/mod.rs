//! Parses widget descriptions.

pub fn parse(input: &str) -> Vec<&str> {
    // TODO: handle quoted names with spaces
    input.split_whitespace().collect()
}

pub fn validate(name: &str) -> bool {
    // FIXME: unicode names are rejected
    name.chars().all(|c| c.is_ascii_alphanumeric())
}
