//! The demo's built-in workload: what a support desk sends an LLM. Multi-turn chats whose long
//! system prompts (an assistant's instructions plus a product catalogue) are shared by several
//! customers, mixed with short one-shot questions. Plain data, built deterministically from a
//! seed, so every mode replays exactly the same requests.
//!
//! A chat is a [`Session`]: its turns go out one after another, each carrying the whole history
//! so far, the way a chat UI calls `/v1/chat/completions`. A one-shot is a session of one turn
//! on `/v1/completions`.

use serde_json::{json, Value};

use crate::sim::tokens::text_tokens;

/// The model name every engine-sim serves.
pub const MODEL: &str = "sim-model";

/// The knobs of the built-in workload.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadParams {
    /// Distinct long system prompts (one per product line).
    pub system_prompts: usize,
    /// Approximate tokens of each system prompt.
    pub system_prompt_tokens: u64,
    /// Multi-turn chats; chat `i` uses system prompt `i % system_prompts`.
    pub chats: usize,
    /// Turns per chat.
    pub turns: usize,
    /// `max_tokens` of a chat turn.
    pub chat_max_tokens: u64,
    /// Short one-shot prompts.
    pub one_shots: usize,
    /// `max_tokens` of a one-shot.
    pub one_shot_max_tokens: u64,
    /// Orders the sessions; the same seed replays the same sequence.
    pub seed: u64,
}

impl WorkloadParams {
    /// The default: 6 system prompts of about 3,000 tokens, 24 chats of 4 turns, 48 one-shots.
    pub fn standard() -> WorkloadParams {
        WorkloadParams {
            system_prompts: 6,
            system_prompt_tokens: 3000,
            chats: 24,
            turns: 4,
            chat_max_tokens: 64,
            one_shots: 48,
            one_shot_max_tokens: 32,
            seed: 7,
        }
    }

    /// A small version for smoke tests (a few seconds per mode).
    pub fn quick() -> WorkloadParams {
        WorkloadParams {
            system_prompts: 2,
            system_prompt_tokens: 1200,
            chats: 4,
            turns: 2,
            chat_max_tokens: 8,
            one_shots: 4,
            one_shot_max_tokens: 4,
            seed: 7,
        }
    }

