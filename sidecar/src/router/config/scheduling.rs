//! The scheduling profiles: llm-d's `EndpointPickerConfig` YAML (plugins, then profiles
//! referencing them) turned into scorers, pickers, the prefix index, the precise index's
//! settings and the P/D threshold.
//!
//! Both of llm-d's shapes are read: `inference.networking.x-k8s.io/v1alpha1` (GIE and the
//! older llm-d-inference-scheduler) and llm-d-router's `llm-d.ai/v1alpha1`, with its
//! producers (`approx-prefix-cache-producer`, `precise-prefix-cache-producer`) referenced by
//! `prefix-cache-scorer`, and `disagg-profile-handler` naming the profiles and the decider.
//! What is accepted but changes nothing here is kept in [`Scheduling::unapplied`]. The plugin
//! catalogue itself is `plugins.rs`.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::plugins::{define_plugin, Decider, Disagg, Plugin};
use super::precise::PreciseConfig;

/// Prefix index parameters (llm-d's `prefix-cache-scorer` parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixParams {
    /// Tokens per hashed block.
    pub block_size: usize,
    /// Leading blocks looked at per request; later blocks are neither hashed nor matched.
    pub max_blocks: usize,
    /// Block hashes remembered per endpoint (LRU).
    pub lru_capacity: usize,
}

impl Default for PrefixParams {
    fn default() -> Self {
        PrefixParams {
            block_size: 16,
            max_blocks: 256,
            lru_capacity: 31_250,
        }
    }
}

/// A scorer of a profile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScorerSpec {
    /// Share of the prompt's leading blocks the endpoint has cached. Also what
    /// `precise-prefix-cache-scorer` and a `prefix-cache-scorer` fed by a
    /// `precise-prefix-cache-producer` are: scored from the router's approximate index until
    /// the KV-event index ([`PreciseConfig`]) is wired to feed them.
    PrefixCache,
    /// Router-side requests in flight; relative to the busiest candidate, or to
    /// `threshold` when given.
    LoadAware { threshold: Option<u64> },
    /// The engine's waiting queue, min-max normalised over the candidates.
    Queue,
    /// 1 - the engine's KV-cache usage.
    KvCacheUtilization,
}

/// How a profile turns scores into one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickerSpec {
    /// Highest weighted score; ties broken at random.
    MaxScore,
    /// Uniformly random, scores ignored.
    Random,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WeightedScorer {
    /// The plugin's name (for logs).
    pub name: String,
    pub scorer: ScorerSpec,
    pub weight: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProfileSpec {
    pub name: String,
    pub scorers: Vec<WeightedScorer>,
    pub picker: PickerSpec,
}

/// Something the config asks for that pd-router accepts but does not do.
#[derive(Clone, PartialEq, Eq)]
pub struct Unapplied {
    /// The plugin (and parameter), profile or top-level key.
    pub at: String,
    pub why: String,
}

impl Unapplied {
    pub fn new(at: impl Into<String>, why: impl Into<String>) -> Unapplied {
        Unapplied {
            at: at.into(),
            why: why.into(),
        }
    }
}

impl std::fmt::Display for Unapplied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: accepted, no effect: {}", self.at, self.why)
    }
}

/// One line each in `--check-config`'s listing.
impl std::fmt::Debug for Unapplied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

/// What the router schedules with: the two profiles, the prefix index and the
/// P/D threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct Scheduling {
    pub prefix: PrefixParams,
    pub decode: ProfileSpec,
    /// Absent when the config has no `prefill` profile (then P/D is impossible).
    pub prefill: Option<ProfileSpec>,
    /// Uncached tokens on the decode pick at which a remote prefill is used; 0 = never.
    pub threshold: u64,
    /// prefix-based-pd-decider's `promptTokens`: P/D only for prompts at least this long
    /// (0 = no such gate). Implied by the threshold when not above it; above it, pick.rs's
    /// decider does not read it yet and it is listed in `unapplied`.
    pub min_prompt_tokens: u64,
    /// The precise (KV-event) index, when the config defines one.
    pub precise: Option<PreciseConfig>,
    /// Accepted but without effect here: logged once at start, listed by `--check-config`.
    pub unapplied: Vec<Unapplied>,
}

