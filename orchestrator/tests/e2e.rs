//! The whole system on loopback: muse and majordomo replicas and the orchestrator as separate
//! processes with the real default models. Conversations persist, roles swap, a killed muse is
//! failed over, a restarted orchestrator resumes, many sessions run at once, and bad requests
//! get a clear status.

use mm_proto::orchestrator::v1 as pb;
use pb::orchestrator_client::OrchestratorClient;
use pb::turn_event::Event as E;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use tonic::transport::Channel;

struct Proc {
    child: Child,
    addr: String,
    /// The orchestrator's HTTP API.
    http: Option<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bin(name: &str) -> std::path::PathBuf {
    // Sibling binaries of this package's `mm` (cargo builds the workspace's binaries together).
    Path::new(env!("CARGO_BIN_EXE_mm")).with_file_name(name)
}

fn spawn(name: &str, args: &[&str]) -> Proc {
    spawn_env(name, args, &[])
}

fn spawn_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut child = Command::new(bin(name))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let a = mm_kit::serve::announced(&mut child).unwrap_or_else(|e| panic!("{name}: {e}"));
    Proc {
        child,
        addr: a.grpc,
        http: a.http,
    }
}

fn muse(model: &str) -> Proc {
    spawn(
        "muse",
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            model,
            "--threads",
            "2",
            "--max-context",
            "2048",
        ],
    )
}

fn majordomo() -> Proc {
    majordomo_with(&[])
}

/// A majordomo with `extra` flags.
fn majordomo_with(extra: &[&str]) -> Proc {
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "2",
        "--queue-capacity",
        "64",
    ];
    args.extend(extra);
    spawn("majordomo", &args)
}

fn orchestrator(store: impl AsRef<std::ffi::OsStr>, muses: &[&Proc], md: &Proc) -> Proc {
    orchestrator_env(store, muses, md, &[])
}

