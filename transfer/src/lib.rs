//! KV-transfer agent (filled by the kv-transfer issue).
