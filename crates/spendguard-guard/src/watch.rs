//! [`SpendWatch`]: which scopes' spend changed since the last look, for the alert engine.
//!
//! The writer notes the scopes of every durable usage record with a cost; the alert engine
//! takes the set and evaluates only those scopes. The set coalesces (a hot scope appears
//! once however many records it got), so its memory is bounded by the number of scopes,
//! and taking it is O(changed scopes). Noting happens on the writer task, after the batch
//! is durable: never on the decision path.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use spendguard_core::{Event, ScopeKey, TierName, UsageRecord};
use tokio::sync::Notify;

/// Scopes with new spend, and the tier their latest spend was made under (users' budgets
/// depend on it).
#[derive(Debug, Default)]
pub struct SpendWatch {
    enabled: AtomicBool,
    changed: Mutex<HashMap<ScopeKey, Option<TierName>>>,
    notify: Notify,
}

impl SpendWatch {
    /// Starts collecting changed scopes.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    /// Notes the scopes of the usage records among `events`.
    pub(crate) fn note(&self, events: &[Event]) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let mut any = false;
        {
            let mut changed = self.changed.lock().unwrap_or_else(|e| e.into_inner());
            for e in events {
                let usage: &UsageRecord = match e {
                    Event::Committed { usage, .. } | Event::Recorded(usage) => usage,
                    _ => continue,
                };
                if !usage.counts() || usage.cost == spendguard_core::Money::ZERO {
                    continue;
                }
                for scope in usage.scopes() {
                    let tier = matches!(scope, ScopeKey::User(..)).then(|| usage.tier.clone());
                    changed.insert(scope, tier);
                    any = true;
                }
            }
        }
        if any {
            self.notify.notify_one();
        }
    }

    /// Takes the changed scopes (leaving the set empty).
    pub fn take(&self) -> Vec<(ScopeKey, Option<TierName>)> {
        let mut changed = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        changed.drain().collect()
    }

    /// Waits until scopes were noted since the last wait (returns at once if they were).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}
