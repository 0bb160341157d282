// What the tests share: the server under test (started by the Rust test that runs this
// suite: SPENDGUARD_TEST_URL and SPENDGUARD_TEST_ADMIN_KEY), fresh names, a tenant key.

import { SpendGuard } from "../src/index.js";

export const url = process.env.SPENDGUARD_TEST_URL;
export const adminKey = process.env.SPENDGUARD_TEST_ADMIN_KEY;
if (!url || !adminKey) {
  throw new Error("set SPENDGUARD_TEST_URL and SPENDGUARD_TEST_ADMIN_KEY (a spendguard serve to test)");
}

export const admin = new SpendGuard({ baseUrl: url, apiKey: adminKey });

let n = 0;
/** A name no other test (or run) uses. */
export function unique(prefix) {
  return `${prefix}-${process.pid}-${++n}-${Date.now().toString(36)}`;
}

/** A new tenant and a client with its key. */
export async function tenant() {
  const tenantId = unique("ts");
  const { key } = await admin.request("POST", "/v1/admin/api-keys", {
    body: { tenant_id: tenantId },
  });
  return { tenantId, client: new SpendGuard({ baseUrl: url, apiKey: key }) };
}

/** Today in UTC (the server's default time zone). */
export function today() {
  return new Date().toISOString().slice(0, 10);
}
