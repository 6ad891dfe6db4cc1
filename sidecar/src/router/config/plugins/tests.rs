//! Tests of `router::config::plugins`.

use super::super::scheduling::{parse_scheduling, Scheduling, WeightedScorer};
use super::super::PerEndpoint;
use super::*;

fn fixture(name: &str) -> Scheduling {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/llm-d-configs")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    parse_scheduling(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn err(yaml: &str) -> String {
    parse_scheduling(yaml).unwrap_err()
}

fn scorers(p: &[WeightedScorer]) -> Vec<(&str, ScorerSpec, f64)> {
    p.iter()
        .map(|w| (w.name.as_str(), w.scorer, w.weight))
        .collect()
}

fn unapplied(s: &Scheduling) -> Vec<String> {
    s.unapplied.iter().map(|u| u.at.clone()).collect()
}

#[test]
fn precise_seed_config_parses_with_its_weights_and_event_socket() {
    let s = fixture("precise-seed.yaml");
    assert_eq!(s.decode.name, "default");
    assert_eq!(
        scorers(&s.decode.scorers),
        [
            ("precise-prefix-cache-scorer", ScorerSpec::PrefixCache, 3.0),
            (
                "kv-cache-utilization-scorer",
                ScorerSpec::KvCacheUtilization,
                2.0
            ),
            ("queue-scorer", ScorerSpec::Queue, 2.0),
        ]
    );
    assert_eq!(s.decode.picker, PickerSpec::MaxScore);
    assert!(s.prefill.is_none());
    assert_eq!(s.threshold, 0, "no decider: single profile, never P/D");
    let p = s.precise.as_ref().expect("a precise index");
    assert_eq!(p.producer, "precise-prefix-cache-scorer");
    assert_eq!(p.scorers, ["precise-prefix-cache-scorer"]);
    assert_eq!(p.block_size, Some(32));
    assert_eq!(p.centralized_endpoint(), Some("tcp://*:5557"));
    assert_eq!(p.per_endpoint(), None, "discoverPods: false");
    assert_eq!(p.topic_filter(), "kv@");
    assert_eq!(p.concurrency, Some(2));
    // The approximate fallback hashes blocks of the engines' size.
    assert_eq!(s.prefix.block_size, 32);
    let notes = unapplied(&s);
    for expected in [
        "plugin \"precise-prefix-cache-scorer\" parameter indexerConfig.tokenizersPoolConfig",
        "plugin \"precise-prefix-cache-scorer\" parameter kvEventsConfig.concurrency",
    ] {
        assert!(
            notes.iter().any(|n| n == expected),
            "{expected} in {notes:?}"
        );
    }
}

#[test]
fn llm_d_router_pd_config_maps_producer_and_decider() {
    let s = fixture("pd-disagg.yaml");
    assert_eq!(
        s.prefix,
        PrefixParams {
            block_size: 32,
            max_blocks: 8192 / 32,
            lru_capacity: 20_000
        }
    );
    assert_eq!(s.threshold, 64);
    let prefill = s.prefill.as_ref().unwrap();
    for p in [&s.decode, prefill] {
        assert_eq!(
            scorers(&p.scorers),
            [
                ("prefix-cache-scorer", ScorerSpec::PrefixCache, 2.0),
                ("queue-scorer", ScorerSpec::Queue, 1.0)
            ]
        );
    }
    assert!(s.precise.is_none());
    assert_eq!(unapplied(&s), Vec::<String>::new(), "all of it applies");
}

