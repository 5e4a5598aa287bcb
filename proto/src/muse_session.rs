//! A client for one muse session stream: send a command, collect its events up to the one
//! that ends it. Shared by the orchestrator, `muse bench` and the tests.

use crate::muse::v1 as pb;
use pb::client_command::Command;
use pb::muse_client::MuseClient;
use pb::server_event::Event;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub struct SessionClient {
    tx: mpsc::Sender<pb::ClientCommand>,
    rx: tonic::Streaming<pb::ServerEvent>,
    next: u64,
    /// The server's id of this session.
    pub id: String,
}

impl SessionClient {
    pub async fn open(client: &mut MuseClient<Channel>) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut stream = client.session(ReceiverStream::new(rx)).await?.into_inner();
        match stream.message().await?.and_then(|e| e.event) {
            Some(Event::Started(s)) => Ok(Self {
                tx,
                rx: stream,
                next: 1,
                id: s.session_id,
            }),
            other => Err(tonic::Status::internal(format!(
                "expected SessionStarted, got {other:?}"
            ))),
        }
    }

    /// Sends `command` and returns its events, the final one (done, error, closed) last.
    pub async fn run(&mut self, command: Command) -> Result<Vec<Event>, tonic::Status> {
        self.run_with(command, |_| true).await
    }

    /// Like [`run`](Self::run), handing each intermediate event (latent step, token) to
    /// `on_event` as it arrives; `on_event` returning false abandons the command.
    pub async fn run_with(
        &mut self,
        command: Command,
        mut on_event: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<Event>, tonic::Status> {
        let rid = self.next;
        self.next += 1;
        self.tx
            .send(pb::ClientCommand {
                request_id: rid,
                command: Some(command),
            })
            .await
            .map_err(|_| tonic::Status::unavailable("the session stream is closed"))?;
        let mut events = Vec::new();
        while let Some(ev) = self.rx.message().await? {
            let Some(e) = ev.event else { continue };
            let last = is_final(&e);
            if !last && !on_event(&e) {
                return Err(tonic::Status::cancelled("abandoned by the caller"));
            }
            events.push(e);
            if last {
                return Ok(events);
            }
        }
        Err(tonic::Status::unavailable(
            "the muse ended the session stream",
        ))
    }
}

/// Whether `e` ends its command.
pub fn is_final(e: &Event) -> bool {
    !matches!(
        e,
        Event::LatentStep(_) | Event::Token(_) | Event::Started(_)
    )
}