    pub fn requests(&self) -> usize {
        self.chats * self.turns + self.one_shots
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    OneShot,
}

/// One request of a session, ready to send.
#[derive(Clone, Debug)]
pub struct Turn {
    /// Sent as `x-request-id`.
    pub id: String,
    pub path: &'static str,
    pub body: Value,
    /// Prompt tokens by the 4-bytes-per-token estimate engine-sim uses.
    pub prompt_tokens: u64,
    pub max_tokens: u64,
}

/// Requests that go out one after another (a chat), or a single one (a one-shot).
#[derive(Clone, Debug)]
pub struct Session {
    pub kind: Kind,
    pub turns: Vec<Turn>,
}

/// Every session of the workload, interleaved in a seeded order.
pub fn builtin(p: &WorkloadParams) -> Vec<Session> {
    let systems: Vec<String> = (0..p.system_prompts.max(1))
        .map(|i| system_prompt(i, p.system_prompt_tokens))
        .collect();
    let mut sessions: Vec<Session> = Vec::new();
    for c in 0..p.chats {
        sessions.push(chat(c, &systems[c % systems.len()], p));
    }
    for i in 0..p.one_shots {
        sessions.push(one_shot(i, p));
    }
    shuffle(&mut sessions, p.seed);
    sessions
}

fn chat(c: usize, system: &str, p: &WorkloadParams) -> Session {
    let mut messages = vec![json!({"role": "system", "content": system})];
    let mut tokens = text_tokens(system);
    let mut turns = Vec::new();
    for t in 0..p.turns {
        let ask = user_turn(c, t);
        tokens += text_tokens(&ask);
        messages.push(json!({"role": "user", "content": ask}));
        turns.push(Turn {
            id: format!("chat{c:02}-turn{t}"),
            path: "/v1/chat/completions",
            body: json!({
                "model": MODEL,
                "messages": messages,
                "max_tokens": p.chat_max_tokens,
                "stream": true,
                "stream_options": {"include_usage": true},
            }),
            prompt_tokens: tokens,
            max_tokens: p.chat_max_tokens,
        });
        // The next turn carries this answer (a stand-in of about the same length).
        let answer = assistant_turn(c, t, p.chat_max_tokens);
        tokens += text_tokens(&answer);
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    Session {
        kind: Kind::Chat,
        turns,
    }
}

fn one_shot(i: usize, p: &WorkloadParams) -> Session {
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
    let prompt = format!(
        "Answer in one short sentence. Question {i}: {}\nAnswer:",
        QUESTIONS[i % QUESTIONS.len()]
    );
    Session {
        kind: Kind::OneShot,
        turns: vec![Turn {
            id: format!("oneshot{i:02}"),
            path: "/v1/completions",
            prompt_tokens: text_tokens(&prompt),
            body: json!({
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": p.one_shot_max_tokens,
                "stream": true,
                "stream_options": {"include_usage": true},
            }),
            max_tokens: p.one_shot_max_tokens,
        }],
    }
}

/// System prompt `n`: instructions and a catalogue of about `tokens` tokens. Prompts differ from
/// their first line on, so they share no cached block.
pub fn system_prompt(n: usize, tokens: u64) -> String {
    const LINES: &[&str] = &[
        "Outdoor Gear",
        "Kitchen Appliances",
        "Bicycles",
        "Office Furniture",
        "Garden Tools",
        "Audio Equipment",
        "Board Games",
        "Running Shoes",
    ];
    let line = LINES[n % LINES.len()];
    let mut s = format!(
        "You are the support assistant #{n} of Tandem {line}. Answer politely and precisely, cite \
         the catalogue entry you rely on, never invent prices, and hand over to a human when the \
         customer asks for a refund above 500 EUR.\nCatalogue:\n"
    );
    let want = tokens as usize * 4;
    let mut item = 0usize;
    while s.len() < want {
        s.push_str(&format!(
            "- [{}-{item:04}] {line} item {item}: weight {} g, warranty {} years, stock region \
             {}, rated {}.{} by customers.\n",
            n,
            150 + (item * 37 + n * 11) % 2900,
            1 + (item + n) % 5,
            ["north", "south", "east", "west"][(item + n) % 4],
            3 + (item % 3),
            (item * 7) % 10,
        ));
        item += 1;
    }
    s
}

fn user_turn(chat: usize, turn: usize) -> String {
    const ASKS: &[&str] = &[
        "Which item would you recommend for a beginner, and why?",
        "Does it come with a warranty, and how long is it?",
        "What goes well with it if I use it every day?",
        "Can you compare the two lightest items for me?",
        "Which one is in stock in the north region?",
        "Is there anything rated above 4.5 for under 1 kg?",
    ];
    format!("(customer {chat}) {}", ASKS[(chat + turn) % ASKS.len()])
}

fn assistant_turn(chat: usize, turn: usize, max_tokens: u64) -> String {
    let mut s = format!("(answer to customer {chat}, turn {turn}) ");
    while (s.len() as u64) < max_tokens * 4 {
        s.push_str("Based on the catalogue entry, the lighter option covers what you describe. ");
    }
    s
}

/// Fisher-Yates with a small deterministic generator (splitmix64).
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..v.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_has_the_asked_shape() {
        let p = WorkloadParams::standard();
        let sessions = builtin(&p);
        let chats: Vec<_> = sessions.iter().filter(|s| s.kind == Kind::Chat).collect();
        assert_eq!(chats.len(), p.chats);
        assert_eq!(sessions.len(), p.chats + p.one_shots);
        let total: usize = sessions.iter().map(|s| s.turns.len()).sum();
        assert_eq!(total, p.requests());
        for c in &chats {
            assert_eq!(c.turns.len(), p.turns);
            assert!(c.turns[0].prompt_tokens >= p.system_prompt_tokens);
            // Every turn carries the previous one as a prefix (its history grows).
            for w in c.turns.windows(2) {
                let (a, b) = (&w[0].body["messages"], &w[1].body["messages"]);
                let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
                assert_eq!(&b[..a.len()], &a[..]);
                assert!(w[1].prompt_tokens > w[0].prompt_tokens);
            }
        }
        for s in sessions.iter().filter(|s| s.kind == Kind::OneShot) {
            assert!(
                s.turns[0].prompt_tokens < 64,
                "{}",
                s.turns[0].prompt_tokens
            );
        }
        // Every request streams (TTFT and inter-token latency are measured on the stream).
        assert!(sessions
            .iter()
            .flat_map(|s| &s.turns)
            .all(|t| t.body["stream"] == true));
    }

    #[test]
    fn system_prompts_differ_from_the_start_and_have_the_asked_length() {
        let a = system_prompt(0, 3000);
        let b = system_prompt(1, 3000);
        // They differ within the first 16-token block (64 bytes).
        assert_ne!(a[..64], b[..64]);
        let t = text_tokens(&a);
        assert!((3000..3100).contains(&t), "{t}");
    }

    #[test]
    fn the_order_is_seeded() {
        let p = WorkloadParams::standard();
        let ids = |s: &[Session]| s.iter().map(|s| s.turns[0].id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&builtin(&p)), ids(&builtin(&p)));
        let other = WorkloadParams {
            seed: 8,
            ..p.clone()
        };
        assert_ne!(ids(&builtin(&p)), ids(&builtin(&other)));
    }
}