#[test]
fn split_precise_pipeline_exposes_per_endpoint_subscriptions() {
    let s = fixture("precise-producer.yaml");
    let p = s.precise.as_ref().unwrap();
    assert_eq!(p.producer, "precise-prefix-cache-producer");
    assert_eq!(p.scorers, ["prefix-cache-scorer"]);
    assert_eq!((p.block_size(), p.hash_seed.as_deref()), (64, Some("1234")));
    assert_eq!(
        p.per_endpoint(),
        Some(PerEndpoint {
            socket_port: 5556,
            replay_socket_port: Some(5559)
        })
    );
    assert_eq!(p.centralized_endpoint(), None);
    assert_eq!((p.index_size, p.pod_cache_size), (Some(500_000), Some(8)));
    let media: Vec<_> = p
        .backends
        .iter()
        .map(|b| (b.name.as_str(), b.weight))
        .collect();
    assert_eq!(media, [("gpu", 1.0), ("cpu", 0.5)]);
    assert_eq!(p.enable_metrics, Some(true));
    assert_eq!(s.prefix.block_size, 64);
    assert_eq!(
        scorers(&s.decode.scorers)
            .iter()
            .map(|s| s.2)
            .collect::<Vec<_>>(),
        [2.0, 1.0, 1.0]
    );
    let notes = unapplied(&s);
    for expected in [
        "plugin \"token-producer\"",
        "plugin \"endpoint-notification-source\"",
        "plugin \"metrics-data-source\"",
        "plugin \"core-metrics-extractor\"",
        "top-level key dataLayer",
    ] {
        assert!(
            notes.iter().any(|n| n == expected),
            "{expected} in {notes:?}"
        );
    }
    assert!(
        !notes.iter().any(|n| n.contains("decode-filter")),
        "{notes:?}"
    );
}

#[test]
fn always_decider_renamed_profiles_and_role_selectors() {
    let s = fixture("pd-always-labels.yaml");
    assert_eq!(s.threshold, 1, "always-disagg: any uncached token");
    assert_eq!(s.decode.name, "serve");
    let prefill = s.prefill.as_ref().unwrap();
    assert_eq!(prefill.name, "warm");
    assert_eq!(prefill.picker, PickerSpec::Random);
    assert_eq!(
        scorers(&s.decode.scorers),
        [
            (
                "active-request-scorer",
                ScorerSpec::LoadAware { threshold: None },
                1.0
            ),
            (
                "kv-cache-utilization-scorer",
                ScorerSpec::KvCacheUtilization,
                0.5
            ),
        ]
    );
    // Only the selector on another label is out of pd-router's reach.
    assert_eq!(
        unapplied(&s),
        ["plugin \"big-gpus\" (type label-selector-filter)"]
    );
}

#[test]
fn unknown_type_is_refused_with_the_supported_names() {
    let e = err("plugins:\n- type: lora-affinity-scorer\n");
    assert!(e.contains("unknown type \"lora-affinity-scorer\""), "{e}");
    for name in [
        "precise-prefix-cache-scorer",
        "precise-prefix-cache-producer",
        "disagg-profile-handler",
        "always-disagg-pd-decider",
        "label-selector-filter",
    ] {
        assert!(e.contains(name), "{name} in {e}");
    }
}

#[test]
fn unknown_nested_parameters_are_named_with_their_path() {
    let precise = "plugins:\n- type: precise-prefix-cache-producer\n  parameters:\n";
    let e = err(&format!(
        "{precise}    kvEventsConfig:\n      podDiscoveryConfig:\n        sockPort: 1\n"
    ));
    assert!(
        e.contains("unknown parameter \"kvEventsConfig.podDiscoveryConfig.sockPort\""),
        "{e}"
    );
    assert!(
        e.contains("supported in kvEventsConfig.podDiscoveryConfig: socketPort"),
        "{e}"
    );
    let e = err(&format!("{precise}    kvEventConfig: {{}}\n"));
    assert!(e.contains("unknown parameter \"kvEventConfig\""), "{e}");
    assert!(
        e.contains("supported: tokenProcessorConfig, indexerConfig"),
        "{e}"
    );
    let e = err(&format!(
            "{precise}    indexerConfig:\n      kvCacheBackendConfigs:\n      - {{name: gpu, wieght: 1}}\n"
        ));
    assert!(
        e.contains("\"indexerConfig.kvCacheBackendConfigs[0].wieght\""),
        "{e}"
    );
    let e = err(&format!("{precise}    kvEventsConfig: 5557\n"));
    assert!(e.contains("\"kvEventsConfig\" must be a mapping"), "{e}");
    for (plugin, key) in [
        ("prefix-based-pd-decider", "nonCachedToken"),
        ("disagg-profile-handler", "decider"),
        ("approx-prefix-cache-producer", "blockSizeToken"),
        ("active-request-scorer", "threshold"),
        ("token-producer", "model"),
        ("always-disagg-pd-decider", "x"),
    ] {
        let e = err(&format!(
            "plugins:\n- type: {plugin}\n  parameters: {{{key}: 1}}\n"
        ));
        assert!(
            e.contains(&format!("\"{plugin}\": unknown parameter \"{key}\"")),
            "{e}"
        );
    }
}

