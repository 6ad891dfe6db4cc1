//! Tests of `router::config`.

use super::*;

const FULL: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters: {blockSize: 32, maxPrefixBlocksToMatch: 128, lruCapacityPerServer: 1000}
- type: load-aware-scorer
- type: max-score-picker
- type: random-picker
- type: decode-filter
- type: prefill-filter
- type: prefill-header-handler
- type: pd-profile-handler
  parameters: {threshold: 512}
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 512}
- type: load-aware-scorer
  name: load-by-threshold
  parameters: {threshold: 64}
schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: load-aware-scorer
    weight: 1.5
  - pluginRef: max-score-picker
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: load-by-threshold
  - pluginRef: random-picker
"#;

fn parse(args: &[&str]) -> Result<RouterConfig, String> {
    RouterConfig::parse_from(std::iter::once("pd-router").chain(args.iter().copied()))
}

fn err(yaml: &str) -> String {
    parse_scheduling(yaml).unwrap_err()
}

#[test]
fn default_scheduling_is_prefix_and_load_with_threshold_256() {
    let cfg = parse(&["--decode", "http://127.0.0.1:8000"]).unwrap();
    let s = &cfg.scheduling;
    assert_eq!(s.threshold, 256);
    assert_eq!(s.prefix, PrefixParams::default());
    assert_eq!(s.prefix.block_size, 16);
    for p in [&s.decode, s.prefill.as_ref().unwrap()] {
        assert_eq!(p.picker, PickerSpec::MaxScore);
        assert_eq!(p.scorers.len(), 2);
        assert_eq!(p.scorers[0].scorer, ScorerSpec::PrefixCache);
        assert_eq!(p.scorers[0].weight, 2.0);
        assert_eq!(
            p.scorers[1].scorer,
            ScorerSpec::LoadAware { threshold: None }
        );
        assert_eq!(p.scorers[1].weight, 1.0);
    }
    assert_eq!((cfg.port, cfg.metrics_port), (8080, 9090));
}

#[test]
fn dns_names_are_endpoints_too() {
    let cfg = parse(&[
        "--decode-dns",
        "https://decode.ns.svc.cluster.local:8000",
        "--prefill-dns",
        "prefill.ns.svc:8000",
        "--dns-refresh-interval",
        "2s",
    ])
    .expect("names alone are enough");
    assert_eq!(
        cfg.decode_dns,
        [DnsName {
            scheme: "https",
            host: "decode.ns.svc.cluster.local".into(),
            port: 8000
        }]
    );
    assert_eq!(cfg.prefill_dns[0].host, "prefill.ns.svc");
    assert_eq!(cfg.dns_refresh_interval, Duration::from_secs(2));
    let ip = "10.0.0.9".parse().unwrap();
    assert_eq!(
        cfg.decode_dns[0].decode_at(ip).label(),
        "https://10.0.0.9:8000"
    );
    assert_eq!(cfg.prefill_dns[0].prefill_at(ip).label(), "10.0.0.9:8000");
    let v6 = "fd00::1".parse().unwrap();
    assert_eq!(cfg.prefill_dns[0].prefill_at(v6).label(), "[fd00::1]:8000");

    for (args, names) in [
        (&["--decode-dns", "decode"][..], "--decode-dns"),
        (&["--decode-dns", "ftp://decode:1"][..], "--decode-dns"),
        (&["--decode-dns", "http://decode:1/v1"][..], "--decode-dns"),
        (
            &["--decode", "d:1", "--prefill-dns", "p"][..],
            "--prefill-dns",
        ),
        (
            &["--decode-dns", "d:1", "--dns-refresh-interval", "0"][..],
            "--dns-refresh-interval",
        ),
        (&["--prefill-dns", "p:1"][..], "--decode-dns"),
    ] {
        let e = parse(args).unwrap_err();
        assert!(e.contains(names), "{args:?}: {e}");
    }
}

