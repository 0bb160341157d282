// spendguard's TypeScript/JavaScript client: the HTTP API over `fetch`, typed errors, and
// `guard()`, which reserves before a model call, commits the usage the provider reported
// and releases the reservation when the call throws. No dependencies: Node 18 or later,
// Deno, Bun, browsers and edge runtimes. Types: index.d.ts and api.d.ts.

/** HTTP statuses and codes of a refusal by a limit. */
const LIMIT_CODES = new Set(["budget_exceeded", "rate_limited", "too_many_subjects"]);

/** Any error answer of spendguard (`{"error": {"code", "message", ...}}`). */
export class SpendGuardError extends Error {
  constructor(status, body, headers) {
    const detail = (body && typeof body === "object" && body.error) || {};
    super(detail.message || `spendguard answered ${status}`);
    this.name = "SpendGuardError";
    /** The HTTP status. */
    this.status = status;
    /** `error.code`, e.g. `budget_exceeded`, `unknown_model`, `not_found`. */
    this.code = detail.code || "http_" + status;
    /** The failing limits (429, and a check's denial). */
    this.limits = Array.isArray(detail.limits) ? detail.limits : [];
    /** Seconds from `Retry-After`, or `null`. */
    this.retryAfter = parseRetryAfter(headers?.get?.("retry-after"));
    /** The whole error body. */
    this.body = body;
  }
}

/** A refusal by a limit (429: `budget_exceeded`, `rate_limited`, `too_many_subjects`). */
export class LimitExceededError extends SpendGuardError {
  constructor(status, body, headers) {
    super(status, body, headers);
    this.name = "LimitExceededError";
  }
}

/** spendguard could not be reached (or did not answer in time). */
export class ConnectionError extends Error {
  constructor(message, cause) {
    super(message, { cause });
    this.name = "ConnectionError";
  }
}

function parseRetryAfter(value) {
  if (value == null || value === "") return null;
  const n = Number(value);
  if (Number.isFinite(n)) return n;
  const at = Date.parse(value);
  return Number.isNaN(at) ? null : Math.max(0, Math.ceil((at - Date.now()) / 1000));
}

// Web Crypto: global on Node 19+, Deno, Bun, browsers and edge runtimes; on Node 18 it is
// `node:crypto`'s (imported by a computed name, so bundlers for the edge leave it alone).
const nodeCrypto = "node:crypto";
const webcrypto =
  globalThis.crypto ?? (await import(nodeCrypto).then((m) => m.webcrypto, () => undefined));

/** A fresh idempotency key (`sg-` and a random UUID). */
export function idempotencyKey() {
  if (!webcrypto?.randomUUID) throw new Error("no Web Crypto (crypto.randomUUID) in this runtime");
  return "sg-" + webcrypto.randomUUID();
}

const num = (v) => (typeof v === "number" && Number.isFinite(v) && v > 0 ? Math.trunc(v) : 0);
const has = (o, k) => o != null && typeof o === "object" && o[k] !== undefined && o[k] !== null;

/**
 * The usage an OpenAI or Anthropic response reports, in spendguard's terms, or `null` when
 * it reports none. OpenAI chat completions and embeddings (`prompt_tokens`, cached in
 * `prompt_tokens_details.cached_tokens`), the Responses API (`input_tokens`,
 * `input_tokens_details.cached_tokens`) and Anthropic messages (`input_tokens` plus
 * `cache_read_input_tokens` and `cache_creation_input_tokens`: spendguard's input counts
 * all prompt tokens; cache reads are its cached input, cache writes are charged as input).
 */
export function usageOf(response) {
  const u = response?.usage;
  if (u == null || typeof u !== "object") return null;
  if (has(u, "prompt_tokens")) {
    return {
      input_tokens: num(u.prompt_tokens),
      cached_input_tokens: num(u.prompt_tokens_details?.cached_tokens),
      output_tokens: num(u.completion_tokens),
    };
  }
  if (!has(u, "input_tokens")) return null;
  const anthropic =
    response.type === "message" ||
    has(u, "cache_read_input_tokens") ||
    has(u, "cache_creation_input_tokens");
  if (anthropic) {
    const read = num(u.cache_read_input_tokens);
    return {
      input_tokens: num(u.input_tokens) + read + num(u.cache_creation_input_tokens),
      cached_input_tokens: read,
      output_tokens: num(u.output_tokens),
    };
  }
  return {
    input_tokens: num(u.input_tokens),
    cached_input_tokens: num(u.input_tokens_details?.cached_tokens),
    output_tokens: num(u.output_tokens),
  };
}

/** A client of one spendguard server. */
export class SpendGuard {
  /**
   * @param {{baseUrl: string, apiKey: string, fetch?: typeof fetch, timeoutMs?: number,
   *   retries?: number}} options
   */
  constructor(options) {
    if (!options?.baseUrl) throw new TypeError("baseUrl is required");
    if (!options.apiKey) throw new TypeError("apiKey is required");
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.apiKey = options.apiKey;
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.retries = options.retries ?? 2;
  }

