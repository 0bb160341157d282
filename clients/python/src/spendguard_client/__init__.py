"""spendguard's Python client: reserve before a model call, commit what it really cost,
release when it failed. Sync (:class:`SpendGuard`) and asyncio (:class:`AsyncSpendGuard`)."""

from ._client import AsyncGuard, AsyncSpendGuard, Guard, SpendGuard, idempotency_key
from ._errors import LimitExceededError, SpendGuardConnectionError, SpendGuardError
from ._types import *  # noqa: F401,F403 (the API's shapes)
from ._usage import usage_of

__all__ = [
    "AsyncGuard",
    "AsyncSpendGuard",
    "Guard",
    "LimitExceededError",
    "SpendGuard",
    "SpendGuardConnectionError",
    "SpendGuardError",
    "idempotency_key",
    "usage_of",
]
__version__ = "0.1.0"