#[test]
fn full_example_parses() {
    let s = parse_scheduling(FULL).unwrap();
    assert_eq!(
        s.prefix,
        PrefixParams {
            block_size: 32,
            max_blocks: 128,
            lru_capacity: 1000
        }
    );
    assert_eq!(s.threshold, 512);
    assert_eq!(s.decode.scorers.len(), 2);
    assert_eq!(s.decode.scorers[1].weight, 1.5);
    let prefill = s.prefill.unwrap();
    assert_eq!(prefill.picker, PickerSpec::Random);
    assert_eq!(
        prefill.scorers,
        vec![WeightedScorer {
            name: "load-by-threshold".into(),
            scorer: ScorerSpec::LoadAware {
                threshold: Some(64)
            },
            weight: 1.0
        }]
    );
}

#[test]
fn decider_defaults_and_zero() {
    let base = "plugins:\n- type: max-score-picker\n";
    let profile =
        "schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: max-score-picker\n";
    // No decider: single profile, never P/D.
    assert_eq!(
        parse_scheduling(&format!("{base}{profile}"))
            .unwrap()
            .threshold,
        0
    );
    let s = parse_scheduling(&format!("{base}- type: pd-profile-handler\n{profile}")).unwrap();
    assert_eq!(s.threshold, DEFAULT_THRESHOLD);
    let s = parse_scheduling(&format!(
        "{base}- type: prefix-based-pd-decider\n  parameters: {{nonCachedTokens: 0}}\n{profile}"
    ))
    .unwrap();
    assert_eq!(s.threshold, 0);
    assert!(s.prefill.is_none());
}

#[test]
fn threshold_flag_overrides_the_config() {
    let dir = std::env::temp_dir().join(format!("pd-router-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("full.yaml");
    std::fs::write(&path, FULL).unwrap();
    let p = path.to_str().unwrap();
    let cfg = parse(&["--decode=a:1", "--config", p]).unwrap();
    assert_eq!(cfg.scheduling.threshold, 512);
    let cfg = parse(&["--decode=a:1", "--config", p, "--threshold-tokens=7"]).unwrap();
    assert_eq!(cfg.scheduling.threshold, 7);
    let missing = parse(&["--decode=a:1", "--config", "/nonexistent/x.yaml"]).unwrap_err();
    assert!(
        missing.contains("--config=/nonexistent/x.yaml"),
        "{missing}"
    );
}

#[test]
fn tokenizer_flag_loads_or_names_the_file() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/wordlevel-tokenizer.json"
    );
    let cfg = parse(&["--decode=a:1", &format!("--tokenizer={fixture}")]).unwrap();
    assert!(cfg.tokenizer.is_some());
    assert!(parse(&["--decode=a:1"]).unwrap().tokenizer.is_none());
    let e = parse(&["--decode=a:1", "--tokenizer=/nonexistent/tokenizer.json"]).unwrap_err();
    assert!(e.contains("--tokenizer=/nonexistent/tokenizer.json"), "{e}");
}

#[test]
fn chat_template_is_found_beside_the_tokenizer_or_named_by_flag() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chat-template");
    let tokenizer = format!("--tokenizer={}", dir.join("tokenizer.json").display());
    let template = |cfg: &RouterConfig| {
        let t = cfg.tokenizer.as_ref().unwrap();
        t.inner.template.as_ref().map(|t| t.source.clone())
    };
    let cfg = parse(&["--decode=a:1", &tokenizer]).unwrap();
    assert_eq!(template(&cfg), Some(dir.join("tokenizer_config.json")));
    let chatml = dir.join("chatml/tokenizer_config.json");
    let flag = format!("--chat-template-config={}", chatml.display());
    let cfg = parse(&["--decode=a:1", &tokenizer, &flag]).unwrap();
    assert_eq!(template(&cfg), Some(chatml));
    assert!(format!("{cfg:?}").contains("chatml/tokenizer_config.json"));
    // The wordlevel fixture has no config beside it: no template, no error.
    let plain = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/wordlevel-tokenizer.json"
    );
    let cfg = parse(&["--decode=a:1", &format!("--tokenizer={plain}")]).unwrap();
    assert_eq!(template(&cfg), None);
    let e = parse(&["--decode=a:1", &flag]).unwrap_err();
    assert!(
        e.contains("--chat-template-config needs --tokenizer"),
        "{e}"
    );
    let e = parse(&[
        "--decode=a:1",
        &tokenizer,
        "--chat-template-config=/no/such.json",
    ])
    .unwrap_err();
    assert!(e.contains("--chat-template-config=/no/such.json"), "{e}");
    // A template that does not compile stops the start, naming where it came from.
    let tmp = write(
        "tokenizer.json",
        &std::fs::read_to_string(dir.join("tokenizer.json")).unwrap(),
    );
    let bad = tmp.with_file_name("tokenizer_config.json");
    std::fs::write(&bad, r#"{"chat_template": "{% if messages %}unclosed"}"#).unwrap();
    let e = parse(&["--decode=a:1", &format!("--tokenizer={}", tmp.display())]).unwrap_err();
    assert!(
        e.contains("--tokenizer=") && e.contains("chat_template"),
        "{e}"
    );
    assert!(e.contains("--chat-template-config"), "{e}");
    std::fs::remove_file(&bad).unwrap();
    let e = parse(&[
        "--decode=a:1",
        &tokenizer,
        &format!(
            "--chat-template-config={}",
            dir.join("cases.json").display()
        ),
    ])
    .unwrap_err();
    assert!(e.contains("no chat_template"), "{e}");
}

