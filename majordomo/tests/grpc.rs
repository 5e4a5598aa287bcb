//! The majordomo over a real socket: `majordomo serve` as a separate process. Bad input is
//! refused at the edge naming the field; a full queue answers RESOURCE_EXHAUSTED.

use mm_proto::majordomo::v1 as pb;
use pb::majordomo_client::MajordomoClient;
use std::process::{Child, Command, Stdio};

struct Server(Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_majordomo"))
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
        .spawn()
        .expect("start majordomo serve");
    let addr = mm_kit::serve::listening_address(&mut child).unwrap();
    Server(child, addr)
}

fn request(draft: &[u8]) -> pb::CritiqueRequest {
    pb::CritiqueRequest {
        request: "Write a haiku about rain.".into(),
        draft: draft.to_vec(),
        ..Default::default()
    }
}

async fn critique(
    client: &mut MajordomoClient<tonic::transport::Channel>,
    r: pb::CritiqueRequest,
) -> Result<(String, pb::CritiqueResult), tonic::Status> {
    let mut stream = client.critique(r).await?.into_inner();
    let mut streamed = String::new();
    while let Some(ev) = stream.message().await? {
        match ev.event.unwrap() {
            pb::critique_event::Event::Token(t) => streamed.push_str(&t),
            pb::critique_event::Event::Result(r) => return Ok((streamed, r)),
        }
    }
    Err(tonic::Status::internal("stream ended without a result"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critique_over_a_socket_and_bad_requests() {
    let server = start(&["--workers", "1", "--queue-capacity", "0"]);
    let mut client = MajordomoClient::connect(server.1.clone()).await.unwrap();
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            info.architecture.as_str(),
            info.workers,
            info.queue_capacity
        ),
        ("llama", 1, 0)
    );

    let (streamed, result) = critique(
        &mut client,
        request("Rain on the tin roof\ncounting down the afternoon\nthe kettle answers".as_bytes()),
    )
    .await
    .unwrap();
    let c = majordomo::critique::Critique::parse(&result.json).unwrap();
    assert!(streamed.starts_with("{\"verdict\":"), "{streamed}");
    assert!(result.decode.unwrap().tokens > 0);
    assert_eq!(result.critique.unwrap().coherence, c.coherence as u32);

    let e = critique(&mut client, request(b"ok \xff\xfe broken"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("draft is not valid UTF-8") && e.message().contains("offset 3"),
        "{}",
        e.message()
    );
    let e = critique(&mut client, request(&vec![b'a'; 200_000]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("draft is longer"), "{}", e.message());
    let e = critique(
        &mut client,
        pb::CritiqueRequest {
            request: String::new(),
            draft: b"x".to_vec(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(e.message().contains("request is empty"), "{}", e.message());
    let e = client
        .structure(pb::StructureRequest { draft: vec![0xc3] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // One worker, no queue: a second request while the first runs is refused at once.
    let mut c2 = client.clone();
    let first = tokio::spawn(async move {
        critique(
            &mut c2,
            request(
                &"A long and winding draft about rain. "
                    .repeat(30)
                    .into_bytes(),
            ),
        )
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let e = critique(&mut client, request(b"second")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("retry"), "{}", e.message());
    first.await.unwrap().unwrap();
}
