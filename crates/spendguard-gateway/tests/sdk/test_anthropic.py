"""The official Anthropic Python SDK against the gateway: messages, whole and streamed,
charged exactly what the mock upstream reported (cache reads and writes included)."""

import anthropic
import pytest

MODEL = "claude-mock"
# Priced like MODEL; the mock streams it slowly.
SLOW_MODEL = "claude-mock-slow"


@pytest.fixture
def client(gateway, user):
    """An SDK client whose calls are charged to this test's user."""
    return anthropic.Anthropic(
        api_key=gateway.key,
        base_url=gateway.anthropic_base,
        default_headers={"x-spendguard-user": user},
        max_retries=0,
    )


def ask():
    return [{"role": "user", "content": "Say hello."}]


def test_message(gateway, user, client):
    mock = gateway.expect["mock"]["messages"]
    m = client.messages.create(model=MODEL, max_tokens=1000, messages=ask())
    assert m.content[0].text == gateway.expect["text"]["whole"]
    assert m.usage.input_tokens == mock["input_tokens"]
    assert m.usage.cache_read_input_tokens == mock["cache_read_input_tokens"]
    assert m.usage.cache_creation_input_tokens == mock["cache_creation_input_tokens"]
    assert m.usage.output_tokens == mock["output_tokens"]
    gateway.assert_charged(user, "messages")


def test_message_stream(gateway, user, client):
    mock = gateway.expect["mock"]["messages"]
    with client.messages.stream(model=MODEL, max_tokens=1000, messages=ask()) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == gateway.expect["text"]["streamed"]
    assert final.usage.output_tokens == mock["output_tokens"]
    assert final.usage.cache_read_input_tokens == mock["cache_read_input_tokens"]
    gateway.assert_charged(user, "messages")


def test_raw_stream_charges_the_metadata_user(gateway, user):
    # No identity header: `metadata.user_id` names whom to charge.
    client = anthropic.Anthropic(
        api_key=gateway.key, base_url=gateway.anthropic_base, max_retries=0
    )
    events = list(
        client.messages.create(
            model=MODEL,
            max_tokens=1000,
            messages=ask(),
            metadata={"user_id": user},
            stream=True,
        )
    )
    text = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == gateway.expect["text"]["streamed"]
    assert events[-1].type == "message_stop"
    gateway.assert_charged(user, "messages")


def test_a_stream_left_early_is_charged_in_full(gateway, user, client):
    # A slow stream the caller leaves after its first piece of text.
    with client.messages.stream(model=SLOW_MODEL, max_tokens=1000, messages=ask()) as stream:
        first = next(iter(stream.text_stream))
    assert first == "piece 0 "
    gateway.wait_recorded(user)
    gateway.assert_charged(user, "messages")


def test_count_tokens_is_not_charged(gateway, user, client):
    r = client.messages.count_tokens(model=MODEL, messages=ask())
    assert r.input_tokens == gateway.expect["mock"]["count_tokens"]
    assert gateway.day(user)["requests"] == 0


def test_a_refusal_is_a_rate_limit_error(gateway, user, client):
    gateway.starve(user)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model=MODEL, max_tokens=1000, messages=ask())
    e = caught.value
    assert e.status_code == 429
    assert e.body["error"]["type"] == "rate_limit_error"
    assert int(e.response.headers["retry-after"]) >= 1
    with pytest.raises(anthropic.RateLimitError):
        with client.messages.stream(model=MODEL, max_tokens=1000, messages=ask()) as stream:
            stream.get_final_message()
    assert gateway.day(user)["requests"] == 0