#[test]
fn precise_parameters_are_validated_and_read_in_both_shapes() {
    let precise = |params: &str| {
        parse_scheduling(&format!(
                "plugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n{params}\
                 schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: precise-prefix-cache-scorer\n"
            ))
    };
    // llm-d-kv-cache-manager's older shape: the token processor inside indexerConfig,
    // and an unquoted hash seed.
    let s = precise(
        "    indexerConfig:\n      tokenProcessorConfig: {blockSize: 16, hashSeed: 42}\n      \
             prefixStoreConfig: {cacheSize: 1000, blockSize: 256}\n",
    )
    .unwrap();
    let p = s.precise.unwrap();
    assert_eq!(
        (p.block_size, p.hash_seed.as_deref()),
        (Some(16), Some("42"))
    );
    // Neither mode named: llm-d-router's default, one subscription per endpoint.
    assert_eq!(
        p.per_endpoint(),
        Some(PerEndpoint {
            socket_port: 5557,
            replay_socket_port: None
        })
    );
    let bad = [
        (
            "    tokenProcessorConfig: {blockSizeTokens: 16, blockSize: 64}\n",
            "disagree",
        ),
        (
            "    tokenProcessorConfig: {hashAlgorithm: md5}\n",
            "hashAlgorithm \"md5\"",
        ),
        ("    kvEventsConfig: {engineType: sglang}\n", "vLLM's KV"),
        (
            "    kvEventsConfig: {zmqEndpoint: \"*:5557\"}\n",
            "ZMQ address",
        ),
        (
            "    kvEventsConfig:\n      podDiscoveryConfig: {socketPort: 70000}\n",
            "must be a port",
        ),
        (
            "    kvEventsConfig: {discoverPods: yes-please}\n",
            "true or false",
        ),
        ("    tokenProcessorConfig: {blockSizeTokens: 0}\n", ">= 1"),
    ];
    for (params, expected) in bad {
        let e = precise(params).unwrap_err();
        assert!(e.contains(expected), "{params}: {e}");
    }
}

#[test]
fn references_between_plugins_are_checked() {
    let e = err("plugins:\n- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: nope}\n");
    assert!(
        e.contains("prefixMatchInfoProducerName \"nope\" names no plugin"),
        "{e}"
    );
    let e = err("plugins:\n- type: queue-scorer\n- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: queue-scorer}\n");
    assert!(e.contains("is not an approx-prefix-cache-producer"), "{e}");
    let e = err(
        "plugins:\n- type: disagg-profile-handler\n  parameters:\n    deciders: {prefill: nope}\n",
    );
    assert!(
        e.contains("deciders.prefill \"nope\" names no plugin"),
        "{e}"
    );
    let e = err("plugins:\n- type: queue-scorer\n- type: disagg-profile-handler\n  parameters:\n    deciders: {prefill: queue-scorer}\n");
    assert!(e.contains("is not a P/D decider"), "{e}");
    let e = err("plugins:\n- type: precise-prefix-cache-producer\n- type: precise-prefix-cache-producer\n  name: two\n");
    assert!(e.contains("keeps one precise index"), "{e}");
    let e = err("plugins:\n- type: approx-prefix-cache-producer\nschedulingProfiles:\n- name: d\n  plugins:\n  - pluginRef: approx-prefix-cache-producer\n");
    assert!(e.contains("is a data producer or source"), "{e}");
    let e = err("plugins:\n- type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 64}\n- type: prefix-cache-scorer\n  parameters: {blockSize: 16}\n");
    assert!(
        e.contains("pd-router keeps one prefix index per endpoint"),
        "{e}"
    );
    let e = err("plugins:\n- type: disagg-profile-handler\n  parameters:\n    deciderPluginName: a\n    deciders: {prefill: a}\n");
    assert!(e.contains("use one shape"), "{e}");
    let e = err(
        "plugins:\n- type: disagg-profile-handler\n  parameters: {stageOrder: prefill-first}\n",
    );
    assert!(e.contains("decode-first"), "{e}");
    let e = err("apiVersion: llm-d.ai/v2\n");
    assert!(
        e.contains("llm-d.ai/v1alpha1, inference.networking.x-k8s.io/v1alpha1"),
        "{e}"
    );
}