/// The built-in default threshold, also the default of the deciders' parameters.
pub const DEFAULT_THRESHOLD: u64 = 256;

pub(crate) fn default_profile(name: &str) -> ProfileSpec {
    ProfileSpec {
        name: name.to_string(),
        scorers: vec![
            WeightedScorer {
                name: "prefix-cache-scorer".into(),
                scorer: ScorerSpec::PrefixCache,
                weight: 2.0,
            },
            WeightedScorer {
                name: "load-aware-scorer".into(),
                scorer: ScorerSpec::LoadAware { threshold: None },
                weight: 1.0,
            },
        ],
        picker: PickerSpec::MaxScore,
    }
}

impl Default for Scheduling {
    /// Both profiles: prefix-cache-scorer (weight 2) + load-aware-scorer (weight 1) +
    /// max-score-picker; threshold 256; block size 16.
    fn default() -> Self {
        Scheduling {
            prefix: PrefixParams::default(),
            decode: default_profile("decode"),
            prefill: Some(default_profile("prefill")),
            threshold: DEFAULT_THRESHOLD,
            min_prompt_tokens: 0,
            precise: None,
            unapplied: Vec::new(),
        }
    }
}

impl Scheduling {
    /// One warning per accepted-but-unapplied item; called once at start.
    pub fn log_unapplied(&self) {
        for u in &self.unapplied {
            tracing::warn!(what = %u.at, "accepted by pd-router but without effect: {}", u.why);
        }
    }
}

