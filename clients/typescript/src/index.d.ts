// Types of spendguard's client. The request and answer shapes (api.d.ts) are generated
// from the server's /openapi.json.

import type {
  AlertParams,
  AlertsOut,
  CheckOut,
  CommitBody,
  CommittedOut,
  DailyOut,
  ErrorBody,
  LimitOut,
  LimitsAnswer,
  LimitsQuery,
  ReleaseBody,
  ReleasedOut,
  ReportOut,
  ReportParams,
  ReserveBody,
  ReservedOut,
  UsageBody,
  UsageOut,
} from "./api.js";

export type * from "./api.js";

/** Any error answer of spendguard (`{"error": {"code", "message", ...}}`). */
export declare class SpendGuardError extends Error {
  /** The HTTP status. */
  readonly status: number;
  /** `error.code`, e.g. `budget_exceeded`, `unknown_model`, `not_found`. */
  readonly code: string;
  /** The failing limits (429). */
  readonly limits: LimitOut[];
  /** Seconds from the `Retry-After` header, or `null`. */
  readonly retryAfter: number | null;
  /** The whole error body. */
  readonly body: ErrorBody | null;
}

/** A refusal by a limit (429: `budget_exceeded`, `rate_limited`, `too_many_subjects`). */
export declare class LimitExceededError extends SpendGuardError {}

/** spendguard could not be reached (or did not answer in time). */
export declare class ConnectionError extends Error {}

/** Who calls which model: the subject of a reservation. */
export type Subject = Pick<
  ReserveBody,
  "tenant_id" | "user_id" | "model" | "company_id" | "endpoint" | "tier"
>;

/** The worst case to reserve: tokens (priced by spendguard) or a cost. */
export type Estimate = Pick<
  ReserveBody,
  "input_tokens" | "max_output_tokens" | "estimated_cost_usd" | "ttl_seconds" | "idempotency_key"
>;

/** The usage of a call in spendguard's terms (`input_tokens` includes the cached ones). */
export interface Usage {
  input_tokens: number;
  cached_input_tokens?: number;
  output_tokens: number;
  cost_usd?: number | string;
}

export interface ClientOptions {
  /** Where spendguard listens, e.g. `http://127.0.0.1:8080`. */
  baseUrl: string;
  /** A tenant key (or the admin key). */
  apiKey: string;
  /** Another `fetch` (default: the global one). */
  fetch?: typeof fetch;
  /** Per request (default 10,000). */
  timeoutMs?: number;
  /** Tries again after a network error or a 503 (default 2). */
  retries?: number;
}

export interface GuardOptions<T> {
  /** Reads the usage from the result (default: `usageOf`, OpenAI and Anthropic responses). */
  usage?: (result: T) => Usage | null;
  /** Called with the usage record once committed. */
  onCommit?: (committed: CommittedOut) => void;
  /** Called when releasing after a failed call fails (the call's error is still thrown). */
  onReleaseError?: (error: unknown) => void;
}

/** The usage an OpenAI or Anthropic response reports, or `null`. */
export declare function usageOf(response: unknown): Usage | null;

/** A fresh idempotency key. */
export declare function idempotencyKey(): string;

export declare class SpendGuard {
  constructor(options: ClientOptions);
  readonly baseUrl: string;
  /**
   * Any call of the API (`path` from `/v1/...`), with the client's key, retries and typed
   * errors; the answer's JSON.
   */
  request<T = unknown>(
    method: string,
    path: string,
    options?: { body?: unknown; query?: Record<string, string | number | boolean | null | undefined> },
  ): Promise<T>;
  reserve(body: ReserveBody): Promise<ReservedOut>;
  commit(reservationId: string, body: CommitBody): Promise<CommittedOut>;
  release(reservationId: string, body?: ReleaseBody): Promise<ReleasedOut>;
  record(body: UsageBody): Promise<UsageOut>;
  check(body: ReserveBody): Promise<CheckOut>;
  limits(query: LimitsQuery): Promise<LimitsAnswer>;
  dailyUsage(
    userId: string,
    query?: { date?: string; tenant_id?: string },
  ): Promise<DailyOut>;
  alerts(query?: AlertParams): Promise<AlertsOut>;
  report(query?: Omit<ReportParams, "format">): Promise<ReportOut>;
  /**
   * Reserves `estimate` for `subject`, runs `fn`, commits the usage its result reports and
   * returns the result; releases the reservation and rethrows when `fn` throws.
   */
  guard<T>(
    subject: Subject,
    estimate: Estimate,
    fn: (reservation: ReservedOut) => Promise<T> | T,
    options?: GuardOptions<T>,
  ): Promise<T>;
}
