//! The demo's workloads: phases of requests, each with the faults to inject before it and what
//! the cluster is expected to do with it. A phase is plain data, so adding a workload is adding a
//! function that returns [`Phase`]s; [`builtin`] is the default one.

use serde_json::{json, Value};

use crate::sim::tokens::text_tokens;

/// The model name every engine-sim serves.
pub const MODEL: &str = "sim-model";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Chat,
    Completions,
}

impl Route {
    pub fn path(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
        }
    }
}

/// One request of a phase: where it goes and what it says.
#[derive(Clone, Debug)]
pub struct RequestSpec {
    /// Sent as `x-request-id`; the sidecar keeps it on both legs, so engine logs can be matched.
    pub id: String,
    pub route: Route,
    pub stream: bool,
    /// Index of the decode engine (and so of its sidecar) that gets the request.
    pub decode: usize,
    /// Index of the prefill engine named in `x-prefiller-host-port`, if any.
    pub prefiller: Option<usize>,
    pub body: Value,
    /// Prompt tokens by the 4-bytes-per-token estimate the sidecar and engine-sim both use.
    pub prompt_tokens: u64,
}

/// What the cluster should do with every request of a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Prefill on the decode engine; no prefill engine sees the request.
    Local,
    /// Prefill on the named prefill engine, KV handed to the decode engine.
    Remote,
    /// Like `Remote`, except that requests whose every prefill attempt failed on prefill engine
    /// `engine` fall back to local prefill; at least one must.
    Fallback { engine: usize },
}

/// A fault configuration (`POST /sim/faults` body) for one prefill engine during a phase.
#[derive(Clone, Debug)]
pub struct Fault {
    pub prefill_engine: usize,
    pub config: Value,
}

#[derive(Clone, Debug)]
pub struct Phase {
    /// Short machine name (JSON, request ids).
    pub key: &'static str,
    /// Name in the table.
    pub title: &'static str,
    /// One line saying what the phase sends.
    pub about: String,
    pub faults: Vec<Fault>,
    pub expect: Expect,
    pub requests: Vec<RequestSpec>,
}

/// The knobs the built-in workload depends on.
#[derive(Clone, Debug)]
pub struct WorkloadParams {
    pub requests_per_phase: usize,
    pub max_tokens: u64,
    pub prefill_engines: usize,
    pub decode_engines: usize,
    /// The sidecars' `--prefill-max-retries`: the failure phase injects more failures than that.
    pub prefill_max_retries: u32,
    /// The sidecars' `--prefill-threshold-tokens`.
    pub threshold_tokens: u64,
}

/// Short prompts (stay local), long multi-turn prompts (disaggregated), then the long prompts
/// again while prefill-0 answers 503 to more attempts than the sidecar retries.
pub fn builtin(p: &WorkloadParams) -> Vec<Phase> {
    let n = p.requests_per_phase;
    // Enough consecutive failures for `falling` requests to exhaust their attempts.
    let falling = 4u64;
    let fail_next = falling * (u64::from(p.prefill_max_retries) + 1);
    vec![
        Phase {
            key: "short",
            title: "short prompts",
            about: format!(
                "{n} one-question prompts, well below the {}-token threshold, each naming a \
                 prefill engine",
                p.threshold_tokens
            ),
            faults: vec![],
            expect: Expect::Local,
            requests: short_requests("short", p),
        },
        Phase {
            key: "long",
            title: "long prompts",
            about: format!(
                "{n} turns of multi-turn chats under a long shared system prompt, alternating \
                 between the {} prefill engines",
                p.prefill_engines
            ),
            faults: vec![],
            expect: Expect::Remote,
            requests: conversation_requests("long", p),
        },
        Phase {
            key: "prefill-failure",
            title: "prefill failure",
            about: format!(
                "the long prompts again while prefill-0 answers 503 to its next {fail_next} \
                 prefill attempts (the sidecar makes 1 + {} retries)",
                p.prefill_max_retries
            ),
            faults: vec![Fault {
                prefill_engine: 0,
                config: json!({"fail_next": fail_next, "error_status": 503, "scope": "prefill"}),
            }],
            expect: Expect::Fallback { engine: 0 },
            requests: conversation_requests("fail", p),
        },
    ]
}

const QUESTIONS: &[&str] = &[
    "What is the capital of France?",
    "Translate 'good morning' into Spanish.",
    "How many legs does a spider have?",
    "Give me a synonym for 'quick'.",
    "What is 17 times 3?",
    "Name a prime number larger than 50.",
    "What colour do you get by mixing blue and yellow?",
    "Spell 'necessary' backwards.",
];

fn short_requests(key: &str, p: &WorkloadParams) -> Vec<RequestSpec> {
    (0..p.requests_per_phase)
        .map(|i| {
            let q = QUESTIONS[i % QUESTIONS.len()];
            let messages = vec![
                ("system", "You are a concise assistant.".to_string()),
                ("user", q.to_string()),
            ];
            request(key, i, i % p.decode_engines.max(1), Some(i), messages, p)
        })
        .collect()
}

/// `requests_per_phase` turns of several concurrent conversations sharing one long system prompt.
/// Turn `t` of a conversation carries its `t` previous exchanges; a conversation stays on one
/// decode engine (session affinity) while its turns alternate between prefill engines.
fn conversation_requests(key: &str, p: &WorkloadParams) -> Vec<RequestSpec> {
    let conversations = 8usize.min(p.requests_per_phase.max(1));
    let system = system_prompt();
    (0..p.requests_per_phase)
        .map(|i| {
            let (conv, turn) = (i % conversations, i / conversations);
            let mut messages = vec![("system", system.clone())];
            for t in 0..turn {
                messages.push(("user", user_turn(conv, t)));
                messages.push(("assistant", assistant_turn(conv, t)));
            }
            messages.push(("user", user_turn(conv, turn)));
            request(
                key,
                i,
                conv % p.decode_engines.max(1),
                Some(conv + turn),
                messages,
                p,
            )
        })
        .collect()
}

