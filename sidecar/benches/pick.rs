//! The pick path of `pd-router`, in process: what one routing decision costs with 64 decode and
//! 64 prefill endpoints whose prefix indexes are warm, for an 8k-token prompt.
//!
//! Measured separately, per request: parsing the JSON body; extracting the prompt (4-bytes-per-
//! token estimate); the pick itself (hashing the prompt's blocks, matching them against every
//! endpoint's prefix index, scoring, the decider, the prefill pick), with the hashing also timed
//! alone; recording the prompt in both picks' indexes (done right after the pick); and, for
//! comparison, tokenizing the prompt with a byte-level BPE tokenizer trained here (what
//! `--tokenizer` adds).
//! Prints a table and writes `bench-out/router-pick.json`. Numbers are reported, not asserted.
//!
//! Run: `cargo bench -p sidecar --bench pick` (or `make bench-router`).

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Map, Value};
use sidecar::request::ApiKind;
use sidecar::router::config::RouterConfig;
use sidecar::router::prefix::{block_hashes, prompt_of, prompt_with};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

const ENDPOINTS: usize = 64;
const PROMPT_TOKENS: usize = 8192;
const WARM_DOCUMENTS: usize = 256;
const ITERATIONS: usize = 20_000;
const TOKENIZE_ITERATIONS: usize = 200;

/// About `tokens` tokens (4 bytes each) of text that starts with document `doc`'s preamble.
fn document(doc: usize, tokens: usize, tail: usize) -> String {
    let mut s =
        format!("Document {doc}. You are the assistant of team {doc}; follow the handbook.\n");
    let mut i = 0usize;
    while s.len() < tokens * 4 * 3 / 4 {
        s.push_str(&format!(
            "Section {i} of handbook {doc}: steps {}, {} and {} apply. ",
            i * 7 % 13,
            i * 3 % 11,
            doc % 17
        ));
        i += 1;
    }
    while s.len() < tokens * 4 {
        s.push_str(&format!("Question {tail}-{i}: what applies here? "));
        i += 1;
    }
    s.truncate(tokens * 4);
    s
}

fn chat_body(text: &str) -> Value {
    json!({"model": "llama", "messages": [{"role": "system", "content": text}, {"role": "user", "content": "Summarise."}], "max_tokens": 64, "stream": true})
}

struct Stat {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Stat {
    fn pct(&self, q: f64) -> f64 {
        let mut v: Vec<f64> = self.samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        v.sort_by(f64::total_cmp);
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }
    fn mean(&self) -> f64 {
        self.samples
            .iter()
            .map(|d| d.as_secs_f64() * 1e6)
            .sum::<f64>()
            / self.samples.len() as f64
    }
}

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed())
}

