import asyncio
import types

import pytest

from conftest import ADMIN_KEY, URL, subject, today, unique, user_day_usd
from spendguard_client import (
    AsyncSpendGuard,
    LimitExceededError,
    SpendGuard,
    SpendGuardError,
    usage_of,
)

OPENAI_CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
    "usage": {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 200},
    },
}


def anthropic_message():
    """An Anthropic message as the SDK returns it: an object with attributes."""
    usage = types.SimpleNamespace(
        input_tokens=50,
        cache_read_input_tokens=1000,
        cache_creation_input_tokens=200,
        output_tokens=80,
    )
    return types.SimpleNamespace(
        id="msg_1", type="message", role="assistant", model="claude-haiku-4-5", usage=usage
    )


def cost_of(client, tenant_id, model, **tokens):
    """What spendguard charges a direct record of these tokens (to compare exactly)."""
    return client.record({**subject(tenant_id, unique("ref"), model), **tokens})["cost_usd"]


def test_reserve_then_commit(tenant):
    tenant_id, client, _ = tenant
    user = unique("u")
    r = client.reserve({**subject(tenant_id, user), "input_tokens": 1000, "max_output_tokens": 500})
    assert r["replayed"] is False and r["reserved_cost_usd"] > 0
    assert user_day_usd(client, tenant_id, user)["reserved"] == r["reserved_cost_usd"]
    body = {"input_tokens": 900, "cached_input_tokens": 100, "output_tokens": 120}
    c = client.commit(r["reservation_id"], body)
    assert (c["input_tokens"], c["cached_input_tokens"], c["output_tokens"]) == (900, 100, 120)
    assert (c["request_status"], c["pricing"], c["replayed"]) == ("success", "catalog", False)
    again = client.commit(r["reservation_id"], body)
    assert again["usage_id"] == c["usage_id"] and again["replayed"] is True
    entry = user_day_usd(client, tenant_id, user)
    assert (entry["used"], entry["reserved"]) == (c["cost_usd"], 0)
    day = client.daily_usage(user, date=today())
    assert day["totals"]["requests"] == 1
    assert day["totals"]["cost_usd"] == c["cost_usd"]


def test_each_reservation_gets_its_own_idempotency_key(tenant):
    tenant_id, client, _ = tenant
    body = {**subject(tenant_id, unique("u")), "input_tokens": 10, "max_output_tokens": 10}
    assert client.reserve(body)["reservation_id"] != client.reserve(body)["reservation_id"]
    key = unique("key")
    first = client.reserve({**body, "idempotency_key": key})
    second = client.reserve({**body, "idempotency_key": key})
    assert second["reservation_id"] == first["reservation_id"] and second["replayed"] is True


def test_a_refusal_raises_the_typed_error_with_retry_after(tenant, admin):
    tenant_id, client, _ = tenant
    user = unique("u")
    admin.request(
        "PUT",
        f"/v1/admin/budgets/user/{user}",
        query={"tenant_id": tenant_id},
        body={"daily_usd": "0.01"},
    )
    with pytest.raises(LimitExceededError) as info:
        client.reserve(
            {**subject(tenant_id, user), "input_tokens": 10, "estimated_cost_usd": "0.02"}
        )
    err = info.value
    assert isinstance(err, SpendGuardError)
    assert (err.status, err.code) == (429, "budget_exceeded")
    assert isinstance(err.retry_after, int) and 0 < err.retry_after <= 86_400
    assert [(x["scope"], x["scope_id"], x["window"], x["unit"], x["limit"]) for x in err.limits] == [
        ("user", user, "day", "usd", 0.01)
    ]
    with pytest.raises(SpendGuardError) as info:
        client.commit("01890000-0000-7000-8000-000000000000", {"input_tokens": 1, "output_tokens": 1})
    assert not isinstance(info.value, LimitExceededError)
    assert (info.value.status, info.value.code) == (404, "not_found")
    with SpendGuard(URL, "sg_wrong") as bad, pytest.raises(SpendGuardError) as info:
        bad.alerts()
    assert (info.value.status, info.value.code) == (401, "unauthorized")


def test_the_context_manager_releases_when_the_call_raises(tenant):
    tenant_id, client, _ = tenant
    user = unique("u")
    with pytest.raises(RuntimeError, match="provider is down"):
        with client.guard(
            subject(tenant_id, user), {"input_tokens": 1000, "max_output_tokens": 1000}
        ) as call:
            held = call.reservation
            assert user_day_usd(client, tenant_id, user)["reserved"] == held["reserved_cost_usd"]
            raise RuntimeError("the provider is down")
    entry = user_day_usd(client, tenant_id, user)
    assert (entry["used"], entry["reserved"]) == (0, 0)
    assert client.release(held["reservation_id"])["state"] == "released"
    assert client.daily_usage(user, date=today())["totals"]["requests"] == 0


def test_the_decorator_releases_when_the_call_raises(tenant):
    tenant_id, client, _ = tenant
    user = unique("u")

    @client.guard(subject(tenant_id, user), {"input_tokens": 100, "max_output_tokens": 100})
    def call_model():
        assert user_day_usd(client, tenant_id, user)["reserved"] > 0
        raise ValueError("bad answer")

    for _ in range(2):
        with pytest.raises(ValueError):
            call_model()
    entry = user_day_usd(client, tenant_id, user)
    assert (entry["used"], entry["reserved"]) == (0, 0)


