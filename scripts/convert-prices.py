#!/usr/bin/env python3
"""Builds spendguard's price catalog from a snapshot of LiteLLM's model price list.

    convert-prices.py filter FULL.json > crates/spendguard-core/data/litellm/model_prices.json
    convert-prices.py convert crates/spendguard-core/data/litellm/model_prices.json \
        > crates/spendguard-core/data/catalog.tsv

`filter` keeps the entries of the providers spendguard prices, sorted by name, with their
price fields (and provider, mode, source and context sizes) unchanged, so the vendored
snapshot stays small. `convert` writes the compact catalog the core compiles in.
Running `convert` on the full file or on the filtered one gives the same catalog.

The catalog is tab-separated, one model a line, sorted by name. Token prices are integers in
micro-USD per million tokens (which is pico-USD per token), so every published price is held
exactly; per-request and per-image prices are integers in micro-USD. An empty field means the
model has no such price. A long-context tier (`tier_above`) replaces every token price for a
call whose prompt is larger than that many tokens.

Standard library only; the output depends on nothing but the input file.
"""

import json
import re
import sys
from decimal import Decimal

# LiteLLM provider names, in the order their entries win a bare-name alias.
PROVIDERS = [
    "openai",
    "anthropic",
    "gemini",
    "mistral",
    "deepseek",
    "xai",
    "meta",
    "meta_llama",
    "vertex_ai-language-models",
    "vertex_ai-anthropic_models",
    "vertex_ai-mistral_models",
    "vertex_ai-llama_models",
    "vertex_ai-deepseek_models",
    "vertex_ai",
    "bedrock_converse",
    "bedrock",
]

MODES = {"chat", "completion", "responses", "embedding", "image_generation"}

# spendguard's model names: 1-128 characters of [A-Za-z0-9._:@/-].
NAME = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")

# (catalog column, LiteLLM key, unit): `tok` prices are USD per token, `each` USD per unit.
BASE = [
    ("input", "input_cost_per_token", "tok"),
    ("output", "output_cost_per_token", "tok"),
    ("cache_read", "cache_read_input_token_cost", "tok"),
    ("cache_write", "cache_creation_input_token_cost", "tok"),
    ("cache_write_1h", "cache_creation_input_token_cost_above_1hr", "tok"),
    ("reasoning", "output_cost_per_reasoning_token", "tok"),
    ("per_request", "input_cost_per_request", "each"),
    ("per_image_input", "input_cost_per_image", "each"),
    ("per_image_output", "output_cost_per_image", "each"),
]

# Long-context tier: (catalog column, LiteLLM key prefix); the key is PREFIX_above_<N>k_tokens.
TIER = [
    ("tier_input", "input_cost_per_token"),
    ("tier_output", "output_cost_per_token"),
    ("tier_cache_read", "cache_read_input_token_cost"),
    ("tier_cache_write", "cache_creation_input_token_cost"),
    ("tier_cache_write_1h", "cache_creation_input_token_cost_above_1hr"),
]

COLUMNS = ["model", "provider"] + [c for c, _, _ in BASE] + ["tier_above"] + [c for c, _ in TIER]

# The fields `filter` keeps besides the prices (every field whose name holds `cost`).
KEPT = {"litellm_provider", "mode", "source", "max_input_tokens", "max_output_tokens"}

TIER_KEY = re.compile(r"^(.*)_above_(\d+)k_tokens$")


def fail(msg):
    sys.stderr.write("convert-prices: " + msg + "\n")
    sys.exit(1)


def load(path):
    with open(path, encoding="utf-8") as f:
        # Decimal keeps every published price exact.
        return json.load(f, parse_float=Decimal, parse_int=Decimal)


def wanted(name, entry):
    return (
        isinstance(entry, dict)
        and entry.get("litellm_provider") in PROVIDERS
        and entry.get("mode") in MODES
        and NAME.match(name) is not None
        and (
            isinstance(entry.get("input_cost_per_token"), Decimal)
            or isinstance(entry.get("output_cost_per_image"), Decimal)
        )
    )


def scaled(name, key, value, unit):
    """The price as an exact integer: pico-USD per token, or micro-USD per unit."""
    if not isinstance(value, Decimal):
        fail(f"{name}: {key} is not a number")
    factor = Decimal(10) ** (12 if unit == "tok" else 6)
    exact = value * factor
    if exact != exact.to_integral_value() or exact < 0:
        fail(f"{name}: {key} = {value} is not a whole number at the catalog's unit")
    return str(int(exact))


def row(name, entry):
    fields = {"model": name, "provider": entry["litellm_provider"]}
    for col, key, unit in BASE:
        v = entry.get(key)
        fields[col] = "" if v is None else scaled(name, key, v, unit)
    # The long-context tier: the one threshold of the standard (not batch, flex or priority)
    # prices above N thousand tokens.
    thresholds = set()
    for key in entry:
        m = TIER_KEY.match(key)
        if m and m.group(1) in {p for _, p in TIER}:
            thresholds.add(int(m.group(2)))
    if len(thresholds) > 1:
        fail(f"{name}: more than one long-context threshold {sorted(thresholds)}")
    if thresholds:
        n = thresholds.pop()
        fields["tier_above"] = str(n * 1000)
        for col, prefix in TIER:
            v = entry.get(f"{prefix}_above_{n}k_tokens")
            fields[col] = "" if v is None else scaled(name, prefix, v, "tok")
    else:
        fields["tier_above"] = ""
        for col, _ in TIER:
            fields[col] = ""
    return fields


def convert(data):
    entries = {k: v for k, v in data.items() if wanted(k, v)}
    rows = {k: row(k, v) for k, v in entries.items()}
    # Bare-name aliases: `mistral/mistral-large-latest` is also `mistral-large-latest`, when
    # no entry has that name; the provider listed first in PROVIDERS wins, then the name.
    order = sorted(entries, key=lambda k: (PROVIDERS.index(entries[k]["litellm_provider"]), k))
    for k in order:
        bare = k.rsplit("/", 1)[-1]
        if bare != k and bare not in rows:
            rows[bare] = dict(rows[k], model=bare)
    out = ["\t".join(COLUMNS)]
    for k in sorted(rows):
        out.append("\t".join(rows[k][c] for c in COLUMNS))
    return "\n".join(out) + "\n"


def dump_filtered(data):
    # json cannot write Decimal, and floats could change a price's digits: write the numbers'
    # own text (Decimal str is exact) through a small recursive writer.
    def enc(v, indent):
        pad = " " * indent
        if isinstance(v, dict):
            if not v:
                return "{}"
            items = [
                f'{pad} {json.dumps(k, ensure_ascii=False)}: {enc(v[k], indent + 1)}'
                for k in sorted(v)
            ]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(v, list):
            if not v:
                return "[]"
            items = [f"{pad} {enc(x, indent + 1)}" for x in v]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        if isinstance(v, Decimal):
            return str(v)
        return json.dumps(v, ensure_ascii=False)

    keep = {
        k: {f: v for f, v in data[k].items() if f in KEPT or "cost" in f}
        for k in sorted(data)
        if wanted(k, data[k])
    }
    return enc(keep, 0) + "\n"


def main(argv):
    if len(argv) != 3 or argv[1] not in ("filter", "convert"):
        fail("usage: convert-prices.py filter|convert FILE.json")
    data = load(argv[2])
    if not isinstance(data, dict):
        fail("the price list is not a JSON object")
    text = dump_filtered(data) if argv[1] == "filter" else convert(data)
    sys.stdout.buffer.write(text.encode("utf-8"))


if __name__ == "__main__":
    main(sys.argv)
