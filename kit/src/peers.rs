//! The Python peers the end-to-end tests talk to (the official `openai` client, a Prometheus
//! text parser, llama.cpp's OpenAI-compatible server, a WebDriver client): the interpreter in
//! `TEST_PEERS_PYTHON`, else the cached venv `deploy/python-env.sh` prepares (minutes the
//! first time); and a PostgreSQL server for the shared session store. Not `MM_…`: the orchestrator reads every `MM_*` variable as its configuration.

use std::process::{Command, Stdio};

/// The Python to run the peers with.
pub fn python() -> std::io::Result<String> {
    from_env_or_script("TEST_PEERS_PYTHON", "python-env.sh")
}

/// A PostgreSQL server's URL (a superuser's, database `postgres`): `TEST_POSTGRES_URL`, else
/// the private server `deploy/postgres.sh` starts (installing Debian's package when missing).
pub fn postgres() -> std::io::Result<String> {
    from_env_or_script("TEST_POSTGRES_URL", "postgres.sh")
}

/// A new, empty database on the tests' PostgreSQL server ([`postgres`]), created with `psql`
/// (Debian's `postgresql` brings it): its URL. Each test gets its own, so tests never see each
/// other's sessions.
pub fn postgres_database() -> std::io::Result<String> {
    let server = postgres()?;
    let (base, _) = server
        .rsplit_once('/')
        .ok_or_else(|| std::io::Error::other(format!("`{server}` names no database")))?;
    let name = format!("mm_test_{}", crate::ids::random_id());
    let out = Command::new("psql")
        .args([&server, "-qc", &format!("CREATE DATABASE {name}")])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "psql could not create a test database ({})",
            out.status
        )));
    }
    Ok(format!("{base}/{name}"))
}

/// `var`, else what `deploy/<script>` prints on stdout (its messages go to the test's stderr).
fn from_env_or_script(var: &str, script: &str) -> std::io::Result<String> {
    if let Ok(v) = std::env::var(var) {
        return Ok(v);
    }
    let path = format!("{}/../deploy/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(&path)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "deploy/{script} failed ({}): see its messages above, or set {var}",
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
