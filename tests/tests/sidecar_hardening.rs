//! pd-sidecar under hostile or failing conditions, end to end with real
//! processes on loopback: stalled TLS handshakes and request bodies, running
//! out of file descriptors, certificates rotated under `--cert-path`.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tandem_tests::harness::{free_port, poll_until, prom_sample, try_http, EngineSim, Proc};

/// Reads from `s` until EOF or `limit`; returns what arrived, or None if the
/// connection was still open at the limit.
async fn read_until_closed(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|_| got)
}

/// A sidecar process with `env`, serving `--port` (plain or TLS per `args`).
async fn sidecar_proc(args: &[String], env: &[(&str, &str)], port: u16) -> Proc {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = Proc::spawn("pd-sidecar", &args, env);
    poll_until(Duration::from_secs(10), "sidecar listening", || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await;
    proc
}

#[tokio::test]
async fn stalled_tls_handshakes_and_request_bodies_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let dead_engine = free_port();
    // TLS (the default): an idle connection and a half-sent ClientHello.
    let tls_port = free_port();
    let _tls = sidecar_proc(
        &[
            format!("--port={tls_port}"),
            format!("--vllm-port={dead_engine}"),
            "--metrics-port=0".into(),
        ],
        &[("TANDEM_TLS_HANDSHAKE_TIMEOUT_MS", "300")],
        tls_port,
    )
    .await;
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut idle, Duration::from_secs(5))
            .await
            .is_some(),
        "an idle TLS connection was kept open"
    );
    let mut half = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
        .await
        .unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut half, Duration::from_secs(5))
            .await
            .is_some(),
        "a half-sent ClientHello kept the connection open"
    );

    // Plain: headers complete, Content-Length 1000, a few bytes, then nothing.
    let plain_port = free_port();
    let _plain = sidecar_proc(
        &[
            format!("--port={plain_port}"),
            format!("--vllm-port={dead_engine}"),
            "--metrics-port=0".into(),
            "--secure-proxy=false".into(),
        ],
        &[("TANDEM_BODY_IDLE_TIMEOUT_MS", "300")],
        plain_port,
    )
    .await;
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", plain_port))
        .await
        .unwrap();
    slow.write_all(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 1000\r\nx-prefiller-host-port: 127.0.0.1:1\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let got = read_until_closed(&mut slow, Duration::from_secs(5))
        .await
        .expect("a stalled body kept the request open");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"), "{text}");
}

#[tokio::test]
async fn running_out_of_descriptors_backs_off_instead_of_spinning() {
    use std::os::unix::process::CommandExt;
    let port = free_port();
    let metrics_port = free_port();
    let log_path = std::env::temp_dir().join(format!("tandem-emfile-{}.log", uuid::Uuid::new_v4()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = std::process::Command::new(tandem_tests::harness::bin_path("pd-sidecar"));
    cmd.args([
        format!("--port={port}"),
        format!("--vllm-port={}", free_port()),
        format!("--metrics-port={metrics_port}"),
        "--secure-proxy=false".into(),
    ])
    .env("RUST_LOG", "info")
    .stdout(std::process::Stdio::null())
    .stderr(log);
    // SAFETY: setrlimit between fork and exec touches only this child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    poll_until(Duration::from_secs(10), "sidecar listening", || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await;
    // Hold more connections than the sidecar has descriptors for.
    let mut held = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            held.push(s);
        }
    }
    // Long enough for a spinning accept loop to log thousands of lines.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let warnings = text.matches("accept failed").count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} accept warnings in 1.5 s"
    );
    drop(held);
    // With descriptors back, it serves again and has counted the failures.
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let m = poll_until(
        Duration::from_secs(10),
        "metrics after recovery",
        || async {
            try_http(Method::GET, &url, &[], Bytes::new(), Duration::from_secs(2))
                .await
                .ok()
                .map(|(_, _, b)| String::from_utf8_lossy(&b).into_owned())
        },
    )
    .await;
    let errors = prom_sample(&m, "pd_sidecar_accept_errors_total").unwrap_or(0.0);
    assert!(errors >= 1.0, "{m}");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&log_path);
}

