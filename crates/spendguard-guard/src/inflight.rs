//! `InFlight`: the operations whose write is not finished yet, by what a retry of them would
//! repeat (a reservation id, or a tenant's idempotency key).
//!
//! An operation takes a [`Ticket`] for its key before it touches the ledger and hands the
//! ticket to the writer with its event; the writer drops it once the event is durable or,
//! if it could not be made durable, once memory is undone. A retry of the same key waits
//! for the ticket, so it is answered from what is durable: never from memory ahead of the
//! store, and never from an attempt that failed.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Arc, Mutex};

use spendguard_core::{IdempotencyKey, TenantId};
use tokio::sync::watch;
use uuid::Uuid;

const SHARDS: usize = 16;

/// What a retry repeats.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum OpKey {
    /// Commit and release of a reservation.
    Reservation(Uuid),
    /// A keyed reserve or record of a tenant (they share the key space, as in the ledger).
    Key(TenantId, IdempotencyKey),
}

type Shard = Mutex<HashMap<OpKey, watch::Sender<()>>>;

/// The keys of operations in flight.
#[derive(Debug)]
pub(crate) struct InFlight {
    hasher: RandomState,
    shards: Box<[Shard]>,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

/// Held while an operation on a key is in flight; dropping it lets the next one in.
#[derive(Debug)]
pub(crate) struct Ticket {
    inflight: Arc<InFlight>,
    key: OpKey,
}

impl InFlight {
    fn shard(&self, key: &OpKey) -> &Shard {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Waits until no other operation on `key` is in flight, then takes its ticket.
    pub(crate) async fn enter(self: &Arc<Self>, key: OpKey) -> Ticket {
        loop {
            let mut done = {
                let mut map = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
                match map.entry(key.clone()) {
                    Entry::Vacant(v) => {
                        v.insert(watch::channel(()).0);
                        return Ticket {
                            inflight: self.clone(),
                            key,
                        };
                    }
                    // Subscribed under the lock: the holder's drop, which removes the entry
                    // under the same lock, cannot be missed.
                    Entry::Occupied(o) => o.get().subscribe(),
                }
            };
            // Ends when the holder drops the sender.
            while done.changed().await.is_ok() {}
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.inflight
            .shard(&self.key)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_holder_waits_for_the_first() {
        let inflight = Arc::new(InFlight::default());
        let key = OpKey::Reservation(Uuid::from_u128(7));
        let first = inflight.enter(key.clone()).await;
        let other = inflight.enter(OpKey::Reservation(Uuid::from_u128(8))).await;
        let waiter = {
            let inflight = inflight.clone();
            let key = key.clone();
            tokio::spawn(async move { inflight.enter(key).await })
        };
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert!(
            !waiter.is_finished(),
            "entered while the first held the key"
        );
        drop(first);
        let second = waiter.await.unwrap();
        assert_eq!(inflight.len(), 2);
        drop((second, other));
        assert_eq!(inflight.len(), 0);
    }
}
