// Generated from spendguard's /openapi.json by scripts/generate-types.mjs: do not edit.
// Regenerate: node scripts/generate-types.mjs http://127.0.0.1:8080/openapi.json > src/api.d.ts

/** The dashboard's acknowledgement of an alert. */
export interface AckForm {
  /** Where to go afterwards (a path on this site). */
  back?: string | null;
  csrf: string;
}

/** An alert's kind. */
export type AlertKindName = "threshold" | "projected" | "dead_letter" | "soft_threshold";

/** An alert as JSON: in `GET /v1/alerts`, and as a webhook's body. */
export interface AlertOut {
  /** Spend when raised; for `projected`, the projected spend of the month. */
  amount_usd: number | string;
  /**
   * The budget's name: its scope, window and kind (`tenant acme daily budget`, `user u1
   * (tenant acme) monthly soft budget`).
   */
  budget: string;
  created_at: string;
  id: number;
  /** `threshold`, `projected`, `soft_threshold` (a soft budget) or `dead_letter`. */
  kind: AlertKindName;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  limit_usd: number | string;
  message: string;
  scope: ScopeName;
  scope_id: string;
  /** `null` for the global scope. */
  tenant_id: string | null;
  threshold_percent: number;
  /** Always `spendguard.alert` (for receivers that take several kinds of events). */
  type: string;
  window: WindowName;
  window_start: string;
}

export interface AlertParams {
  /** Also alerts of past windows. */
  all?: boolean | null;
  /** At most this many (1 to 100000; default 1000). */
  limit?: number | null;
  /** Admin key: only this tenant (a tenant key always reads its own). */
  tenant_id?: string | null;
}

/** Alerts, newest first. */
export interface AlertsOut {
  alerts: AlertOut[];
}

/** Capacity of a busy scope's budget held by one instance. */
export interface AllowanceHeldOut {
  /** What the instance can still admit against it (null: the window has no cap). */
  free_usd_day: number | string | null;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  free_usd_month: number | string | null;
  /** Capacity moved from the scope's budget to the instance, this day and this month. */
  granted_usd_day: number | string;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  granted_usd_month: number | string;
  instance: string;
  /**
   * Reservations it admitted minus those it settled (below zero when it settled more
   * than it admitted, for other instances).
   */
  open_reservations: number;
  /** `global`, `tenant` or `company`. */
  scope: string;
  /** The tenant or the company; `global` for the global scope. */
  scope_id: string;
  /** The tenant (or the company's tenant); empty for the global scope. */
  tenant_id: string;
}

export interface BudgetBody {
  /** USD per calendar day; `null` clears the override. */
  daily_usd?: number | string | null;
  /** USD per calendar month; `null` clears the override. */
  monthly_usd?: number | string | null;
}

/** The dashboard's budget form (empty amounts clear the override). */
export interface BudgetForm {
  csrf: string;
  daily_usd?: string | null;
  /** The company or user. */
  id?: string | null;
  monthly_usd?: string | null;
  /** global, tenant, company or user. */
  scope: string;
  tenant_id?: string | null;
}

/** A scope's budget: the override set through the admin API and the caps in force. */
export interface BudgetOut {
  /** The caps enforced: the override, else the configuration. */
  effective: CapsOut;
  /** What the admin API set (`null` fields: the configuration applies). */
  override: CapsOut;
  scope: ScopeName;
  scope_id: string;
  /** The tenant of a company or user scope. */
  tenant_id: string | null;
}

/** Every scope with a budget override. */
export interface BudgetsOut {
  budgets: BudgetOut[];
}

/** A daily and a monthly cap (`null`: none). */
export interface CapsOut {
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  daily_usd: number | string | null;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  monthly_usd: number | string | null;
}

/** The answer to a check. */
export interface CheckOut {
  allowed: boolean;
  /** Why it would be refused (`null`: it would be admitted). */
  denial: ErrorDetail | null;
  limits: Limits;
  /**
   * When admitted: what limits in shadow would refuse, had they been enforced (`null`
   * when none would).
   */
  would_deny: ErrorDetail | null;
}

