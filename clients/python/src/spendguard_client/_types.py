"""The request and answer shapes of spendguard's HTTP API (its ``/openapi.json``), as
``TypedDict``s. The contract test (``tests/test_contract.py``) checks them against the
document a live server serves."""

import sys
from typing import List, Literal, Optional, Union

if sys.version_info >= (3, 11):
    from typing import NotRequired, TypedDict
else:  # pragma: no cover
    from typing_extensions import NotRequired, TypedDict

#: USD in a request: a number or a decimal string ("0.75"), parsed exactly.
UsdIn = Union[float, int, str]
#: USD in an answer: a float, or from 1,000,000,000 USD up a decimal string (which a float
#: cannot hold to the micro-dollar).
UsdOut = Union[float, str]

ErrorCode = Literal[
    "invalid_request",
    "malformed_json",
    "unsupported_media_type",
    "body_too_large",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "timeout",
    "conflict",
    "already_settled",
    "commit_conflict",
    "idempotency_conflict",
    "budget_exceeded",
    "rate_limited",
    "model_not_allowed",
    "unknown_model",
    "max_output_tokens_exceeded",
    "too_many_subjects",
    "store_unavailable",
    "not_stored",
    "starting",
    "shutting_down",
    "busy",
    "internal",
]
CommitStatus = Literal["success", "error", "cancelled", "truncated"]
ScopeName = Literal["global", "tenant", "company", "user"]
WindowName = Literal["minute", "day", "month", "none"]
UnitName = Literal["usd", "requests", "tokens", "concurrent"]
PricingName = Literal[
    "catalog", "config", "tenant_override", "caller", "estimate", "default", "free"
]
RequestStatusName = Literal["success", "error", "cancelled", "expired", "truncated"]
SettledName = Literal["released", "expired", "committed"]
AlertKindName = Literal["threshold", "projected", "dead_letter", "soft_threshold"]


class ReserveBody(TypedDict):
    """``POST /v1/reservations`` (and ``/v1/check``)."""

    tenant_id: str
    user_id: str
    model: str
    input_tokens: int
    company_id: NotRequired[Optional[str]]
    endpoint: NotRequired[Optional[str]]
    tier: NotRequired[Optional[str]]
    max_output_tokens: NotRequired[Optional[int]]
    estimated_cost_usd: NotRequired[Optional[UsdIn]]
    idempotency_key: NotRequired[Optional[str]]
    ttl_seconds: NotRequired[Optional[int]]


class Subject(TypedDict):
    """Who calls which model (the part of a reservation ``guard`` takes first)."""

    tenant_id: str
    user_id: str
    model: str
    company_id: NotRequired[Optional[str]]
    endpoint: NotRequired[Optional[str]]
    tier: NotRequired[Optional[str]]


class Estimate(TypedDict, total=False):
    """The worst case to reserve: tokens (priced by spendguard) or a cost."""

    input_tokens: int
    max_output_tokens: Optional[int]
    estimated_cost_usd: Optional[UsdIn]
    ttl_seconds: Optional[int]
    idempotency_key: Optional[str]


class LimitOut(TypedDict):
    scope: ScopeName
    scope_id: str
    window: WindowName
    unit: UnitName
    resets_at: Optional[str]
    shadow: bool
    limit: NotRequired[Optional[float]]
    used: NotRequired[Optional[float]]
    reserved: NotRequired[Optional[float]]
    remaining: NotRequired[Optional[float]]


class ReservedOut(TypedDict):
    reservation_id: str
    reserved_cost_usd: UsdOut
    reserved_tokens: int
    expires_at: str
    tier: str
    replayed: bool
    limits: List[LimitOut]
    would_deny: Optional["ErrorDetail"]