  /**
   * One call. Every call is safe to repeat (reservations and records carry an idempotency
   * key, commits and releases answer a repeat with the first result), so a call that
   * could not reach the server, or found it unavailable (503), is tried again.
   */
  async request(method, path, { body, query } = {}) {
    let url = this.baseUrl + path;
    if (query) {
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(query)) if (v != null) q.set(k, String(v));
      const s = q.toString();
      if (s) url += "?" + s;
    }
    const headers = { authorization: `Bearer ${this.apiKey}`, accept: "application/json" };
    if (body !== undefined) headers["content-type"] = "application/json";
    for (let attempt = 0; ; attempt++) {
      let res;
      try {
        res = await this.fetch(url, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          signal: AbortSignal.timeout(this.timeoutMs),
        });
      } catch (e) {
        if (attempt < this.retries) {
          await sleep(100 * 2 ** attempt);
          continue;
        }
        throw new ConnectionError(`${method} ${path}: ${e?.message ?? e}`, e);
      }
      const text = await res.text();
      let data = null;
      try {
        data = text ? JSON.parse(text) : null;
      } catch {
        data = { error: { code: "http_" + res.status, message: text.slice(0, 200) } };
      }
      if (res.ok) return data;
      if (res.status === 503 && attempt < this.retries) {
        const wait = parseRetryAfter(res.headers.get("retry-after")) ?? 1;
        await sleep(Math.min(wait, 2) * 1000);
        continue;
      }
      const code = data?.error?.code;
      const Err = res.status === 429 || LIMIT_CODES.has(code) ? LimitExceededError : SpendGuardError;
      throw new Err(res.status, data, res.headers);
    }
  }

  /** `POST /v1/reservations` (an idempotency key is added when the body has none). */
  reserve(body) {
    return this.request("POST", "/v1/reservations", {
      body: { ...body, idempotency_key: body.idempotency_key ?? idempotencyKey() },
    });
  }

  /** `POST /v1/reservations/{id}/commit`. */
  commit(reservationId, body) {
    return this.request("POST", `/v1/reservations/${encodeURIComponent(reservationId)}/commit`, {
      body,
    });
  }

  /** `POST /v1/reservations/{id}/release`. */
  release(reservationId, body = {}) {
    return this.request("POST", `/v1/reservations/${encodeURIComponent(reservationId)}/release`, {
      body,
    });
  }

  /** `POST /v1/usage`: a call that was not reserved (an idempotency key is added). */
  record(body) {
    return this.request("POST", "/v1/usage", {
      body: { ...body, idempotency_key: body.idempotency_key ?? idempotencyKey() },
    });
  }

  /** `POST /v1/check`: would this reservation be admitted? Changes nothing. */
  check(body) {
    return this.request("POST", "/v1/check", { body });
  }

  /** `GET /v1/limits`. */
  limits(query) {
    return this.request("GET", "/v1/limits", { query });
  }

  /** `GET /v1/users/{user_id}/daily-usage`. */
  dailyUsage(userId, query = {}) {
    return this.request("GET", `/v1/users/${encodeURIComponent(userId)}/daily-usage`, { query });
  }

  /** `GET /v1/alerts`. */
  alerts(query = {}) {
    return this.request("GET", "/v1/alerts", { query });
  }

  /** `GET /v1/reports/usage` (JSON). */
  report(query = {}) {
    return this.request("GET", "/v1/reports/usage", { query: { ...query, format: "json" } });
  }

  /**
   * Reserves `estimate` for `subject`, runs `fn(reservation)`, commits the usage its result
   * reports (an OpenAI or Anthropic response, or `options.usage(result)`), and returns the
   * result. If `fn` throws, the reservation is released and the error rethrown. A result
   * without usage is committed as `truncated`: charged the estimate, never $0. A refusal
   * throws `LimitExceededError` before `fn` runs.
   */
  async guard(subject, estimate, fn, options = {}) {
    const reservation = await this.reserve({ ...subject, ...estimate });
    let result;
    try {
      result = await fn(reservation);
    } catch (e) {
      try {
        await this.release(reservation.reservation_id, {
          reason: `the call failed: ${String(e?.message ?? e).slice(0, 200)}`,
        });
      } catch (releaseError) {
        // The reservation expires after its TTL; the call's own error is the one to see.
        options.onReleaseError?.(releaseError);
      }
      throw e;
    }
    const usage = options.usage ? options.usage(result) : usageOf(result);
    const body = usage
      ? { cached_input_tokens: 0, ...usage }
      : { input_tokens: 0, output_tokens: 0, status: "truncated" };
    const committed = await this.commit(reservation.reservation_id, body);
    options.onCommit?.(committed);
    return result;
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
