import assert from "node:assert/strict";
import { test } from "node:test";

import { LimitExceededError, SpendGuard, SpendGuardError, usageOf } from "../src/index.js";
import { admin, tenant, today, unique } from "./support.mjs";

const subject = (tenantId, userId, model = "gpt-4o-mini") => ({
  tenant_id: tenantId,
  user_id: userId,
  model,
  tier: "pro",
});

/** The user's usage-day limit entry (`user`, `day`, `usd`). */
async function userDayUsd(client, tenantId, userId) {
  const { limits } = await client.limits({ tenant_id: tenantId, user_id: userId });
  const entry = limits.find((l) => l.scope === "user" && l.window === "day" && l.unit === "usd");
  assert.ok(entry, JSON.stringify(limits));
  return entry;
}

test("reserve then commit records the usage, and the day shows it", async () => {
  const { tenantId, client } = await tenant();
  const user = unique("u");
  const r = await client.reserve({ ...subject(tenantId, user), input_tokens: 1000, max_output_tokens: 500 });
  assert.equal(r.replayed, false);
  assert.ok(r.reserved_cost_usd > 0);
  assert.equal((await userDayUsd(client, tenantId, user)).reserved, r.reserved_cost_usd);
  const c = await client.commit(r.reservation_id, {
    input_tokens: 900,
    cached_input_tokens: 100,
    output_tokens: 120,
  });
  assert.equal(c.reservation_id, r.reservation_id);
  assert.deepEqual(
    [c.input_tokens, c.cached_input_tokens, c.output_tokens, c.request_status, c.pricing],
    [900, 100, 120, "success", "catalog"],
  );
  // The same commit again answers the same record.
  const again = await client.commit(r.reservation_id, {
    input_tokens: 900,
    cached_input_tokens: 100,
    output_tokens: 120,
  });
  assert.equal(again.usage_id, c.usage_id);
  assert.equal(again.replayed, true);
  const entry = await userDayUsd(client, tenantId, user);
  assert.equal(entry.reserved, 0);
  assert.equal(entry.used, c.cost_usd);
  const day = await client.dailyUsage(user, { date: today() });
  assert.equal(day.tenant_id, tenantId);
  assert.equal(day.totals.requests, 1);
  assert.equal(day.totals.cost_usd, c.cost_usd);
  assert.deepEqual(day.models.map((m) => m.model), ["gpt-4o-mini"]);
});

test("each reservation gets its own idempotency key; a given key replays", async () => {
  const { tenantId, client } = await tenant();
  const body = { ...subject(tenantId, unique("u")), input_tokens: 10, max_output_tokens: 10 };
  const a = await client.reserve(body);
  const b = await client.reserve(body);
  assert.notEqual(a.reservation_id, b.reservation_id);
  const key = unique("key");
  const c = await client.reserve({ ...body, idempotency_key: key });
  const d = await client.reserve({ ...body, idempotency_key: key });
  assert.equal(d.reservation_id, c.reservation_id);
  assert.equal(d.replayed, true);
});

