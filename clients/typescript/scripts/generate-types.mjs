// Generates `src/api.d.ts`, the types of the HTTP API's requests and answers, from the
// OpenAPI document the server serves at `/openapi.json`:
//
//   node scripts/generate-types.mjs http://127.0.0.1:8080/openapi.json > src/api.d.ts
//   node scripts/generate-types.mjs openapi.json > src/api.d.ts
//
// The contract test (test/contract.test.mjs) generates them again from a live server and
// fails when they differ from the committed file.

import { readFile } from "node:fs/promises";

const HEADER = `// Generated from spendguard's /openapi.json by scripts/generate-types.mjs: do not edit.
// Regenerate: node scripts/generate-types.mjs http://127.0.0.1:8080/openapi.json > src/api.d.ts
`;

/** A JSON string literal as a TypeScript literal type. */
const literal = (v) => JSON.stringify(v);

/** `/** text *\/` above a declaration, indented. */
function doc(text, indent) {
  if (!text) return "";
  const lines = String(text).replaceAll("*/", "*\\/").split("\n");
  if (lines.length === 1) return `${indent}/** ${lines[0]} */\n`;
  return `${indent}/**\n${lines.map((l) => `${indent} * ${l}`.trimEnd()).join("\n")}\n${indent} */\n`;
}

/** The TypeScript type of a JSON schema. */
function type(schema, indent) {
  if (schema === true || schema === undefined) return "unknown";
  if (schema === false) return "never";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if ("const" in schema) return literal(schema.const);
  if (schema.enum) return schema.enum.map(literal).join(" | ");
  for (const key of ["anyOf", "oneOf"]) {
    if (schema[key]) {
      return [...new Set(schema[key].map((s) => type(s, indent)))].join(" | ");
    }
  }
  const types = Array.isArray(schema.type) ? schema.type : schema.type ? [schema.type] : [];
  if (types.length === 0) return schema.properties ? object(schema, indent) : "unknown";
  return types
    .map((t) => {
      switch (t) {
        case "null":
          return "null";
        case "string":
          return "string";
        case "integer":
        case "number":
          return "number";
        case "boolean":
          return "boolean";
        case "array": {
          const item = type(schema.items, indent);
          return /[ |]/.test(item) ? `Array<${item}>` : `${item}[]`;
        }
        case "object":
          return object(schema, indent);
        default:
          return "unknown";
      }
    })
    .join(" | ");
}

/** An object type: its properties (optional unless required) and any other keys. */
function object(schema, indent) {
  const props = schema.properties ?? {};
  const required = new Set(schema.required ?? []);
  const inner = indent + "  ";
  let out = "{\n";
  for (const [name, prop] of Object.entries(props)) {
    const key = /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(name) ? name : literal(name);
    out += doc(prop.description, inner);
    out += `${inner}${key}${required.has(name) ? "" : "?"}: ${type(prop, inner)};\n`;
  }
  const extra = schema.additionalProperties;
  if (extra && extra !== true) out += `${inner}[key: string]: ${type(extra, inner)};\n`;
  else if (extra === true || (extra === undefined && !schema.properties)) {
    out += `${inner}[key: string]: unknown;\n`;
  }
  return `${out}${indent}}`;
}

/** The whole `api.d.ts` for an OpenAPI document. */
export function generate(openapi) {
  const schemas = openapi?.components?.schemas ?? {};
  let out = HEADER;
  for (const name of Object.keys(schemas).sort()) {
    const schema = schemas[name];
    out += "\n" + doc(schema.description, "");
    const isObject =
      !schema.$ref && !schema.anyOf && !schema.oneOf && !schema.enum &&
      (schema.type === "object" || (!schema.type && schema.properties));
    if (isObject) out += `export interface ${name} ${object(schema, "")}\n`;
    else out += `export type ${name} = ${type(schema, "")};\n`;
  }
  return out;
}

/** Reads an OpenAPI document from a URL or a file. */
export async function load(source) {
  if (/^https?:\/\//.test(source)) {
    const res = await fetch(source);
    if (!res.ok) throw new Error(`GET ${source}: ${res.status}`);
    return res.json();
  }
  return JSON.parse(await readFile(source, "utf8"));
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const source = process.argv[2];
  if (!source) {
    console.error("usage: node scripts/generate-types.mjs URL_OR_FILE > src/api.d.ts");
    process.exit(2);
  }
  process.stdout.write(generate(await load(source)));
}
