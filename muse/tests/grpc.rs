//! The muse over a real socket: `muse serve` as a separate process, driven by the generated
//! client. Prime, dream, commit, rewind, commit again; malformed commands get a code and a
//! message naming the field; limits answer RESOURCE_EXHAUSTED; closing frees the session.

use mm_proto::muse::v1 as pb;
use mm_proto::muse_session::SessionClient;
use pb::client_command::Command as C;
use pb::muse_client::MuseClient;
use pb::server_event::Event as E;
use std::process::{Child, Command, Stdio};
use tonic::transport::Channel;

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_muse"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "smollm2-135m",
            "--threads",
            "2",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start muse serve");
    let addr = mm_kit::serve::listening_address(&mut child).unwrap();
    Server { child, addr }
}

struct Session(SessionClient);

impl Session {
    async fn open(client: &mut MuseClient<Channel>) -> Result<Self, tonic::Status> {
        SessionClient::open(client).await.map(Self)
    }

    fn id(&self) -> String {
        self.0.id.clone()
    }

    async fn run(&mut self, c: C) -> Vec<E> {
        self.0.run(c).await.unwrap()
    }

    async fn error(&mut self, c: C) -> pb::Error {
        match self.run(c).await.pop() {
            Some(E::Error(e)) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }
}

fn chat(msg: &str) -> C {
    C::Prime(pb::Prime {
        prompt: Some(pb::prime::Prompt::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: msg.into(),
            }],
        })),
    })
}

fn burst(steps: u32) -> pb::DreamBurst {
    pb::DreamBurst {
        steps,
        seed: 3,
        gumbel_tau: Some(0.8),
        ..Default::default()
    }
}

