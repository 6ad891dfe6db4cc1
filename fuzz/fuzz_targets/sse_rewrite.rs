//! pd-sidecar's streamed response path: an engine's SSE bytes, cut into
//! frames at any sizes, through `body::Observed` with the `cached_tokens`
//! rewrite. No input may panic or stall; a stream without a usage object
//! comes out byte for byte as it went in; the rewrite never adds or removes
//! a line (event boundaries are kept).
#![no_main]

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::StreamBody;
use libfuzzer_sys::fuzz_target;
use sidecar::body::Observed;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cached = u64::from(data[0]) * 977;
    let step = usize::from(data[1] % 64) + 1;
    let input = &data[2..];
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = input
        .chunks(step)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut observed = Observed::new(body, Box::new(|| {}), Some(cached));
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::with_capacity(input.len());
    loop {
        match Pin::new(&mut observed).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                out.extend_from_slice(&frame.into_data().expect("only data frames"))
            }
            Poll::Ready(Some(Err(e))) => panic!("an upstream without errors ended in {e}"),
            Poll::Ready(None) => break,
            Poll::Pending => panic!("pending although every frame was ready"),
        }
    }
    if !contains(input, b"\"usage\"") {
        assert_eq!(out, input);
    }
    let lines = |b: &[u8]| b.iter().filter(|&&c| c == b'\n').count();
    assert_eq!(lines(&out), lines(input));
});
