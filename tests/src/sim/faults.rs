//! Failure injection: which generation requests fail, hang or are delayed, and which KV-event
//! batches are lost on the wire. Owns the fault configuration (set by flags, replaced at run time
//! by `POST /sim/faults`); the decision itself is a pure function of the configuration and two
//! dice rolls so it can be unit-tested.

use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Which requests a fault applies to. "decode" means every request that is not prefill-role,
/// local ones included: from the sidecar's point of view those all go to the decode engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FaultScope {
    All,
    Prefill,
    Decode,
}

impl FaultScope {
    fn matches(self, prefill_role: bool) -> bool {
        match self {
            FaultScope::All => true,
            FaultScope::Prefill => prefill_role,
            FaultScope::Decode => !prefill_role,
        }
    }
}

/// The body of `POST /sim/faults` and `GET /sim/faults`. Absent fields take neutral defaults
/// (no errors, no hangs, no delay, scope all, status 500): a POST replaces the whole config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    pub error_rate: f64,
    pub error_status: u16,
    pub hang_rate: f64,
    pub scope: FaultScope,
    /// The next n matching requests fail with `error_status`, whatever the rates say.
    pub fail_next: u64,
    /// Extra delay before answering matching requests.
    pub delay_ms: u64,
    /// The next n KV-event batches get their sequence numbers and are kept for replay but are
    /// never sent: a gap a subscriber can fill from the replay socket. Any request's batches
    /// count (the scope does not apply).
    pub lose_kv_events: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            error_rate: 0.0,
            error_status: 500,
            hang_rate: 0.0,
            scope: FaultScope::All,
            fail_next: 0,
            delay_ms: 0,
            lose_kv_events: 0,
        }
    }
}

/// What to do with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    Proceed,
    Fail(u16),
    Hang,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultDecision {
    pub delay: Duration,
    pub action: FaultAction,
}

impl FaultConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("error_rate", self.error_rate),
            ("hang_rate", self.hang_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be within 0..=1, got {v}"));
            }
        }
        if !(400..=599).contains(&self.error_status) {
            return Err(format!(
                "error_status must be within 400..=599, got {}",
                self.error_status
            ));
        }
        Ok(())
    }

    /// Decides the fate of one request. `roll_error` and `roll_hang` are uniform in [0, 1).
    /// Consumes one `fail_next` when it fires.
    pub fn decide(&mut self, prefill_role: bool, roll_error: f64, roll_hang: f64) -> FaultDecision {
        if !self.scope.matches(prefill_role) {
            return FaultDecision {
                delay: Duration::ZERO,
                action: FaultAction::Proceed,
            };
        }
        let action = if self.fail_next > 0 {
            self.fail_next -= 1;
            FaultAction::Fail(self.error_status)
        } else if roll_error < self.error_rate {
            FaultAction::Fail(self.error_status)
        } else if roll_hang < self.hang_rate {
            FaultAction::Hang
        } else {
            FaultAction::Proceed
        };
        FaultDecision {
            delay: Duration::from_millis(self.delay_ms),
            action,
        }
    }
}

/// The live fault configuration and the dice.
pub struct Faults {
    state: Mutex<(FaultConfig, StdRng)>,
}

impl Faults {
    pub fn new(cfg: FaultConfig) -> Faults {
        Faults {
            state: Mutex::new((cfg, StdRng::from_os_rng())),
        }
    }

    pub fn get(&self) -> FaultConfig {
        self.lock().0.clone()
    }

    pub fn set(&self, cfg: FaultConfig) {
        self.lock().0 = cfg;
    }

    pub fn decide(&self, prefill_role: bool) -> FaultDecision {
        let mut guard = self.lock();
        let (cfg, rng) = &mut *guard;
        let roll_error: f64 = rng.random();
        let roll_hang: f64 = rng.random();
        cfg.decide(prefill_role, roll_error, roll_hang)
    }

    /// Whether the next KV-event batch is to be lost; consumes one `lose_kv_events`.
    pub fn take_kv_event_loss(&self) -> bool {
        let mut guard = self.lock();
        let n = &mut guard.0.lose_kv_events;
        let lose = *n > 0;
        *n = n.saturating_sub(1);
        lose
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (FaultConfig, StdRng)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_next_counts_down_then_stops() {
        let mut cfg = FaultConfig {
            fail_next: 2,
            error_status: 503,
            ..FaultConfig::default()
        };
        assert_eq!(cfg.decide(false, 0.9, 0.9).action, FaultAction::Fail(503));
        assert_eq!(cfg.decide(false, 0.9, 0.9).action, FaultAction::Fail(503));
        assert_eq!(cfg.decide(false, 0.9, 0.9).action, FaultAction::Proceed);
        assert_eq!(cfg.fail_next, 0);
    }

    #[test]
    fn scope_limits_which_requests_are_hit() {
        let mut cfg = FaultConfig {
            error_rate: 1.0,
            scope: FaultScope::Prefill,
            delay_ms: 7,
            ..FaultConfig::default()
        };
        let local = cfg.decide(false, 0.0, 0.0);
        assert_eq!(local.action, FaultAction::Proceed);
        assert_eq!(local.delay, Duration::ZERO);
        let prefill = cfg.decide(true, 0.0, 0.0);
        assert_eq!(prefill.action, FaultAction::Fail(500));
        assert_eq!(prefill.delay, Duration::from_millis(7));
        cfg.scope = FaultScope::Decode;
        assert_eq!(cfg.decide(true, 0.0, 0.0).action, FaultAction::Proceed);
        assert_eq!(cfg.decide(false, 0.0, 0.0).action, FaultAction::Fail(500));
    }

    #[test]
    fn rates_compare_against_rolls() {
        let mut cfg = FaultConfig {
            error_rate: 0.5,
            hang_rate: 0.5,
            ..FaultConfig::default()
        };
        assert_eq!(cfg.decide(false, 0.4, 0.9).action, FaultAction::Fail(500));
        assert_eq!(cfg.decide(false, 0.6, 0.4).action, FaultAction::Hang);
        assert_eq!(cfg.decide(false, 0.6, 0.6).action, FaultAction::Proceed);
    }

    #[test]
    fn json_fields_are_optional_and_checked() {
        let cfg: FaultConfig = serde_json::from_str(r#"{"fail_next": 1}"#).unwrap();
        assert_eq!(cfg.error_status, 500);
        assert_eq!(cfg.fail_next, 1);
        assert!(serde_json::from_str::<FaultConfig>(r#"{"fail-next": 1}"#).is_err());
        let faults = Faults::new(serde_json::from_str(r#"{"lose_kv_events": 1}"#).unwrap());
        assert!(faults.take_kv_event_loss());
        assert!(!faults.take_kv_event_loss());
        let bad = FaultConfig {
            error_rate: 2.0,
            ..FaultConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
