//! A ZMQ publisher of KV events that behaves on the wire as vLLM's
//! `ZmqEventPublisher` (`vllm/distributed/kv_events.py`).
//!
//! Each batch goes out as three frames — topic, sequence number (8 bytes,
//! big-endian, counting from 0), msgpack payload — and is kept in a ring of
//! `buffer_steps` batches. With a replay endpoint, a ROUTER socket answers a
//! request `[identity, "", start]` (`start` big-endian) with one message
//! `[identity, "", topic, seq, payload]` per kept batch from `start` on, then
//! the end marker `[identity, "", "", -1 as 8 bytes, ""]`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeromq::{
    PubSocket, RouterSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, ZmqMessage,
};

use super::config::{is_bind_endpoint, socket_endpoint, KvEventsConfig};
use super::encode::encode_batch;
use super::wire::{Encoding, EventBatch};
use super::{TransportError, END_SEQ};

/// How long one replay reply may wait for a slow client before the replay is
/// abandoned, so one stalled client cannot hold the replay socket.
const REPLAY_SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// One connect attempt; the publisher retries until it is connected.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(1);

/// Whether the PUB socket binds or connects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Attach {
    /// vLLM's rule, [`is_bind_endpoint`].
    #[default]
    Auto,
    Bind,
    Connect,
}

/// What a [`Publisher`] needs; [`PublisherOptions::from_config`] reads vLLM's
/// `--kv-events-config`.
#[derive(Clone, Debug, PartialEq)]
pub struct PublisherOptions {
    /// Bound when [`is_bind_endpoint`] says so (`tcp://*:5557`), else
    /// connected to (and reconnected after the peer goes away); `attach`
    /// can force either.
    pub endpoint: String,
    pub attach: Attach,
    /// ROUTER endpoint for replay requests, always bound; `None`: no replay.
    pub replay_endpoint: Option<String>,
    pub topic: String,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// Batches queued before [`Publisher::publish`] waits.
    pub max_queue_size: usize,
    /// Written into batches whose `data_parallel_rank` is `None`, as vLLM does.
    pub data_parallel_rank: u32,
    pub encoding: Encoding,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        let cfg = KvEventsConfig::default();
        Self {
            endpoint: cfg.endpoint,
            attach: Attach::Auto,
            replay_endpoint: None,
            topic: cfg.topic,
            buffer_steps: cfg.buffer_steps,
            max_queue_size: cfg.max_queue_size,
            data_parallel_rank: 0,
            encoding: Encoding::Map,
        }
    }
}

impl PublisherOptions {
    /// The publisher vLLM builds for data-parallel rank `rank` (endpoint ports
    /// offset by the rank). `cfg.hwm` has no counterpart here: the ZMQ crate
    /// keeps up to 100,000 messages per subscriber, vLLM's default `hwm`, and
    /// drops beyond that as a PUB socket at its high-water mark does.
    pub fn from_config(
        cfg: &KvEventsConfig,
        rank: u32,
        encoding: Encoding,
    ) -> Result<Self, TransportError> {
        let cfg = cfg.for_rank(rank)?;
        Ok(Self {
            endpoint: cfg.endpoint,
            attach: Attach::Auto,
            replay_endpoint: cfg.replay_endpoint,
            topic: cfg.topic,
            buffer_steps: cfg.buffer_steps,
            max_queue_size: cfg.max_queue_size,
            data_parallel_rank: rank,
            encoding,
        })
    }
}

/// Counters a metrics task can read while the publisher runs.
#[derive(Debug, Default)]
pub struct PublisherStats {
    /// Batches given a sequence number (sent or [`Publisher::publish_dropped`]).
    pub batches: AtomicU64,
    /// Replay requests answered.
    pub replays: AtomicU64,
    /// Replay requests ignored for their shape, or abandoned on a stalled client.
    pub replay_errors: AtomicU64,
}

enum Command {
    Send(EventBatch),
    /// Numbered and kept for replay, never sent: a message lost on the way.
    Lose(EventBatch),
}

type Ring = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

