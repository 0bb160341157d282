"""Type-checked by ``mypy --strict`` (never run): a typical use of the client."""

from typing import Any, Dict, Union

from spendguard_client import (
    AsyncSpendGuard,
    CommittedOut,
    DailyOut,
    LimitExceededError,
    ReservedOut,
    SpendGuard,
    Subject,
)


def example(sg: SpendGuard) -> str:
    r: ReservedOut = sg.reserve(
        {"tenant_id": "acme", "user_id": "alice", "model": "gpt-4o-mini", "input_tokens": 10}
    )
    c: CommittedOut = sg.commit(
        r["reservation_id"], {"input_tokens": 9, "cached_input_tokens": 1, "output_tokens": 3}
    )
    day: DailyOut = sg.daily_usage("alice", tenant_id="acme")
    subject: Subject = {"tenant_id": "acme", "user_id": "alice", "model": "gpt-4o-mini"}

    @sg.guard(subject, {"input_tokens": 10, "max_output_tokens": 100})
    def ask(prompt: str) -> Dict[str, Any]:
        return {"usage": {"prompt_tokens": len(prompt), "completion_tokens": 1}}

    try:
        with sg.guard(subject, {"estimated_cost_usd": "0.01", "input_tokens": 1}) as call:
            call.result = ask("Hi")
    except LimitExceededError as e:
        return f"{e.code} {e.retry_after} {len(e.limits)}"
    assert call.committed is not None
    return c["request_status"] + str(day["totals"]["cost_usd"]) + call.committed["usage_id"]


async def example_async(sg: AsyncSpendGuard) -> Union[float, str]:
    subject: Subject = {"tenant_id": "acme", "user_id": "alice", "model": "claude-haiku-4-5"}
    async with sg.guard(subject, {"input_tokens": 10, "max_output_tokens": 100}) as call:
        call.usage = {"input_tokens": 10, "output_tokens": 5}
    return call.committed["cost_usd"] if call.committed else 0.0
