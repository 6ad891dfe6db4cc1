//! A ZMQ subscriber of vLLM's KV events: topic-prefix filter, decoding,
//! per-topic sequence tracking, and replay from a publisher's ROUTER socket.
//!
//! Malformed messages never end the stream: a message without exactly three
//! frames or with a sequence frame other than 8 bytes is counted and skipped;
//! a payload that does not decode is yielded with its error (its sequence
//! number still counts for gap detection) and counted.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use super::config::socket_endpoint;
use super::decode::{decode_batch, DecodeError};
use super::wire::EventBatch;
use super::{TransportError, END_SEQ};

/// How a message's sequence number follows the last one on its topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Continuity {
    /// The first message seen on this topic (a late joiner may have missed
    /// `0..seq`, which [`replay`] can fetch).
    First,
    /// Exactly one after the previous.
    Next,
    /// These sequence numbers never arrived.
    Gap { missed: Range<u64> },
    /// Not after the previous (`previous` >= this one): the publisher started
    /// over, so whatever it said before no longer holds. Sequence numbers are
    /// all there is to go on: a restarted publisher that has already sent
    /// more than its predecessor when the subscriber hears it again shows as
    /// a [`Continuity::Gap`] instead.
    Restart { previous: u64 },
}

/// One message as received.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    /// First frame (vLLM's `topic`), UTF-8 with invalid bytes replaced.
    pub topic: String,
    pub seq: u64,
    pub continuity: Continuity,
    pub batch: Result<EventBatch, DecodeError>,
}

/// One batch fetched by [`replay`].
#[derive(Clone, Debug, PartialEq)]
pub struct Replayed {
    pub seq: u64,
    pub batch: Result<EventBatch, DecodeError>,
}

/// Why a replay did not return every missed batch.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("replay did not finish before its deadline ({received} batches received)")]
    Deadline { received: usize },
    /// The publisher no longer keeps (or never had) sequence `first_missing`.
    #[error("the publisher's replay buffer lacks sequence {first_missing}")]
    Incomplete {
        first_missing: u64,
        replayed: Vec<Replayed>,
    },
}

/// Counters a metrics task can read while [`Subscriber::recv`] runs.
#[derive(Debug, Default)]
pub struct SubscriberStats {
    /// Well-framed messages on a subscribed topic (decoded or not).
    pub messages: AtomicU64,
    /// Payloads that are not a vLLM event batch.
    pub decode_errors: AtomicU64,
    /// Messages skipped for their framing (frame count, sequence frame size).
    pub malformed: AtomicU64,
    /// Messages outside the topic prefix (a publisher that does not filter).
    pub filtered: AtomicU64,
    pub gaps: AtomicU64,
    /// Sequence numbers missed, over all gaps.
    pub missed: AtomicU64,
    pub restarts: AtomicU64,
    /// Errors from the socket itself (a peer that broke the ZMTP protocol).
    pub socket_errors: AtomicU64,
    pub replays: AtomicU64,
    pub replay_failures: AtomicU64,
}

impl SubscriberStats {
    fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

/// A SUB socket, bound (centralized: every engine connects to it) or
/// connected (per pod), subscribed to one topic prefix.
pub struct Subscriber {
    socket: SubSocket,
    endpoint: String,
    prefix: Bytes,
    last_seq: HashMap<Bytes, u64>,
    stats: Arc<SubscriberStats>,
}

impl Subscriber {
    /// Binds `endpoint` (`tcp://*:5557` binds every IPv4 interface); engines
    /// connect to it with their own topics.
    pub async fn bind(endpoint: &str, topic_prefix: &str) -> Result<Self, TransportError> {
        let mut socket = SubSocket::new();
        subscribe(&mut socket, endpoint, topic_prefix).await?;
        let bound = socket
            .bind(&socket_endpoint(endpoint)?)
            .await
            .map_err(|e| TransportError::zmq(endpoint, e))?;
        Ok(Self::with(socket, bound.to_string(), topic_prefix))
    }