#[test]
fn handler_without_prefill_decider_means_no_pd_and_legacy_flat_shape_works() {
    let base = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
                    - type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 32, promptTokens: 100}\n";
    let profiles = "schedulingProfiles:\n- name: d\n- name: p\n";
    let s = parse_scheduling(&format!(
            "{base}- type: disagg-profile-handler\n  parameters:\n    profiles: {{decode: d, prefill: p}}\n{profiles}"
        ))
        .unwrap();
    assert_eq!(s.threshold, 0, "llm-d-router: no deciders.prefill, no P/D");
    assert!(unapplied(&s)
        .iter()
        .any(|n| n == "plugin \"prefix-based-pd-decider\""));
    let s = parse_scheduling(&format!(
        "{base}- type: disagg-profile-handler\n  parameters:\n    decodeProfile: d\n    \
             prefillProfile: p\n    prefillDeciderPluginName: prefix-based-pd-decider\n{profiles}"
    ))
    .unwrap();
    assert_eq!((s.threshold, s.min_prompt_tokens), (32, 100));
    assert_eq!(
        (s.decode.name.as_str(), s.prefill.unwrap().name.as_str()),
        ("d", "p")
    );
    // promptTokens above nonCachedTokens is a gate pick.rs does not apply yet.
    assert!(
        s.unapplied.iter().any(|u| u.at.contains("promptTokens")),
        "{:?}",
        s.unapplied
    );
}

#[test]
fn encode_stage_is_accepted_and_noted() {
    let s = parse_scheduling(
            "plugins:\n- type: encode-filter\n- type: prefill-filter\n- type: decode-filter\n\
             - type: always-disagg-multimodal-decider\n- type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 16}\n\
             - type: disagg-profile-handler\n  parameters:\n    deciders: {encode: always-disagg-multimodal-decider, prefill: prefix-based-pd-decider}\n\
             schedulingProfiles:\n- name: encode\n  plugins:\n  - pluginRef: encode-filter\n\
             - name: prefill\n  plugins:\n  - pluginRef: prefill-filter\n- name: decode\n  plugins:\n  - pluginRef: decode-filter\n",
        )
        .unwrap();
    assert_eq!(s.threshold, 16);
    let notes = unapplied(&s);
    for expected in [
        "plugin \"encode-filter\"",
        "plugin \"disagg-profile-handler\" parameter deciders.encode",
        "schedulingProfiles[encode]",
    ] {
        assert!(
            notes.iter().any(|n| n == expected),
            "{expected} in {notes:?}"
        );
    }
}

#[test]
fn legacy_precise_scorer_defers_to_a_producer() {
    let s = parse_scheduling(
            "plugins:\n- type: precise-prefix-cache-producer\n  name: idx\n  parameters:\n    \
             tokenProcessorConfig: {blockSizeTokens: 64}\n- type: precise-prefix-cache-scorer\n  parameters:\n    \
             tokenProcessorConfig: {blockSizeTokens: 16}\n\
             schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: precise-prefix-cache-scorer\n    weight: 5\n",
        )
        .unwrap();
    let p = s.precise.unwrap();
    assert_eq!((p.producer.as_str(), p.block_size), ("idx", Some(64)));
    assert_eq!(p.scorers, ["precise-prefix-cache-scorer"]);
    assert!(s
        .unapplied
        .iter()
        .any(|u| u.at == "plugin \"precise-prefix-cache-scorer\" parameters"));
    let display = s.unapplied[0].to_string();
    assert!(display.contains(": accepted, no effect: "), "{display}");
}
