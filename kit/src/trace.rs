//! Logging: to stderr (stdout carries generated text and `listening on` lines), `warn` unless
//! `RUST_LOG` says otherwise.

pub fn init() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
}