fn main() {
    let mut argv: Vec<String> = vec!["pd-router".into()];
    for i in 0..ENDPOINTS {
        argv.push(format!("--decode=10.0.{}.{}:8000", i / 250, i % 250 + 1));
        argv.push(format!("--prefill=10.1.{}.{}:8000", i / 250, i % 250 + 1));
    }
    // The built-in profiles: prefix-cache-scorer (weight 2) + load-aware-scorer (1), max-score
    // picker, threshold 256; no scrapes or health checks run (no runtime here).
    let cfg = RouterConfig::parse_from(&argv).expect("config");
    let state = sidecar::router::state(cfg);
    let view = state.view();
    let sched = &view.scheduler;
    let mut rng = StdRng::seed_from_u64(1);

    // Warm the indexes: documents spread over the endpoints by the router itself.
    for doc in 0..WARM_DOCUMENTS {
        let body = chat_body(&document(doc, PROMPT_TOKENS, 0));
        let prompt = prompt_of(ApiKind::ChatCompletions, body.as_object().unwrap());
        let routed = sched.schedule("llama", &prompt, None, Instant::now(), &mut rng);
        sched.record(&routed.expect("a decode endpoint"));
    }

    let mut parse = Stat {
        name: "parse JSON body",
        samples: Vec::new(),
    };
    let mut extract = Stat {
        name: "prompt (estimate)",
        samples: Vec::new(),
    };
    let mut pick = Stat {
        name: "pick (hash, score, decide)",
        samples: Vec::new(),
    };
    let mut total = Stat {
        name: "all of the above",
        samples: Vec::new(),
    };
    let raw: Vec<Vec<u8>> = (0..64)
        .map(|t| {
            serde_json::to_vec(&chat_body(&document(
                t % WARM_DOCUMENTS,
                PROMPT_TOKENS,
                t + 1,
            )))
            .unwrap()
        })
        .collect();
    // The block-hash chain alone (part of the pick).
    let mut hash = Stat {
        name: "  of which block-hash chain",
        samples: Vec::new(),
    };
    let prefix = sched.prefix_params();
    for i in 0..ITERATIONS / 4 {
        let body: Map<String, Value> = serde_json::from_slice(&raw[i % raw.len()]).unwrap();
        let prompt = prompt_of(ApiKind::ChatCompletions, &body);
        let (_, dt) =
            time(|| block_hashes("llama", &prompt.bytes, prefix.block_size, prefix.max_blocks));
        hash.samples.push(dt);
    }
    let mut record = Stat {
        name: "record in both indexes",
        samples: Vec::new(),
    };

    let mut remote = 0usize;
    for i in 0..ITERATIONS {
        let bytes = &raw[i % raw.len()];
        let started = Instant::now();
        let (body, dt) = time(|| serde_json::from_slice::<Map<String, Value>>(bytes).unwrap());
        parse.samples.push(dt);
        let (prompt, dt) = time(|| prompt_of(ApiKind::ChatCompletions, &body));
        extract.samples.push(dt);
        let (routed, dt) =
            time(|| sched.schedule("llama", &prompt, None, Instant::now(), &mut rng));
        pick.samples.push(dt);
        let routed = routed.expect("a decode endpoint");
        let ((), dt) = time(|| sched.record(&routed));
        record.samples.push(dt);
        total.samples.push(started.elapsed());
        remote += usize::from(routed.prefill.is_some());
        // The request is over: in-flight counts go back down.
        drop(routed);
    }

    // Tokenization, for comparison: a byte-level BPE trained on this text (vocabulary 8,000).
    let mut tok = TokenizerBuilder::<BPE, _, _, _, _>::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(ByteLevel::default()))
        .with_decoder(Some(ByteLevel::default()))
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
        .build()
        .expect("tokenizer");
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(8000)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from("<s>", true)])
        .show_progress(false)
        .build();
    let corpus: Vec<String> = (0..8).map(|d| document(d, PROMPT_TOKENS, d)).collect();
    tok.train(&mut trainer, corpus.iter()).expect("train");
    let tokenizer: tokenizers::Tokenizer = tok.into();
    let mut tokenize = Stat {
        name: "prompt (tokenizer.json, BPE)",
        samples: Vec::new(),
    };
    let mut token_count = 0;
    for i in 0..TOKENIZE_ITERATIONS {
        let body: Map<String, Value> = serde_json::from_slice(&raw[i % raw.len()]).unwrap();
        let (p, dt) = time(|| prompt_with(ApiKind::ChatCompletions, &body, Some(&tokenizer)));
        token_count = p.tokens;
        tokenize.samples.push(dt);
    }

    println!(
        "pd-router pick path: {ENDPOINTS} decode + {ENDPOINTS} prefill endpoints, {WARM_DOCUMENTS} warm 8k-token documents in the indexes, \
         {PROMPT_TOKENS}-token chat prompts ({} P/D of {ITERATIONS}); BPE prompt = {token_count} tokens",
        remote
    );
    println!(
        "{:<30} {:>9} {:>9} {:>9} {:>9}",
        "step", "n", "mean us", "p50 us", "p99 us"
    );
    let mut rows = Vec::new();
    for s in [&parse, &extract, &pick, &hash, &record, &total, &tokenize] {
        println!(
            "{:<30} {:>9} {:>9.1} {:>9.1} {:>9.1}",
            s.name,
            s.samples.len(),
            s.mean(),
            s.pct(0.5),
            s.pct(0.99)
        );
        rows.push(json!({"step": s.name, "n": s.samples.len(), "mean_us": s.mean(), "p50_us": s.pct(0.5), "p99_us": s.pct(0.99)}));
    }
    let out =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-out/router-pick.json");
    let _ = std::fs::create_dir_all(out.parent().unwrap());
    let doc = json!({
        "benchmark": "router-pick",
        "decode_endpoints": ENDPOINTS, "prefill_endpoints": ENDPOINTS,
        "prompt_tokens": PROMPT_TOKENS, "warm_documents": WARM_DOCUMENTS,
        "remote_decisions": remote, "iterations": ITERATIONS,
        "bpe_prompt_tokens": token_count,
        "steps": rows,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("wrote {}", out.display());
}
