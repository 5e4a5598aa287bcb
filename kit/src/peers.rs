//! The Python peers the end-to-end tests talk to (the official `openai` client, a Prometheus
//! text parser, llama.cpp's OpenAI-compatible server, a WebDriver client): the interpreter in
//! `TEST_PEERS_PYTHON`, else the cached venv `deploy/python-env.sh` prepares (minutes the
//! first time). Not `MM_…`: the orchestrator reads every `MM_*` variable as its configuration.

use std::process::{Command, Stdio};

/// The Python to run the peers with.
pub fn python() -> std::io::Result<String> {
    if let Ok(p) = std::env::var("TEST_PEERS_PYTHON") {
        return Ok(p);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/python-env.sh");
    let out = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "deploy/python-env.sh failed ({}): see its messages above, or set TEST_PEERS_PYTHON",
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A loopback port no one listens on (bound, then released), for a peer or a service's
/// second listener that must be named before it starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
