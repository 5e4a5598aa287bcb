//! The majordomo with a remote critic, all real processes: llama-cpp-python's OpenAI-compatible
//! server runs the default SmolLM2 GGUF, and `majordomo serve --backend openai` critiques
//! through it. The server's answer is schema-valid, the deterministic checks are merged into
//! it, Info names the remote model, and a server that goes away makes the majordomo
//! UNAVAILABLE (the orchestrator fails over).
//!
//! Python comes from `TEST_PEERS_PYTHON`, else from `deploy/python-env.sh` (which installs
//! llama-cpp-python the first time: minutes).

use majordomo::critique::{Critique, IssueKind, Verdict};
use mm_proto::majordomo::v1 as pb;
use pb::majordomo_client::MajordomoClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The name the Python server serves the model under, and the majordomo asks for.
const REMOTE_MODEL: &str = "smollm2-critic";
/// Bounds the wait for the Python server to load the model and answer.
const SERVER_START: Duration = Duration::from_secs(180);

/// A child process killed when dropped, also when the test panics.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The default model's GGUF, where `lm` finds it (fetched first if missing).
fn smollm2_gguf() -> PathBuf {
    let alias = lm::ALIASES
        .iter()
        .find(|a| a.alias == "smollm2-135m")
        .unwrap();
    let cached = || {
        hf_hub::Cache::new(lm::hub_cache_dir())
            .model(alias.repo.into())
            .get(alias.file)
    };
    cached()
        .or_else(|| {
            mm_kit::model::fetch(alias.alias).unwrap();
            cached()
        })
        .expect("the default model is in the cache after fetching it")
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Starts llama-cpp-python's server and waits until `GET /v1/models` answers. Returns the
/// process and its API root.
async fn start_python_server(log: &Path) -> (Proc, String) {
    let port = mm_kit::peers::free_port();
    let stderr = std::fs::File::create(log).unwrap();
    let child = Command::new(mm_kit::peers::python().unwrap())
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(smollm2_gguf())
        .args(["--model_alias", REMOTE_MODEL, "--host", "127.0.0.1"])
        .args(["--port", &port.to_string(), "--n_ctx", "2048"])
        // One thread: llama.cpp's threads spin at every barrier, and on a small machine shared
        // with a build two of them ran up to 15x slower than one (360 vs 22 ms a token).
        .args(["--n_threads", "1"])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start python -m llama_cpp.server");
    let mut server = Proc(child);
    let base = format!("http://127.0.0.1:{port}/v1");
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/models")).send().await {
            if r.status().is_success() {
                return (server, base);
            }
        }
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!(
                "llama_cpp.server exited ({status}) before answering; its stderr ends:\n{}",
                tail(log)
            );
        }
        assert!(
            started.elapsed() < SERVER_START,
            "llama_cpp.server did not answer GET {base}/models within {SERVER_START:?}; its stderr ends:\n{}",
            tail(log)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn start_majordomo(base_url: &str) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_majordomo"))
        .args(["serve", "--listen", "127.0.0.1:0", "--backend", "openai"])
        .args(["--base-url", base_url, "--remote-model", REMOTE_MODEL])
        // A loaded CI machine is slow; this test asserts answers, not speed.
        .env("MAJORDOMO_REMOTE_TIMEOUT_S", "600")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start majordomo serve");
    let addr = mm_kit::serve::listening_address(&mut child).unwrap();
    (Proc(child), addr)
}

async fn critique(
    client: &mut MajordomoClient<tonic::transport::Channel>,
    request: &str,
    draft: &str,
) -> Result<pb::CritiqueResult, tonic::Status> {
    let mut stream = client
        .critique(pb::CritiqueRequest {
            request: request.into(),
            draft: draft.as_bytes().to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(ev) = stream.message().await? {
        if let Some(pb::critique_event::Event::Result(r)) = ev.event {
            return Ok(r);
        }
    }
    Err(tonic::Status::internal("stream ended without a result"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_critic_is_held_to_the_schema_and_the_checks() {
    let logs = tempfile::tempdir().unwrap();
    let (server, base_url) = start_python_server(&logs.path().join("llama_cpp.server.log")).await;
    let (_majordomo, addr) = start_majordomo(&base_url);
    let mut client = MajordomoClient::connect(addr).await.unwrap();

    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            info.model.as_str(),
            info.architecture.as_str(),
            info.context_length
        ),
        (REMOTE_MODEL, "remote", 0)
    );

    let looping = critique(
        &mut client,
        "Write about the sea.",
        &"The waves are calling me home. ".repeat(40),
    )
    .await
    .unwrap();
    let c = Critique::parse(&looping.json).unwrap_or_else(|e| panic!("{e}: {}", looping.json));
    assert!(
        looping.findings().any(|k| k == pb::IssueKind::Repetition),
        "{looping:?}"
    );
    assert!(
        c.issues.iter().any(|i| i.kind == IssueKind::Repetition),
        "{c:?}"
    );
    assert_ne!(c.verdict, Verdict::Accept, "{c:?}");
    assert_eq!(
        looping.critique.as_ref().unwrap().verdict(),
        match c.verdict {
            Verdict::Accept => pb::Verdict::Accept,
            Verdict::Revise => pb::Verdict::Revise,
            Verdict::Reject => pb::Verdict::Reject,
        }
    );
    assert!(looping.stats.as_ref().unwrap().distinct_3 < 0.2);
    assert_eq!(
        (looping.nll, looping.nll_tokens),
        (None, 0),
        "a remote critic gives no NLL"
    );
    assert!(
        looping.decode.as_ref().unwrap().tokens > 0,
        "usage is reported"
    );

    let haiku = critique(
        &mut client,
        "Write a haiku about rain.",
        "Rain on the tin roof\ncounting down the afternoon\nthe kettle answers",
    )
    .await
    .unwrap();
    let c = Critique::parse(&haiku.json).unwrap_or_else(|e| panic!("{e}: {}", haiku.json));
    assert!(haiku.findings.is_empty(), "{haiku:?}");
    assert_ne!(haiku.critique.unwrap().verdict(), pb::Verdict::Unspecified);
    eprintln!(
        "remote critiques: {:.0} ms (looping draft), {:.0} ms (haiku, verdict {:?})",
        looping.decode.unwrap().millis,
        haiku.decode.unwrap().millis,
        c.verdict
    );

    let s = client
        .structure(pb::StructureRequest {
            draft: b"Copper conducts electricity well, so it is used for wiring. It resists corrosion, so plumbers use it for pipes.".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!s.title.trim().is_empty(), "{s:?}");

    // The server goes away: the majordomo says UNAVAILABLE, so the orchestrator fails over.
    drop(server);
    let e = client.info(pb::InfoRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    let e = critique(&mut client, "Write about the sea.", "The sea is grey.")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
}
