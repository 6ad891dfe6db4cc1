//! Publisher and Subscriber over loopback TCP, and vLLM's config rules.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{timeout, Instant};
use zeromq::{PubSocket, RouterSocket, Socket, SocketSend, ZmqMessage};

use crate::kv_events::config::socket_endpoint;
use crate::kv_events::{
    encode_batch, is_bind_endpoint, offset_endpoint_port, replay, Attach, BlockStored, Continuity,
    Encoding, EventBatch, ExternalBlockHash, KvEvent, KvEventsConfig, Publisher, PublisherKind,
    PublisherOptions, Received, ReplayError, Subscriber,
};

/// Generous: these are deadlines for polling, not expected durations.
const DEADLINE: Duration = Duration::from_secs(20);

pub(super) fn batch(n: u64) -> EventBatch {
    EventBatch {
        ts: n as f64,
        events: vec![KvEvent::BlockStored(BlockStored {
            block_hashes: vec![ExternalBlockHash::Int(n)],
            token_ids: vec![n as u32; 4],
            block_size: 4,
            medium: Some("GPU".into()),
            ..Default::default()
        })],
        data_parallel_rank: Some(0),
    }
}

pub(super) async fn next(sub: &mut Subscriber) -> Received {
    timeout(DEADLINE, sub.recv())
        .await
        .expect("a message before the deadline")
}

/// Polls `cond` until it holds or the deadline passes.
pub(super) async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn options(topic: &str, replay: bool, buffer_steps: usize) -> PublisherOptions {
    PublisherOptions {
        endpoint: "tcp://127.0.0.1:0".into(),
        attach: Attach::Bind,
        replay_endpoint: replay.then(|| "tcp://127.0.0.1:0".into()),
        topic: topic.into(),
        buffer_steps,
        ..Default::default()
    }
}

/// Publishes probes until the subscriber receives one (a new subscription
/// takes a moment to reach the publisher), drains the rest, and returns the
/// next sequence number the publisher will use.
async fn sync(publisher: &Publisher, sub: &mut Subscriber) -> u64 {
    let end = Instant::now() + DEADLINE;
    loop {
        assert!(
            Instant::now() < end,
            "subscription never reached the publisher"
        );
        publisher.publish(batch(u64::MAX)).await.expect("publish");
        if let Ok(got) = timeout(Duration::from_millis(100), sub.recv()).await {
            let sent = publisher.stats().batches.load(Ordering::Relaxed);
            let mut seq = got.seq;
            while seq + 1 < sent {
                seq = next(sub).await.seq;
            }
            return sent;
        }
    }
}

#[tokio::test]
async fn delivers_in_order_and_filters_by_topic_prefix() {
    // Centralized: the subscriber binds, publishers connect with their topics.
    let mut only_a = Subscriber::bind("tcp://127.0.0.1:0", "kv@a")
        .await
        .expect("bind");
    let mut both = Subscriber::bind("tcp://127.0.0.1:0", "kv@")
        .await
        .expect("bind");
    let connect = |topic: &str, ep: &str| PublisherOptions {
        endpoint: ep.into(),
        attach: Attach::Auto, // vLLM's rule: no wildcard, so connect
        topic: topic.into(),
        ..Default::default()
    };
    let a1 = Publisher::start(connect("kv@a@m", only_a.endpoint()))
        .await
        .expect("a");
    let b1 = Publisher::start(connect("kv@b@m", only_a.endpoint()))
        .await
        .expect("b");
    let a2 = Publisher::start(connect("kv@a@m", both.endpoint()))
        .await
        .expect("a");
    let b2 = Publisher::start(connect("kv@b@m", both.endpoint()))
        .await
        .expect("b");
    let start_a = sync(&a1, &mut only_a).await;
    sync(&b2, &mut both).await;
    let start_a2 = sync(&a2, &mut both).await;
    for n in 0..5 {
        b1.publish(batch(100 + n)).await.expect("publish");
        b2.publish(batch(100 + n)).await.expect("publish");
    }
    for n in 0..5 {
        a1.publish(batch(n)).await.expect("publish");
        a2.publish(batch(n)).await.expect("publish");
    }
    for n in 0..5 {
        let got = next(&mut only_a).await;
        assert_eq!(got.topic, "kv@a@m");
        assert_eq!((got.seq, &got.continuity), (start_a + n, &Continuity::Next));
        assert_eq!(got.batch, Ok(batch(n)));
    }
    // The positive control: B's batches do flow to a subscriber that wants them.
    let mut seen_b = 0;
    let mut seen_a = 0;
    while seen_a < 5 || seen_b < 5 {
        let got = next(&mut both).await;
        match got.topic.as_str() {
            "kv@a@m" => {
                assert_eq!(got.seq, start_a2 + seen_a);
                seen_a += 1;
            }
            "kv@b@m" => seen_b += 1,
            other => panic!("unexpected topic {other}"),
        }
    }
    assert_eq!(only_a.stats().gaps.load(Ordering::Relaxed), 0);
    assert_eq!(
        only_a.last_seq("kv@b@m"),
        None,
        "B's messages reached the A-only subscriber"
    );
}