test("a refusal is a LimitExceededError with its code, limits and Retry-After", async () => {
  const { tenantId, client } = await tenant();
  const user = unique("u");
  await admin.request("PUT", `/v1/admin/budgets/user/${user}`, {
    query: { tenant_id: tenantId },
    body: { daily_usd: "0.01" },
  });
  const err = await client
    .reserve({ ...subject(tenantId, user), input_tokens: 10, estimated_cost_usd: "0.02" })
    .then(() => assert.fail("the reservation was admitted"), (e) => e);
  assert.ok(err instanceof LimitExceededError, String(err));
  assert.ok(err instanceof SpendGuardError);
  assert.equal(err.status, 429);
  assert.equal(err.code, "budget_exceeded");
  assert.ok(Number.isInteger(err.retryAfter) && err.retryAfter > 0, `retryAfter ${err.retryAfter}`);
  assert.ok(err.retryAfter <= 86_400);
  assert.deepEqual(
    err.limits.map((l) => [l.scope, l.scope_id, l.window, l.unit, l.limit]),
    [["user", user, "day", "usd", 0.01]],
  );
  // Other errors carry their code too.
  const missing = await client
    .commit("01890000-0000-7000-8000-000000000000", { input_tokens: 1, output_tokens: 1 })
    .then(() => assert.fail("committed an unknown reservation"), (e) => e);
  assert.ok(missing instanceof SpendGuardError && !(missing instanceof LimitExceededError));
  assert.deepEqual([missing.status, missing.code], [404, "not_found"]);
  const bad = new SpendGuard({ baseUrl: admin.baseUrl, apiKey: "sg_wrong" });
  const unauthorized = await bad.alerts().then(() => assert.fail("no 401"), (e) => e);
  assert.deepEqual([unauthorized.status, unauthorized.code], [401, "unauthorized"]);
});

test("guard releases the reservation when the call throws", async () => {
  const { tenantId, client } = await tenant();
  const user = unique("u");
  let held;
  const boom = new Error("the provider is down");
  const err = await client
    .guard(subject(tenantId, user), { input_tokens: 1000, max_output_tokens: 1000 }, async (r) => {
      held = r;
      assert.equal((await userDayUsd(client, tenantId, user)).reserved, r.reserved_cost_usd);
      throw boom;
    })
    .then(() => assert.fail("guard returned"), (e) => e);
  assert.equal(err, boom);
  const entry = await userDayUsd(client, tenantId, user);
  assert.deepEqual([entry.used, entry.reserved], [0, 0]);
  const again = await client.release(held.reservation_id);
  assert.equal(again.state, "released");
  const day = await client.dailyUsage(user, { date: today() });
  assert.equal(day.totals.requests, 0);
});

test("guard refuses before the call when a limit is reached", async () => {
  const { tenantId, client } = await tenant();
  const user = unique("u");
  await admin.request("PUT", `/v1/admin/budgets/user/${user}`, {
    query: { tenant_id: tenantId },
    body: { daily_usd: "0.000001" },
  });
  let ran = false;
  const err = await client
    .guard(subject(tenantId, user), { input_tokens: 1000, max_output_tokens: 1000 }, () => {
      ran = true;
    })
    .then(() => assert.fail("admitted"), (e) => e);
  assert.ok(err instanceof LimitExceededError);
  assert.ok(err.retryAfter > 0);
  assert.equal(ran, false);
});

/** The cost spendguard charges a direct record of these tokens (to compare exactly). */
async function costOf(client, tenantId, model, usage) {
  const r = await client.record({ ...subject(tenantId, unique("ref"), model), ...usage });
  return r.cost_usd;
}

test("guard commits the usage of an OpenAI chat completion (cached tokens included)", async () => {
  const { tenantId, client } = await tenant();
  const user = unique("u");
  const completion = {
    id: "chatcmpl-1",
    object: "chat.completion",
    model: "gpt-4o-mini-2024-07-18",
    choices: [{ index: 0, message: { role: "assistant", content: "Hi" }, finish_reason: "stop" }],
    usage: {
      prompt_tokens: 1200,
      completion_tokens: 300,
      total_tokens: 1500,
      prompt_tokens_details: { cached_tokens: 200 },
      completion_tokens_details: { reasoning_tokens: 0 },
    },
  };
  let committed;
  const out = await client.guard(
    subject(tenantId, user),
    { input_tokens: 1200, max_output_tokens: 1000 },
    async () => completion,
    { onCommit: (c) => (committed = c) },
  );
  assert.equal(out, completion);
  assert.deepEqual(
    [committed.input_tokens, committed.cached_input_tokens, committed.output_tokens],
    [1200, 200, 300],
  );
  const expected = await costOf(client, tenantId, "gpt-4o-mini", {
    input_tokens: 1200,
    cached_input_tokens: 200,
    output_tokens: 300,
  });
  assert.equal(committed.cost_usd, expected);
  const day = await client.dailyUsage(user, { date: today() });
  assert.deepEqual(
    [day.totals.requests, day.totals.input_tokens, day.totals.cached_input_tokens, day.totals.output_tokens],
    [1, 1200, 200, 300],
  );
  assert.equal(day.totals.cost_usd, expected);
});