    /// Connects to a publisher's bound endpoint, waiting up to `timeout` for
    /// it to answer (`None`: as long as it takes); once connected, the socket
    /// reconnects by itself after the publisher restarts.
    pub async fn connect(
        endpoint: &str,
        topic_prefix: &str,
        timeout: Option<Duration>,
    ) -> Result<Self, TransportError> {
        let mut options = SocketOptions::default();
        match timeout {
            Some(t) => options.connect_timeout(t),
            None => options.no_connect_timeout(),
        };
        let mut socket = SubSocket::with_options(options);
        subscribe(&mut socket, endpoint, topic_prefix).await?;
        socket
            .connect(&socket_endpoint(endpoint)?)
            .await
            .map_err(|e| TransportError::zmq(endpoint, e))?;
        Ok(Self::with(socket, endpoint.to_owned(), topic_prefix))
    }

    fn with(socket: SubSocket, endpoint: String, topic_prefix: &str) -> Self {
        Self {
            socket,
            endpoint,
            prefix: Bytes::copy_from_slice(topic_prefix.as_bytes()),
            last_seq: HashMap::new(),
            stats: Arc::default(),
        }
    }

    /// Unbinds and closes the socket, waiting until its listeners are gone
    /// (a plain drop releases them in the background).
    pub async fn close(self) {
        for e in self.socket.close().await {
            tracing::debug!(endpoint = %self.endpoint, error = %e, "kv events: close");
        }
    }

    /// The bound address (port 0 resolved) or the one connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn stats(&self) -> &Arc<SubscriberStats> {
        &self.stats
    }

    /// The last sequence number seen on `topic`.
    pub fn last_seq(&self, topic: &str) -> Option<u64> {
        self.last_seq.get(topic.as_bytes()).copied()
    }

    /// Forgets `topic`'s sequence, so its next message counts as
    /// [`Continuity::First`] (after a consumer dropped that topic's state).
    pub fn forget(&mut self, topic: &str) {
        self.last_seq.remove(topic.as_bytes());
    }

