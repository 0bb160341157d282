"""Errors: every error answer of spendguard, and a server that cannot be reached."""

from __future__ import annotations

import email.utils
import time
from typing import Any, List, Optional

from ._types import LimitOut

#: The codes of a refusal by a limit.
LIMIT_CODES = frozenset({"budget_exceeded", "rate_limited", "too_many_subjects"})


def parse_retry_after(value: Optional[str]) -> Optional[int]:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date), or ``None``."""
    if not value:
        return None
    try:
        return max(0, int(value.strip()))
    except ValueError:
        pass
    try:
        at = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0, int(at.timestamp() - time.time() + 0.999))


class SpendGuardError(Exception):
    """An error answer of spendguard (``{"error": {"code", "message", ...}}``)."""

    def __init__(self, status: int, body: Any, retry_after: Optional[int] = None) -> None:
        detail = body.get("error") if isinstance(body, dict) else None
        detail = detail if isinstance(detail, dict) else {}
        self.status: int = status
        #: ``error.code``, e.g. ``budget_exceeded``, ``unknown_model``, ``not_found``.
        self.code: str = str(detail.get("code") or f"http_{status}")
        self.message: str = str(detail.get("message") or f"spendguard answered {status}")
        #: The failing limits (429).
        self.limits: List[LimitOut] = list(detail.get("limits") or [])
        #: Seconds from ``Retry-After``, or ``None``.
        self.retry_after: Optional[int] = retry_after
        self.body: Any = body
        super().__init__(f"{status} {self.code}: {self.message}")


class LimitExceededError(SpendGuardError):
    """A refusal by a limit (429: ``budget_exceeded``, ``rate_limited``,
    ``too_many_subjects``)."""


class SpendGuardConnectionError(Exception):
    """spendguard could not be reached, or did not answer in time."""


def error_for(status: int, body: Any, retry_after: Optional[str]) -> SpendGuardError:
    err = SpendGuardError(status, body, parse_retry_after(retry_after))
    if status == 429 or err.code in LIMIT_CODES:
        return LimitExceededError(status, body, err.retry_after)
    return err