test("guard commits the usage of an OpenAI Responses API answer", async () => {
  const { tenantId, client } = await tenant();
  const response = {
    id: "resp_1",
    object: "response",
    usage: {
      input_tokens: 800,
      input_tokens_details: { cached_tokens: 300 },
      output_tokens: 90,
      output_tokens_details: { reasoning_tokens: 10 },
      total_tokens: 890,
    },
  };
  let committed;
  await client.guard(subject(tenantId, unique("u")), { input_tokens: 800, max_output_tokens: 200 }, () => response, {
    onCommit: (c) => (committed = c),
  });
  assert.deepEqual(
    [committed.input_tokens, committed.cached_input_tokens, committed.output_tokens],
    [800, 300, 90],
  );
});

test("guard commits the usage of an Anthropic message (cache reads and writes)", async () => {
  const { tenantId, client } = await tenant();
  const user = unique("u");
  const message = {
    id: "msg_1",
    type: "message",
    role: "assistant",
    model: "claude-haiku-4-5",
    content: [{ type: "text", text: "Hi" }],
    stop_reason: "end_turn",
    usage: {
      input_tokens: 50,
      cache_read_input_tokens: 1000,
      cache_creation_input_tokens: 200,
      output_tokens: 80,
    },
  };
  let committed;
  await client.guard(
    subject(tenantId, user, "claude-haiku-4-5"),
    { input_tokens: 1250, max_output_tokens: 500 },
    async () => message,
    { onCommit: (c) => (committed = c) },
  );
  // spendguard's input is every prompt token: uncached, cache reads and cache writes.
  assert.deepEqual(
    [committed.input_tokens, committed.cached_input_tokens, committed.output_tokens],
    [1250, 1000, 80],
  );
  const expected = await costOf(client, tenantId, "claude-haiku-4-5", {
    input_tokens: 1250,
    cached_input_tokens: 1000,
    output_tokens: 80,
  });
  assert.equal(committed.cost_usd, expected);
  const day = await client.dailyUsage(user, { date: today() });
  assert.deepEqual(day.models.map((m) => [m.model, m.input_tokens, m.cost_usd]), [
    ["claude-haiku-4-5", 1250, expected],
  ]);
});

test("guard charges the estimate when the result reports no usage", async () => {
  const { tenantId, client } = await tenant();
  let committed;
  let reserved;
  await client.guard(
    subject(tenantId, unique("u")),
    { input_tokens: 100, max_output_tokens: 100 },
    (r) => {
      reserved = r;
      return "no usage here";
    },
    { onCommit: (c) => (committed = c) },
  );
  assert.equal(committed.request_status, "truncated");
  assert.equal(committed.cost_usd, reserved.reserved_cost_usd);
  assert.ok(committed.cost_usd > 0);
});

test("usageOf reads each provider's shape and nothing else", () => {
  assert.deepEqual(usageOf({ usage: { prompt_tokens: 7, total_tokens: 7 } }), {
    input_tokens: 7,
    cached_input_tokens: 0,
    output_tokens: 0,
  });
  assert.deepEqual(usageOf({ usage: { input_tokens: 5, output_tokens: 6 }, type: "message" }), {
    input_tokens: 5,
    cached_input_tokens: 0,
    output_tokens: 6,
  });
  assert.equal(usageOf({}), null);
  assert.equal(usageOf(null), null);
  assert.equal(usageOf({ usage: { total: 3 } }), null);
  assert.equal(usageOf({ usage: { prompt_tokens: -4 } }).input_tokens, 0);
});