/// A greedy commit that keeps the burst as unspoken thought (the positions stay latent).
fn commit(n: u32) -> C {
    C::Commit(pb::Commit {
        max_tokens: n,
        ignore_eos: true,
        render: pb::Render::Think as i32,
        sampling: Some(pb::Sampling {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dream_commit_rewind_commit_over_a_socket() {
    let server = start(&["--max-sessions", "2", "--max-context", "256"]);
    let mut client = MuseClient::connect(server.addr.clone()).await.unwrap();
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            info.architecture.as_str(),
            info.hidden_size,
            info.vocab_size,
            info.quantization.as_str()
        ),
        ("llama", 576, 49152, "Q4_1")
    );
    assert_eq!(info.context_length, 256);

    let mut s = Session::open(&mut client).await.unwrap();
    let primed = match s.run(chat("Write one line about the moon.")).await.pop() {
        Some(E::Primed(p)) => p,
        other => panic!("{other:?}"),
    };
    assert!(primed.prompt_tokens > 10);
    let events = s.run(C::Burst(burst(8))).await;
    let steps: Vec<&pb::LatentStep> = events
        .iter()
        .filter_map(|e| {
            if let E::LatentStep(l) = e {
                Some(l)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(steps.len(), 8);
    assert!(steps
        .iter()
        .all(|l| !l.top.is_empty() && l.entropy >= 0.0 && l.norm > 0.0));
    let Some(E::BurstDone(done)) = events.last() else {
        panic!("{events:?}")
    };
    assert_eq!(
        (done.steps, done.stop(), done.position),
        (8, pb::BurstStop::Budget, primed.position + 8)
    );
    s.run(C::Checkpoint(pb::Checkpoint {
        name: "dreamt".into(),
    }))
    .await;

    let first = s.run(commit(32)).await;
    let streamed: String = first
        .iter()
        .filter_map(|e| {
            if let E::Token(t) = e {
                Some(t.text.as_str())
            } else {
                None
            }
        })
        .collect();
    let Some(E::CommitDone(c1)) = first.last() else {
        panic!("{first:?}")
    };
    assert_eq!(c1.tokens.len(), 32);
    assert_eq!(
        streamed, c1.text,
        "streamed pieces must add up to the committed text"
    );
    assert_eq!(c1.position, primed.position + 8 + 32);

    let Some(E::Rewound(r)) = s
        .run(C::Rewind(pb::Rewind {
            checkpoint: "dreamt".into(),
        }))
        .await
        .pop()
    else {
        panic!()
    };
    assert_eq!(r.position, primed.position + 8);
    let Some(E::CommitDone(c2)) = s.run(commit(32)).await.pop() else {
        panic!()
    };
    assert_eq!(
        c2.tokens, c1.tokens,
        "greedy commit after a rewind must repeat itself"
    );

    let status = client
        .session_status(pb::SessionStatusRequest { session_id: s.id() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.position, c2.position);
    assert!(status.kv_bytes > 0 && status.checkpoints.contains(&"dreamt".to_string()));

    // Malformed commands: a code and the field's name; the session survives them.
    let cases: Vec<(C, tonic::Code, &str)> = vec![
        (
            C::Burst(pb::DreamBurst {
                temperature: Some(f32::NAN),
                ..burst(4)
            }),
            tonic::Code::InvalidArgument,
            "temperature",
        ),
        (
            C::Burst(pb::DreamBurst {
                top_k: Some(0),
                ..burst(4)
            }),
            tonic::Code::InvalidArgument,
            "top_k",
        ),
        (
            C::Burst(burst(100_000)),
            tonic::Code::InvalidArgument,
            "steps",
        ),
        (C::Burst(burst(0)), tonic::Code::InvalidArgument, "steps"),
        (commit(0), tonic::Code::InvalidArgument, "max_tokens"),
        (
            C::Rewind(pb::Rewind {
                checkpoint: "nowhere".into(),
            }),
            tonic::Code::InvalidArgument,
            "nowhere",
        ),
        (
            C::Prime(pb::Prime { prompt: None }),
            tonic::Code::InvalidArgument,
            "prime",
        ),
        (
            C::Prime(pb::Prime {
                prompt: Some(pb::prime::Prompt::Raw("word ".repeat(400))),
            }),
            tonic::Code::OutOfRange,
            "context",
        ),
    ];
    for (cmd, code, needle) in cases {
        let e = s.error(cmd).await;
        assert_eq!(tonic::Code::from(e.code), code, "{}", e.message);
        assert!(e.message.contains(needle), "{needle}: {}", e.message);
    }
    let Some(E::CommitDone(c3)) = s.run(commit(4)).await.pop() else {
        panic!("session did not survive bad commands")
    };
    assert_eq!(c3.tokens.len(), 4);

    // Unknown session.
    let e = client
        .session_status(pb::SessionStatusRequest {
            session_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("nope"));

    // Session limit: two open, the third is refused.
    let _second = Session::open(&mut client).await.unwrap();
    let third = Session::open(&mut client)
        .await
        .err()
        .expect("third session admitted");
    assert_eq!(third.code(), tonic::Code::ResourceExhausted);
    assert!(
        third.message().contains("max_sessions"),
        "{}",
        third.message()
    );

    // Close frees the session.
    let id = s.id();
    assert!(matches!(
        s.run(C::Close(pb::Close {})).await.pop(),
        Some(E::Closed(_))
    ));
    drop(s);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let gone = client
        .session_status(pb::SessionStatusRequest { session_id: id })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.active_sessions, 1);

    // Standard tooling: health reports SERVING.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(server.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "muse.v1.Muse".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_session() {
    let server = start(&["--max-sessions", "1"]);
    let mut client = MuseClient::connect(server.addr.clone()).await.unwrap();
    let mut s = Session::open(&mut client).await.unwrap();
    s.run(chat("Hello")).await;
    drop(s); // the stream ends without Close
    let mut reopened = None;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if let Ok(s) = Session::open(&mut client).await {
            reopened = Some(s);
            break;
        }
    }
    assert!(reopened.is_some(), "the only session slot was never freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_memory_bound_refuses_what_would_pass_it() {
    // SmolLM2 holds ~46 KB of KV per position: 1 MiB is ~22 positions.
    let server = start(&["--kv-memory-mb", "1"]);
    let mut client = MuseClient::connect(server.addr.clone()).await.unwrap();
    let mut s = Session::open(&mut client).await.unwrap();
    let e = s
        .error(chat(
            &"Tell me everything about the sea and the sky. ".repeat(4),
        ))
        .await;
    assert_eq!(
        tonic::Code::from(e.code),
        tonic::Code::ResourceExhausted,
        "{}",
        e.message
    );
    assert!(e.message.contains("kv_memory"), "{}", e.message);
    // A short prime fits.
    assert!(matches!(
        s.run(C::Prime(pb::Prime {
            prompt: Some(pb::prime::Prompt::Tokens(pb::TokenIds {
                ids: vec![1, 2, 3]
            }))
        }))
        .await
        .pop(),
        Some(E::Primed(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_closed_with_a_reason_and_frees_its_slot() {
    let server = start(&["--idle-timeout-s", "1", "--max-sessions", "1"]);
    let mut client = MuseClient::connect(server.addr.clone()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ClientCommand>(1);
    let mut events = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = events.message().await.unwrap().and_then(|e| e.event);
    assert!(matches!(first, Some(E::Started(_))), "{first:?}");
    // Send nothing: the next event is the idle error, then the stream ends.
    let Some(E::Error(e)) = events.message().await.unwrap().and_then(|e| e.event) else {
        panic!("expected the idle error");
    };
    assert_eq!(tonic::Code::from(e.code), tonic::Code::DeadlineExceeded);
    assert!(e.message.contains("idle_timeout_s"), "{}", e.message);
    assert!(events.message().await.unwrap().is_none());
    drop(tx);
    // The one slot is free again.
    let mut s = Session::open(&mut client).await.unwrap();
    let primed = s.run(chat("hello")).await;
    assert!(matches!(primed.last(), Some(E::Primed(_))), "{primed:?}");
}

/// One counter's value from the muse's `/metrics`, read with a bare HTTP/1.0 GET.
fn counter(metrics: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(metrics).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_stops_when_its_client_goes_away() {
    let metrics = format!("127.0.0.1:{}", mm_kit::peers::free_port());
    let server = start(&["--metrics", &metrics, "--max-sessions", "1"]);
    let mut client = MuseClient::connect(server.addr.clone()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ClientCommand>(4);
    let mut events = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for (id, c) in [(1, chat("Tell me a very long story.")), (2, commit(2000))] {
        tx.send(pb::ClientCommand {
            request_id: id,
            command: Some(c),
        })
        .await
        .unwrap();
    }
    // Wait for the commit's first token, then leave without a word.
    loop {
        match events.message().await.unwrap().and_then(|e| e.event) {
            Some(E::Token(_)) => break,
            Some(E::CommitDone(_)) | None => panic!("the commit ended before it could be left"),
            _ => {}
        }
    }
    drop(events);
    drop(tx);
    // The slot frees once the session ends; had the commit run on, it would have ended as
    // a completed commit, counted in committed_tokens, not as a cancelled one.
    let mut reopened = None;
    for _ in 0..1200 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        reopened = Session::open(&mut client).await.ok();
        if reopened.is_some() {
            break;
        }
    }
    assert!(reopened.is_some(), "the session never ended");
    assert_eq!(counter(&metrics, "muse_commits_cancelled_total"), 1.0);
    assert_eq!(counter(&metrics, "muse_committed_tokens_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_prime_takes_its_prompt_from_the_prefix_cache() {
    let metrics = format!("127.0.0.1:{}", mm_kit::peers::free_port());
    let server = start(&["--metrics", &metrics]);
    let mut client = MuseClient::connect(server.addr.clone()).await.unwrap();
    let mut primes = Vec::new();
    // Each attempt of a turn is a new stream priming the same transcript.
    for _ in 0..2 {
        let mut s = Session::open(&mut client).await.unwrap();
        let ask = "Write one line about the moon, the tide it pulls and the sailors who watch it.";
        match s.run(chat(ask)).await.pop() {
            Some(E::Primed(p)) => primes.push(p),
            other => panic!("{other:?}"),
        }
    }
    let n = primes[0].prompt_tokens;
    // Everything but the last token, whose row gives the frontier.
    let cached = n - 1;
    assert_eq!(primes[0].cached_tokens, 0);
    assert_eq!(
        (primes[1].prompt_tokens, primes[1].cached_tokens),
        (n, cached)
    );
    assert_eq!(primes[1].position, n);
    let hits = counter(&metrics, "muse_prefix_lookups_total{result=\"hit\"}");
    let misses = counter(&metrics, "muse_prefix_lookups_total{result=\"miss\"}");
    assert_eq!((hits, misses), (1.0, 1.0));
    assert_eq!(
        counter(&metrics, "muse_cached_tokens_total"),
        f64::from(cached)
    );
}

/// A raw HTTP/2 muse session stream: one DATA frame per command, as grpcio clients send them
/// (tonic's client coalesces messages into large frames, which would hide the problem).
struct RawStream {
    send: h2::SendStream<bytes::Bytes>,
    body: h2::RecvStream,
    buf: Vec<u8>,
}

impl RawStream {
    async fn open(client: &mut h2::client::SendRequest<bytes::Bytes>, addr: &str) -> Self {
        let req = http::Request::post(format!("{addr}/muse.v1.Muse/Session"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        client.clone().ready().await.unwrap();
        let (resp, send) = client.send_request(req, false).unwrap();
        let body = resp.await.unwrap().into_body();
        Self {
            send,
            body,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, request_id: u64, command: C) {
        use prost::Message;
        let msg = pb::ClientCommand {
            request_id,
            command: Some(command),
        }
        .encode_to_vec();
        let mut frame = vec![0u8];
        frame.extend((msg.len() as u32).to_be_bytes());
        frame.extend(msg);
        self.send.send_data(frame.into(), false).unwrap();
    }

    /// The next event; `None` when the stream ended.
    async fn next(&mut self) -> Option<pb::ServerEvent> {
        use prost::Message;
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() >= 5 + len {
                    let msg = pb::ServerEvent::decode(&self.buf[5..5 + len]).unwrap();
                    self.buf.drain(..5 + len);
                    return Some(msg);
                }
            }
            let chunk = self.body.data().await?.expect("the stream broke");
            let _ = self.body.flow_control().release_capacity(chunk.len());
            self.buf.extend_from_slice(&chunk);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_pipelined_commands_are_refused_not_a_dead_connection() {
    let server = start(&[]);
    let authority = server.addr.trim_start_matches("http://").to_string();
    let tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    // A second, idle stream on the same connection: h2's GOAWAY would take it down too.
    let mut bystander = RawStream::open(&mut client, &server.addr).await;
    let mut flood = RawStream::open(&mut client, &server.addr).await;
    // A long commit, and behind it 3,000 tiny commands, one frame each, sent at once.
    let n = 3000u64;
    flood.send(1, chat("Tell me a long story."));
    flood.send(2, commit(300));
    for id in 3..3 + n {
        flood.send(id, C::Checkpoint(pb::Checkpoint { name: "c".into() }));
    }
    flood.send.send_data(bytes::Bytes::new(), true).unwrap(); // the queue drains, then it ends
    let mut finals = std::collections::HashMap::<u64, E>::new();
    while let Some(e) = flood.next().await {
        match e.event {
            Some(E::Token(_)) | Some(E::Started(_)) | None => {}
            Some(ev) => assert!(finals.insert(e.request_id, ev).is_none(), "two answers"),
        }
    }
    let (mut done, mut refused) = (0, 0);
    for id in 3..3 + n {
        match finals.get(&id) {
            Some(E::CheckpointSet(_)) => done += 1,
            Some(E::Error(e)) if e.code == tonic::Code::ResourceExhausted as i32 => {
                assert!(e.message.contains("pipelined"), "{}", e.message);
                refused += 1
            }
            other => panic!("command {id}: {other:?}"),
        }
    }
    assert!(done > 0 && refused > 0, "{done} done, {refused} refused");
    assert!(matches!(finals.get(&2), Some(E::CommitDone(_))));
    // The connection lives: the bystander still dreams on it.
    bystander.send(1, chat("hello"));
    loop {
        match bystander.next().await.and_then(|e| e.event) {
            Some(E::Primed(_)) => break,
            Some(E::Started(_)) => {}
            other => panic!("the bystander got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_idle_streams_do_not_lock_out_new_work() {
    let server = start(&["--evict-idle-s", "1"]); // 16 sessions at most
    let mut client = MuseClient::connect(server.addr.clone()).await.unwrap();
    let mut idle = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        match Session::open(&mut client).await {
            Ok(s) => idle.push(s),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((idle.len(), refused), (16, 4));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // New work gets in: the longest-idle stream makes room, and is told why.
    let mut s = Session::open(&mut client).await.unwrap();
    s.run(chat("Hello")).await;
    let done = s.run(commit(4)).await;
    assert!(matches!(done.last(), Some(E::CommitDone(_))), "{done:?}");
    // Closing each shows which one made room: its stream holds the reason instead.
    let mut told = 0;
    for mut old in idle {
        match old.run(C::Close(pb::Close {})).await.pop() {
            Some(E::Closed(_)) => {}
            Some(E::Error(e)) => {
                assert_eq!(e.code, tonic::Code::ResourceExhausted as i32);
                assert!(e.message.contains("evict_idle_s"), "{}", e.message);
                told += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(told, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_session_open_still_exits() {
    let mut server = start(&["--idle-timeout-s", "3600"]);
    let mut client = MuseClient::connect(server.addr.clone()).await.unwrap();
    let mut s = Session::open(&mut client).await.unwrap();
    s.run(chat("Hello")).await;
    let term = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    // The open stream would hold a graceful shutdown for its hour of idle time; the grace
    // period ends it. (The bound below only guards against a hang.)
    let mut exited = None;
    for _ in 0..1200 {
        exited = server.child.try_wait().unwrap();
        if exited.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(exited.is_some(), "still running two minutes after SIGTERM");
    drop(s);
}