/** `GET /v1/admin/cluster`: the instances sharing this database. */
export interface ClusterOut {
  /** The kinds of scope decided through allowances (cluster mode). */
  allowance_scopes: string[];
  /** Every instance's allowances of busy scopes, by instance and scope. */
  allowances: AllowanceHeldOut[];
  /**
   * How this instance decides: `shared rows` in cluster mode (each batch under the
   * locks of its rows, busy scopes through allowances), `memory` on one node.
   */
  decisions: string;
  /** This instance (cluster mode). */
  instance: InstanceOut | null;
  /** Every instance registered on the database, newest heartbeat first. */
  instances: InstanceOut[];
  /**
   * An instance is live while its last heartbeat is younger than this (its lease):
   * afterwards the others take back its allowances.
   */
  live_within_seconds: number;
  /** `single` or `cluster`. */
  mode: string;
  /** This instance's counters (cluster mode). */
  stats: ClusterStatsOut | null;
}

/** Counters of this instance in a cluster. */
export interface ClusterStatsOut {
  /**
   * Reservations refused by a budget decided through an allowance: at most these were
   * false denials (capacity idle in another live instance's allowance).
   */
  allowance_denials: number;
  /** Allowances of lapsed instances this instance took back. */
  allowance_reclaims: number;
  /**
   * Heartbeats (and the shutdown) that folded this instance's allowances into the rows
   * and gave back what it did not need.
   */
  allowance_returns: number;
  /** Batches that moved capacity from a busy scope's row to this instance. */
  allowance_top_ups: number;
  batches: number;
  config_reloads: number;
  config_version: number;
  failures: number;
  /**
   * Of those, refusals while the cluster had the capacity free, idle in another live
   * instance's allowance (as the batch saw it when it locked the row): false denials.
   */
  false_denials: number;
  heartbeat_failing: boolean;
  /** Live instances as of the last heartbeat, this one included. */
  live_instances: number;
  operations: number;
  retries: number;
}

/** The actual usage of a reserved call. */
export interface CommitBody {
  /** The part of `cache_creation_input_tokens` written to the 1-hour cache. */
  cache_creation_1h_input_tokens?: number | null;
  /**
   * Prompt tokens written to the provider's prompt cache, 1-hour writes included (part of
   * `input_tokens`).
   */
  cache_creation_input_tokens?: number | null;
  cached_input_tokens?: number | null;
  /** The real cost, if known; else computed from the tokens. */
  cost_usd?: number | string | null;
  input_tokens: number;
  output_tokens: number;
  /**
   * Reasoning tokens (part of `output_tokens`); priced apart only where the price list
   * prices them apart.
   */
  reasoning_tokens?: number | null;
  /**
   * `success` (default), `error`, `cancelled` or `truncated` (cut off before its usage
   * was known: a commit is then charged at least its estimate).
   */
  status?: CommitStatus | null;
}

/** A commit's `status` (`expired` is the sweeper's alone). */
export type CommitStatus = "success" | "error" | "cancelled" | "truncated";

/** The answer to a commit: the usage record and how it was settled. */
export interface CommittedOut {
  /** The part of `cache_creation_input_tokens` written to the 1-hour cache. */
  cache_creation_1h_input_tokens: number;
  /** Prompt tokens written to the cache (part of `input_tokens`), 1-hour writes included. */
  cache_creation_input_tokens: number;
  cached_input_tokens: number;
  company_id: string | null;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  cost_usd: number | string;
  created_at: string;
  endpoint: string | null;
  input_tokens: number;
  /** Committed after the reservation expired: recorded on its own. */
  late: boolean;
  /**
   * The long-context tier the call was priced at (its threshold in prompt tokens), when
   * its prompt was above one.
   */
  long_context_above: number | null;
  model: string;
  output_tokens: number;
  /**
   * How `cost_usd` was found: `catalog`, `config`, `tenant_override`, `caller`,
   * `estimate`, `default` or `free`.
   */
  pricing: PricingName;
  /** Reasoning tokens (part of `output_tokens`). */
  reasoning_tokens: number;
  /** The same commit was answered before: this is its record. */
  replayed: boolean;
  request_status: RequestStatusName;
  reservation_id: string | null;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  reserved_cost_usd: number | string;
  subscription_tier: string;
  tenant_id: string;
  usage_id: string;
  user_id: string;
}

/** A dashboard form that carries only the session's CSRF token. */
export interface CsrfForm {
  csrf: string;
}

/** A user's usage on one day. */
export interface DailyOut {
  date: string;
  /** By cost, highest first. */
  models: ModelDayOut[];
  tenant_id: string;
  time_zone: string;
  totals: TotalsOut;
  user_id: string;
}