    /// The next well-framed message on a subscribed topic. Never fails:
    /// malformed messages and socket errors are counted and skipped.
    /// Cancel-safe: a message is consumed only when it is returned.
    pub async fn recv(&mut self) -> Received {
        loop {
            let msg = match self.socket.recv().await {
                Ok(msg) => msg,
                Err(e) => {
                    SubscriberStats::bump(&self.stats.socket_errors, 1);
                    tracing::debug!(endpoint = %self.endpoint, error = %e, "kv events: receive failed");
                    // Back off so a socket that keeps failing cannot spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if let Some(received) = self.accept(msg) {
                return received;
            }
        }
    }

    fn accept(&mut self, msg: ZmqMessage) -> Option<Received> {
        let Ok([topic, seq, payload]) = <[Bytes; 3]>::try_from(msg.into_vec()) else {
            SubscriberStats::bump(&self.stats.malformed, 1);
            return None;
        };
        let Some(seq) = seq_of(&seq) else {
            SubscriberStats::bump(&self.stats.malformed, 1);
            return None;
        };
        if !topic.starts_with(&self.prefix) {
            SubscriberStats::bump(&self.stats.filtered, 1);
            return None;
        }
        SubscriberStats::bump(&self.stats.messages, 1);
        let continuity = match self.last_seq.insert(topic.clone(), seq) {
            None => Continuity::First,
            Some(prev) if prev.checked_add(1) == Some(seq) => Continuity::Next,
            Some(prev) if seq > prev => {
                SubscriberStats::bump(&self.stats.gaps, 1);
                SubscriberStats::bump(&self.stats.missed, seq - prev - 1);
                Continuity::Gap {
                    missed: prev + 1..seq,
                }
            }
            Some(previous) => {
                SubscriberStats::bump(&self.stats.restarts, 1);
                Continuity::Restart { previous }
            }
        };
        let batch = decode_batch(&payload);
        if batch.is_err() {
            SubscriberStats::bump(&self.stats.decode_errors, 1);
        }
        Some(Received {
            topic: String::from_utf8_lossy(&topic).into_owned(),
            seq,
            continuity,
            batch,
        })
    }

    /// [`replay`], counted in this subscriber's stats.
    pub async fn replay(
        &self,
        replay_endpoint: &str,
        missed: Range<u64>,
        deadline: Instant,
    ) -> Result<Vec<Replayed>, ReplayError> {
        let result = replay(replay_endpoint, missed, deadline).await;
        let counter = if result.is_ok() {
            &self.stats.replays
        } else {
            &self.stats.replay_failures
        };
        SubscriberStats::bump(counter, 1);
        if let Ok(batches) = &result {
            let bad = batches.iter().filter(|r| r.batch.is_err()).count();
            SubscriberStats::bump(&self.stats.decode_errors, bad as u64);
        }
        result
    }
}

async fn subscribe(
    socket: &mut SubSocket,
    endpoint: &str,
    prefix: &str,
) -> Result<(), TransportError> {
    socket
        .subscribe(prefix)
        .await
        .map_err(|e| TransportError::zmq(endpoint, e))
}

fn seq_of(frame: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(frame).ok().map(u64::from_be_bytes)
}

/// Asks a publisher's replay endpoint (vLLM's `replay_endpoint`) for the
/// batches `missed` and returns exactly those, in order. A fresh DEALER
/// socket per call, so replies to an abandoned request cannot be mistaken
/// for a later one's. Sends `["", start]` (`start` 8 bytes big-endian) and
/// reads replies until vLLM's end marker, accepting the reply shapes of each
/// vLLM release: `["", topic, seq, payload]` (0.26.0, 0.33.0), `["", seq,
/// payload]` (earlier), with the end marker `["", "", -1, ""]`, `["", -1,
/// ""]` or `[""]`.
pub async fn replay(
    endpoint: &str,
    missed: Range<u64>,
    deadline: Instant,
) -> Result<Vec<Replayed>, ReplayError> {
    if missed.is_empty() {
        return Ok(Vec::new());
    }
    let target = socket_endpoint(endpoint)?;
    let mut got = Vec::new();
    let fetch = async {
        let mut dealer = DealerSocket::new();
        dealer
            .connect(&target)
            .await
            .map_err(|e| TransportError::zmq(endpoint, e))?;
        let request = vec![
            Bytes::new(),
            Bytes::copy_from_slice(&missed.start.to_be_bytes()),
        ];
        let request = ZmqMessage::try_from(request).map_err(|_| TransportError::Closed)?;
        dealer
            .send(request)
            .await
            .map_err(|e| TransportError::zmq(endpoint, e))?;
        loop {
            let reply = dealer
                .recv()
                .await
                .map_err(|e| TransportError::zmq(endpoint, e))?;
            match parse_reply(reply.into_vec()) {
                Reply::End => return Ok::<_, TransportError>(()),
                Reply::Batch(seq, payload) if missed.contains(&seq) => {
                    got.push(Replayed {
                        seq,
                        batch: decode_batch(&payload),
                    });
                    if seq + 1 == missed.end {
                        return Ok(());
                    }
                }
                Reply::Batch(..) | Reply::Malformed => {}
            }
        }
    };
    match tokio::time::timeout_at(deadline, fetch).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(ReplayError::Deadline {
                received: got.len(),
            })
        }
    }
    // Replies come in sequence order; stops at the first hole.
    let first_missing = missed
        .clone()
        .enumerate()
        .find(|(i, want)| got.get(*i).map(|r| r.seq) != Some(*want))
        .map(|(_, want)| want);
    match first_missing {
        None => Ok(got),
        Some(first_missing) => Err(ReplayError::Incomplete {
            first_missing,
            replayed: got,
        }),
    }
}

enum Reply {
    Batch(u64, Bytes),
    End,
    Malformed,
}

fn parse_reply(mut frames: Vec<Bytes>) -> Reply {
    // A DEALER sees the ROUTER's empty delimiter first.
    if frames.first().is_some_and(|f| f.is_empty()) && frames.len() > 1 {
        frames.remove(0);
    }
    let (seq, payload) = match frames.as_slice() {
        [_, seq, payload] | [seq, payload] => (seq, payload),
        [only] if only.is_empty() => return Reply::End,
        _ => return Reply::Malformed,
    };
    if seq.as_ref() == END_SEQ {
        return Reply::End;
    }
    match seq_of(seq) {
        Some(seq) => Reply::Batch(seq, payload.clone()),
        None => Reply::Malformed,
    }
}