class CommitBody(TypedDict):
    """``POST /v1/reservations/{id}/commit``."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: NotRequired[Optional[int]]
    #: Prompt tokens written to the cache (part of ``input_tokens``), 1-hour writes included.
    cache_creation_input_tokens: NotRequired[Optional[int]]
    #: The part of ``cache_creation_input_tokens`` written to the 1-hour cache.
    cache_creation_1h_input_tokens: NotRequired[Optional[int]]
    #: Reasoning tokens (part of ``output_tokens``).
    reasoning_tokens: NotRequired[Optional[int]]
    cost_usd: NotRequired[Optional[UsdIn]]
    status: NotRequired[Optional[CommitStatus]]


class UsageOut(TypedDict):
    usage_id: str
    reservation_id: Optional[str]
    tenant_id: str
    user_id: str
    company_id: Optional[str]
    model: str
    endpoint: Optional[str]
    subscription_tier: str
    input_tokens: int
    cached_input_tokens: int
    cache_creation_input_tokens: int
    cache_creation_1h_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: UsdOut
    pricing: PricingName
    #: The long-context tier's threshold (prompt tokens) the call was priced at, if any.
    long_context_above: Optional[int]
    request_status: RequestStatusName
    created_at: str


class CommittedOut(UsageOut):
    reserved_cost_usd: UsdOut
    replayed: bool
    late: bool


class ReleaseBody(TypedDict, total=False):
    reason: Optional[str]


class ReleasedOut(TypedDict):
    reservation_id: str
    state: SettledName


class UsageBody(TypedDict):
    """``POST /v1/usage``: a call that was not reserved."""

    tenant_id: str
    user_id: str
    model: str
    input_tokens: int
    output_tokens: int
    company_id: NotRequired[Optional[str]]
    endpoint: NotRequired[Optional[str]]
    tier: NotRequired[Optional[str]]
    cached_input_tokens: NotRequired[Optional[int]]
    cache_creation_input_tokens: NotRequired[Optional[int]]
    cache_creation_1h_input_tokens: NotRequired[Optional[int]]
    reasoning_tokens: NotRequired[Optional[int]]
    cost_usd: NotRequired[Optional[UsdIn]]
    status: NotRequired[Optional[CommitStatus]]
    idempotency_key: NotRequired[Optional[str]]
    #: When the call was made (RFC 3339), for importing history: admin key only.
    created_at: NotRequired[Optional[str]]


class ErrorDetail(TypedDict):
    code: ErrorCode
    message: str
    limits: NotRequired[Optional[List[LimitOut]]]


class ErrorBody(TypedDict):
    error: ErrorDetail


class CheckOut(TypedDict):
    allowed: bool
    limits: List[LimitOut]
    denial: Optional[ErrorDetail]
    would_deny: Optional[ErrorDetail]


class LimitsAnswer(TypedDict):
    tenant_id: str
    user_id: str
    limits: List[LimitOut]


class TotalsOut(TypedDict):
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    total_tokens: int
    cost_usd: UsdOut


class ModelDayOut(TotalsOut):
    model: str


class DailyOut(TypedDict):
    tenant_id: str
    user_id: str
    date: str
    time_zone: str
    totals: TotalsOut
    models: List[ModelDayOut]


AlertOut = TypedDict(
    "AlertOut",
    {
        "id": int,
        "type": str,
        "kind": AlertKindName,
        "scope": ScopeName,
        "scope_id": str,
        "tenant_id": Optional[str],
        "window": WindowName,
        "window_start": str,
        "threshold_percent": int,
        "budget": str,
        "amount_usd": UsdOut,
        "limit_usd": UsdOut,
        "created_at": str,
        "message": str,
    },
)


class AlertsOut(TypedDict):
    alerts: List[AlertOut]


class Usage(TypedDict):
    """The usage of a call in spendguard's terms (``input_tokens`` includes the cached)."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: NotRequired[int]
    cache_creation_input_tokens: NotRequired[int]
    cache_creation_1h_input_tokens: NotRequired[int]
    reasoning_tokens: NotRequired[int]
    cost_usd: NotRequired[UsdIn]
