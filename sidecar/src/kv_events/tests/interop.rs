//! Against pyzmq (libzmq), msgspec and vLLM's publisher logic, driven through
//! `tests/fixtures/kv_events/zmq_peer.py` in the repository's `.venv`
//! (`scripts/setup` creates it; CI runs that first).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use super::transport::{batch, next, wait_until};
use super::{batch_json, fixture_dir, unhex};
use crate::kv_events::{
    decode_batch, Attach, Continuity, Encoding, EventBatch, ExternalBlockHash, KvEvent, Publisher,
    PublisherOptions, Subscriber,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// A running `zmq_peer.py`; killed when dropped.
struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Peer {
    /// `None` (the test then skips, saying why) only when the venv is missing.
    fn spawn(args: &[&str]) -> Option<Self> {
        let python = fixture_dir().join("../../../.venv/bin/python");
        if !python.exists() {
            eprintln!(
                "SKIPPED: {} is missing; run scripts/setup to create the venv",
                python.display()
            );
            return None;
        }
        let mut child = Command::new(&python)
            .arg(fixture_dir().join("zmq_peer.py"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the python peer");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Some(Self {
            child,
            stdin,
            lines,
        })
    }

    async fn line(&mut self) -> Value {
        let line = timeout(DEADLINE, self.lines.recv())
            .await
            .expect("the peer answers before the deadline");
        let line = line.expect("the peer exited early (see its stderr)");
        serde_json::from_str(&line).expect("a JSON line")
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("write to the peer");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What zmq_peer.py's `vllm_batch(seq)` sends.
fn python_batch(seq: u64) -> EventBatch {
    let stored = crate::kv_events::BlockStored {
        block_hashes: vec![ExternalBlockHash::Int(seq + (1 << 63))],
        token_ids: (seq as u32..seq as u32 + 16).collect(),
        block_size: 16,
        medium: Some("GPU".into()),
        extra_keys: Some(vec![None]),
        group_idx: Some(0),
        kv_cache_spec_kind: Some("full_attention".into()),
        ..Default::default()
    };
    EventBatch {
        ts: seq as f64 + 0.5,
        events: vec![KvEvent::BlockStored(stored)],
        data_parallel_rank: Some(0),
    }
}

/// Publishes `batch(k)` from each publisher every 10 ms until the pyzmq SUB
/// has printed `count` messages; checks each against what was sent.
async fn feed_python_sub(peer: &mut Peer, publishers: &[&Publisher], topic: &str, count: usize) {
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let end = Instant::now() + DEADLINE;
    let mut got = 0;
    let mut last = None;
    while got < count {
        assert!(Instant::now() < end, "pyzmq received {got} of {count}");
        tokio::select! {
            line = peer.lines.recv() => {
                let v: Value = serde_json::from_str(&line.expect("peer alive")).expect("json");
                assert_eq!(v["frames"], 3, "{v}");
                assert_eq!(v["topic"], topic, "the prefix filter let {v} through");
                let seq = v["seq"].as_u64().expect("seq");
                assert_eq!(v["batch"], batch_json(&batch(seq)), "seq {seq}");
                if let Some(prev) = last {
                    assert_eq!(seq, prev + 1, "in order, none lost");
                }
                last = Some(seq);
                got += 1;
            }
            _ = tick.tick() => {
                for p in publishers {
                    p.publish(batch(sent)).await.expect("publish");
                }
                sent += 1;
            }
        }
    }
}

#[tokio::test]
async fn rust_publishers_to_pyzmq_sub_with_topic_filter() {
    let bound = |topic: &str| PublisherOptions {
        endpoint: "tcp://127.0.0.1:0".into(),
        attach: Attach::Bind,
        topic: topic.into(),
        ..Default::default()
    };
    let a = Publisher::start(bound("kv@10.0.0.1:8000@m"))
        .await
        .expect("a");
    let b = Publisher::start(bound("kv@10.0.0.2:8000@m"))
        .await
        .expect("b");
    let args = [
        "sub",
        "--connect",
        a.endpoint(),
        "--connect",
        b.endpoint(),
        "--topic",
        "kv@10.0.0.1",
        "--count",
        "5",
    ];
    let Some(mut peer) = Peer::spawn(&args) else {
        return;
    };
    feed_python_sub(&mut peer, &[&a, &b], "kv@10.0.0.1:8000@m", 5).await;
}

#[tokio::test]
async fn rust_publisher_connects_to_bound_pyzmq_sub_array_layout() {
    let Some(mut peer) = Peer::spawn(&[
        "sub", "--bind", "--topic", "kv@", "--layout", "array", "--count", "5",
    ]) else {
        return;
    };
    let ep = peer.line().await["bound"]
        .as_str()
        .expect("bound")
        .to_owned();
    let opts = PublisherOptions {
        endpoint: ep,
        topic: "kv@x@m".into(),
        encoding: Encoding::Array,
        ..Default::default()
    };
    let p = Publisher::start(opts)
        .await
        .expect("connects by vLLM's rule");
    feed_python_sub(&mut peer, &[&p], "kv@x@m", 5).await;
}

/// pyzmq publishing as vLLM does: losses are found, replay (vLLM's ROUTER
/// logic) fills them, garbage and misframed messages are counted and skipped.
#[tokio::test]
async fn vllm_style_publisher_to_rust_subscriber_with_gap_and_replay() {
    let args = [
        "pub",
        "--bind",
        "--topic",
        "kv@p@m",
        "--lose",
        "8",
        "9",
        "--garbage",
        "12",
        "--malformed-after",
        "5",
    ];
    let Some(mut peer) = Peer::spawn(&args) else {
        return;
    };
    let eps = peer.line().await;
    let mut sub = Subscriber::connect(eps["pub"].as_str().expect("pub"), "", Some(DEADLINE))
        .await
        .expect("connect");
    // Probes on their own topic until the subscription is in place.
    let probe = next(&mut sub).await;
    assert_eq!(probe.topic, "probe");
    peer.say("go");
    let mut seq = None;
    while seq != Some(14) {
        let got = next(&mut sub).await;
        if got.topic == "probe" {
            continue;
        }
        assert_eq!(got.topic, "kv@p@m");
        let want = match got.seq {
            0 => Continuity::First,
            10 => Continuity::Gap { missed: 8..10 },
            _ => Continuity::Next,
        };
        assert_eq!(got.continuity, want, "seq {}", got.seq);
        if got.seq == 12 {
            assert!(got.batch.is_err(), "garbage payload decoded");
        } else {
            assert_eq!(got.batch, Ok(python_batch(got.seq)), "seq {}", got.seq);
        }
        if let Continuity::Gap { missed } = got.continuity {
            let ep = eps["replay"].as_str().expect("replay");
            let replayed = sub
                .replay(ep, missed, Instant::now() + DEADLINE)
                .await
                .expect("replay");
            let replayed: Vec<_> = replayed.into_iter().map(|r| (r.seq, r.batch)).collect();
            assert_eq!(
                replayed,
                vec![(8, Ok(python_batch(8))), (9, Ok(python_batch(9)))]
            );
        }
        seq = Some(got.seq);
    }
    let stats = sub.stats();
    assert_eq!(
        stats.malformed.load(Ordering::Relaxed),
        2,
        "short seq and two-frame messages"
    );
    assert_eq!(stats.decode_errors.load(Ordering::Relaxed), 1);
    assert_eq!(
        (
            stats.gaps.load(Ordering::Relaxed),
            stats.missed.load(Ordering::Relaxed)
        ),
        (1, 2)
    );
    assert_eq!(stats.replays.load(Ordering::Relaxed), 1);
}

/// Centralized mode: the Rust subscriber binds, pyzmq's PUB connects.
#[tokio::test]
async fn pyzmq_publisher_connects_to_bound_rust_subscriber() {
    let mut sub = Subscriber::bind("tcp://127.0.0.1:0", "")
        .await
        .expect("bind");
    let Some(mut peer) = Peer::spawn(&["pub", "--connect", sub.endpoint(), "--topic", "kv@c@m"])
    else {
        return;
    };
    peer.line().await;
    // Probes on their own topic until the subscription is in place.
    assert_eq!(next(&mut sub).await.topic, "probe");
    peer.say("go");
    let mut got = next(&mut sub).await;
    while got.topic == "probe" {
        got = next(&mut sub).await;
    }
    assert_eq!(got.topic, "kv@c@m");
    assert_eq!((got.seq, &got.continuity), (0, &Continuity::First));
    assert_eq!(got.batch, Ok(python_batch(0)));
    for seq in 1..4 {
        let got = next(&mut sub).await;
        assert_eq!((got.seq, got.continuity), (seq, Continuity::Next));
        assert_eq!(got.batch, Ok(python_batch(seq)));
    }
}

/// A pyzmq DEALER replays from the Rust publisher's ROUTER, frame for frame
/// as vLLM's ROUTER answers.
#[tokio::test]
async fn pyzmq_dealer_replays_from_rust_publisher() {
    let opts = PublisherOptions {
        endpoint: "tcp://127.0.0.1:0".into(),
        attach: Attach::Bind,
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        topic: "kv@r@m".into(),
        ..Default::default()
    };
    let p = Publisher::start(opts).await.expect("start");
    for n in 0..5 {
        p.publish(batch(n)).await.expect("publish");
    }
    let stats = p.stats().clone();
    wait_until("five batches numbered", || {
        stats.batches.load(Ordering::Relaxed) == 5
    })
    .await;
    let ep = p.replay_endpoint().expect("replay").to_owned();
    let Some(mut peer) = Peer::spawn(&["replay", "--endpoint", &ep, "--start", "2"]) else {
        return;
    };
    for seq in 2..5u64 {
        let v = peer.line().await;
        let frames: Vec<Vec<u8>> = v["frames"]
            .as_array()
            .expect("frames")
            .iter()
            .map(|f| unhex(f.as_str().expect("hex")))
            .collect();
        assert_eq!(frames.len(), 4, "{v}");
        assert_eq!(
            (frames[0].as_slice(), frames[1].as_slice()),
            (&b""[..], &b"kv@r@m"[..])
        );
        assert_eq!(frames[2], seq.to_be_bytes());
        assert_eq!(decode_batch(&frames[3]), Ok(batch(seq)));
        assert_eq!(
            v["batch"],
            batch_json(&batch(seq)),
            "msgspec reads it the same"
        );
    }
    let end = peer.line().await;
    assert_eq!(
        end["frames"],
        serde_json::json!(["", "", "ffffffffffffffff", ""])
    );
}
