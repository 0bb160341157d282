"""Shared fixtures of the SDK suite: the gateway's address, the keys, what the mock upstream
reports and what each call must be charged.

The suite is started by the Rust test `sdk::official_python_sdks_are_charged_exactly`, which
runs a gateway in front of the mock upstream and passes, through the environment:

- SPENDGUARD_SDK_URL: the server's base URL;
- SPENDGUARD_SDK_KEY: a key of tenant SPENDGUARD_SDK_TENANT, the SDKs' API key;
- SPENDGUARD_SDK_ADMIN_KEY: the admin key, to read usage back and set budgets;
- SPENDGUARD_SDK_DATE: the server's (fixed) day;
- SPENDGUARD_SDK_EXPECT: JSON, what the mock reports per API (`mock`), the text it sends
  (`text`) and what each call must be charged (`charged`, cost in micro-dollars).
"""

import json
import os
import time
from decimal import Decimal

import httpx
import pytest


class Gateway:
    def __init__(self):
        self.url = os.environ["SPENDGUARD_SDK_URL"].rstrip("/")
        self.key = os.environ["SPENDGUARD_SDK_KEY"]
        self.admin = os.environ["SPENDGUARD_SDK_ADMIN_KEY"]
        self.tenant = os.environ["SPENDGUARD_SDK_TENANT"]
        self.date = os.environ["SPENDGUARD_SDK_DATE"]
        self.expect = json.loads(os.environ["SPENDGUARD_SDK_EXPECT"])
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.admin}"},
            timeout=30,
        )

    @property
    def openai_base(self):
        return f"{self.url}/openai/v1"

    @property
    def anthropic_base(self):
        return f"{self.url}/anthropic"

    def day(self, user):
        """The user's totals of the day, the cost in whole micro-dollars."""
        r = self.http.get(
            f"/v1/users/{user}/daily-usage",
            params={"tenant_id": self.tenant, "date": self.date},
        )
        assert r.status_code == 200, r.text
        # Decimals, not floats: the cost is compared to the micro-dollar.
        totals = json.loads(r.text, parse_float=Decimal)["totals"]
        micros = Decimal(totals["cost_usd"]) * 1_000_000
        assert micros == micros.to_integral_value(), totals
        return {
            "requests": totals["requests"],
            "input_tokens": totals["input_tokens"],
            "cached_input_tokens": totals["cached_input_tokens"],
            "output_tokens": totals["output_tokens"],
            "cost_micros": int(micros),
        }

    def assert_charged(self, user, api, calls=1):
        """The user's day holds `calls` calls of `api`, charged what the mock reported."""
        one = self.expect["charged"][api]
        want = {
            "requests": calls,
            "input_tokens": calls * one["input_tokens"],
            "cached_input_tokens": calls * one["cached_input_tokens"],
            "output_tokens": calls * one["output_tokens"],
            "cost_micros": calls * one["cost_micros"],
        }
        got = self.day(user)
        assert got == want, f"{user}, {api}: recorded {got}, expected {want}"

    def wait_recorded(self, user, timeout_s=30):
        """Waits until the user's day holds a call (one settled after its caller left)."""
        deadline = time.monotonic() + timeout_s
        while self.day(user)["requests"] == 0:
            assert time.monotonic() < deadline, f"{user}: nothing recorded in {timeout_s} s"
            time.sleep(0.02)

    def starve(self, user):
        """Gives the user a daily budget of one micro-dollar: every call is refused."""
        r = self.http.put(
            f"/v1/admin/budgets/user/{user}",
            params={"tenant_id": self.tenant},
            json={"daily_usd": "0.000001"},
        )
        assert r.status_code == 200, r.text


@pytest.fixture(scope="session")
def gateway():
    g = Gateway()
    yield g
    g.http.close()


@pytest.fixture
def user(request):
    """A user of this test alone, so its day holds only this test's calls."""
    name = f"{request.node.module.__name__}-{request.node.name}"
    return "sdk-" + name.replace("_", "-")