#[test]
fn unknown_plugin_type_is_named() {
    let e = err("plugins:\n- type: no-hit-lru-scorer\nschedulingProfiles: []\n");
    assert!(e.contains("unknown type \"no-hit-lru-scorer\""), "{e}");
    assert!(e.contains("prefix-cache-scorer, load-aware-scorer"), "{e}");
}

#[test]
fn unknown_parameter_is_named() {
    let e = err(
        "plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSize: 16, hashBlockSize: 64}\n",
    );
    assert!(e.contains("unknown parameter \"hashBlockSize\""), "{e}");
    assert!(e.contains("blockSize, maxPrefixBlocksToMatch"), "{e}");
    let e = err("plugins:\n- type: decode-filter\n  parameters: {x: 1}\n");
    assert!(
        e.contains("unknown parameter \"x\"") && e.contains("no parameters"),
        "{e}"
    );
    let e = err("plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSize: 0}\n");
    assert!(e.contains("\"blockSize\" must be an integer >= 1"), "{e}");
    let e = err("plugins:\n- type: pd-profile-handler\n  parameters: {threshold: -5}\n");
    assert!(e.contains("\"threshold\""), "{e}");
}

#[test]
fn unknown_top_level_and_profile_keys_are_named() {
    let e = err("plugins: []\nschedulingProfile: []\n");
    assert!(e.contains("schedulingProfile"), "{e}");
    let e =
        err("schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: x\n    wieght: 2\n");
    assert!(e.contains("wieght"), "{e}");
    let e = err("kind: Deployment\n");
    assert!(e.contains("EndpointPickerConfig"), "{e}");
}

#[test]
fn metric_scorers_parse_and_take_no_parameters() {
    let s = parse_scheduling(
            "plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n\
             - type: kv-cache-scorer\n  name: kv-old\nschedulingProfiles:\n- name: decode\n  plugins:\n\
             \x20 - pluginRef: queue-scorer\n    weight: 3\n  - pluginRef: kv-cache-utilization-scorer\n\
             \x20 - pluginRef: kv-old\n",
        )
        .unwrap();
    let kinds: Vec<_> = s
        .decode
        .scorers
        .iter()
        .map(|w| (w.scorer, w.weight))
        .collect();
    assert_eq!(
        kinds,
        [
            (ScorerSpec::Queue, 3.0),
            (ScorerSpec::KvCacheUtilization, 1.0),
            (ScorerSpec::KvCacheUtilization, 1.0)
        ]
    );
    for t in [
        "queue-scorer",
        "kv-cache-utilization-scorer",
        "kv-cache-scorer",
    ] {
        let e = err(&format!("plugins:\n- type: {t}\n  parameters: {{x: 1}}\n"));
        assert!(
            e.contains(&format!("\"{t}\"")) && e.contains("unknown parameter \"x\""),
            "{e}"
        );
    }
}