export interface DailyParams {
  /** Default: today. */
  date?: string | null;
  /** The user's tenant: required with the admin key; a tenant key's own by default. */
  tenant_id?: string | null;
}

/** Every error: `{"error": {"code": ..., "message": ..., ...details}}`. */
export interface ErrorBody {
  error: ErrorDetail;
}

/** Every `error.code` the API answers with. */
export type ErrorCode = "invalid_request" | "malformed_json" | "unsupported_media_type" | "body_too_large" | "unauthorized" | "forbidden" | "not_found" | "method_not_allowed" | "timeout" | "conflict" | "already_settled" | "commit_conflict" | "idempotency_conflict" | "budget_exceeded" | "rate_limited" | "model_not_allowed" | "unknown_model" | "max_output_tokens_exceeded" | "too_many_subjects" | "store_unavailable" | "not_stored" | "starting" | "shutting_down" | "busy" | "internal";

/** A failing limit (in a 429 and in a check's denial). */
export interface ErrorDetail {
  code: ErrorCode;
  /** The failing limits (429). */
  limits?: LimitOut[] | null;
  message: string;
}

/** A report's grouping. */
export type GroupByName = "day" | "tenant" | "company" | "user" | "model" | "endpoint";

/** The process is up. */
export interface HealthOut {
  /** Always `ok`. */
  status: string;
}

/** One instance of a cluster. */
export interface InstanceOut {
  address: string;
  heartbeat_at: string;
  id: string;
  /** Its heartbeat is recent and it did not stop. */
  live: boolean;
  name: string;
  /** RFC 3339. */
  started_at: string;
  stopped_at: string | null;
  version: string;
}

export interface KeyBody {
  tenant_id: string;
}

/** A new key: shown in this answer only. */
export interface KeyCreatedOut {
  created_at: string;
  id: string;
  key: string;
  /** The key's first characters, to recognise it. */
  prefix: string;
  revoked_at: string | null;
  /** `null` for an admin key. */
  tenant_id: string | null;
}

/** The dashboard's form to create a tenant key. */
export interface KeyForm {
  csrf: string;
  tenant_id: string;
}

/** An API key as listings show it (never the key itself). */
export interface KeyOut {
  created_at: string;
  id: string;
  /** The key's first characters, to recognise it. */
  prefix: string;
  revoked_at: string | null;
  /** `null` for an admin key. */
  tenant_id: string | null;
}

/** Every API key. */
export interface KeysOut {
  keys: KeyOut[];
}

/**
 * One limit entry of the contract, serialized without building a JSON tree. The amounts
 * are left out of the global scope's entries shown to a tenant key.
 */
export interface LimitOut {
  /**
   * USD for `usd`, a count otherwise (as for the next three). Left out of the global
   * scope's entries shown to a tenant key.
   */
  limit?: number | null;
  remaining?: number | null;
  reserved?: number | null;
  /** When the window ends (`null`: a concurrency limit). */
  resets_at: string | null;
  scope: ScopeName;
  scope_id: string;
  /**
   * True when the limit is in shadow: counted like the others, but it never refuses a
   * request (where it would have, the answer says so in `would_deny`).
   */
  shadow: boolean;
  unit: UnitName;
  used?: number | null;
  window: WindowName;
}

export type Limits = LimitOut[];

/** A user's effective limits. */
export interface LimitsAnswer {
  limits: Limits;
  tenant_id: string;
  user_id: string;
}

export interface LimitsQuery {
  company_id?: string | null;
  /** The user's tenant: required with the admin key; a tenant key's own by default. */
  tenant_id?: string | null;
  tier?: string | null;
  user_id: string;
}

/** The login form of the dashboard. */
export interface LoginForm {
  /** The admin key or a tenant key. */
  key: string;
}

/**
 * The long-context tier of a price: above `above_tokens` prompt tokens, these replace the
 * base prices (USD per million tokens).
 */
export interface LongContextOut {
  above_tokens: number;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  cache_write: number | string;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  cache_write_1h: number | string;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  cached_input: number | string;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  input: number | string;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  output: number | string;
}

/**
 * A long-context tier of a price in a request: above `above_tokens` prompt tokens these
 * replace the base prices (USD per million tokens).
 */
export interface LongContextSchema {
  above_tokens: number;
  cache_write?: number | string | null;
  cache_write_1h?: number | string | null;
  cached_input?: number | string | null;
  /** USD as a number or a decimal string ("0.75"), parsed exactly */
  input: number | string;
  /** USD as a number or a decimal string ("0.75"), parsed exactly */
  output: number | string;
}

