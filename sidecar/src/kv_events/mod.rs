//! vLLM's KV events on the wire: the types, the msgpack codec, vLLM's block
//! hash, and a ZMQ publisher and subscriber that speak vLLM's protocol.
//!
//! This module owns the wire layer only. It keeps no index of what an engine
//! holds and knows nothing of endpoints, pods or scoring: pd-router builds
//! its prefix index on [`Subscriber`], engine-sim publishes with
//! [`Publisher`].
//!
//! # Wire facts (vLLM 0.26.0 and 0.33.0, `vllm/distributed/kv_events.py`)
//! - A ZMQ message is three frames: topic (UTF-8, the config's `topic`,
//!   empty by default), sequence number (8 bytes, big-endian, from 0 per
//!   publisher), msgpack payload.
//! - The payload is `KVEventBatch`, a msgspec `array_like` struct in every
//!   release: `[ts, events, data_parallel_rank]`. The publisher sets the rank
//!   (0 without DP), so real batches have three elements.
//! - Events are msgspec `tag=True, omit_defaults=True` structs. In 0.26.0 and
//!   0.33.0 they are maps tagged `"type": "BlockStored"` (or `BlockRemoved`,
//!   `AllBlocksCleared`) with fields by name, optional fields left out when
//!   `None`. Older releases declared them `array_like` as well: `["BlockStored",
//!   block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
//!   lora_name, extra_keys, group_idx]`, every field written. 0.26.0 adds
//!   `kv_cache_spec_kind`, `kv_cache_spec_sliding_window`, `locality`; 0.33.0
//!   adds `ownership`, `session_id`, `lookahead_token_ids`. [`wire`] has them all.
//! - Block hashes are `int` (the digest's low 64 bits, unsigned; default) or
//!   the raw digest as msgpack `bin`, by `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`.
//! - With `prefix_caching_hash_algo=sha256_cbor` the digest is
//!   `sha256(cbor2.dumps((parent or NONE_HASH, tuple(tokens), extra_keys),
//!   canonical=True))`, `NONE_HASH = sha256_cbor(PYTHONHASHSEED)` when set
//!   ([`hash`]).
//! - Bind or connect: vLLM binds the PUB endpoint when it contains `*` or `::`
//!   or is `ipc://`/`inproc://`, and connects otherwise; the replay ROUTER is
//!   always bound. Each data-parallel rank adds its rank to both ports.
//! - Replay: a DEALER (or REQ) sends `["", start_seq]`; the ROUTER answers
//!   `["", topic, seq, payload]` per buffered batch with `seq >= start_seq`, then
//!   `["", "", -1 (8 bytes), ""]`.
//!
//! # Why the pure-Rust `zeromq` crate, not `zmq` (libzmq)
//! Both speak ZMTP 3.x, the protocol on the wire, so the choice is about
//! what ships and what can break. `zmq` 0.10 binds libzmq: the release image
//! (distroless cc-debian12) has no libzmq, so it would need the `vendored`
//! feature (a C++ build of libzmq inside ours) or a copied shared library, and
//! its API is blocking, needing threads beside tokio. `zeromq` 0.7 is
//! maintained by the ZeroMQ organisation, runs on the tokio we already use,
//! and tests PUB/SUB and ROUTER/DEALER against libzmq; 0.7 also rejects
//! truncated ZMTP commands that 0.6 would index past. Our own tests check it
//! against pyzmq (libzmq 4.3), the library vLLM uses: PUB/SUB with a topic
//! filter with either side bound, and replay over ROUTER/DEALER both ways.
//! What it lacks: a settable high-water mark (each subscriber's queue holds
//! 100,000 messages, vLLM's default `hwm`, and drops beyond) and `inproc://`.

pub mod config;
mod decode;
mod encode;
pub mod hash;
mod publisher;
mod subscriber;
pub mod wire;

#[cfg(test)]
mod tests;

pub use config::{is_bind_endpoint, offset_endpoint_port, KvEventsConfig, PublisherKind};
pub use decode::{decode_batch, DecodeError, MAX_DEPTH};
pub use encode::encode_batch;
pub use hash::{
    hash_block_tokens, none_hash, none_hash_from_env, BlockHash, BlockHasher, UnsetSeed,
};
pub use publisher::{Attach, Publisher, PublisherOptions, PublisherStats};
pub use subscriber::{
    replay, Continuity, Received, ReplayError, Replayed, Subscriber, SubscriberStats,
};
pub use wire::{
    BlockRemoved, BlockStored, Encoding, EventBatch, ExternalBlockHash, ExtraKey, HashForm, KvEvent,
};

/// vLLM's end-of-replay sequence frame, `(-1).to_bytes(8, "big", signed=True)`.
pub const END_SEQ: [u8; 8] = [0xff; 8];

/// A socket could not be set up, or the publisher is gone.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("endpoint {endpoint}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("endpoint {endpoint}: {source}")]
    Zmq {
        endpoint: String,
        #[source]
        source: zeromq::ZmqError,
    },
    #[error("the publisher's queue is full")]
    QueueFull,
    #[error("the publisher has stopped")]
    Closed,
}

impl TransportError {
    fn zmq(endpoint: &str, source: zeromq::ZmqError) -> Self {
        Self::Zmq {
            endpoint: endpoint.to_owned(),
            source,
        }
    }
}