#[tokio::test]
async fn gap_is_detected_and_filled_by_replay() {
    let publisher = Publisher::start(options("kv@e@m", true, 100))
        .await
        .expect("start");
    let mut sub = Subscriber::connect(publisher.endpoint(), "kv@", Some(DEADLINE))
        .await
        .expect("connect");
    let s = sync(&publisher, &mut sub).await;
    publisher.publish(batch(1)).await.expect("publish");
    publisher.publish_dropped(batch(2)).await.expect("publish");
    publisher.publish_dropped(batch(3)).await.expect("publish");
    publisher.publish(batch(4)).await.expect("publish");

    let got = next(&mut sub).await;
    assert_eq!((got.seq, got.continuity), (s, Continuity::Next));
    let got = next(&mut sub).await;
    assert_eq!(got.seq, s + 3);
    assert_eq!(
        got.continuity,
        Continuity::Gap {
            missed: s + 1..s + 3
        }
    );
    assert_eq!(got.batch, Ok(batch(4)));
    assert_eq!(sub.stats().gaps.load(Ordering::Relaxed), 1);
    assert_eq!(sub.stats().missed.load(Ordering::Relaxed), 2);

    let replay_ep = publisher.replay_endpoint().expect("replay endpoint");
    let replayed = sub
        .replay(replay_ep, s + 1..s + 3, Instant::now() + DEADLINE)
        .await
        .expect("replay");
    let replayed: Vec<_> = replayed.into_iter().map(|r| (r.seq, r.batch)).collect();
    assert_eq!(replayed, vec![(s + 1, Ok(batch(2))), (s + 2, Ok(batch(3)))]);
    assert_eq!(sub.stats().replays.load(Ordering::Relaxed), 1);
    assert_eq!(publisher.stats().replays.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn late_joiner_fetches_history_and_short_buffer_is_reported() {
    let publisher = Publisher::start(options("t", true, 3))
        .await
        .expect("start");
    for n in 0..5 {
        publisher.publish(batch(n)).await.expect("publish");
    }
    let stats = publisher.stats().clone();
    wait_until("five batches numbered", || {
        stats.batches.load(Ordering::Relaxed) == 5
    })
    .await;
    let ep = publisher.replay_endpoint().expect("replay").to_owned();
    let deadline = || Instant::now() + DEADLINE;

    // The ring keeps the last three (2, 3, 4).
    let got = replay(&ep, 2..5, deadline()).await.expect("replay");
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 3, 4]);
    assert_eq!(got[0].batch, Ok(batch(2)));
    match replay(&ep, 0..5, deadline()).await {
        Err(ReplayError::Incomplete {
            first_missing: 0,
            replayed,
        }) => assert_eq!(replayed.len(), 3),
        other => panic!("expected an incomplete replay, got {other:?}"),
    }
    assert!(replay(&ep, 3..3, deadline())
        .await
        .expect("empty")
        .is_empty());

    let mut sub = Subscriber::connect(publisher.endpoint(), "", Some(DEADLINE))
        .await
        .expect("connect");
    sync(&publisher, &mut sub).await;
    publisher.publish(batch(9)).await.expect("publish");
    let first = next(&mut sub).await;
    assert_eq!(first.batch, Ok(batch(9)));
}