/** One model's share of a user's day. */
export interface ModelDayOut {
  cached_input_tokens: number;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  cost_usd: number | string;
  input_tokens: number;
  model: string;
  output_tokens: number;
  requests: number;
  total_tokens: number;
}

/** What new reservations get while the store cannot be written. */
export type OnStoreErrorName = "spool" | "deny";

/**
 * One model's effective price (token prices in USD per million tokens) and where it came
 * from.
 */
export interface PriceOut {
  /** Prompt tokens written to the 5-minute cache. */
  cache_write: number | string;
  /** Prompt tokens written to the 1-hour cache. */
  cache_write_1h: number | string;
  /** Prompt tokens read from the cache. */
  cached_input: number | string;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  input: number | string;
  long_context: LongContextOut | null;
  /** The model name; dated names (`gpt-4o-2024-08-06`) resolve to it. */
  model: string;
  /** The tenant's multiplier, when it scales this price. */
  multiplier: number | null;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  output: number | string;
  /** USD per input image (shown, not charged: records carry no image counts). */
  per_image_input: number | string | null;
  /** USD per generated image (shown, not charged). */
  per_image_output: number | string | null;
  /** USD per call, on top of the tokens. */
  per_request: number | string | null;
  /** The catalog's provider name (LiteLLM's `litellm_provider`), for a catalog price. */
  provider: string | null;
  /** Reasoning tokens (the output price unless priced apart). */
  reasoning: number | string;
  /**
   * Where the price came from: `catalog`, `config`, `tenant_override`, or for a model
   * without a price, `default` (the configured default price) or `free`.
   */
  source: PriceSourceName;
}

/**
 * A model's price in a request, USD per million tokens (per-request and per-image prices:
 * USD each), as in the configuration's `[prices]`.
 */
export interface PriceSchema {
  /** The 5-minute cache write; defaults to `input`. */
  cache_write?: number | string | null;
  /** The 1-hour cache write; defaults to `cache_write`. */
  cache_write_1h?: number | string | null;
  /** Defaults to `input`. */
  cached_input?: number | string | null;
  /** USD as a number or a decimal string ("0.75"), parsed exactly */
  input: number | string;
  long_context?: LongContextSchema | null;
  /** USD as a number or a decimal string ("0.75"), parsed exactly */
  output: number | string;
  per_image_input?: number | string | null;
  per_image_output?: number | string | null;
  per_request?: number | string | null;
  /** Defaults to `output`. */
  reasoning?: number | string | null;
}

/** Where a price came from. */
export type PriceSourceName = "catalog" | "config" | "tenant_override" | "default" | "free";

/** The unit of prices. */
export type PriceUnit = "usd_per_million_tokens";

/** The price table the server charges by. */
export interface PricesOut {
  /** The built-in catalog's source: the LiteLLM version and snapshot date. */
  catalog: string;
  /** The price of unknown models under `unknown_model = "default_cost"`. */
  default_price: PriceOut | null;
  /** By model name; with `?model=`, that model's effective price alone. */
  models: PriceOut[];
  /** The tenant whose overrides the prices include, if any. */
  tenant_id: string | null;
  /** Always `usd_per_million_tokens` (per-request and per-image prices: USD each). */
  unit: PriceUnit;
  /** What happens to a model not in the table. */
  unknown_model: UnknownModel;
}

/** `GET /v1/prices` parameters. */
export interface PricesQuery {
  /** One model's effective price (dated names resolve), and where it came from. */
  model?: string | null;
  /** Include this tenant's price overrides (a tenant key: its own tenant, the default). */
  tenant_id?: string | null;
}

/** How a usage record's cost was found. */
export type PricingName = "catalog" | "config" | "tenant_override" | "caller" | "estimate" | "default" | "free";

/** Whether reservations are admitted, and the write path's state. */
export interface ReadyOut {
  /** Events the store refused for good since start, kept as dead letters. */
  dead_letters: number;
  on_store_error: OnStoreErrorName;
  /** Why the service is not ready (the spool, the writer, the sweeper, deny mode). */
  problems: string[];
  ready: boolean;
  /** Batches waiting in the spool for the store. */
  spool_depth: number;
  store: StoreHealthName;
}

export interface ReleaseBody {
  reason?: string | null;
}

