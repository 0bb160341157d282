"""The server under test (started by the Rust test that runs this suite:
SPENDGUARD_TEST_URL, SPENDGUARD_TEST_ADMIN_KEY), fresh names, and tenants with keys."""

import datetime
import itertools
import os
import time
from typing import Iterator, Tuple

import pytest

from spendguard_client import SpendGuard

URL = os.environ.get("SPENDGUARD_TEST_URL", "")
ADMIN_KEY = os.environ.get("SPENDGUARD_TEST_ADMIN_KEY", "")
if not URL or not ADMIN_KEY:
    raise RuntimeError(
        "set SPENDGUARD_TEST_URL and SPENDGUARD_TEST_ADMIN_KEY (a spendguard serve to test)"
    )

_n = itertools.count()


def unique(prefix: str) -> str:
    """A name no other test (or run) uses."""
    return f"{prefix}-{os.getpid()}-{next(_n)}-{time.time_ns() % 10**9}"


def today() -> str:
    """Today in UTC (the server's default time zone)."""
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


@pytest.fixture
def admin() -> Iterator[SpendGuard]:
    with SpendGuard(URL, ADMIN_KEY) as client:
        yield client


@pytest.fixture
def tenant(admin: SpendGuard) -> Iterator[Tuple[str, SpendGuard, str]]:
    """A new tenant, a client with its key, and the key."""
    tenant_id = unique("py")
    key = admin.request("POST", "/v1/admin/api-keys", body={"tenant_id": tenant_id})["key"]
    with SpendGuard(URL, key) as client:
        yield tenant_id, client, key


def subject(tenant_id: str, user_id: str, model: str = "gpt-4o-mini") -> dict:
    return {"tenant_id": tenant_id, "user_id": user_id, "model": model, "tier": "pro"}


def user_day_usd(client: SpendGuard, tenant_id: str, user_id: str) -> dict:
    """The user's daily USD limit entry."""
    limits = client.limits(user_id, tenant_id=tenant_id)["limits"]
    entries = [
        entry
        for entry in limits
        if (entry["scope"], entry["window"], entry["unit"]) == ("user", "day", "usd")
    ]
    assert len(entries) == 1, limits
    return entries[0]
