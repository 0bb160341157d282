//! Integration tests of spendguard-store: the conformance suite on every backend, and the
//! tests particular to each.

mod analytics;
mod browse;
mod conformance;
mod postgres_only;
mod sqlite_only;
mod support;

/// Instantiates every conformance test for one backend: `conformance!(name, make)`, where
/// `make()` returns the database to test on (or `None` to skip).
macro_rules! conformance {
    ($backend:ident, $make:path) => {
        conformance!(@tests $backend, $make;
            conformance::applies_each_event_kind,
            conformance::reapplying_changes_nothing,
            conformance::rollups_equal_recount_after_random_batches,
            conformance::load_returns_current_state,
            conformance::load_streaming_sends_what_load_returns,
            conformance::expired_rows_do_not_count,
            conformance::large_money_values_round_trip,
            conformance::origins_and_truncated_records_round_trip,
            conformance::writer_lock_is_exclusive,
            conformance::migrations_are_versioned,
            conformance::concurrent_batches_are_serializable,
            conformance::large_batches_count_each_record_once,
            conformance::api_keys_round_trip,
            conformance::keyed_reservations_and_settings_round_trip,
            conformance::database_id_is_stable_and_dead_letters_are_kept_once,
            conformance::a_gap_in_the_migrations_is_filled_later,
            conformance::a_broken_schema_is_a_transient_error,
            analytics::reports_match_a_brute_force_sum,
            analytics::user_day_sums_per_model,
            analytics::reapplying_leaves_usage_rollups_unchanged,
            analytics::usage_rollups_saturate,
            analytics::migration_2_backfills_usage_rollups,
            analytics::migration_5_keeps_every_record,
            analytics::migration_10_keeps_every_record,
            conformance::token_kinds_pricings_and_tenant_prices_round_trip,
            analytics::whole_months_read_like_their_days,
            analytics::user_reports_read_whole_weeks_from_week_rows,
            analytics::alerts_are_inserted_exactly_once,
            analytics::alerts_list_newest_first_with_filters,
            analytics::deliveries_move_through_their_states,
            analytics::would_deny_is_counted_once_per_reservation,
            browse::dashboard_reads_match_the_records,
            browse::audit_log_and_acknowledgements_round_trip,
        );
    };
    (@tests $backend:ident, $make:path; $($module:ident :: $test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $test() {
                    let Some(db) = $make().await else { return };
                    crate::$module::$test(&db).await;
                }
            )*
        }
    };
}

conformance!(sqlite, crate::support::make_sqlite);
conformance!(postgres, crate::support::make_pg);