#[tokio::test]
async fn upstream_tls_trusts_the_hosts_certificate_authorities() {
    // A cluster CA, as cert-manager or a service mesh issues: sidecar B serves a certificate
    // it signed for 127.0.0.1; sidecar A verifies it through SSL_CERT_FILE, as Go does.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(vec!["tandem test CA".to_string()]).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("tandem-ca-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), leaf_key.serialize_pem()).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();

    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let b_port = free_port();
    let _b = sidecar_proc(
        &[
            format!("--port={b_port}"),
            format!("--vllm-port={}", prefill.port()),
            "--metrics-port=0".into(),
            "--trust-client-kv-transfer-params".into(),
            format!("--cert-path={}", dir.display()),
        ],
        &[],
        b_port,
    )
    .await;
    let a_port = free_port();
    let a_args = |port: u16| {
        vec![
            format!("--port={port}"),
            format!("--vllm-port={}", decode.port()),
            "--metrics-port=0".into(),
            "--secure-proxy=false".into(),
            "--prefill-threshold-tokens=0".into(),
            "--prefill-max-retries=0".into(),
            "--enable-tls=prefiller".into(),
        ]
    };
    let ca = ca_file.display().to_string();
    let _a = sidecar_proc(&a_args(a_port), &[("SSL_CERT_FILE", ca.as_str())], a_port).await;
    let body =
        serde_json::json!({"model": "sim-model", "prompt": "x ".repeat(600), "max_tokens": 2});
    let post = |port: u16| {
        let body = body.clone();
        let target = format!("127.0.0.1:{b_port}");
        async move {
            let (status, _, resp) = tandem_tests::harness::http_post_json(
                &format!("http://127.0.0.1:{port}/v1/completions"),
                &body,
                &[("x-prefiller-host-port", target.as_str())],
            )
            .await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
        }
    };
    post(a_port).await;
    let remote =
        |d: &serde_json::Value| d["body"]["kv_transfer_params"]["do_remote_prefill"] == true;
    let reqs = decode.inference_requests().await;
    assert!(reqs.len() == 1 && remote(&reqs[0]), "{reqs:#?}");

    // Without the CA the certificate is refused and the request is served by local prefill.
    decode.clear_requests().await;
    let c_port = free_port();
    let _c = sidecar_proc(
        &a_args(c_port),
        &[("SSL_CERT_FILE", "/nonexistent")],
        c_port,
    )
    .await;
    post(c_port).await;
    let reqs = decode.inference_requests().await;
    assert!(reqs.len() == 1 && !remote(&reqs[0]), "{reqs:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn tls_clients_may_speak_http2() {
    use http_body_util::BodyExt;
    let decode = EngineSim::start(&[]).await;
    let port = free_port();
    let _sidecar = sidecar_proc(
        &[
            format!("--port={port}"),
            format!("--vllm-port={}", decode.port()),
            "--metrics-port=0".into(),
            "--prefill-threshold-tokens=0".into(),
        ],
        &[],
        port,
    )
    .await;
    let (tls, _) = tls_connect_offering(port, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let body = serde_json::json!({"model": "sim-model", "prompt": "hi", "max_tokens": 2});
    let req = http::Request::post(format!("https://localhost:{port}/v1/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let answer = resp.into_body().collect().await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 2, "{answer}");
}

/// A certificate and key as PEM, and the certificate's DER.
fn cert_pem(name: &str) -> (String, String, Vec<u8>) {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    (
        c.cert.pem(),
        c.key_pair.serialize_pem(),
        c.cert.der().to_vec(),
    )
}

/// Writes a Kubernetes-style Secret volume update: the files in a new
/// timestamped folder, then `..data` swapped to it in one rename.
fn secret_update(dir: &std::path::Path, version: &str, crt: &str, key: &str) {
    let target = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("tls.crt"), crt).unwrap();
    std::fs::write(target.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        let link = dir.join(f);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), &link).unwrap();
        }
    }
}

type TlsConn = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `port` and the certificate the server presented.
async fn tls_connect(port: u16) -> (TlsConn, Vec<u8>) {
    tls_connect_offering(port, &[]).await
}

/// The same, offering the application protocols `alpn` (none: the server's choice).
async fn tls_connect_offering(port: u16, alpn: &[&[u8]]) -> (TlsConn, Vec<u8>) {
    let mut config = sidecar::tls::client_config(true);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (tls, der)
}

async fn health_over(conn: &mut TlsConn) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("an answer on the open connection")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn certificates_under_cert_path_are_reloaded_without_dropping_connections() {
    let dir = std::env::temp_dir().join(format!("tandem-secret-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    // The Secret is not mounted yet at start (KServe): the sidecar still starts.
    let _sidecar = sidecar_proc(
        &[
            format!("--port={port}"),
            format!("--vllm-port={}", free_port()),
            "--metrics-port=0".into(),
            format!("--cert-path={}", dir.display()),
        ],
        &[("TANDEM_CERT_RELOAD_INTERVAL_MS", "100")],
        port,
    )
    .await;
    let (_, self_signed) = tls_connect(port).await;

    let (crt_a, key_a, der_a) = cert_pem("a.test");
    secret_update(&dir, "v1", &crt_a, &key_a);
    poll_until(Duration::from_secs(10), "certificate A served", || async {
        (tls_connect(port).await.1 == der_a).then_some(())
    })
    .await;
    assert_ne!(self_signed, der_a);
    let (mut open, _) = tls_connect(port).await;
    assert!(health_over(&mut open).await.starts_with("HTTP/1.1 200"));

    let (crt_b, key_b, der_b) = cert_pem("b.test");
    secret_update(&dir, "v2", &crt_b, &key_b);
    poll_until(Duration::from_secs(10), "certificate B served", || async {
        (tls_connect(port).await.1 == der_b).then_some(())
    })
    .await;
    // The connection made under A is still served.
    assert!(health_over(&mut open).await.starts_with("HTTP/1.1 200"));
    let _ = std::fs::remove_dir_all(&dir);
}
