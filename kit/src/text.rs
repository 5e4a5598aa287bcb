//! Quoting what a client sent, in messages that go back to it or to logs: never more than a
//! prefix, so an error about a 1 MiB field is still a short error (and fits gRPC metadata).

/// At most `max` characters of `text`, an ellipsis marking a cut.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((end, _)) => format!("{}…", &text[..end]),
    }
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn clips_by_characters_and_marks_the_cut() {
        assert_eq!(clip("short", 8), "short");
        assert_eq!(clip("exactly8", 8), "exactly8");
        assert_eq!(clip("ünïcödé text", 7), "ünïcödé…");
        assert_eq!(clip(&"x".repeat(1 << 20), 3), "xxx…");
    }
}
