// The contract: the types in src/api.d.ts are what the live server's /openapi.json says.
// A change of the document that changes any request or answer type fails here until the
// types are regenerated (and the client checked against them: npm run typecheck).

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { test } from "node:test";

import { generate } from "../scripts/generate-types.mjs";
import { url } from "./support.mjs";

test("src/api.d.ts is generated from the server's /openapi.json", async () => {
  const res = await fetch(`${url}/openapi.json`);
  assert.equal(res.status, 200);
  const live = generate(await res.json());
  const committed = await readFile(new URL("../src/api.d.ts", import.meta.url), "utf8");
  assert.ok(
    live === committed,
    "src/api.d.ts differs from the server's /openapi.json: run\n" +
      "  node scripts/generate-types.mjs URL/openapi.json > src/api.d.ts\n" +
      "and npm run typecheck",
  );
  // The shapes the client relies on are there.
  for (const name of ["ReserveBody", "ReservedOut", "CommitBody", "CommittedOut", "ErrorBody", "DailyOut"]) {
    assert.match(committed, new RegExp(`export interface ${name} \\{`));
  }
});