/// A running publisher: a task owns the PUB socket (and one more the ROUTER
/// socket); batches reach it through a queue, as in vLLM's publisher thread.
pub struct Publisher {
    tx: mpsc::Sender<Command>,
    endpoint: String,
    replay_endpoint: Option<String>,
    stats: Arc<PublisherStats>,
    task: JoinHandle<()>,
    /// Held only to stop the replay task with the publisher.
    _replay_task: Option<AbortOnDrop>,
}

/// The replay task lives as long as its [`Publisher`].
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Publisher {
    /// Binds (or starts connecting) the PUB socket and binds the replay
    /// socket; returns once both binds succeeded.
    pub async fn start(opts: PublisherOptions) -> Result<Self, TransportError> {
        let mut options = SocketOptions::default();
        options.connect_timeout(CONNECT_ATTEMPT);
        let mut pub_sock = PubSocket::with_options(options);
        let target = socket_endpoint(&opts.endpoint)?;
        let bind = match opts.attach {
            Attach::Auto => is_bind_endpoint(&opts.endpoint),
            Attach::Bind => true,
            Attach::Connect => false,
        };
        let (endpoint, connect_to) = if bind {
            let bound = pub_sock
                .bind(&target)
                .await
                .map_err(|e| TransportError::zmq(&opts.endpoint, e))?;
            (bound.to_string(), None)
        } else {
            (opts.endpoint.clone(), Some(target))
        };
        let ring: Ring = Arc::new(Mutex::new(VecDeque::with_capacity(
            opts.buffer_steps.min(1024),
        )));
        let stats = Arc::new(PublisherStats::default());
        let topic = Bytes::from(opts.topic.clone().into_bytes());

        let (replay_endpoint, replay_task) = match &opts.replay_endpoint {
            Some(ep) => {
                let mut router = RouterSocket::new();
                let bound = router
                    .bind(&socket_endpoint(ep)?)
                    .await
                    .map_err(|e| TransportError::zmq(ep, e))?;
                let task = AbortOnDrop(tokio::spawn(serve_replays(
                    router,
                    ring.clone(),
                    topic.clone(),
                    stats.clone(),
                )));
                (Some(bound.to_string()), Some(task))
            }
            None => (None, None),
        };

        let (tx, rx) = mpsc::channel(opts.max_queue_size.max(1));
        let core = Core {
            next_seq: 0,
            ring,
            buffer_steps: opts.buffer_steps,
            topic,
            rank: opts.data_parallel_rank,
            encoding: opts.encoding,
            stats: stats.clone(),
        };
        let task = tokio::spawn(run(pub_sock, connect_to, rx, core));
        Ok(Self {
            tx,
            endpoint,
            replay_endpoint,
            stats,
            task,
            _replay_task: replay_task,
        })
    }

    /// The PUB endpoint: the address actually bound (port 0 resolved), or
    /// the one connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bound replay endpoint, if any.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    pub fn stats(&self) -> &Arc<PublisherStats> {
        &self.stats
    }

    /// Queues a batch; waits while the queue is full (as vLLM's
    /// `Queue.put` blocks the scheduler).
    pub async fn publish(&self, batch: EventBatch) -> Result<(), TransportError> {
        self.tx
            .send(Command::Send(batch))
            .await
            .map_err(|_| TransportError::Closed)
    }

    /// Queues a batch without waiting.
    pub fn try_publish(&self, batch: EventBatch) -> Result<(), TransportError> {
        self.tx.try_send(Command::Send(batch)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TransportError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => TransportError::Closed,
        })
    }

    /// Takes the next sequence number and keeps the batch for replay but
    /// never sends it: a message lost on the way, so tests (and engine-sim's
    /// fault injection) can make subscribers see a gap that replay can fill.
    pub async fn publish_dropped(&self, batch: EventBatch) -> Result<(), TransportError> {
        self.tx
            .send(Command::Lose(batch))
            .await
            .map_err(|_| TransportError::Closed)
    }

    /// Sends what is queued, then closes the sockets.
    pub async fn shutdown(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

/// Numbering, encoding and the replay ring.
struct Core {
    next_seq: u64,
    ring: Ring,
    buffer_steps: usize,
    topic: Bytes,
    rank: u32,
    encoding: Encoding,
    stats: Arc<PublisherStats>,
}

impl Core {
    fn number(&mut self, mut batch: EventBatch) -> ZmqMessage {
        batch.data_parallel_rank.get_or_insert(self.rank);
        let payload = Bytes::from(encode_batch(&batch, self.encoding));
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if self.buffer_steps > 0 {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() >= self.buffer_steps {
                ring.pop_front();
            }
            ring.push_back((seq, payload.clone()));
        }
        frames(vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload,
        ])
    }
}

