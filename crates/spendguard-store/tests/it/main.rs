//! Integration tests of spendguard-store: the conformance suite on every backend, and the
//! tests particular to each.

mod conformance;
mod postgres_only;
mod sqlite_only;
mod support;

/// Instantiates every conformance test for one backend: `conformance!(name, make)`, where
/// `make()` returns the database to test on (or `None` to skip).
macro_rules! conformance {
    ($backend:ident, $make:path) => {
        conformance!(@tests $backend, $make;
            applies_each_event_kind,
            reapplying_changes_nothing,
            rollups_equal_recount_after_random_batches,
            load_returns_current_state,
            expired_rows_do_not_count,
            large_money_values_round_trip,
            writer_lock_is_exclusive,
            migrations_are_versioned,
            concurrent_batches_are_serializable,
            large_batches_count_each_record_once,
            api_keys_round_trip,
        );
    };
    (@tests $backend:ident, $make:path; $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $test() {
                    let Some(db) = $make().await else { return };
                    crate::conformance::$test(&db).await;
                }
            )*
        }
    };
}

conformance!(sqlite, crate::support::make_sqlite);
conformance!(postgres, crate::support::make_pg);
