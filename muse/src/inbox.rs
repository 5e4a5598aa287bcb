//! A session's commands, taken off the connection as soon as they arrive and queued with a
//! bound.
//!
//! Why eagerly: h2 counts small DATA frames that arrive while the application is not reading
//! and, past its budget, closes the whole connection (GOAWAY `too_many_data_frames`), killing
//! the client's other streams with it. A client that pipelines thousands of small commands
//! while a long commit runs would do exactly that. So every frame is read at once; commands
//! wait here, within [`MAX_QUEUED`] commands and [`MAX_QUEUED_BYTES`] bytes, and past either
//! bound a command is answered RESOURCE_EXHAUSTED at once, while the stream and the connection
//! live on. A client that reads neither its answers nor the refusals loses the session.

use crate::service::error_event;
use mm_proto::muse::v1 as pb;
use prost::Message;
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};

/// Commands that may wait behind the running one.
pub const MAX_QUEUED: usize = 64;
/// Bytes of encoded commands that may wait: bounds a session's queue memory whatever the
/// commands' sizes.
pub const MAX_QUEUED_BYTES: usize = 16 * 1024 * 1024;

/// A command taken off the wire (or the stream's failure), holding its share of the byte
/// bound until dropped.
pub struct Queued {
    pub command: Result<pb::ClientCommand, Status>,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Refusals that may wait for the client to read them; a client this far behind on its
/// answers is not reading them at all.
const MAX_REFUSALS_UNREAD: usize = 4096;

/// Reads `inbound` until it ends, queueing into the returned receiver; refusals go to `out`.
pub fn spawn_reader(
    mut inbound: Streaming<pb::ClientCommand>,
    out: mpsc::Sender<Result<pb::ServerEvent, Status>>,
) -> mpsc::Receiver<Queued> {
    let (tx, rx) = mpsc::channel(MAX_QUEUED);
    // Refusals travel apart, so the reader never waits on a slow client's answer stream.
    // Held weakly: the answer stream ends when the session does, not when the client stops
    // sending.
    let out = out.downgrade();
    let (refuse, mut refusals) = mpsc::channel::<u64>(MAX_REFUSALS_UNREAD);
    tokio::spawn(async move {
        while let Some(id) = refusals.recv().await {
            let Some(out) = out.upgrade() else { break };
            if out.send(Ok(refused(id))).await.is_err() {
                break;
            }
        }
    });
    let bytes = Arc::new(Semaphore::new(MAX_QUEUED_BYTES));
    tokio::spawn(async move {
        while let Some(msg) = inbound.next().await {
            let Ok(cmd) = msg else {
                // The session answers a broken stream with its reason, then ends.
                let _ = tx
                    .send(Queued {
                        command: msg,
                        _bytes: None,
                    })
                    .await;
                break;
            };
            let id = cmd.request_id;
            let size = u32::try_from(cmd.encoded_len()).unwrap_or(u32::MAX);
            let queued = match bytes.clone().try_acquire_many_owned(size.max(1)) {
                Ok(p) => tx.try_send(Queued {
                    command: Ok(cmd),
                    _bytes: Some(p),
                }),
                Err(_) => Err(mpsc::error::TrySendError::Full(Queued {
                    command: Ok(cmd),
                    _bytes: None,
                })),
            };
            match queued {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => break, // the session ended
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if refuse.try_send(id).is_err() {
                        break; // the client reads nothing: the session ends
                    }
                }
            }
        }
    });
    rx
}

fn refused(request_id: u64) -> pb::ServerEvent {
    error_event(
        request_id,
        &Status::resource_exhausted(format!(
            "too many commands pipelined (at most {MAX_QUEUED}, {} MiB, wait behind the running one): wait for answers before sending more",
            MAX_QUEUED_BYTES >> 20
        )),
    )
}