/**
 * The answer to a release: the state the reservation is in (a release of a reservation
 * already released or expired answers the same).
 */
export interface ReleasedOut {
  reservation_id: string;
  state: SettledName;
}

/** A report's format. */
export type ReportFormat = "json" | "csv";

/** A usage report. */
export interface ReportOut {
  from: string;
  group_by: GroupByName;
  /** How many groups there are (`rows` may hold fewer, with `limit`). */
  groups: number;
  /** When not null, `?cursor=` this fetches the next page of rows. */
  next_cursor: string | null;
  rows: ReportRowOut[];
  /** The tenant the report is restricted to, if any. */
  tenant_id: string | null;
  /** The IANA time zone the days are counted in. */
  time_zone: string;
  to: string;
  /** The sums over every group. */
  totals: TotalsOut;
  /**
   * Reservations of the range (and tenant) that were admitted although a limit in shadow
   * would have refused them, by the reason it would have given.
   */
  would_deny?: WouldDenyOut | null;
}

export interface ReportParams {
  /** Where the previous page ended (its `next_cursor`). */
  cursor?: string | null;
  /** Default `json`. */
  format?: ReportFormat | null;
  /** The first day (default: 29 days before `to`). */
  from?: string | null;
  /** Default `day`. */
  group_by?: GroupByName | null;
  /** Keep the top N groups (1 to 100000). */
  limit?: number | null;
  /** Admin key: only this tenant (a tenant key always reads its own). */
  tenant_id?: string | null;
  /** The last day (default: today). */
  to?: string | null;
}

/** One row of a report: the grouping's key columns (only those), then the sums. */
export interface ReportRowOut {
  cached_input_tokens: number;
  /** With `group_by=company`; `null`: usage without a company. */
  company_id?: string | null;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  cost_usd: number | string;
  /** With `group_by=day`. */
  day?: string | null;
  /** With `group_by=endpoint`; `null`: usage without an endpoint. */
  endpoint?: string | null;
  input_tokens: number;
  /** With `group_by=model`. */
  model?: string | null;
  output_tokens: number;
  requests: number;
  /** With `group_by=tenant`, `company` and `user`. */
  tenant_id?: string | null;
  total_tokens: number;
  /** With `group_by=user`. */
  user_id?: string | null;
}

/** How a call ended. */
export type RequestStatusName = "success" | "error" | "cancelled" | "expired" | "truncated";

/** Who calls which model (on reserve, check and record). */
export interface ReserveBody {
  company_id?: string | null;
  endpoint?: string | null;
  /** A worst-case cost instead of the price-table estimate (number or decimal string). */
  estimated_cost_usd?: number | string | null;
  idempotency_key?: string | null;
  input_tokens: number;
  /** Defaults to the tier's maximum. */
  max_output_tokens?: number | null;
  model: string;
  tenant_id: string;
  /** The user's tier; else the stored tier; else the configured default. */
  tier?: string | null;
  ttl_seconds?: number | null;
  user_id: string;
}

/** The answer to an admitted reservation. */
export interface ReservedOut {
  expires_at: string;
  limits: Limits;
  /** The same idempotency key and body were answered before (status 200). */
  replayed: boolean;
  reservation_id: string;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  reserved_cost_usd: number | string;
  reserved_tokens: number;
  tier: string;
  /**
   * What limits in shadow would have refused, had they been enforced (the error a
   * refusal carries: `code`, `message`, `limits`); `null` when none would have. The
   * reservation is admitted either way.
   */
  would_deny: ErrorDetail | null;
}

/** A revoked key. */
export interface RevokedOut {
  id: string;
  revoked: boolean;
}

/** The kind of a budget's scope. */
export type ScopeName = "global" | "tenant" | "company" | "user";

/** The state a release left a reservation in. */
export type SettledName = "released" | "expired" | "committed";

/** The write path's state. */
export type StoreHealthName = "ok" | "spooling";

/** A tenant's negotiated prices. */
export interface TenantPricesBody {
  /**
   * Explicit prices by model name (USD per million tokens, as in the configuration's
   * `[prices]`); they beat the configured and catalog prices and are not scaled.
   */
  models?: {
    [key: string]: PriceSchema;
  };
  /**
   * A multiplier on every configured or catalog price (`0.85`: 15% off), exact to six
   * decimals, at most 1000; absent or null: none.
   */
  multiplier?: number | string | null;
}