#[test]
fn probe_and_breaker_flags_default_like_llm_d_and_validate() {
    let cfg = parse(&["--decode=a:1"]).unwrap();
    assert_eq!(
        cfg.probes,
        ProbeConfig {
            refresh_metrics_interval: Duration::from_millis(50),
            metrics_staleness: Duration::from_secs(2),
            health_check_interval: Duration::from_secs(2),
            health_check_timeout: Duration::from_secs(1),
        }
    );
    assert_eq!(
        cfg.breaker,
        BreakerConfig {
            threshold: 3,
            open_for: Duration::from_secs(5)
        }
    );
    assert_eq!(cfg.decode_health_path, "/health");
    let cfg = parse(&[
        "--decode=a:1",
        "--refresh-metrics-interval=0",
        "--metrics-staleness-threshold=1m30s",
        "--health-check-interval=100ms",
        "--unhealthy-threshold=2",
        "--circuit-open-duration=300ms",
        "--decode-health-path=/ready",
    ])
    .unwrap();
    assert_eq!(cfg.probes.refresh_metrics_interval, Duration::ZERO);
    assert_eq!(cfg.probes.metrics_staleness, Duration::from_secs(90));
    assert_eq!(cfg.probes.health_check_interval, Duration::from_millis(100));
    assert_eq!(cfg.breaker.threshold, 2);
    assert_eq!(cfg.breaker.open_for, Duration::from_millis(300));
    assert_eq!(cfg.decode_health_path, "/ready");
    for (flag, expected) in [
        ("--unhealthy-threshold=0", "--unhealthy-threshold"),
        (
            "--metrics-staleness-threshold=0s",
            "--metrics-staleness-threshold",
        ),
        ("--health-check-timeout=0", "--health-check-timeout"),
        ("--decode-health-path=ready", "--decode-health-path"),
        (
            "--circuit-open-duration=5parsecs",
            "--circuit-open-duration",
        ),
    ] {
        let e = parse(&["--decode=a:1", flag]).unwrap_err();
        assert!(e.contains(expected), "{flag}: {e}");
    }
}

#[test]
fn check_config_parses_and_still_validates() {
    assert!(!parse(&["--decode=a:1"]).unwrap().check_config);
    let path = write("check.yaml", FULL);
    let cfg = parse(&[
        "--check-config",
        "--decode=http://a:8000",
        "--prefill=b:8000",
        &format!("--config={}", path.display()),
    ])
    .unwrap();
    assert!(cfg.check_config);
    assert_eq!(cfg.scheduling.threshold, 512);
    // A check that passes what a real start refuses would be worthless.
    let e = parse(&["--check-config", "--decode=a:1", "--no-such-flag"]).unwrap_err();
    assert!(e.contains("--no-such-flag"), "{e}");
    let e = parse(&["--check-config"]).unwrap_err();
    assert!(e.contains("decode endpoint"), "{e}");
    let e = parse(&["--check-config", "--decode=a:1", "--config=/no/such/file"]).unwrap_err();
    assert!(e.contains("--config"), "{e}");
}

/// Each llm-d config fixture passes `--check-config` with P/D endpoints, and what it
/// asks for without effect is in the printed configuration.
#[test]
fn llm_d_config_fixtures_pass_check_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llm-d-configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let config = format!("--config={}", path.display());
        let cfg = parse(&["--check-config", "--decode=a:1", "--prefill=b:1", &config])
            .unwrap_or_else(|e| panic!("{e}"));
        let printed = format!("{cfg:#?}");
        let s = &cfg.scheduling;
        assert_eq!(
            printed.contains("accepted, no effect"),
            !s.unapplied.is_empty()
        );
        seen += 1;
    }
    assert!(seen >= 4, "fixtures in {}", dir.display());
}

