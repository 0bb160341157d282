"""Reads the usage an OpenAI or Anthropic response reports, in spendguard's terms."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ._types import Usage

_MISSING = object()


def _get(obj: Any, name: str) -> Any:
    """``obj[name]`` of a mapping, ``obj.name`` of an SDK object; ``None`` when absent."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    value = getattr(obj, name, _MISSING)
    return None if value is _MISSING else value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return 0
    return int(value) if value > 0 else 0


def usage_of(response: Any) -> Optional[Usage]:
    """The usage of an OpenAI chat completion, embedding or Responses API answer, or of an
    Anthropic message (dicts or the SDKs' objects), or ``None`` when it reports none.

    spendguard's ``input_tokens`` counts every prompt token: OpenAI's ``prompt_tokens`` or
    ``input_tokens`` (cached ones in ``*_tokens_details.cached_tokens``); Anthropic's
    ``input_tokens`` plus ``cache_read_input_tokens`` (spendguard's cached input) plus
    ``cache_creation_input_tokens`` (cache writes, charged as input).
    """
    u = _get(response, "usage")
    if u is None:
        return None
    if _get(u, "prompt_tokens") is not None:
        return {
            "input_tokens": _count(_get(u, "prompt_tokens")),
            "cached_input_tokens": _count(
                _get(_get(u, "prompt_tokens_details"), "cached_tokens")
            ),
            "output_tokens": _count(_get(u, "completion_tokens")),
        }
    if _get(u, "input_tokens") is None:
        return None
    anthropic = (
        _get(response, "type") == "message"
        or _get(u, "cache_read_input_tokens") is not None
        or _get(u, "cache_creation_input_tokens") is not None
    )
    if anthropic:
        read = _count(_get(u, "cache_read_input_tokens"))
        return {
            "input_tokens": _count(_get(u, "input_tokens"))
            + read
            + _count(_get(u, "cache_creation_input_tokens")),
            "cached_input_tokens": read,
            "output_tokens": _count(_get(u, "output_tokens")),
        }
    return {
        "input_tokens": _count(_get(u, "input_tokens")),
        "cached_input_tokens": _count(_get(_get(u, "input_tokens_details"), "cached_tokens")),
        "output_tokens": _count(_get(u, "output_tokens")),
    }