def test_a_refused_guard_never_runs_the_call(tenant, admin):
    tenant_id, client, _ = tenant
    user = unique("u")
    admin.request(
        "PUT",
        f"/v1/admin/budgets/user/{user}",
        query={"tenant_id": tenant_id},
        body={"daily_usd": "0.000001"},
    )
    ran = []
    with pytest.raises(LimitExceededError) as info:
        client.guard(
            subject(tenant_id, user), {"input_tokens": 1000, "max_output_tokens": 1000}
        ).run(lambda: ran.append(1))
    assert info.value.retry_after and info.value.retry_after > 0
    assert ran == []


def test_the_decorator_commits_an_openai_completion(tenant):
    tenant_id, client, _ = tenant
    user = unique("u")
    estimate = {"input_tokens": 1200, "max_output_tokens": 1000}

    @client.guard(subject(tenant_id, user), estimate)
    def ask(prompt):
        assert prompt == "Hi"
        return OPENAI_CHAT

    assert ask("Hi") is OPENAI_CHAT
    assert ask("Hi") is OPENAI_CHAT  # a second call: its own reservation and record
    expected = cost_of(
        client, tenant_id, "gpt-4o-mini", input_tokens=1200, cached_input_tokens=200, output_tokens=300
    )
    day = client.daily_usage(user, date=today())
    t = day["totals"]
    assert (t["requests"], t["input_tokens"], t["cached_input_tokens"], t["output_tokens"]) == (
        2,
        2400,
        400,
        600,
    )
    assert t["cost_usd"] == round(2 * expected, 6)
    assert user_day_usd(client, tenant_id, user)["reserved"] == 0


def test_the_context_manager_commits_an_anthropic_message(tenant):
    tenant_id, client, _ = tenant
    user = unique("u")
    with client.guard(
        subject(tenant_id, user, "claude-haiku-4-5"), {"input_tokens": 1250, "max_output_tokens": 500}
    ) as call:
        call.result = anthropic_message()
    c = call.committed
    assert c is not None
    # spendguard's input is every prompt token: uncached, cache reads and cache writes.
    assert (c["input_tokens"], c["cached_input_tokens"], c["output_tokens"]) == (1250, 1000, 80)
    expected = cost_of(
        client,
        tenant_id,
        "claude-haiku-4-5",
        input_tokens=1250,
        cached_input_tokens=1000,
        output_tokens=80,
    )
    assert c["cost_usd"] == expected
    day = client.daily_usage(user, date=today())
    assert [(m["model"], m["input_tokens"], m["cost_usd"]) for m in day["models"]] == [
        ("claude-haiku-4-5", 1250, expected)
    ]


def test_a_result_without_usage_is_charged_its_estimate(tenant):
    tenant_id, client, _ = tenant
    with client.guard(
        subject(tenant_id, unique("u")), {"input_tokens": 100, "max_output_tokens": 100}
    ) as call:
        call.result = "no usage here"
    assert call.committed["request_status"] == "truncated"
    assert call.committed["cost_usd"] == call.reservation["reserved_cost_usd"] > 0


def test_async_client_guards_and_releases(tenant):
    tenant_id, _, key = tenant

    async def main():
        async with AsyncSpendGuard(URL, key) as client:
            user = unique("u")
            guarded = client.guard(
                subject(tenant_id, user, "claude-haiku-4-5"),
                {"input_tokens": 1250, "max_output_tokens": 500},
            )

            @guarded
            async def ask():
                return anthropic_message()

            assert (await ask()).id == "msg_1"
            with pytest.raises(KeyError):
                async with guarded as call:
                    assert call.reservation["reserved_cost_usd"] > 0
                    raise KeyError("boom")
            async with client.guard(
                subject(tenant_id, user), {"input_tokens": 800, "max_output_tokens": 100}
            ) as call:
                call.result = {
                    "object": "response",
                    "usage": {
                        "input_tokens": 800,
                        "input_tokens_details": {"cached_tokens": 300},
                        "output_tokens": 90,
                        "total_tokens": 890,
                    },
                }
            c = call.committed
            assert (c["input_tokens"], c["cached_input_tokens"], c["output_tokens"]) == (800, 300, 90)
            day = await client.daily_usage(user, date=today())
            assert day["totals"]["requests"] == 2
            assert day["totals"]["input_tokens"] == 1250 + 800
            with pytest.raises(LimitExceededError):
                await client.reserve(
                    {**subject(tenant_id, user), "input_tokens": 1, "estimated_cost_usd": "1000000"}
                )
            return (await client.limits(user))["limits"]

    limits = asyncio.run(main())
    entry = [x for x in limits if (x["scope"], x["window"], x["unit"]) == ("user", "day", "usd")][0]
    assert entry["reserved"] == 0


def test_usage_of_reads_each_provider_and_nothing_else():
    assert usage_of(OPENAI_CHAT) == {
        "input_tokens": 1200,
        "cached_input_tokens": 200,
        "output_tokens": 300,
    }
    assert usage_of({"usage": {"prompt_tokens": 7, "total_tokens": 7}}) == {
        "input_tokens": 7,
        "cached_input_tokens": 0,
        "output_tokens": 0,
    }
    assert usage_of(anthropic_message()) == {
        "input_tokens": 1250,
        "cached_input_tokens": 1000,
        "output_tokens": 80,
    }
    assert usage_of({}) is None
    assert usage_of(None) is None
    assert usage_of({"usage": {"total": 3}}) is None
    assert usage_of({"usage": {"prompt_tokens": -4}})["input_tokens"] == 0
    assert ADMIN_KEY