/// Request `i` of a phase: chat and completions alternate, and so do streaming and not, so
/// every phase covers the four combinations.
fn request(
    key: &str,
    i: usize,
    decode: usize,
    prefiller_seq: Option<usize>,
    messages: Vec<(&str, String)>,
    p: &WorkloadParams,
) -> RequestSpec {
    let route = [Route::Chat, Route::Completions][i % 2];
    let stream = [true, false][(i / 2) % 2];
    let (mut body, prompt_tokens) = match route {
        Route::Chat => {
            let tokens = messages.iter().map(|(_, c)| text_tokens(c)).sum();
            let msgs: Vec<Value> = messages
                .iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect();
            (json!({"model": MODEL, "messages": msgs}), tokens)
        }
        Route::Completions => {
            let mut prompt = String::new();
            for (role, content) in &messages {
                prompt.push_str(&format!("{role}: {content}\n"));
            }
            prompt.push_str("assistant:");
            let tokens = text_tokens(&prompt);
            (json!({"model": MODEL, "prompt": prompt}), tokens)
        }
    };
    body["max_tokens"] = json!(p.max_tokens);
    body["stream"] = json!(stream);
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    RequestSpec {
        id: format!("demo-{key}-{i:03}"),
        route,
        stream,
        decode,
        prefiller: prefiller_seq.map(|s| s % p.prefill_engines.max(1)),
        body,
        prompt_tokens: prompt_tokens.max(1),
    }
}

/// About 3 KB (some 800 tokens): an assistant's instructions and a product reference.
pub fn system_prompt() -> String {
    let mut s = String::from(
        "You are the support assistant of Tandem Outdoor Gear. Answer politely and precisely, \
         cite the catalogue entry you rely on, never invent prices, and hand over to a human \
         when the customer asks for a refund above 500 EUR.\nCatalogue:\n",
    );
    let items = [
        ("tent", "Ridge 2", "2-person tent, 1.9 kg, 3 seasons"),
        ("tent", "Ridge 4", "4-person tent, 3.4 kg, 3 seasons"),
        ("bag", "Ember -5", "down sleeping bag, comfort -5 C"),
        ("bag", "Ember +5", "synthetic sleeping bag, comfort +5 C"),
        ("stove", "Pico", "canister stove, 2.6 kW, 83 g"),
        ("pack", "Vista 38", "38 l backpack, adjustable back length"),
        ("pack", "Vista 55", "55 l backpack, removable lid"),
        ("mat", "Loft", "inflatable mat, R-value 4.2"),
    ];
    for round in 0..4 {
        for (n, (kind, name, what)) in items.iter().enumerate() {
            s.push_str(&format!(
                "- [{}{:02}] {kind} {name}: {what}; warranty {} years; stock region {}.\n",
                kind.to_uppercase(),
                round * items.len() + n,
                2 + (n + round) % 3,
                ["north", "south", "east", "west"][(n + round) % 4],
            ));
        }
    }
    s
}

fn user_turn(conv: usize, turn: usize) -> String {
    const ASKS: &[&str] = &[
        "Which tent would you recommend for two people hiking in autumn?",
        "Does it come with a warranty, and how long is it?",
        "What sleeping bag goes with it for nights around zero degrees?",
        "Can you compare the two backpacks for a three-day trip?",
        "Which stove is the lightest you sell?",
        "Is the mat warm enough for snow?",
    ];
    format!("(customer {conv}) {}", ASKS[(conv + turn) % ASKS.len()])
}

fn assistant_turn(conv: usize, turn: usize) -> String {
    format!(
        "For customer {conv}, turn {turn}: based on the catalogue entry I would suggest the \
         lighter option; it covers the conditions you describe and keeps the pack weight down."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> WorkloadParams {
        WorkloadParams {
            requests_per_phase: 32,
            max_tokens: 16,
            prefill_engines: 2,
            decode_engines: 2,
            prefill_max_retries: 2,
            threshold_tokens: 256,
        }
    }

    #[test]
    fn short_prompts_are_below_and_long_ones_above_the_threshold() {
        let p = params();
        let phases = builtin(&p);
        assert_eq!(phases.len(), 3);
        for r in &phases[0].requests {
            assert!(r.prompt_tokens < p.threshold_tokens, "{}", r.prompt_tokens);
        }
        for ph in &phases[1..] {
            for r in &ph.requests {
                assert!(r.prompt_tokens > p.threshold_tokens, "{}", r.prompt_tokens);
            }
        }
    }

    #[test]
    fn phases_mix_routes_streaming_and_engines() {
        let p = params();
        for ph in builtin(&p) {
            assert_eq!(ph.requests.len(), 32);
            for (route, stream) in [
                (Route::Chat, true),
                (Route::Chat, false),
                (Route::Completions, true),
                (Route::Completions, false),
            ] {
                assert!(ph
                    .requests
                    .iter()
                    .any(|r| r.route == route && r.stream == stream));
            }
            for e in 0..2 {
                assert!(ph.requests.iter().any(|r| r.prefiller == Some(e)));
                assert!(ph.requests.iter().any(|r| r.decode == e));
            }
        }
    }
}
