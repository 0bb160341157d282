// Compiled by `tsc -p .` (never run): the client's declarations fit the generated API
// types, and a typical use type-checks.
import {
  LimitExceededError,
  SpendGuard,
  usageOf,
  type CommittedOut,
  type DailyOut,
  type ReservedOut,
  type Usage,
} from "../src/index.js";

export async function example(): Promise<string> {
  const sg = new SpendGuard({ baseUrl: "http://127.0.0.1:8080", apiKey: "sg_key" });
  const r: ReservedOut = await sg.reserve({
    tenant_id: "acme",
    user_id: "alice",
    model: "gpt-4o-mini",
    input_tokens: 1000,
    max_output_tokens: 500,
  });
  const c: CommittedOut = await sg.commit(r.reservation_id, {
    input_tokens: 900,
    cached_input_tokens: 100,
    output_tokens: 120,
  });
  const day: DailyOut = await sg.dailyUsage("alice", { tenant_id: "acme" });
  const u: Usage | null = usageOf({ usage: { prompt_tokens: 1, completion_tokens: 2 } });
  try {
    const text = await sg.guard(
      { tenant_id: "acme", user_id: "alice", model: "claude-haiku-4-5" },
      { input_tokens: 10, max_output_tokens: 100 },
      async (res) => ({ id: res.reservation_id, usage: { input_tokens: 1, output_tokens: 2 } }),
      { onCommit: (x) => x.cost_usd },
    );
    return text.id + c.request_status + day.totals.cost_usd + (u?.input_tokens ?? 0);
  } catch (e) {
    if (e instanceof LimitExceededError) return `${e.code} ${e.retryAfter ?? ""} ${e.limits.length}`;
    throw e;
  }
}
