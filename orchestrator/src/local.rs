//! The embedded default: muse, majordomo and orchestrator as separate processes on loopback,
//! started from the binaries beside the running one (`mm`, `mm-eval`), stopped when dropped.

use anyhow::{Context, Result};
use std::process::{Child, Command, Stdio};

/// What to start.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Muse model (alias, hf:..., or path).
    pub muse_model: String,
    pub majordomo_model: String,
    /// The orchestrator's gRPC and HTTP addresses (the model services get free ports).
    pub listen: String,
    pub http: String,
    /// The session store: a redb file, or a postgres:// URL.
    pub store: String,
    /// CPU threads per model service.
    pub threads: Option<usize>,
    /// Orchestrator settings passed on as environment (`MM_POLICY__REPLY_TOKENS`, …).
    pub env: Vec<(String, String)>,
}

pub struct Services {
    children: Vec<Child>,
    pub muse: String,
    pub majordomo: String,
    pub orchestrator: String,
    /// The orchestrator's HTTP API (`http://…`).
    pub http: String,
}

impl Drop for Services {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `bin args…` (with `env` added), waits for it to announce its addresses, returns the
/// child and them.
fn spawn(
    bin: &str,
    args: &[String],
    env: &[(String, String)],
) -> Result<(Child, mm_kit::serve::Announced)> {
    let dir = std::env::current_exe()?
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let path = dir.join(bin);
    let mut child = Command::new(&path)
        .args(args)
        // Loopback services this process talks to itself: plain, whatever TLS the shell sets
        // for a real deployment (the announced address is `http://`).
        .env_remove("MM_TLS_CERT")
        .env_remove("MM_TLS_KEY")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build the workspace: cargo build --release)",
                path.display()
            )
        })?;
    match mm_kit::serve::announced(&mut child) {
        Ok(addr) => Ok((child, addr)),
        Err(_) => {
            let status = child.wait()?;
            anyhow::bail!("{bin} did not start ({status}); see its message above")
        }
    }
}

impl Services {
    pub async fn start(a: &Launch) -> Result<Self> {
        let threads: Vec<String> = a
            .threads
            .map(|t| vec!["--threads".into(), t.to_string()])
            .unwrap_or_default();
        let args = |model: &str| -> Vec<String> {
            let mut v = vec![
                "serve".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--model".into(),
                model.into(),
            ];
            v.extend(threads.iter().cloned());
            v
        };
        eprintln!(
            "starting the muse ({}) and the majordomo ({}); models are fetched on first use…",
            a.muse_model, a.majordomo_model
        );
        let (mc, muse) = tokio::task::spawn_blocking({
            let a = args(&a.muse_model);
            move || spawn("muse", &a, &[])
        })
        .await??;
        let muse = muse.grpc;
        let mut s = Services {
            children: vec![mc],
            muse,
            majordomo: String::new(),
            orchestrator: String::new(),
            http: String::new(),
        };
        let (dc, majordomo) = tokio::task::spawn_blocking({
            let a = args(&a.majordomo_model);
            move || spawn("majordomo", &a, &[])
        })
        .await??;
        s.children.push(dc);
        s.majordomo = majordomo.grpc;
        let orch_args = vec![
            "serve".into(),
            "--listen".into(),
            a.listen.clone(),
            "--http".into(),
            a.http.clone(),
            "--store".into(),
            a.store.clone(),
            "--muse".into(),
            s.muse.clone(),
            "--majordomo".into(),
            s.majordomo.clone(),
        ];
        let env = a.env.clone();
        let (oc, orchestrator) =
            tokio::task::spawn_blocking(move || spawn("mm", &orch_args, &env)).await??;
        s.children.push(oc);
        s.orchestrator = orchestrator.grpc;
        s.http = orchestrator.http.unwrap_or_default();
        Ok(s)
    }
}