#[tokio::test]
async fn replay_gives_up_at_its_deadline() {
    // A ROUTER that never answers, and a port nothing listens on.
    let mut silent = RouterSocket::new();
    let ep = silent
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("bind")
        .to_string();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("tcp://{}", l.local_addr().expect("addr"))
    };
    for target in [ep, closed] {
        let started = Instant::now();
        let res = replay(&target, 0..4, started + Duration::from_millis(300)).await;
        assert!(
            matches!(res, Err(ReplayError::Deadline { received: 0 })),
            "{target}: {res:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{target}: overran its deadline"
        );
    }
}

#[tokio::test]
async fn publisher_restart_is_reported() {
    let first = Publisher::start(options("kv@r@m", false, 0))
        .await
        .expect("start");
    let ep = first.endpoint().to_owned();
    let mut sub = Subscriber::connect(&ep, "kv@", Some(DEADLINE))
        .await
        .expect("connect");
    let mut s = sync(&first, &mut sub).await;
    // Far enough ahead that the restarted publisher's first numbers, spent
    // while the subscriber reconnects, stay below it.
    while s < 200 {
        first.publish(batch(s)).await.expect("publish");
        assert_eq!(next(&mut sub).await.seq, s);
        s += 1;
    }
    first.shutdown().await;

    // Same address, sequence from 0 again: the subscriber reconnects by itself.
    let second = Publisher::start(PublisherOptions {
        endpoint: ep,
        ..options("kv@r@m", false, 0)
    })
    .await
    .expect("restart on the same port");
    let end = Instant::now() + DEADLINE;
    let got = loop {
        assert!(Instant::now() < end, "no message after the restart");
        second.publish(batch(7)).await.expect("publish");
        if let Ok(got) = timeout(Duration::from_millis(100), sub.recv()).await {
            break got;
        }
    };
    assert_eq!(got.continuity, Continuity::Restart { previous: s - 1 });
    assert_eq!(sub.stats().restarts.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn malformed_messages_are_counted_and_skipped() {
    let mut raw = PubSocket::new();
    let ep = raw
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("bind")
        .to_string();
    let mut sub = Subscriber::connect(&ep, "kv", Some(DEADLINE))
        .await
        .expect("connect");
    let good = Bytes::from(encode_batch(&batch(1), Encoding::Map));
    let msg = |frames: Vec<&[u8]>| {
        ZmqMessage::try_from(
            frames
                .into_iter()
                .map(Bytes::copy_from_slice)
                .collect::<Vec<_>>(),
        )
        .expect("frames")
    };
    let seq = |n: u64| n.to_be_bytes();
    // Until the subscription is in place, send seq 0 repeatedly.
    let end = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < end, "subscription never arrived");
        raw.send(msg(vec![b"kv", &seq(0), &good]))
            .await
            .expect("send");
        if let Ok(got) = timeout(Duration::from_millis(100), sub.recv()).await {
            assert_eq!(got.seq, 0);
            break;
        }
    }
    let base = sub.stats().malformed.load(Ordering::Relaxed);
    for bad in [
        msg(vec![b"kv", &seq(1)]),                             // two frames
        msg(vec![b"kv"]),                                      // one frame
        msg(vec![b"kv", &seq(1), &good, b"x"]),                // four frames
        msg(vec![b"kv", &[0, 0, 0, 1], &good]),                // short sequence number
        msg(vec![b"kv", &[0, 0, 0, 0, 0, 0, 0, 0, 1], &good]), // long sequence number
    ] {
        raw.send(bad).await.expect("send");
    }
    raw.send(msg(vec![b"kv", &seq(1), b"\xc1garbage"]))
        .await
        .expect("send");
    raw.send(msg(vec![b"kv", &seq(2), &good]))
        .await
        .expect("send");

    let got = next(&mut sub).await;
    assert_eq!((got.seq, &got.continuity), (1, &Continuity::Next));
    assert!(got.batch.is_err(), "garbage decoded: {:?}", got.batch);
    let got = next(&mut sub).await;
    assert_eq!((got.seq, got.batch), (2, Ok(batch(1))));
    let stats = sub.stats();
    assert_eq!(stats.malformed.load(Ordering::Relaxed) - base, 5);
    assert!(stats.decode_errors.load(Ordering::Relaxed) >= 1);
}

