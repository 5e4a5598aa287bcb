//! Identifiers handed to clients. They carry 128 random bits from the OS-seeded generator, so
//! one client cannot guess another's session (time-based ids with a counter could be).

/// 32 hex digits of randomness.
pub fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_128_bit_hex_and_do_not_repeat() {
        let a = super::random_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, super::random_id());
    }
}
