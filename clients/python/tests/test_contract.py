"""The contract: the client's TypedDicts and literal types are what the live server's
``/openapi.json`` says. A change of the document that the types do not follow fails here."""

import typing

import httpx
import pytest

from conftest import URL
import spendguard_client as sg

#: Each TypedDict and the component schema it mirrors.
SHAPES = {
    "ReserveBody": sg.ReserveBody,
    "ReservedOut": sg.ReservedOut,
    "CommitBody": sg.CommitBody,
    "CommittedOut": sg.CommittedOut,
    "ReleaseBody": sg.ReleaseBody,
    "ReleasedOut": sg.ReleasedOut,
    "UsageBody": sg.UsageBody,
    "UsageOut": sg.UsageOut,
    "CheckOut": sg.CheckOut,
    "LimitOut": sg.LimitOut,
    "LimitsAnswer": sg.LimitsAnswer,
    "ErrorBody": sg.ErrorBody,
    "ErrorDetail": sg.ErrorDetail,
    "TotalsOut": sg.TotalsOut,
    "ModelDayOut": sg.ModelDayOut,
    "DailyOut": sg.DailyOut,
    "AlertOut": sg.AlertOut,
    "AlertsOut": sg.AlertsOut,
}

#: Each literal type and the enum schema it mirrors.
ENUMS = {
    "ErrorCode": sg.ErrorCode,
    "ScopeName": sg.ScopeName,
    "WindowName": sg.WindowName,
    "UnitName": sg.UnitName,
    "PricingName": sg.PricingName,
    "RequestStatusName": sg.RequestStatusName,
    "SettledName": sg.SettledName,
    "AlertKindName": sg.AlertKindName,
    "CommitStatus": sg.CommitStatus,
}


@pytest.fixture(scope="module")
def schemas():
    doc = httpx.get(f"{URL}/openapi.json").json()
    return doc["components"]["schemas"]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_typed_dicts_have_the_schemas_keys(schemas, name):
    schema = schemas[name]
    shape = SHAPES[name]
    properties = set(schema.get("properties", {}))
    required = set(schema.get("required", []))
    assert set(shape.__required_keys__) == required, f"{name}: required keys"
    assert set(shape.__optional_keys__) == properties - required, f"{name}: optional keys"


def _enum_values(schema):
    if "enum" in schema:
        return set(schema["enum"])
    if "const" in schema:
        return {schema["const"]}
    values = set()
    for part in schema.get("oneOf", []) + schema.get("anyOf", []):
        values |= _enum_values(part)
    return values


@pytest.mark.parametrize("name", sorted(ENUMS))
def test_literals_have_the_schemas_values(schemas, name):
    assert set(typing.get_args(ENUMS[name])) == _enum_values(schemas[name]), name
