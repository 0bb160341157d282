"""The sync and async clients, and ``guard``: reserve, run the model call, commit the usage
its answer reports, release when it raises."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    Mapping,
    Optional,
    Tuple,
    TypeVar,
    cast,
)
from urllib.parse import quote

import httpx

from ._errors import SpendGuardConnectionError, error_for, parse_retry_after
from ._types import (
    AlertsOut,
    CheckOut,
    CommitBody,
    CommittedOut,
    DailyOut,
    Estimate,
    LimitsAnswer,
    ReleasedOut,
    ReservedOut,
    ReserveBody,
    Subject,
    Usage,
    UsageBody,
    UsageOut,
)
from ._usage import usage_of

T = TypeVar("T")
UsageReader = Callable[[Any], Optional[Usage]]


def idempotency_key() -> str:
    """A fresh idempotency key (``sg-`` and a random UUID)."""
    return f"sg-{uuid.uuid4()}"


def _keyed(body: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(body)
    if not out.get("idempotency_key"):
        out["idempotency_key"] = idempotency_key()
    return out


def _query(**params: Any) -> Dict[str, str]:
    out = {}
    for k, v in params.items():
        if v is None:
            continue
        out[k] = ("true" if v else "false") if isinstance(v, bool) else str(v)
    return out


def _decode(resp: httpx.Response) -> Any:
    if not resp.content:
        return None
    try:
        return resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"error": {"code": f"http_{resp.status_code}", "message": resp.text[:200]}}


def _commit_body(usage: Optional[Usage]) -> Dict[str, Any]:
    if usage is None:
        # The call happened but its usage is unknown: charged the estimate, never $0.
        return {"input_tokens": 0, "output_tokens": 0, "status": "truncated"}
    return {"cached_input_tokens": 0, **usage}


def _reason(exc: BaseException) -> str:
    return f"the call failed: {type(exc).__name__}: {exc}"[:200]


def _segment(value: str) -> str:
    """One path segment (an id), percent-encoded."""
    return quote(value, safe="")


class _Base:
    def __init__(self, base_url: str, api_key: str, retries: int) -> None:
        if not base_url:
            raise ValueError("base_url is required")
        if not api_key:
            raise ValueError("api_key is required")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._headers = {
            "authorization": f"Bearer {api_key}",
            "accept": "application/json",
        }

    def _prepare(self, method: str, path: str, body: Any, query: Any) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {
            "method": method,
            "url": self.base_url + path,
            "headers": self._headers,
        }
        if query:
            kwargs["params"] = query
        if body is not None:
            kwargs["json"] = body
        return kwargs

    def _outcome(self, resp: httpx.Response, attempt: int) -> Tuple[bool, Any, float]:
        """(done, answer or error, seconds to wait before trying again)."""
        data = _decode(resp)
        if resp.is_success:
            return True, data, 0.0
        if resp.status_code == 503 and attempt < self.retries:
            wait = parse_retry_after(resp.headers.get("retry-after"))
            return False, None, float(min(wait if wait is not None else 1, 2))
        return True, error_for(resp.status_code, data, resp.headers.get("retry-after")), 0.0


class SpendGuard(_Base):
    """A client of one spendguard server (blocking). Every call is safe to repeat, so one
    that could not reach the server, or found it unavailable (503), is tried again."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        http_client: Optional[httpx.Client] = None,
    ) -> None:
        super().__init__(base_url, api_key, retries)
        self._own = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> "SpendGuard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, body: Any = None, query: Any = None) -> Any:
        kwargs = self._prepare(method, path, body, query)
        attempt = 0
        while True:
            try:
                resp = self._http.request(**kwargs)
            except httpx.TransportError as e:
                if attempt < self.retries:
                    time.sleep(0.1 * 2**attempt)
                    attempt += 1
                    continue
                raise SpendGuardConnectionError(f"{method} {path}: {e}") from e
            done, result, wait = self._outcome(resp, attempt)
            if done:
                if isinstance(result, Exception):
                    raise result
                return result
            time.sleep(wait)
            attempt += 1

    def reserve(self, body: ReserveBody) -> ReservedOut:
        """``POST /v1/reservations`` (an idempotency key is added when there is none)."""
        return cast(ReservedOut, self.request("POST", "/v1/reservations", body=_keyed(body)))

    def commit(self, reservation_id: str, body: CommitBody) -> CommittedOut:
        path = f"/v1/reservations/{_segment(reservation_id)}/commit"
        return cast(CommittedOut, self.request("POST", path, body=dict(body)))

    def release(self, reservation_id: str, reason: Optional[str] = None) -> ReleasedOut:
        path = f"/v1/reservations/{_segment(reservation_id)}/release"
        return cast(ReleasedOut, self.request("POST", path, body=_query(reason=reason)))

    def record(self, body: UsageBody) -> UsageOut:
        """``POST /v1/usage``: a call that was not reserved (an idempotency key is added)."""
        return cast(UsageOut, self.request("POST", "/v1/usage", body=_keyed(body)))

    def check(self, body: ReserveBody) -> CheckOut:
        return cast(CheckOut, self.request("POST", "/v1/check", body=dict(body)))

    def limits(
        self,
        user_id: str,
        *,
        tenant_id: Optional[str] = None,
        company_id: Optional[str] = None,
        tier: Optional[str] = None,
    ) -> LimitsAnswer:
        """``GET /v1/limits``: the user's effective limits, used, reserved and remaining."""
        q = _query(user_id=user_id, tenant_id=tenant_id, company_id=company_id, tier=tier)
        return cast(LimitsAnswer, self.request("GET", "/v1/limits", query=q))

    def daily_usage(
        self, user_id: str, *, date: Optional[str] = None, tenant_id: Optional[str] = None
    ) -> DailyOut:
        path = f"/v1/users/{_segment(user_id)}/daily-usage"
        q = _query(date=date, tenant_id=tenant_id)
        return cast(DailyOut, self.request("GET", path, query=q))

    def alerts(
        self,
        *,
        all: Optional[bool] = None,
        tenant_id: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> AlertsOut:
        q = _query(all=all, tenant_id=tenant_id, limit=limit)
        return cast(AlertsOut, self.request("GET", "/v1/alerts", query=q))

    def guard(
        self, subject: Subject, estimate: Estimate, *, usage: Optional[UsageReader] = None
    ) -> "Guard":
        """Reserve, run, commit, or release on an exception: as a context manager
        (``with sg.guard(...) as call: call.result = ...``), a decorator (``@sg.guard(...)``)
        or ``sg.guard(...).run(fn, *args)``."""
        return Guard(self, subject, estimate, usage)


class Guard:
    """One guarded model call (a fresh reservation per ``with`` and per decorated call)."""

    def __init__(
        self,
        client: SpendGuard,
        subject: Subject,
        estimate: Estimate,
        usage: Optional[UsageReader] = None,
    ) -> None:
        self._client = client
        self._subject = subject
        self._estimate = estimate
        self._read = usage or usage_of
        #: The admitted reservation (inside the ``with`` block).
        self.reservation: Optional[ReservedOut] = None
        #: The model's answer: its usage is committed when the block ends.
        self.result: Any = None
        #: Or the usage itself, when the answer is not an OpenAI or Anthropic response.
        self.usage: Optional[Usage] = None
        #: The usage record, once committed.
        self.committed: Optional[CommittedOut] = None

    def _fresh(self) -> "Guard":
        return Guard(self._client, self._subject, self._estimate, self._read)

    def __enter__(self) -> "Guard":
        body = cast(ReserveBody, {**self._subject, **self._estimate})
        self.reservation = self._client.reserve(body)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.reservation is not None
        rid = self.reservation["reservation_id"]
        if exc is not None:
            try:
                self._client.release(rid, _reason(exc))
            except Exception:
                pass  # it expires after its TTL; the call's own error is the one to see
            return
        usage = self.usage if self.usage is not None else self._read(self.result)
        self.committed = self._client.commit(rid, cast(CommitBody, _commit_body(usage)))

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs ``fn`` guarded and returns its result."""
        with self._fresh() as call:
            call.result = fn(*args, **kwargs)
        return cast(T, call.result)

    def __call__(self, fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            return self.run(fn, *args, **kwargs)

        return wrapper


class AsyncSpendGuard(_Base):
    """The client for asyncio: the same calls as :class:`SpendGuard`, awaited."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        http_client: Optional[httpx.AsyncClient] = None,
    ) -> None:
        super().__init__(base_url, api_key, retries)
        self._own = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncSpendGuard":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(
        self, method: str, path: str, *, body: Any = None, query: Any = None
    ) -> Any:
        kwargs = self._prepare(method, path, body, query)
        attempt = 0
        while True:
            try:
                resp = await self._http.request(**kwargs)
            except httpx.TransportError as e:
                if attempt < self.retries:
                    await asyncio.sleep(0.1 * 2**attempt)
                    attempt += 1
                    continue
                raise SpendGuardConnectionError(f"{method} {path}: {e}") from e
            done, result, wait = self._outcome(resp, attempt)
            if done:
                if isinstance(result, Exception):
                    raise result
                return result
            await asyncio.sleep(wait)
            attempt += 1

    async def reserve(self, body: ReserveBody) -> ReservedOut:
        return cast(
            ReservedOut, await self.request("POST", "/v1/reservations", body=_keyed(body))
        )

    async def commit(self, reservation_id: str, body: CommitBody) -> CommittedOut:
        path = f"/v1/reservations/{_segment(reservation_id)}/commit"
        return cast(CommittedOut, await self.request("POST", path, body=dict(body)))

    async def release(self, reservation_id: str, reason: Optional[str] = None) -> ReleasedOut:
        path = f"/v1/reservations/{_segment(reservation_id)}/release"
        return cast(ReleasedOut, await self.request("POST", path, body=_query(reason=reason)))

    async def record(self, body: UsageBody) -> UsageOut:
        return cast(UsageOut, await self.request("POST", "/v1/usage", body=_keyed(body)))

    async def check(self, body: ReserveBody) -> CheckOut:
        return cast(CheckOut, await self.request("POST", "/v1/check", body=dict(body)))

    async def limits(
        self,
        user_id: str,
        *,
        tenant_id: Optional[str] = None,
        company_id: Optional[str] = None,
        tier: Optional[str] = None,
    ) -> LimitsAnswer:
        """``GET /v1/limits``: the user's effective limits, used, reserved and remaining."""
        q = _query(user_id=user_id, tenant_id=tenant_id, company_id=company_id, tier=tier)
        return cast(LimitsAnswer, await self.request("GET", "/v1/limits", query=q))

    async def daily_usage(
        self, user_id: str, *, date: Optional[str] = None, tenant_id: Optional[str] = None
    ) -> DailyOut:
        path = f"/v1/users/{_segment(user_id)}/daily-usage"
        q = _query(date=date, tenant_id=tenant_id)
        return cast(DailyOut, await self.request("GET", path, query=q))

    async def alerts(
        self,
        *,
        all: Optional[bool] = None,
        tenant_id: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> AlertsOut:
        q = _query(all=all, tenant_id=tenant_id, limit=limit)
        return cast(AlertsOut, await self.request("GET", "/v1/alerts", query=q))

    def guard(
        self, subject: Subject, estimate: Estimate, *, usage: Optional[UsageReader] = None
    ) -> "AsyncGuard":
        """As :meth:`SpendGuard.guard`: ``async with``, a decorator of coroutine functions,
        or ``await sg.guard(...).run(fn, *args)``."""
        return AsyncGuard(self, subject, estimate, usage)


class AsyncGuard:
    """One guarded model call for asyncio (see :class:`Guard`)."""

    def __init__(
        self,
        client: AsyncSpendGuard,
        subject: Subject,
        estimate: Estimate,
        usage: Optional[UsageReader] = None,
    ) -> None:
        self._client = client
        self._subject = subject
        self._estimate = estimate
        self._read = usage or usage_of
        self.reservation: Optional[ReservedOut] = None
        self.result: Any = None
        self.usage: Optional[Usage] = None
        self.committed: Optional[CommittedOut] = None

    def _fresh(self) -> "AsyncGuard":
        return AsyncGuard(self._client, self._subject, self._estimate, self._read)

    async def __aenter__(self) -> "AsyncGuard":
        body = cast(ReserveBody, {**self._subject, **self._estimate})
        self.reservation = await self._client.reserve(body)
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.reservation is not None
        rid = self.reservation["reservation_id"]
        if exc is not None:
            try:
                await self._client.release(rid, _reason(exc))
            except Exception:
                pass  # it expires after its TTL; the call's own error is the one to see
            return
        usage = self.usage if self.usage is not None else self._read(self.result)
        self.committed = await self._client.commit(rid, cast(CommitBody, _commit_body(usage)))

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        async with self._fresh() as call:
            call.result = await fn(*args, **kwargs)
        return cast(T, call.result)

    def __call__(self, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> T:
            return await self.run(fn, *args, **kwargs)

        return wrapper
