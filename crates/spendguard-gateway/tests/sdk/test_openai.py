"""The official OpenAI Python SDK against the gateway: chat completions, responses and
embeddings, whole and streamed, each charged exactly what the mock upstream reported."""

import openai
import pytest

CHAT_MODEL = "gpt-4o-mock"
# Priced like CHAT_MODEL; the mock streams it slowly.
SLOW_MODEL = "gpt-4o-mock-slow"
EMBEDDING_MODEL = "text-embedding-3-mock"


@pytest.fixture
def client(gateway, user):
    """An SDK client whose calls are charged to this test's user."""
    return openai.OpenAI(
        api_key=gateway.key,
        base_url=gateway.openai_base,
        default_headers={"x-spendguard-user": user},
        max_retries=0,
    )


def ask():
    return [{"role": "user", "content": "Say hello."}]


def test_chat_completion(gateway, user, client):
    mock = gateway.expect["mock"]["chat"]
    r = client.chat.completions.create(model=CHAT_MODEL, messages=ask(), max_tokens=1000)
    assert r.choices[0].message.content == gateway.expect["text"]["whole"]
    assert r.usage.prompt_tokens == mock["prompt_tokens"]
    assert r.usage.prompt_tokens_details.cached_tokens == mock["cached_tokens"]
    assert r.usage.completion_tokens == mock["completion_tokens"]
    assert r.usage.completion_tokens_details.reasoning_tokens == mock["reasoning_tokens"]
    gateway.assert_charged(user, "chat")


def test_chat_completion_charges_the_user_field(gateway, user):
    # No identity header: the request's own `user` names whom to charge.
    client = openai.OpenAI(api_key=gateway.key, base_url=gateway.openai_base, max_retries=0)
    r = client.chat.completions.create(model=CHAT_MODEL, messages=ask(), user=user)
    assert r.choices[0].message.content == gateway.expect["text"]["whole"]
    gateway.assert_charged(user, "chat")


def test_chat_stream_without_usage_sees_no_usage_chunk(gateway, user, client):
    # The gateway asks the provider for the usage chunk to charge the call, and must not
    # pass it on to a caller that did not ask for it.
    chunks = list(client.chat.completions.create(model=CHAT_MODEL, messages=ask(), stream=True))
    assert chunks, "the stream was empty"
    for c in chunks:
        assert c.usage is None, c
        assert c.choices, f"a chunk without choices reached the caller: {c}"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == gateway.expect["text"]["streamed"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    gateway.assert_charged(user, "chat")


def test_chat_stream_with_usage_passes_it_on(gateway, user, client):
    mock = gateway.expect["mock"]["chat"]
    chunks = list(
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=ask(),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1, chunks
    last = chunks[-1]
    assert last is with_usage[0] and last.choices == []
    assert last.usage.prompt_tokens == mock["prompt_tokens"]
    assert last.usage.completion_tokens == mock["completion_tokens"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == gateway.expect["text"]["streamed"]
    gateway.assert_charged(user, "chat")


def test_chat_stream_helper(gateway, user, client):
    with client.chat.completions.stream(model=CHAT_MODEL, messages=ask()) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == gateway.expect["text"]["streamed"]
    gateway.assert_charged(user, "chat")


def test_a_stream_left_early_is_charged_in_full(gateway, user, client):
    # A slow stream (20 chunks) the caller stops reading after its first chunk: the gateway
    # reads on to the provider's usage and charges all of it.
    stream = client.chat.completions.create(model=SLOW_MODEL, messages=ask(), stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    stream.close()
    gateway.wait_recorded(user)
    gateway.assert_charged(user, "chat")


def test_response(gateway, user, client):
    mock = gateway.expect["mock"]["responses"]
    r = client.responses.create(model=CHAT_MODEL, input="Say hello.", max_output_tokens=500)
    assert r.output_text == gateway.expect["text"]["whole"]
    assert r.usage.input_tokens == mock["input_tokens"]
    assert r.usage.input_tokens_details.cached_tokens == mock["cached_tokens"]
    assert r.usage.output_tokens == mock["output_tokens"]
    gateway.assert_charged(user, "responses")


def test_response_stream(gateway, user, client):
    mock = gateway.expect["mock"]["responses"]
    events = list(client.responses.create(model=CHAT_MODEL, input="Say hello.", stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == gateway.expect["text"]["streamed"]
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage.output_tokens == mock["output_tokens"]
    gateway.assert_charged(user, "responses")


def test_embeddings(gateway, user, client):
    mock = gateway.expect["mock"]["embeddings"]
    # The SDK asks for base64 and decodes it.
    r = client.embeddings.create(model=EMBEDDING_MODEL, input=["one", "two"])
    assert [d.embedding for d in r.data] == [[0.25, 0.5, 1.0], [0.25, 0.5, 1.0]]
    assert r.usage.prompt_tokens == mock["prompt_tokens"]
    gateway.assert_charged(user, "embeddings")


def test_a_refusal_is_a_rate_limit_error(gateway, user, client):
    gateway.starve(user)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=CHAT_MODEL, messages=ask())
    e = caught.value
    assert e.status_code == 429
    assert e.code == "budget_exceeded"
    assert int(e.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=CHAT_MODEL, messages=ask(), stream=True)
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model=CHAT_MODEL, input="Say hello.", stream=True)
    # Refused before the provider: nothing was charged.
    assert gateway.day(user)["requests"] == 0