fn frames(frames: Vec<Bytes>) -> ZmqMessage {
    // Never empty here; an empty message would be a bug, sent as one frame.
    ZmqMessage::try_from(frames).unwrap_or_else(|_| ZmqMessage::from(Bytes::new()))
}

async fn run(
    mut sock: PubSocket,
    connect_to: Option<String>,
    mut rx: mpsc::Receiver<Command>,
    mut core: Core,
) {
    use futures_util::StreamExt;
    let mut monitor = Some(sock.monitor());
    let mut connected = connect_to.is_none();
    loop {
        if let (false, Some(target)) = (connected, &connect_to) {
            // Until connected nothing can be delivered (a PUB socket drops
            // messages without subscribers); keep numbering and buffering.
            let connecting = connect_until_done(&mut sock, target);
            tokio::pin!(connecting);
            loop {
                tokio::select! {
                    () = &mut connecting => break,
                    cmd = rx.recv() => match cmd {
                        Some(Command::Send(b) | Command::Lose(b)) => drop(core.number(b)),
                        None => return,
                    },
                }
            }
            connected = true;
        }
        let event = async {
            match monitor.as_mut() {
                Some(m) => m.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Command::Send(b)) => {
                    let msg = core.number(b);
                    if let Err(e) = sock.send(msg).await {
                        tracing::debug!(error = %e, "kv events: send failed");
                    }
                }
                Some(Command::Lose(b)) => drop(core.number(b)),
                None => return,
            },
            ev = event => match ev {
                Some(SocketEvent::Disconnected(_)) if connect_to.is_some() => connected = false,
                Some(_) => {}
                None => monitor = None,
            },
        }
    }
}

async fn connect_until_done(sock: &mut PubSocket, target: &str) {
    loop {
        match sock.connect(target).await {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(endpoint = target, error = %e, "kv events: connect failed, retrying")
            }
        }
    }
}

/// Answers replay requests from the ring, one client at a time.
async fn serve_replays(
    mut router: RouterSocket,
    ring: Ring,
    topic: Bytes,
    stats: Arc<PublisherStats>,
) {
    loop {
        let request = match router.recv().await {
            Ok(m) => m.into_vec(),
            Err(e) => {
                // Back off so a socket that keeps failing cannot spin.
                tracing::debug!(error = %e, "kv events: replay socket receive failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // vLLM ignores anything but [identity, "", start].
        let Ok([id, _, start]) = <[Bytes; 3]>::try_from(request) else {
            stats.replay_errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        // Python's int.from_bytes(start, "big"): any length, empty is 0.
        let start = start.iter().fold(0u128, |acc, &b| {
            acc.saturating_mul(256).saturating_add(b.into())
        });
        let batches: Vec<(u64, Bytes)> = {
            let ring = ring.lock().unwrap_or_else(|p| p.into_inner());
            ring.iter()
                .filter(|(seq, _)| u128::from(*seq) >= start)
                .cloned()
                .collect()
        };
        let replies = batches
            .into_iter()
            .map(|(seq, payload)| vec![Bytes::copy_from_slice(&seq.to_be_bytes()), payload])
            .map(|tail| [vec![id.clone(), Bytes::new(), topic.clone()], tail].concat())
            .chain(std::iter::once(vec![
                id.clone(),
                Bytes::new(),
                Bytes::new(),
                Bytes::from_static(&END_SEQ),
                Bytes::new(),
            ]));
        let mut ok = true;
        for reply in replies {
            match tokio::time::timeout(REPLAY_SEND_TIMEOUT, router.send(frames(reply))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        let counter = if ok {
            &stats.replays
        } else {
            &stats.replay_errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