/** A tenant's stored price overrides. */
export interface TenantPricesOut {
  /** The tenant's own prices, by model name. */
  models: PriceOut[];
  multiplier: number | null;
  tenant_id: string;
}

export interface TenantQuery {
  tenant_id?: string | null;
}

/** Sums as JSON (money as a USD number). */
export interface TotalsOut {
  cached_input_tokens: number;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  cost_usd: number | string;
  input_tokens: number;
  output_tokens: number;
  requests: number;
  total_tokens: number;
}

/** What a limit counts. */
export type UnitName = "usd" | "requests" | "tokens" | "concurrent";

/** What happens to a model with no price. */
export type UnknownModel = "deny" | "default_cost" | "free";

/** Usage of a call that was not reserved. */
export interface UsageBody {
  /** The part of `cache_creation_input_tokens` written to the 1-hour cache. */
  cache_creation_1h_input_tokens?: number | null;
  /**
   * Prompt tokens written to the provider's prompt cache, 1-hour writes included (part of
   * `input_tokens`).
   */
  cache_creation_input_tokens?: number | null;
  cached_input_tokens?: number | null;
  company_id?: string | null;
  cost_usd?: number | string | null;
  /**
   * When the call was made (RFC 3339), for importing history: admin key only; from
   * 1970 to now. The record counts in the day and month of that time.
   */
  created_at?: string | null;
  endpoint?: string | null;
  idempotency_key?: string | null;
  input_tokens: number;
  model: string;
  output_tokens: number;
  /**
   * Reasoning tokens (part of `output_tokens`); priced apart only where the price list
   * prices them apart.
   */
  reasoning_tokens?: number | null;
  /**
   * `success` (default), `error`, `cancelled` or `truncated` (cut off before its usage
   * was known: a commit is then charged at least its estimate).
   */
  status?: CommitStatus | null;
  tenant_id: string;
  tier?: string | null;
  user_id: string;
}

/** A usage record as the API shows it. */
export interface UsageOut {
  /** The part of `cache_creation_input_tokens` written to the 1-hour cache. */
  cache_creation_1h_input_tokens: number;
  /** Prompt tokens written to the cache (part of `input_tokens`), 1-hour writes included. */
  cache_creation_input_tokens: number;
  cached_input_tokens: number;
  company_id: string | null;
  /** USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string ("9223372036854.775807"), which a float cannot hold to the micro-dollar */
  cost_usd: number | string;
  created_at: string;
  endpoint: string | null;
  input_tokens: number;
  /**
   * The long-context tier the call was priced at (its threshold in prompt tokens), when
   * its prompt was above one.
   */
  long_context_above: number | null;
  model: string;
  output_tokens: number;
  /**
   * How `cost_usd` was found: `catalog`, `config`, `tenant_override`, `caller`,
   * `estimate`, `default` or `free`.
   */
  pricing: PricingName;
  /** Reasoning tokens (part of `output_tokens`). */
  reasoning_tokens: number;
  request_status: RequestStatusName;
  reservation_id: string | null;
  subscription_tier: string;
  tenant_id: string;
  usage_id: string;
  user_id: string;
}

/** The dashboard's user tier form (an empty tier: the default). */
export interface UserForm {
  csrf: string;
  tenant_id: string;
  tier?: string | null;
  user_id: string;
}

/** A user's stored tier and limit overrides (`null`: the tier's). */
export interface UserOut {
  overrides: UserOverridesSchema;
  tenant_id: string;
  user_id: string;
}

/**
 * A user's tier and limit overrides (`PUT /v1/admin/users/{user_id}`): each field set wins
 * over the tier; an empty object clears them.
 */
export interface UserOverridesSchema {
  /** Glob patterns (`gpt-4o*`). */
  allowed_models?: string[] | null;
  max_concurrent?: number | null;
  max_output_tokens?: number | null;
  requests_per_day?: number | null;
  requests_per_minute?: number | null;
  tier?: string | null;
  tokens_per_day?: number | null;
}

/** Every user with stored overrides. */
export interface UsersOut {
  users: UserOut[];
}

/** A limit's window. */
export type WindowName = "minute" | "day" | "month" | "none";

/** Would-be denials (shadow mode) by reason, and their total. */
export interface WouldDenyOut {
  budget_exceeded: number;
  max_output_tokens_exceeded: number;
  model_not_allowed: number;
  rate_limited: number;
  total: number;
}