fn write(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pd-router-cfg3-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn endpoints_file_merges_with_flags() {
    let path = write(
            "endpoints.yaml",
            "decode:\n- url: http://d-0:8000\n  metricsUrl: http://d-0:8200/metrics\n- https://d-1:8000\n\
             prefill:\n- hostPort: p-0:8000\n  metricsUrl: https://p-0:9000/m\n  kvEventsUrl: tcp://p-0:5557\n- p-1:8000\n",
        );
    let p = path.to_str().unwrap();
    let cfg = parse(&["--decode=d-9:1", "--endpoints", p]).unwrap();
    let labels: Vec<_> = cfg.decode.iter().map(DecodeTarget::label).collect();
    assert_eq!(
        labels,
        ["http://d-9:1", "http://d-0:8000", "https://d-1:8000"]
    );
    assert_eq!(cfg.decode[1].metrics_uri(), "http://d-0:8200/metrics");
    assert_eq!(cfg.decode[2].metrics_uri(), "https://d-1:8000/metrics");
    let hp: Vec<_> = cfg.prefill.iter().map(PrefillTarget::label).collect();
    assert_eq!(hp, ["p-0:8000", "p-1:8000"]);
    assert_eq!(cfg.prefill[0].metrics_uri(), "https://p-0:9000/m");
    assert_eq!(
        cfg.prefill[0].kv_events_url.as_deref(),
        Some("tcp://p-0:5557")
    );
    assert_eq!(cfg.prefill[1].kv_events_url, None);
    // The file alone is enough.
    assert_eq!(parse(&["--endpoints", p]).unwrap().decode.len(), 2);
    // A duplicate across flag and file.
    let e = parse(&["--decode=http://D-0:8000", "--endpoints", p]).unwrap_err();
    assert!(
        e.contains("decode endpoint d-0:8000 is listed twice"),
        "{e}"
    );
    let e = parse(&["--decode=a:1", "--prefill=p-1:8000", "--endpoints", p]).unwrap_err();
    assert!(
        e.contains("prefill endpoint p-1:8000 is listed twice"),
        "{e}"
    );
}

#[test]
fn endpoints_file_errors_name_the_key() {
    let cases = [
        (
            "decoders: []\n",
            "unknown key \"decoders\" (supported: decode, prefill)",
        ),
        (
            "decode:\n- url: http://d:1\n  metricURL: x\n",
            "decode[0]: unknown key \"metricURL\" (supported: url, metricsUrl, kvEventsUrl)",
        ),
        (
            "decode: [a:1]\nprefill:\n- {url: p:1}\n",
            "prefill[0]: unknown key \"url\" (supported: hostPort, metricsUrl, kvEventsUrl)",
        ),
        (
            "decode:\n- {url: a:1, kvEventsUrl: \"tcp://*:5557\"}\n",
            "decode[0].kvEventsUrl: \"tcp://*:5557\": expected tcp://host:port",
        ),
        (
            "decode:\n- metricsUrl: http://x:1/m\n",
            "decode[0]: \"url\" is required",
        ),
        ("decode:\n- url: http://d:1/v1\n", "decode[0].url"),
        ("decode: [a:1]\nprefill: [nohost]\n", "prefill[0].hostPort"),
        (
            "decode:\n- {url: a:1, metricsUrl: /metrics}\n",
            "decode[0].metricsUrl",
        ),
        ("decode: a:1\n", "decode: expected a list"),
        ("- a:1\n", "expected a mapping"),
        (
            "decode: [[1]]\n",
            "decode[0]: expected a string or a mapping",
        ),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let path = write(&format!("bad-{i}.yaml"), yaml);
        let p = path.to_str().unwrap();
        let e = parse(&["--decode=z:9", "--endpoints", p]).unwrap_err();
        assert!(e.contains(&format!("--endpoints={p}")), "{e}");
        assert!(
            e.contains(expected),
            "{yaml:?}: expected {expected:?} in {e}"
        );
    }
    let e = parse(&["--endpoints", "/nonexistent/e.yaml"]).unwrap_err();
    assert!(e.contains("--endpoints=/nonexistent/e.yaml"), "{e}");
    let empty = write("empty.yaml", "");
    let e = parse(&["--endpoints", empty.to_str().unwrap()]).unwrap_err();
    assert!(e.contains("at least one decode endpoint"), "{e}");
}

#[test]
fn profile_errors() {
    let plugins = "plugins:\n- type: prefix-cache-scorer\n- type: max-score-picker\n- type: random-picker\n- type: pd-profile-handler\n";
    let e = err(&format!(
        "{plugins}schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: nope\n"
    ));
    assert!(
        e.contains("unknown pluginRef \"nope\"") && e.contains("prefix-cache-scorer"),
        "{e}"
    );
    let e = err(&format!(
        "{plugins}schedulingProfiles:\n- name: prefill\n  plugins: []\n"
    ));
    assert!(e.contains("\"decode\" is required"), "{e}");
    let e = err(&format!("{plugins}schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: prefix-cache-scorer\n    weight: -1\n"));
    assert!(e.contains("weight must be a number >= 0"), "{e}");
    let e = err(&format!("{plugins}schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: max-score-picker\n  - pluginRef: random-picker\n"));
    assert!(e.contains("two pickers"), "{e}");
    let e = err(&format!("{plugins}schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: pd-profile-handler\n"));
    assert!(e.contains("list it under plugins only"), "{e}");
    let e = err(&format!(
        "{plugins}schedulingProfiles:\n- name: decode\n- name: default\n  plugins: []\n"
    ));
    assert!(e.contains("unknown profile \"default\""), "{e}");
    // Alone, a profile of any name is the decode profile.
    let s = parse_scheduling(&format!("{plugins}schedulingProfiles:\n- name: default\n"));
    assert_eq!(s.unwrap().decode.name, "default");
    let e = err("plugins:\n- type: max-score-picker\n- type: max-score-picker\n");
    assert!(e.contains("defined twice"), "{e}");
    let e = err("plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 2}\n");
    assert!(e.contains("maxNumOfEndpoints=2"), "{e}");
}

#[test]
fn disagreeing_deciders_are_an_error() {
    let e = err("plugins:\n- type: pd-profile-handler\n  parameters: {threshold: 100}\n- type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 200}\n");
    assert!(e.contains("disagrees"), "{e}");
}

#[test]
fn endpoints_parse_and_validate() {
    assert_eq!(
        parse_decode("10.0.0.1:8000").unwrap(),
        DecodeTarget {
            scheme: "http",
            authority: "10.0.0.1:8000".into(),
            metrics_url: None,
            kv_events_url: None,
        }
    );
    assert_eq!(
        parse_decode("https://d-0:8000/").unwrap().label(),
        "https://d-0:8000"
    );
    assert!(parse_decode("http://d-0:8000/v1").is_err());
    assert!(parse_decode("grpc://d:1").is_err());
    assert!(parse_decode("nohost").is_err());
    assert_eq!(
        parse_prefill("http://10.0.0.2:8000").unwrap().host_port,
        "10.0.0.2:8000"
    );
    assert!(parse_prefill("p-0").is_err());
    let cfg = parse(&[
        "--decode",
        "a:1",
        "--decode=http://b:2",
        "--prefill=p:1,q:2",
    ])
    .unwrap();
    assert_eq!(cfg.decode.len(), 2);
    let hp: Vec<_> = cfg.prefill.iter().map(PrefillTarget::label).collect();
    assert_eq!(hp, ["p:1", "q:2"]);
    assert_eq!(cfg.decode[1].metrics_uri(), "http://b:2/metrics");
    assert_eq!(cfg.prefill[0].metrics_uri(), "http://p:1/metrics");
    let e = parse(&[]).unwrap_err();
    assert!(e.contains("--decode"), "{e}");
    let e = parse(&["--decode=a:1", "--decode=http://a:1"]).unwrap_err();
    assert!(e.contains("listed twice"), "{e}");
    let e = parse(&["--decode=a:1", "--no-such-flag"]).unwrap_err();
    assert!(e.contains("--no-such-flag"), "{e}");
}

#[test]
fn prefill_endpoints_need_a_prefill_profile() {
    let dir = std::env::temp_dir().join(format!("pd-router-cfg2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("decode-only.yaml");
    std::fs::write(
        &path,
        "plugins:\n- type: pd-profile-handler\nschedulingProfiles:\n- name: decode\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let e = parse(&["--decode=a:1", "--prefill=p:1", "--config", p]).unwrap_err();
    assert!(e.contains("no \"prefill\" scheduling profile"), "{e}");
    // Threshold 0: P/D is off, so no prefill profile is needed.
    assert!(parse(&[
        "--decode=a:1",
        "--prefill=p:1",
        "--config",
        p,
        "--threshold-tokens=0"
    ])
    .is_ok());
}
