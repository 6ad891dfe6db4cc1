//! The bad-input corpus: every file in `tests/corpus/` is one request
//! (`# expect: STATUS`, `# path: PATH`, then the body, byte for byte) that
//! pd-sidecar and pd-router must refuse with that status and an OpenAI-style
//! error, without any engine seeing it. Add a file to add a case.

use std::path::PathBuf;

use bytes::Bytes;
use http::Method;
use tandem_tests::harness::{http, json, EngineSim, Router, Sidecar};

struct Case {
    name: String,
    expect: u16,
    path: String,
    body: Vec<u8>,
}

fn corpus() -> Vec<Case> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut cases: Vec<Case> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let raw = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let (mut expect, mut route, mut at) = (None, None, 0);
            // Header lines "# key: value" at the top; the rest is the body.
            while raw[at..].starts_with(b"# ") {
                let end = raw[at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(raw.len(), |n| at + n);
                let line = String::from_utf8_lossy(&raw[at + 2..end]).into_owned();
                match line.split_once(": ") {
                    Some(("expect", v)) => expect = v.trim().parse().ok(),
                    Some(("path", v)) => route = Some(v.trim().to_string()),
                    _ => panic!("{name}: unknown header line {line:?}"),
                }
                at = (end + 1).min(raw.len());
            }
            Case {
                expect: expect.unwrap_or_else(|| panic!("{name}: no '# expect:' line")),
                path: route.unwrap_or_else(|| panic!("{name}: no '# path:' line")),
                body: raw[at..].to_vec(),
                name,
            }
        })
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(
        cases.len() >= 10,
        "the corpus is missing: {}",
        dir.display()
    );
    cases
}

#[tokio::test]
async fn every_corpus_case_is_refused_by_both_binaries_and_reaches_no_engine() {
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let sidecar = Sidecar::start(decode.port(), &["--prefill-threshold-tokens=0"]).await;
    let router = Router::start(&[sidecar.url("")], &[prefill.host_port()], &[]).await;
    let prefiller = prefill.host_port();
    for case in corpus() {
        let targets = [
            // The sidecar as pd-router calls it: a prefiller named.
            (
                "pd-sidecar",
                sidecar.url(&case.path),
                vec![
                    ("content-type", "application/json"),
                    ("x-prefiller-host-port", prefiller.as_str()),
                ],
            ),
            (
                "pd-router",
                router.url(&case.path),
                vec![("content-type", "application/json")],
            ),
        ];
        for (binary, url, headers) in targets {
            let (status, resp_headers, resp) =
                http(Method::POST, &url, &headers, Bytes::from(case.body.clone())).await;
            assert_eq!(
                status.as_u16(),
                case.expect,
                "{}: {binary}: {}",
                case.name,
                String::from_utf8_lossy(&resp)
            );
            assert!(
                json(&resp)["error"]["message"].is_string(),
                "{}: {binary}: not an OpenAI error: {}",
                case.name,
                String::from_utf8_lossy(&resp)
            );
            assert!(
                resp_headers.contains_key("x-pd-error-code"),
                "{}: {binary}: no x-pd-error-code",
                case.name
            );
        }
    }
    assert!(
        prefill.inference_requests().await.is_empty(),
        "a refused request reached the prefill engine"
    );
    assert!(
        decode.inference_requests().await.is_empty(),
        "a refused request reached the decode engine"
    );
}