fn orchestrator_env(
    store: impl AsRef<std::ffi::OsStr>,
    muses: &[&Proc],
    md: &Proc,
    env: &[(&str, &str)],
) -> Proc {
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--store".into(),
        store.as_ref().to_string_lossy().into_owned(),
    ];
    for m in muses {
        args.extend(["--muse".into(), m.addr.clone()]);
    }
    args.extend(["--majordomo".into(), md.addr.clone()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_env("mm", &refs, env)
}

async fn client(p: &Proc) -> OrchestratorClient<Channel> {
    OrchestratorClient::connect(p.addr.clone()).await.unwrap()
}

fn quick() -> pb::DreamPolicy {
    pb::DreamPolicy {
        bursts: Some(2),
        steps: Some(3),
        commit_tokens: Some(12),
        max_attempts: Some(1),
        ..Default::default()
    }
}

async fn session(c: &mut OrchestratorClient<Channel>, muse_model: &str) -> pb::Session {
    let roles = pb::Roles {
        muse: muse_model.into(),
        majordomo: String::new(),
    };
    c.create_session(pb::CreateSessionRequest {
        roles: Some(roles),
        policy: Some(quick()),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// Runs a turn; returns its events (the reply last) or the error it ended with.
async fn turn(
    c: &mut OrchestratorClient<Channel>,
    id: &str,
    msg: &str,
    mut on: impl FnMut(&E),
) -> Result<Vec<E>, pb::TurnError> {
    let req = pb::TurnRequest {
        session_id: id.into(),
        message: msg.into(),
        verbosity: pb::Verbosity::Full as i32,
        ..Default::default()
    };
    let mut stream = c
        .turn(req)
        .await
        .map_err(|s| pb::TurnError {
            code: s.code() as i32,
            message: s.message().into(),
        })?
        .into_inner();
    let mut events = Vec::new();
    while let Some(ev) = stream.message().await.unwrap() {
        let e = ev.event.unwrap();
        on(&e);
        if let E::Error(err) = &e {
            return Err(err.clone());
        }
        events.push(e);
    }
    assert!(
        matches!(events.last(), Some(E::Reply(_))),
        "a turn ends with its reply: {events:?}"
    );
    Ok(events)
}

fn started(events: &[E]) -> pb::TurnStarted {
    events
        .iter()
        .find_map(|e| {
            if let E::Started(s) = e {
                Some(s.clone())
            } else {
                None
            }
        })
        .expect("TurnStarted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_persists_roles_swap_restart_resumes_and_bad_requests_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("sessions.redb");
    let smol = muse("smollm2-135m");
    let gemma = muse("gemma3-270m");
    let md = majordomo();
    let orch = orchestrator(&store, &[&smol, &gemma], &md);
    let mut c = client(&orch).await;
    let s = session(&mut c, "smollm2-135m").await;

    let t1 = turn(&mut c, &s.id, "Name a colour of the sea.", |_| {})
        .await
        .unwrap();
    assert_eq!(started(&t1).muse_replica, smol.addr);
    assert!(
        t1.iter().any(|e| matches!(e, E::LatentStep(_)))
            && t1.iter().any(|e| matches!(e, E::Critique(_)))
    );
    turn(&mut c, &s.id, "Name a colour of the sea.", |_| {})
        .await
        .unwrap();
    let got = c
        .get_session(pb::GetSessionRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.turns.len(), 2);
    // The second turn was primed with the first: same message, a longer prompt.
    let p1 = got.turns[0].attempts[0].prompt_tokens;
    let p2 = got.turns[1].attempts[0].prompt_tokens;
    assert!(
        p2 > p1 + 5,
        "turn 2 primed with {p2} tokens, turn 1 with {p1}"
    );
    assert!(got
        .turns
        .iter()
        .all(|t| !t.attempts[0].critique_json.is_empty()));

    // Swap the muse to the other default model; the serving replica proves it.
    let swapped = c
        .set_roles(pb::SetRolesRequest {
            session_id: s.id.clone(),
            roles: Some(pb::Roles {
                muse: "gemma3-270m".into(),
                majordomo: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(swapped.roles.unwrap().muse, "gemma3-270m");
    let t3 = turn(&mut c, &s.id, "And a colour of the sky?", |_| {})
        .await
        .unwrap();
    let st = started(&t3);
    assert_eq!(
        (st.muse_replica.as_str(), st.roles.unwrap().muse.as_str()),
        (gemma.addr.as_str(), "gemma3-270m")
    );
    let mut gc = mm_proto::muse::v1::muse_client::MuseClient::connect(gemma.addr.clone())
        .await
        .unwrap();
    assert_eq!(
        gc.info(mm_proto::muse::v1::InfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .architecture,
        "gemma3"
    );

    // Bad requests name the problem.
    let e = turn(&mut c, "nope", "hi", |_| {}).await.unwrap_err();
    assert_eq!(
        (
            tonic::Code::from(e.code),
            e.message.contains("unknown session `nope`")
        ),
        (tonic::Code::NotFound, true),
        "{}",
        e.message
    );
    let e = turn(&mut c, &s.id, "   ", |_| {}).await.unwrap_err();
    assert_eq!(tonic::Code::from(e.code), tonic::Code::InvalidArgument);
    assert!(e.message.contains("message is empty"));
    let e = turn(&mut c, &s.id, &"x".repeat(5000), |_| {})
        .await
        .unwrap_err();
    assert!(e.message.contains("message is longer"), "{}", e.message);
    let e = c
        .set_roles(pb::SetRolesRequest {
            session_id: s.id.clone(),
            roles: Some(pb::Roles {
                muse: "llama-70b".into(),
                majordomo: String::new(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("roles.muse `llama-70b`") && e.message().contains("smollm2-135m"),
        "{}",
        e.message()
    );

    // Restart the orchestrator on the same store: the session is listed and continues. The
    // new one primes only the last turn verbatim (MM_HISTORY_CHARS), so the older ones are
    // folded into a majordomo-made summary.
    drop(c);
    drop(orch);
    let orch = orchestrator_env(&store, &[&smol, &gemma], &md, &[("MM_HISTORY_CHARS", "1")]);
    let mut c = client(&orch).await;
    let list = c
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    let listed = list
        .sessions
        .iter()
        .find(|x| x.id == s.id)
        .expect("session listed after restart");
    assert_eq!(listed.turn_count, 3);
    turn(&mut c, &s.id, "One more word?", |_| {}).await.unwrap();
    let got = c
        .get_session(pb::GetSessionRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.turns.iter().map(|t| t.index).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_muse_killed_mid_turn_fails_over_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let a = muse("smollm2-135m");
    let b = muse("smollm2-135m");
    let md = majordomo();
    let orch = orchestrator(dir.path().join("s.redb"), &[&a, &b], &md);
    let mut c = client(&orch).await;
    let s = c
        .create_session(pb::CreateSessionRequest {
            roles: None,
            policy: Some(pb::DreamPolicy {
                bursts: Some(3),
                steps: Some(8),
                commit_tokens: Some(16),
                max_attempts: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut procs = [a, b];
    let mut serving = None;
    let mut victim = None;
    let events = turn(&mut c, &s.id, "Describe a storm at sea.", |e| match e {
        E::Started(st) => serving = Some(st.muse_replica.clone()),
        // Kill -9 the replica serving this turn, mid-burst.
        E::LatentStep(_) if victim.is_none() => {
            let addr = serving.clone().expect("TurnStarted comes first");
            let p = procs
                .iter_mut()
                .find(|p| p.addr == addr)
                .expect("the serving replica is ours");
            unsafe { libc_kill(p.child.id() as i32) };
            let _ = p.child.wait();
            victim = Some(addr);
        }
        _ => {}
    })
    .await
    .unwrap_or_else(|e| panic!("the turn failed instead of failing over: {}", e.message));
    let victim = victim.expect("a latent step arrived");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, E::Failover(f) if f.from_replica == victim)),
        "no failover event: {events:?}"
    );
    let got = c
        .get_session(pb::GetSessionRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.turns.len(), 1);
    assert!(!got.turns[0].reply.is_empty());
}

/// Two orchestrators over one PostgreSQL store serve the same session: a turn through one
/// excludes a turn through the other, either continues what the other stored, and when one is
/// killed mid-turn its lease runs out and the other takes the session on, transcript intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_share_sessions_over_postgres_one_turn_at_a_time() {
    let db = mm_kit::peers::postgres_database().expect("a test database");
    let m = muse("smollm2-135m");
    let md = majordomo();
    let lease = [("MM_TURN_LEASE_S", "3")];
    let mut orch_a = orchestrator_env(&db, &[&m], &md, &lease);
    let orch_b = orchestrator_env(&db, &[&m], &md, &lease);
    let (mut a, mut b) = (client(&orch_a).await, client(&orch_b).await);
    let s = session(&mut a, "").await;
    turn(&mut a, &s.id, "Say hello to the sea.", |_| {})
        .await
        .unwrap();
    // A turn through A holds the session's lease from the moment it is accepted.
    let request = |msg: &str| pb::TurnRequest {
        session_id: s.id.clone(),
        message: msg.into(),
        ..Default::default()
    };
    let mut running = a
        .turn(request("Now a line about gulls."))
        .await
        .unwrap()
        .into_inner();
    let refused = turn(&mut b, &s.id, "And the wind?", |_| {})
        .await
        .unwrap_err();
    assert_eq!(
        refused.code,
        tonic::Code::FailedPrecondition as i32,
        "{}",
        refused.message
    );
    assert!(
        refused.message.contains("turn in progress"),
        "{}",
        refused.message
    );
    while let Some(ev) = running.message().await.unwrap() {
        assert!(!matches!(ev.event, Some(E::Error(_))), "{ev:?}");
    }
    // B continues what A stored.
    let events = turn(&mut b, &s.id, "And the wind?", |_| {}).await.unwrap();
    let Some(E::Reply(r)) = events.last() else {
        unreachable!()
    };
    assert_eq!(r.turn, 2, "B saw both of A's turns");
    let get = |c: &mut OrchestratorClient<Channel>| {
        let mut c = c.clone();
        let id = s.id.clone();
        async move {
            c.get_session(pb::GetSessionRequest { session_id: id })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let stored = get(&mut a).await;
    assert_eq!(stored.turns.len(), 3);
    assert_eq!(stored, get(&mut b).await, "both read one store");
    // A dies mid-turn: its lease is no longer renewed and runs out; B then runs the turn.
    let mut dying = a
        .turn(pb::TurnRequest {
            verbosity: pb::Verbosity::Full as i32,
            ..request("Tell me of the lighthouse.")
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(ev) = dying.message().await.unwrap() {
        if matches!(ev.event, Some(E::LatentStep(_))) {
            break;
        }
    }
    unsafe { libc_kill(orch_a.child.id() as i32) };
    let _ = orch_a.child.wait();
    let mut waited = 0;
    let events = loop {
        match turn(&mut b, &s.id, "Tell me of the lighthouse.", |_| {}).await {
            Ok(events) => break events,
            Err(e) if e.code == tonic::Code::FailedPrecondition as i32 && waited < 120 => {
                waited += 1;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => panic!("B could not take the session over: {}", e.message),
        }
    };
    let Some(E::Reply(r)) = events.last() else {
        unreachable!()
    };
    assert_eq!(r.turn, 3, "the killed turn left nothing behind");
    let after = get(&mut b).await;
    assert_eq!(after.turns.len(), 4);
    assert_eq!(
        after.turns[..3],
        stored.turns[..],
        "the transcript is intact"
    );
}

/// SIGKILL, without a dependency for one call.
unsafe fn libc_kill(pid: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    kill(pid, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_sessions_complete_with_no_lost_turn() {
    // On the shared store: its one connection carries every session's reads, leases and writes.
    let db = mm_kit::peers::postgres_database().expect("a test database");
    let m = muse("smollm2-135m");
    let md = majordomo();
    let orch = orchestrator(&db, &[&m], &md);
    let mut c = client(&orch).await;
    let mut ids = Vec::new();
    for _ in 0..16 {
        let p = pb::DreamPolicy {
            bursts: Some(1),
            steps: Some(2),
            commit_tokens: Some(8),
            max_attempts: Some(1),
            ..Default::default()
        };
        ids.push(
            c.create_session(pb::CreateSessionRequest {
                roles: None,
                policy: Some(p),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .id,
        );
    }
    let tasks: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut c = c.clone();
            let id = id.clone();
            tokio::spawn(async move {
                turn(&mut c, &id, &format!("Give me word number {i}."), |_| {})
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    for t in tasks {
        t.await
            .unwrap()
            .unwrap_or_else(|e| panic!("a turn failed: {}", e.message));
    }
    let list = c
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.sessions.len(), 16);
    assert!(
        list.sessions.iter().all(|s| s.turn_count == 1),
        "{:?}",
        list.sessions
            .iter()
            .map(|s| s.turn_count)
            .collect::<Vec<_>>()
    );
}

/// The reply a fresh session gives to `msg` under `policy`, and the turn's seed.
async fn first_reply(
    c: &mut OrchestratorClient<Channel>,
    policy: pb::DreamPolicy,
    msg: &str,
) -> (String, u64) {
    let s = c
        .create_session(pb::CreateSessionRequest {
            roles: None,
            policy: Some(policy),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    turn(c, &s.id, msg, |_| {}).await.unwrap();
    let got = c
        .get_session(pb::GetSessionRequest { session_id: s.id })
        .await
        .unwrap()
        .into_inner();
    (got.turns[0].reply.clone(), got.turns[0].seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_seeds_differ_a_seed_replays_and_a_long_story_does_not_loop() {
    let dir = tempfile::tempdir().unwrap();
    let m = muse("smollm2-135m");
    let md = majordomo();
    let orch = orchestrator(dir.path().join("s.redb"), &[&m], &md);
    let mut c = client(&orch).await;
    let haiku = "Write a haiku about the sea.";

    // Two unseeded runs of a prompt: fresh seeds, recorded, and different replies.
    let (a, seed_a) = first_reply(&mut c, pb::DreamPolicy::default(), haiku).await;
    let (b, seed_b) = first_reply(&mut c, pb::DreamPolicy::default(), haiku).await;
    assert_ne!(seed_a, seed_b);
    assert_ne!(a, b, "two unseeded runs gave the same reply");
    // A recorded seed replays the turn.
    let seeded = pb::DreamPolicy {
        seed: Some(seed_a),
        ..Default::default()
    };
    let (again, seed) = first_reply(&mut c, seeded, haiku).await;
    assert_eq!((again.as_str(), seed), (a.as_str(), seed_a));

    // Twelve turns of one story with the default policy: no reply loops a line.
    let s = c
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    let asks = [
        "Tell me a story about a lighthouse keeper.",
        "What did the keeper see that night?",
        "Who came to visit the lighthouse?",
        "What did they talk about?",
        "Then a storm came. What happened?",
        "How did the keeper feel?",
        "What did the visitor do next?",
        "Describe the morning after the storm.",
        "What did they find on the beach?",
        "Where did the visitor go?",
        "What did the keeper write in the log?",
        "How does the story end?",
    ];
    for ask in asks {
        turn(&mut c, &s.id, ask, |_| {}).await.unwrap();
    }
    let got = c
        .get_session(pb::GetSessionRequest { session_id: s.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.turns.len(), 12);
    for t in &got.turns {
        let lines = t
            .reply
            .lines()
            .map(|l| l.trim().to_lowercase())
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>();
        let worst = lines
            .iter()
            .map(|l| lines.iter().filter(|m| *m == l).count())
            .max()
            .unwrap_or(0);
        assert!(
            worst <= 2,
            "turn {} repeats a line {worst} times: {:?}",
            t.index,
            t.reply
        );
        assert!(!t.reply.trim().is_empty(), "turn {} is empty", t.index);
    }
}

/// The services a port's reflection lists, over v1 and v1alpha.
async fn reflected(addr: &str) -> (Vec<String>, Vec<String>) {
    use tonic_reflection::pb::{v1, v1alpha};
    let channel = tonic::transport::Endpoint::from_shared(addr.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut a = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut out = a
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        out.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let mut v1_names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    v1_names.sort();
    let mut b = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut out = b
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        out.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let mut alpha: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    alpha.sort();
    (v1_names, alpha)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_environment_configuration_and_reflection_work() {
    let dir = tempfile::tempdir().unwrap();
    let m = muse("smollm2-135m");
    let md = majordomo();
    let port = mm_kit::peers::free_port();
    let listen = format!("127.0.0.1:{port}");
    let store = dir.path().join("s.redb");
    let orch = spawn_env(
        "mm",
        &["serve"],
        &[
            ("MM_LISTEN", listen.as_str()),
            ("MM_STORE", store.to_str().unwrap()),
            ("MM_MUSE", m.addr.as_str()),
            ("MM_MAJORDOMO", md.addr.as_str()),
            ("MM_POLICY__STEPS", "1"),
            ("MM_POLICY__RENDER", "translate"),
        ],
    );
    assert_eq!(
        orch.addr,
        format!("http://{listen}"),
        "MM_LISTEN was ignored"
    );
    let mut c = client(&orch).await;
    let s = c
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    let p = s.policy.unwrap();
    assert_eq!(p.steps, Some(1), "MM_POLICY__STEPS was ignored");
    assert_eq!(p.render(), mm_proto::muse::v1::Render::Translate);
    // Zero is a value, not "unset": a session asks for noise 0 and a greedy commit against
    // configured defaults that are not zero.
    let zero = c
        .create_session(pb::CreateSessionRequest {
            roles: None,
            policy: Some(pb::DreamPolicy {
                temperature: Some(0.0),
                commit_temperature: Some(0.0),
                noise: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(
        (zero.temperature, zero.commit_temperature, zero.noise),
        (Some(0.0), Some(0.0), Some(0.0))
    );

    // Each port lists its own services, health and reflection, in v1 and v1alpha.
    for (addr, own) in [
        (&orch.addr, "orchestrator.v1.Orchestrator"),
        (&m.addr, "muse.v1.Muse"),
        (&md.addr, "majordomo.v1.Majordomo"),
    ] {
        let (v1, alpha) = reflected(addr).await;
        for list in [&v1, &alpha] {
            assert!(list.contains(&own.to_string()), "{addr}: {list:?}");
            assert!(
                list.contains(&"grpc.health.v1.Health".to_string()),
                "{list:?}"
            );
            let others = list
                .iter()
                .filter(|n| {
                    n.ends_with(".v1.Muse")
                        || n.ends_with(".v1.Majordomo")
                        || n.ends_with(".v1.Orchestrator")
                })
                .count();
            assert_eq!(
                others, 1,
                "{addr} lists services it does not serve: {list:?}"
            );
        }
    }
}

/// Runs the Python peer `tests/<script>` with `args`; it must succeed and print one JSON line
/// of what it found.
async fn peer(script: &str, args: Vec<String>) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(mm_kit::peers::python().unwrap())
            .arg(path)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{script}: {stdout}");
    serde_json::from_str(stdout.trim()).unwrap()
}

/// Plain HTTP GET of `url` with `headers`: the whole response, status line first.
async fn get_with(url: &str, headers: &[(&str, &str)]) -> String {
    let url = url.strip_prefix("http://").unwrap();
    let (host, path) = url.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n{extra}\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    response
}

async fn get(url: &str) -> String {
    get_with(url, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_completes_streams_and_continues_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", mm_kit::peers::free_port());
    let m = spawn(
        "muse",
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "2",
            "--metrics",
            &metrics,
        ],
    );
    let md_metrics = format!("127.0.0.1:{}", mm_kit::peers::free_port());
    let md = majordomo_with(&["--metrics", &md_metrics]);
    let orch = orchestrator(dir.path().join("sessions.redb"), &[&m], &md);
    let http = orch
        .http
        .clone()
        .expect("the orchestrator announces its HTTP API");
    let found = peer("openai_client.py", vec![http]).await;

    // What the client saw is what the store holds: one session, its instructions, two turns.
    let mut c = client(&orch).await;
    let s = c
        .get_session(pb::GetSessionRequest {
            session_id: found["session"].as_str().unwrap().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        s.system.starts_with("You are a poet of the coast"),
        "{}",
        s.system
    );
    assert_eq!(s.turns.len(), 2);
    assert_eq!(s.turns[0].user, "Write one line about the sea.");
    assert_eq!(s.turns[1].reply, found["second"]["text"].as_str().unwrap());
    assert_eq!(
        found["errors"].as_array().map(|e| e.len()),
        Some(3),
        "{found}"
    );

    // The muse counted its dreaming.
    let text = get(&format!("http://{metrics}/metrics")).await;
    let steps = text
        .lines()
        .find_map(|l| l.strip_prefix("muse_latent_steps_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("muse_latent_steps_total in\n{text}"));
    assert!(steps > 0.0, "{text}");
    assert!(
        text.contains(r#"muse_grpc_requests_total{method="/muse.v1.Muse/Session",code="Ok"}"#),
        "{text}"
    );
    // So did the majordomo its critiques: one per attempt of the three turns at least.
    let text = get(&format!("http://{md_metrics}/metrics")).await;
    let critiques: f64 = text
        .lines()
        .filter_map(|l| l.strip_prefix("majordomo_critiques_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(critiques >= 3.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_shows_a_turn_dream_live_and_again_after_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let m = muse("smollm2-135m");
    let md = majordomo();
    let orch = orchestrator(dir.path().join("sessions.redb"), &[&m], &md);
    let http = orch
        .http
        .clone()
        .expect("the orchestrator announces its HTTP API");
    // The screenshot is the test's artifact: look at it.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-view.png");
    let found = peer("browser.py", vec![http, shot.display().to_string()]).await;
    assert!(found["steps"].as_u64().unwrap() >= 1, "{found}");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG"),
        "a PNG screenshot at {}",
        shot.display()
    );
    eprintln!("screenshot of the web view: {}", shot.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mm_up_stopped_with_sigterm_stops_its_services() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.redb");
    let mut up = Command::new(bin("mm"))
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--store",
        ])
        .arg(&store)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(up.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    // stderr names every service: "orchestrator at http://A (muse http://B, majordomo http://C) …"
    let mut said = String::new();
    let mut err = std::io::BufReader::new(up.stderr.take().unwrap());
    while !said.contains("orchestrator at") {
        std::io::BufRead::read_line(&mut err, &mut said).unwrap();
    }
    let addrs: Vec<String> = said
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("http://"))
        .map(|a| a.trim_end_matches([',', ')', ';']).to_string())
        .filter(|a| a.contains(':') && !a.contains('/'))
        .collect();
    assert!(addrs.len() >= 3, "{said}");
    for a in &addrs {
        assert!(std::net::TcpStream::connect(a).is_ok(), "{a} listens");
    }
    let kill = Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = up.wait().unwrap();
    assert!(status.success(), "mm up exits cleanly on SIGTERM: {status}");
    for a in &addrs {
        assert!(
            std::net::TcpStream::connect(a).is_err(),
            "{a} still listens after mm up stopped"
        );
    }
}

/// `message` sent with `authorization: Bearer <token>`.
fn as_holder<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_tenants_that_see_only_their_own_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = ("alice-token-0123456789", "bob-token-0123456789ab");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("alice {alice}\nbob {bob}\n")).unwrap();
    let m = muse("smollm2-135m");
    let md = majordomo();
    let orch = orchestrator_env(
        dir.path().join("s.redb"),
        &[&m],
        &md,
        &[
            ("MM_API_TOKENS_FILE", tokens.to_str().unwrap()),
            ("MM_CEILING__SESSIONS", "1"),
            ("MM_TENANT_CEILINGS__BOB__STEPS", "2"),
        ],
    );
    let mut c = client(&orch).await;

    // No token, a wrong one: UNAUTHENTICATED, saying what is missing. Reflection stays open.
    let e = c
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("Bearer"), "{}", e.message());
    let e = c
        .list_sessions(as_holder("not-a-token-at-all", pb::ListSessionsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(!reflected(&orch.addr).await.0.is_empty());

    // Alice's session is hers: Bob cannot list, read, re-role, run or delete it.
    let s = c
        .create_session(as_holder(alice, pb::CreateSessionRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.owner, "alice");
    // Ceilings: one session each under the common one; Bob's own allows 2 steps, no more.
    let e = c
        .create_session(as_holder(alice, pb::CreateSessionRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let steps = |n| pb::CreateSessionRequest {
        policy: Some(pb::DreamPolicy {
            steps: Some(n),
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = c
        .create_session(as_holder(bob, steps(3)))
        .await
        .unwrap_err();
    assert!(
        e.code() == tonic::Code::InvalidArgument && e.message().contains("policy.steps = 3"),
        "{e:?}"
    );
    let bobs = c
        .create_session(as_holder(bob, steps(2)))
        .await
        .unwrap()
        .into_inner();
    let listed = |token| {
        let mut c = c.clone();
        async move {
            c.list_sessions(as_holder(token, pb::ListSessionsRequest {}))
                .await
                .unwrap()
                .into_inner()
                .sessions
                .len()
        }
    };
    assert_eq!((listed(alice).await, listed(bob).await), (1, 1));
    let id = s.id.clone();
    let by_bob = [
        c.get_session(as_holder(
            bob,
            pb::GetSessionRequest {
                session_id: id.clone(),
            },
        ))
        .await
        .map(|_| ())
        .unwrap_err(),
        c.set_roles(as_holder(
            bob,
            pb::SetRolesRequest {
                session_id: id.clone(),
                roles: None,
            },
        ))
        .await
        .map(|_| ())
        .unwrap_err(),
        c.turn(as_holder(
            bob,
            pb::TurnRequest {
                session_id: id.clone(),
                message: "hello".into(),
                ..Default::default()
            },
        ))
        .await
        .map(|_| ())
        .unwrap_err(),
        c.delete_session(as_holder(
            bob,
            pb::DeleteSessionRequest {
                session_id: id.clone(),
            },
        ))
        .await
        .map(|_| ())
        .unwrap_err(),
    ];
    for e in by_bob {
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    }
    assert!(c
        .get_session(as_holder(alice, pb::GetSessionRequest { session_id: id }))
        .await
        .is_ok());

    // The HTTP API takes the same tokens; /metrics stays open.
    let http = orch.http.clone().unwrap();
    let r = get(&format!("{http}/v1/models")).await;
    let status = |r: &str| r.split_whitespace().nth(1).unwrap_or_default().to_string();
    assert_eq!(status(&r), "401", "{r}");
    assert!(r.contains(r#""type":"authentication_error""#), "{r}");
    let bearer = format!("Bearer {bob}");
    let r = get_with(
        &format!("{http}/api/sessions"),
        &[("authorization", &bearer)],
    )
    .await;
    assert!(
        status(&r) == "200" && r.contains(&bobs.id) && !r.contains(&s.id),
        "{r}"
    );
    assert_eq!(status(&get(&format!("{http}/metrics")).await), "200");
}

/// `mm bench` with a level or a turn count of zero is refused before any service starts.
#[test]
fn bench_refuses_zero_sessions_or_turns_naming_the_flag() {
    for (args, want) in [
        (
            ["bench", "--sessions", "1,0"],
            "--sessions takes counts >= 1",
        ),
        (["bench", "--turns", "0"], "--turns must be at least 1"),
    ] {
        let out = Command::new(bin("mm")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