#[test]
fn config_reads_vllm_json() {
    let cfg = KvEventsConfig::from_json(
        r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557",
            "replay_endpoint": "tcp://*:5558", "topic": "kv@10.0.0.5:8000@m", "buffer_steps": 50, "hwm": 7}"#,
    )
    .expect("parses");
    assert_eq!(cfg.publisher_kind(), PublisherKind::Zmq);
    assert_eq!(
        (cfg.buffer_steps, cfg.hwm, cfg.max_queue_size),
        (50, 7, 100_000)
    );
    let rank2 = cfg.for_rank(2).expect("rank 2");
    assert_eq!(rank2.endpoint, "tcp://*:5559");
    assert_eq!(rank2.replay_endpoint.as_deref(), Some("tcp://*:5560"));
    let opts = PublisherOptions::from_config(&cfg, 2, Encoding::Array).expect("options");
    assert_eq!(
        (opts.data_parallel_rank, opts.endpoint.as_str()),
        (2, "tcp://*:5559")
    );

    let defaults = KvEventsConfig::from_json("{}").expect("defaults");
    assert_eq!(defaults, KvEventsConfig::default());
    assert_eq!(defaults.endpoint, "tcp://*:5557");
    assert_eq!(defaults.publisher_kind(), PublisherKind::Null);
    let enabled =
        KvEventsConfig::from_json(r#"{"enable_kv_cache_events": true}"#).expect("enabled");
    assert_eq!(enabled.publisher_kind(), PublisherKind::Zmq);
    assert!(KvEventsConfig::from_json(r#"{"publisher": "kafka"}"#).is_err());
    assert!(KvEventsConfig::from_json(r#"{"endpont": "tcp://*:1"}"#).is_err());
}

#[test]
fn endpoint_rules_follow_vllm() {
    assert!(is_bind_endpoint("tcp://*:5557"));
    assert!(is_bind_endpoint("tcp://[::]:5557"));
    assert!(is_bind_endpoint("ipc:///tmp/kv"));
    assert!(!is_bind_endpoint("tcp://10.0.0.5:5557"));
    assert!(!is_bind_endpoint("tcp://0.0.0.0:5557"));
    assert_eq!(
        offset_endpoint_port("tcp://*:5557", 0).expect("rank 0"),
        "tcp://*:5557"
    );
    assert_eq!(
        offset_endpoint_port("tcp://host:5557", 3).expect("tcp"),
        "tcp://host:5560"
    );
    assert_eq!(
        offset_endpoint_port("tcp://*:0", 3).expect("port 0"),
        "tcp://*:0"
    );
    assert_eq!(
        offset_endpoint_port("inproc://cache", 1).expect("inproc"),
        "inproc://cache_dp1"
    );
    assert!(offset_endpoint_port("ipc:///tmp/kv", 1).is_err());
    assert!(offset_endpoint_port("tcp://host:65535", 1).is_err());
    assert_eq!(
        socket_endpoint("tcp://*:5557").expect("wildcard"),
        "tcp://0.0.0.0:5557"
    );
    assert!(socket_endpoint("inproc://x").is_err());
}

/// A connecting publisher (vLLM's centralized mode) finds a restarted
/// collector on the same address again.
#[tokio::test]
async fn connecting_publisher_reconnects_after_subscriber_restart() {
    let mut sub = Subscriber::bind("tcp://127.0.0.1:0", "")
        .await
        .expect("bind");
    let ep = sub.endpoint().to_owned();
    let opts = PublisherOptions {
        endpoint: ep.clone(),
        topic: "kv@c@m".into(),
        ..Default::default()
    };
    let publisher = Publisher::start(opts).await.expect("start");
    sync(&publisher, &mut sub).await;
    sub.close().await;

    let end = Instant::now() + DEADLINE;
    let mut sub = loop {
        match Subscriber::bind(&ep, "").await {
            Ok(sub) => break sub,
            Err(e) => assert!(Instant::now() < end, "could not bind {ep} again: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let end = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < end, "the publisher never reconnected");
        publisher.publish(batch(5)).await.expect("publish");
        if let Ok(got) = timeout(Duration::from_millis(100), sub.recv()).await {
            assert_eq!(
                (got.continuity, got.batch),
                (Continuity::First, Ok(batch(5)))
            );
            break;
        }
    }
}