/// The apiVersions of EndpointPickerConfig: llm-d-router's, and GIE's (deprecated there).
pub const API_VERSIONS: [&str; 2] = [
    "llm-d.ai/v1alpha1",
    "inference.networking.x-k8s.io/v1alpha1",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawConfig {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    plugins: Vec<RawPlugin>,
    #[serde(default)]
    scheduling_profiles: Vec<RawProfile>,
    // llm-d-router's other sections: accepted, no effect here.
    feature_gates: Option<Value>,
    data_layer: Option<Value>,
    flow_control: Option<Value>,
    request_handler: Option<Value>,
    saturation_detector: Option<Value>,
    parser: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlugin {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    name: Option<String>,
    #[serde(default)]
    pub(crate) parameters: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProfile {
    name: String,
    #[serde(default)]
    plugins: Vec<RawProfileRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawProfileRef {
    plugin_ref: String,
    weight: Option<f64>,
}

/// The defined plugins, in order, by name.
struct Defined {
    plugins: HashMap<String, Plugin>,
    names: Vec<String>,
    labels: HashMap<String, String>,
}

impl Defined {
    fn names_list(&self) -> String {
        if self.names.is_empty() {
            "(none)".to_string()
        } else {
            self.names.join(", ")
        }
    }

    fn label<'a>(&'a self, name: &'a str) -> &'a str {
        self.labels.get(name).map_or(name, String::as_str)
    }

    fn of<'a, T>(
        &'a self,
        f: impl Fn(&'a Plugin) -> Option<T> + 'a,
    ) -> impl Iterator<Item = (&'a str, T)> + 'a {
        self.names
            .iter()
            .filter_map(move |n| self.plugins.get(n).and_then(&f).map(|t| (n.as_str(), t)))
    }
}

fn build_profile(raw: &RawProfile, defined: &Defined) -> Result<ProfileSpec, String> {
    let at = format!("schedulingProfiles[{}]", raw.name);
    let mut scorers: Vec<WeightedScorer> = Vec::new();
    let mut picker: Option<(String, PickerSpec)> = None;
    for r in &raw.plugins {
        let plugin = defined.plugins.get(&r.plugin_ref).ok_or_else(|| {
            format!(
                "{at}: unknown pluginRef \"{}\"; defined plugins: {}",
                r.plugin_ref,
                defined.names_list()
            )
        })?;
        if let Some(w) = r.weight {
            if !w.is_finite() || w < 0.0 {
                return Err(format!(
                    "{at}: pluginRef \"{}\": weight must be a number >= 0, got {w}",
                    r.plugin_ref
                ));
            }
        }
        let scorer = match plugin {
            Plugin::Scorer(spec) => Some(*spec),
            Plugin::PrefixScorer { .. } | Plugin::PreciseScorer(_) => Some(ScorerSpec::PrefixCache),
            _ => None,
        };
        if let Some(scorer) = scorer {
            if scorers.iter().any(|s| s.name == r.plugin_ref) {
                return Err(format!(
                    "{at}: pluginRef \"{}\" is listed twice",
                    r.plugin_ref
                ));
            }
            scorers.push(WeightedScorer {
                name: r.plugin_ref.clone(),
                scorer,
                weight: r.weight.unwrap_or(1.0),
            });
            continue;
        }
        if r.weight.is_some() {
            return Err(format!(
                "{at}: pluginRef \"{}\": weight applies to scorers only",
                r.plugin_ref
            ));
        }
        match plugin {
            Plugin::Picker(spec) => {
                if let Some((first, _)) = &picker {
                    return Err(format!(
                        "{at}: two pickers (\"{first}\" and \"{}\"); a profile has one",
                        r.plugin_ref
                    ));
                }
                picker = Some((r.plugin_ref.clone(), *spec));
            }
            Plugin::Filter => {}
            Plugin::Handler | Plugin::Disagg(_) | Plugin::Decider(_) => {
                return Err(format!(
                    "{at}: pluginRef \"{}\" is a profile handler or decider, not a \
                     filter, scorer or picker; list it under plugins only",
                    r.plugin_ref
                ))
            }
            _ => {
                return Err(format!(
                    "{at}: pluginRef \"{}\" is a data producer or source, not a filter, scorer \
                     or picker; list it under plugins only (a prefix-cache-scorer names its \
                     producer in prefixMatchInfoProducerName)",
                    r.plugin_ref
                ))
            }
        }
    }
    Ok(ProfileSpec {
        name: raw.name.clone(),
        scorers,
        picker: picker.map_or(PickerSpec::MaxScore, |(_, p)| p),
    })
}

/// The prefix index parameters and the precise index, from the prefix scorers and the
/// producers they name.
fn prefix_sources(
    d: &Defined,
    unapplied: &mut Vec<Unapplied>,
) -> Result<(PrefixParams, Option<PreciseConfig>), String> {
    let producers: Vec<(&str, &PreciseConfig)> = d
        .of(|p| match p {
            Plugin::PreciseProducer(c) => Some(c),
            _ => None,
        })
        .collect();
    if let [(a, _), (b, _), ..] = producers.as_slice() {
        return Err(format!(
            "plugins \"{a}\" and \"{b}\" are both precise-prefix-cache-producers; pd-router \
             keeps one precise index"
        ));
    }
    let mut precise: Option<PreciseConfig> = producers.first().map(|(_, c)| (*c).clone());
    // All approximate sources feed the one index per endpoint, so they must agree.
    let mut approx: Option<(String, PrefixParams)> = None;
    let mut set_approx = |who: &str, params: PrefixParams| match &approx {
        Some((first, p)) if *p != params => Err(format!(
            "plugin {}: its prefix index parameters differ from those of \"{first}\"; \
             pd-router keeps one prefix index per endpoint, so every prefix-cache-scorer and \
             approx-prefix-cache-producer must share the block size, the match cap and \
             lruCapacityPerServer",
            d.label(who)
        )),
        Some(_) => Ok(()),
        None => {
            approx = Some((who.to_string(), params));
            Ok(())
        }
    };
    for (name, params) in d.of(|p| match p {
        Plugin::ApproxProducer(params) => Some(*params),
        _ => None,
    }) {
        set_approx(name, params)?;
    }
    for (name, cfg) in d.of(|p| match p {
        Plugin::PreciseScorer(c) => Some(c),
        _ => None,
    }) {
        match &mut precise {
            // As in llm-d: with a producer defined, the all-in-one scorer defers to it.
            Some(p) if !producers.is_empty() => {
                p.scorers.push(name.to_string());
                let bare = PreciseConfig {
                    producer: name.to_string(),
                    ..PreciseConfig::default()
                };
                if *cfg != bare {
                    unapplied.push(Unapplied::new(
                        format!("plugin {} parameters", d.label(name)),
                        format!(
                            "it scores from precise-prefix-cache-producer \"{}\"'s index, as in \
                             llm-d, so its own index parameters are not used",
                            p.producer
                        ),
                    ));
                }
            }
            Some(p) => {
                return Err(format!(
                    "plugins \"{}\" and \"{name}\" are both precise-prefix-cache-scorers; \
                     pd-router keeps one precise index (define one precise-prefix-cache-producer \
                     and name it in prefix-cache-scorers' prefixMatchInfoProducerName)",
                    p.producer
                ))
            }
            None => {
                let mut c = cfg.clone();
                c.scorers.push(name.to_string());
                precise = Some(c);
            }
        }
    }
    for (name, (producer, params)) in d.of(|p| match p {
        Plugin::PrefixScorer { producer, params } => Some((producer, params)),
        _ => None,
    }) {
        match (producer, params) {
            (Some(n), _) => match d.plugins.get(n) {
                None => {
                    return Err(format!(
                        "plugin {}: prefixMatchInfoProducerName \"{n}\" names no plugin; \
                         defined plugins: {}",
                        d.label(name),
                        d.names_list()
                    ))
                }
                Some(Plugin::ApproxProducer(params)) => set_approx(n, *params)?,
                Some(Plugin::PreciseProducer(_) | Plugin::PreciseScorer(_)) => {
                    if let Some(p) = precise.as_mut().filter(|p| p.producer == *n) {
                        p.scorers.push(name.to_string());
                    }
                }
                Some(_) => {
                    return Err(format!(
                        "plugin {}: prefixMatchInfoProducerName \"{n}\" is not an \
                         approx-prefix-cache-producer or precise-prefix-cache-producer",
                        d.label(name)
                    ))
                }
            },
            (None, Some(params)) => set_approx(name, *params)?,
            // llm-d's default producer: the approximate index.
            (None, None) => {}
        }
    }
    if let Some(p) = &precise {
        if p.scorers.is_empty() {
            unapplied.push(Unapplied::new(
                format!("plugin {}", d.label(&p.producer)),
                "no prefix-cache-scorer names it in prefixMatchInfoProducerName, so no profile \
                 scores from it",
            ));
        }
    }
    let prefix = match (approx, &precise) {
        (Some((_, params)), _) => params,
        // The approximate fallback hashes blocks of the engines' size too.
        (None, Some(p)) => PrefixParams {
            block_size: p.block_size() as usize,
            ..PrefixParams::default()
        },
        (None, None) => PrefixParams::default(),
    };
    Ok((prefix, precise))
}

/// The threshold and promptTokens of one decider.
fn decider_setting(d: &Decider) -> (u64, u64) {
    match d {
        Decider::Handler(t) => (t.unwrap_or(DEFAULT_THRESHOLD), 0),
        Decider::Prefix {
            non_cached,
            prompt_tokens,
        } => (
            non_cached.unwrap_or(DEFAULT_THRESHOLD),
            prompt_tokens.unwrap_or(0),
        ),
        // Any uncached token: a prompt the decode pick holds in full stays local.
        Decider::Always => (1, 0),
        Decider::Encode => (0, 0),
    }
}

/// The P/D threshold and promptTokens: from the decider a disagg-profile-handler names, or
/// (older configs) from every decider defined, which must then agree.
fn decision(d: &Defined, unapplied: &mut Vec<Unapplied>) -> Result<(u64, u64), String> {
    let handlers: Vec<(&str, &Disagg)> = d
        .of(|p| match p {
            Plugin::Disagg(h) => Some(h),
            _ => None,
        })
        .collect();
    if let [(a, _), (b, _), ..] = handlers.as_slice() {
        return Err(format!(
            "plugins \"{a}\" and \"{b}\" are both disagg-profile-handlers; a config has one"
        ));
    }
    let deciders: Vec<(&str, &Decider)> = d
        .of(|p| match p {
            Plugin::Decider(dec) => Some(dec),
            _ => None,
        })
        .collect();
    if let Some((hname, h)) = handlers.first() {
        let hlabel = d.label(hname);
        if let Some(e) = &h.encode_decider {
            if !matches!(d.plugins.get(e), Some(Plugin::Decider(_))) {
                return Err(format!(
                    "plugin {hlabel}: deciders.encode \"{e}\" is not a defined decider plugin"
                ));
            }
            unapplied.push(Unapplied::new(
                format!("plugin {hlabel} parameter deciders.encode"),
                "pd-router has no encode stage",
            ));
        }
        for (name, _) in &deciders {
            if h.prefill_decider.as_deref() != Some(*name)
                && h.encode_decider.as_deref() != Some(*name)
            {
                unapplied.push(Unapplied::new(
                    format!("plugin {}", d.label(name)),
                    format!("{hlabel}'s deciders do not name it"),
                ));
            }
        }
        // As in llm-d-router: no prefill decider named, no P/D.
        let Some(n) = &h.prefill_decider else {
            return Ok((0, 0));
        };
        return match d.plugins.get(n) {
            Some(Plugin::Decider(Decider::Encode)) => Err(format!(
                "plugin {hlabel}: deciders.prefill \"{n}\" decides the encode stage; name a P/D \
                 decider (prefix-based-pd-decider, always-disagg-pd-decider)"
            )),
            Some(Plugin::Decider(dec)) => Ok(decider_setting(dec)),
            Some(_) => Err(format!(
                "plugin {hlabel}: deciders.prefill \"{n}\" is not a P/D decider \
                 (prefix-based-pd-decider, always-disagg-pd-decider)"
            )),
            None => Err(format!(
                "plugin {hlabel}: deciders.prefill \"{n}\" names no plugin; defined plugins: {}",
                d.names_list()
            )),
        };
    }
    // Older configs: every decider defined counts, and their settings must agree. Without
    // one the config describes a single-profile setup: never P/D.
    let mut explicit: Option<(&str, u64)> = None;
    let mut any = false;
    let mut prompt = 0;
    for (name, dec) in deciders {
        if *dec == Decider::Encode {
            unapplied.push(Unapplied::new(
                format!("plugin {}", d.label(name)),
                "pd-router has no encode stage",
            ));
            continue;
        }
        any = true;
        let (t, p) = decider_setting(dec);
        prompt = prompt.max(p);
        if matches!(
            dec,
            Decider::Handler(None)
                | Decider::Prefix {
                    non_cached: None,
                    ..
                }
        ) {
            continue;
        }
        if let Some((other, prev)) = explicit {
            if prev != t {
                return Err(format!(
                    "plugin {}: threshold {t} disagrees with plugin \"{other}\"'s {prev}; \
                     pd-profile-handler's threshold, prefix-based-pd-decider's nonCachedTokens \
                     and always-disagg-pd-decider (1) are the same setting",
                    d.label(name)
                ));
            }
        }
        explicit = Some((name, t));
    }
    let threshold = match (explicit, any) {
        (Some((_, t)), _) => t,
        (None, true) => DEFAULT_THRESHOLD,
        (None, false) => 0,
    };
    Ok((threshold, prompt))
}

/// Parses an EndpointPickerConfig YAML document.
pub fn parse_scheduling(text: &str) -> Result<Scheduling, String> {
    let raw: RawConfig = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    if let Some(kind) = &raw.kind {
        if kind != "EndpointPickerConfig" {
            return Err(format!(
                "kind: expected EndpointPickerConfig, got \"{kind}\""
            ));
        }
    }
    if let Some(v) = &raw.api_version {
        if !API_VERSIONS.contains(&v.as_str()) {
            return Err(format!(
                "apiVersion: \"{v}\" is not one of {}",
                API_VERSIONS.join(", ")
            ));
        }
    }
    let mut unapplied = Vec::new();
    for (key, value, why) in [
        (
            "featureGates",
            &raw.feature_gates,
            "pd-router has no feature gates",
        ),
        (
            "dataLayer",
            &raw.data_layer,
            "pd-router scrapes engine metrics and finds endpoints itself",
        ),
        (
            "flowControl",
            &raw.flow_control,
            "pd-router queues no requests",
        ),
        (
            "saturationDetector",
            &raw.saturation_detector,
            "pd-router queues no requests",
        ),
        (
            "requestHandler",
            &raw.request_handler,
            "pd-router parses the OpenAI routes itself",
        ),
        (
            "parser",
            &raw.parser,
            "pd-router parses the OpenAI routes itself",
        ),
    ] {
        if value.as_ref().is_some_and(|v| !v.is_null()) {
            unapplied.push(Unapplied::new(format!("top-level key {key}"), why));
        }
    }

    let mut defined = Defined {
        plugins: HashMap::new(),
        names: Vec::new(),
        labels: HashMap::new(),
    };
    for (i, p) in raw.plugins.iter().enumerate() {
        let name = p.name.clone().unwrap_or_else(|| p.kind.clone());
        if name.is_empty() {
            return Err(format!("plugins[{i}]: empty name"));
        }
        let label = if name == p.kind {
            format!("\"{name}\"")
        } else {
            format!("\"{name}\" (type {})", p.kind)
        };
        if defined.plugins.contains_key(&name) {
            return Err(format!(
                "plugins[{i}]: plugin name {label} is defined twice; give one a distinct `name:`"
            ));
        }
        let plugin = define_plugin(&name, &label, p)?;
        unapplied.extend(plugin.unapplied);
        defined.names.push(name.clone());
        defined.labels.insert(name.clone(), label);
        defined.plugins.insert(name, plugin.plugin);
    }
    let (prefix, precise) = prefix_sources(&defined, &mut unapplied)?;
    let (threshold, min_prompt_tokens) = decision(&defined, &mut unapplied)?;
    if min_prompt_tokens > threshold && threshold > 0 {
        unapplied.push(Unapplied::new(
            format!("prefix-based-pd-decider parameter promptTokens ({min_prompt_tokens})"),
            format!(
                "pd-router's decider compares the decode pick's uncached tokens with \
                 nonCachedTokens ({threshold}) only, so prompts shorter than promptTokens may be \
                 disaggregated"
            ),
        ));
    }

    let handler = defined
        .of(|p| match p {
            Plugin::Disagg(h) => Some(h.clone()),
            _ => None,
        })
        .next()
        .map(|(_, h)| h)
        .unwrap_or_default();
    let decode_name = handler.decode_profile.as_deref().unwrap_or("decode");
    let prefill_name = handler.prefill_profile.as_deref().unwrap_or("prefill");
    let encode_name = handler.encode_profile.as_deref().unwrap_or("encode");
    // A single profile, named anything, is the decode profile (llm-d's single-profile-handler
    // calls it "default").
    let single = match raw.scheduling_profiles.as_slice() {
        [only] if only.name != prefill_name && only.name != encode_name => Some(&only.name),
        _ => None,
    };
    let mut decode = None;
    let mut prefill = None;
    let mut encode = None;
    for profile in &raw.scheduling_profiles {
        let name = profile.name.as_str();
        let slot = if Some(&profile.name) == single || name == decode_name {
            &mut decode
        } else if name == prefill_name {
            &mut prefill
        } else if name == encode_name {
            &mut encode
        } else {
            return Err(format!(
                "schedulingProfiles: unknown profile \"{name}\"; pd-router runs a \"{decode_name}\" \
                 profile and, for P/D, a \"{prefill_name}\" profile (a single profile may have \
                 any name; disagg-profile-handler's profiles parameter renames them)"
            ));
        };
        if slot.is_some() {
            return Err(format!(
                "schedulingProfiles: profile \"{name}\" is defined twice"
            ));
        }
        *slot = Some(build_profile(profile, &defined)?);
    }
    if encode.is_some() {
        unapplied.push(Unapplied::new(
            format!("schedulingProfiles[{encode_name}]"),
            "pd-router has no encode stage",
        ));
    }
    let decode = decode.ok_or_else(|| {
        format!(
            "schedulingProfiles: a profile named \"{decode_name}\" is required (it picks the \
             decode endpoint)"
        )
    })?;
    Ok(Scheduling {
        prefix,
        decode,
        prefill,
        threshold,
        min_prompt_tokens,
        precise,
        unapplied,
    })
}
