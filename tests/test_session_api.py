"""Public Session API behaviour: generation layers, stops, busy sessions, chat turns, seeds."""

import asyncio
import json

import pytest

import streaming
from streaming.errors import ConfigError, InvalidInputError, SessionBusyError
from streaming.runtime import DEFAULT_MODEL_DIR
from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return streaming.load(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "lckv"))


def test_feeding_while_a_generation_is_open_fails_fast(runtime):
    s = runtime.session(window=64, seed=0)
    it = s.generate("Hello", max_new_tokens=5)
    next(it)
    with pytest.raises(SessionBusyError):
        s.feed("more")
    it.close()
    s.feed("more")  # fine once the iterator is closed
    assert s.stats().tokens_seen > 2


def test_three_layers_agree_and_every_yielded_token_is_in_the_cache(runtime):
    a, b = runtime.session(window=64, seed=0), runtime.session(window=64, seed=0)
    responses = list(a.generate("Once upon a time", max_new_tokens=12, temperature=0.8, seed=3))
    text = b.generate_text("Once upon a time", max_new_tokens=12, temperature=0.8, seed=3)
    assert "".join(r.text for r in responses) == text
    assert responses[-1].finish_reason == "length"
    generated = [i for r in responses for i in r.token_ids]
    assert len(generated) == 12 == responses[-1].generated_tokens
    assert a.stats().tokens_seen == responses[0].prompt_tokens + 12
    assert a.stats() == b.stats()


def test_stop_string_ends_and_never_leaks(runtime):
    s = runtime.session(window=64, seed=0)
    free = s.generate_text("The", max_new_tokens=30)
    stop = free[5:8]
    assert stop.strip(), "need a visible stop string"
    s = runtime.session(window=64, seed=0)
    responses = list(s.generate("The", max_new_tokens=30, stop=[stop]))
    text = "".join(r.text for r in responses)
    assert responses[-1].finish_reason == "stop"
    assert stop not in text and text == free[: free.index(stop)]


def test_async_generation_matches_sync(runtime):
    async def collect():
        s = runtime.session(window=64, seed=0)
        return "".join([r.text async for r in s.agenerate("Hi", max_new_tokens=8)])

    sync = runtime.session(window=64, seed=0).generate_text("Hi", max_new_tokens=8)
    assert asyncio.run(collect()) == sync


def test_chat_feeds_only_new_messages(runtime):
    s = runtime.session(window=256, seed=0)
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    reply = "".join(r.text for r in s.chat(first, max_new_tokens=6))
    seen_after_first = s.stats().tokens_seen
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "again"}]
    responses = list(s.chat(second, max_new_tokens=6))
    # Only the new user turn (+ markers) was fed, not the whole conversation again.
    assert responses[0].prompt_tokens < seen_after_first
    with pytest.raises(InvalidInputError):
        list(s.chat([{"role": "user", "content": "x"}]))  # does not extend the conversation


def test_bad_generation_arguments_fail_at_call_time(runtime):
    s = runtime.session(window=64)
    for kwargs in ({"max_new_tokens": -1}, {"temperature": -1.0}, {"top_p": 0.0}, {"stop": [""]}):
        with pytest.raises(InvalidInputError):
            s.generate("x", **kwargs)
    with pytest.raises(InvalidInputError):
        s.feed([runtime.config.vocab_size])  # id out of range
    assert s.stats().tokens_seen == 0  # nothing was fed


def test_chat_turns_continue_the_stream_exactly_in_bounded_memory(runtime):
    from streaming.session import CHAT_TAIL

    s = runtime.session(window=1000, seed=0)
    tok = runtime.tokenizer
    conversation = [{"role": "system", "content": "Be brief."}]
    for turn in range(6):
        conversation.append({"role": "user", "content": f"question {turn}"})
        reply = "".join(r.text for r in s.chat(conversation, max_new_tokens=5))
        conversation.append({"role": "assistant", "content": reply})
        assert len(s._chat.tail) <= CHAT_TAIL and s._chat.count == len(conversation)
    stream = tok.decode(s.recent_ids())  # every id fed so far (the window is large enough)
    assert stream.startswith(tok.render_chat(conversation[:2], add_generation_prompt=True))
    for turn in range(6):  # each user turn was fed exactly once, with its generation prompt
        assert stream.count(f"question {turn}\n<|assistant|>\n") == 1


def test_cancelling_an_async_generation_leaves_the_session_usable(runtime, monkeypatch):
    import time

    from streaming.engine import Engine

    real_decode = Engine.decode_rows

    def slow_decode(*args, **kwargs):  # every decode step takes 50 ms: the cancel lands mid-step
        time.sleep(0.05)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(Engine, "decode_rows", slow_decode)
    s = runtime.session(window=64, seed=0)

    async def consume(started):
        async for _ in s.agenerate("Hi", max_new_tokens=None):
            started.set()

    async def main():
        started = asyncio.Event()
        task = asyncio.create_task(consume(started))
        await started.wait()
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Wait for the generator's cleanup (the in-flight step finishes, then the iterator closes).
        for _ in range(200):
            try:
                return s.feed("after")
            except SessionBusyError:
                await asyncio.sleep(0.01)
        raise AssertionError("the session stayed busy after cancellation")

    seen_before = s.stats().tokens_seen
    asyncio.run(main())
    assert s.stats().tokens_seen > seen_before


# ---- reply length defaults ------------------------------------------------------------------------

DEFAULT_LEN = 7  # the tiny checkpoint's generation_config.json max_new_tokens


@pytest.fixture(scope="module")
def short_default(tmp_path_factory):
    """A tiny checkpoint whose generation_config.json asks for 7-token replies."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("gencfg"), "lckv")
    (path / "generation_config.json").write_text(json.dumps({"max_new_tokens": DEFAULT_LEN, "do_sample": False}))
    return streaming.load(path)


def finish_within(responses, limit: int) -> list:
    """Consume a reply, failing (instead of running for ever) when it has not ended after `limit` responses."""
    out = []
    try:
        for r in responses:
            out.append(r)
            if r.finish_reason is not None:
                return out
            if len(out) >= limit:
                pytest.fail(f"the reply did not end within {limit} responses")
    finally:
        responses.close()
    return out


def test_default_length_comes_from_generation_config_else_the_documented_constant(runtime, short_default):
    from streaming.runtime import DEFAULT_MAX_NEW_TOKENS

    assert short_default.default_max_new_tokens == DEFAULT_LEN
    assert runtime.default_max_new_tokens == DEFAULT_MAX_NEW_TOKENS == 256  # no generation_config.json


@pytest.mark.parametrize("bad", [0, -3, "200", 2.5, True])
def test_bad_max_new_tokens_in_generation_config_names_file_and_key(tmp_path, bad):
    path = make_tiny_checkpoint(tmp_path / "bad", "plain", layers=1)
    (path / "generation_config.json").write_text(json.dumps({"max_new_tokens": bad}))
    with pytest.raises(ConfigError, match=r"generation_config\.json.*'max_new_tokens'"):
        streaming.load(path)


def test_omitted_length_is_the_default_and_none_is_unbounded(short_default):
    rt = short_default
    responses = finish_within(rt.session(window=64).generate("Once upon a time"), DEFAULT_LEN + 2)
    assert responses[-1].finish_reason == "length" and responses[-1].generated_tokens == DEFAULT_LEN
    assert len(rt.session(window=64).generate_text("Once upon a time")) == len(
        rt.session(window=64).generate_text("Once upon a time", max_new_tokens=DEFAULT_LEN))

    async def collect():
        return [r async for r in rt.session(window=64).agenerate("Once upon a time")]

    assert [r.token_ids for r in asyncio.run(collect())] == [r.token_ids for r in responses]
    # Explicit None: no length limit. Three times the default, still running, then closed by the caller.
    s = rt.session(window=64)
    it = s.generate("Once upon a time", max_new_tokens=None)
    unbounded = [next(it) for _ in range(3 * DEFAULT_LEN)]
    it.close()
    assert all(r.finish_reason is None for r in unbounded)
    assert unbounded[-1].generated_tokens == 3 * DEFAULT_LEN


def test_chat_without_a_length_ends_at_the_default(short_default):
    s = short_default.session(window=256)
    responses = finish_within(s.chat([{"role": "user", "content": "Tell me a long story."}]), DEFAULT_LEN + 2)
    assert responses[-1].generated_tokens <= DEFAULT_LEN
    if responses[-1].finish_reason == "length":
        assert responses[-1].generated_tokens == DEFAULT_LEN


def test_pool_replies_default_to_the_runtime_length(short_default):
    pool = short_default.pool(2, window=64)
    a, b = pool.session(), pool.session()
    last = {}
    replies = pool.generate([(a, "Once upon a time"), (b, "The")])
    for count, (session, response) in enumerate(replies):
        assert count < 2 * (DEFAULT_LEN + 1), "the pool's replies did not end at the default length"
        last[session] = response
    for session in (a, b):
        assert last[session].generated_tokens <= DEFAULT_LEN and last[session].finish_reason is not None
    assert max(r.generated_tokens for r in last.values()) == DEFAULT_LEN  # one at least ran to the limit
    handle = pool.begin(a, " and then")
    for _ in range(DEFAULT_LEN + 1):
        if not handle.reply.finished:
            pool.step([handle])
    assert handle.reply.finished
    pool.end(handle)
    assert handle.reply.generated <= DEFAULT_LEN
    chat = pool.begin_chat(b, [{"role": "user", "content": "hi"}])
    unbounded = pool.begin(a, " more", max_new_tokens=None)
    for _ in range(3 * DEFAULT_LEN):
        if not chat.reply.finished:
            pool.step([chat])
        pool.step([unbounded])
    assert chat.reply.finished and chat.reply.generated <= DEFAULT_LEN
    assert not unbounded.reply.finished and unbounded.reply.generated == 3 * DEFAULT_LEN
    pool.end(chat)
    pool.end(unbounded)


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="no bundled model")
def test_chat_on_the_bundled_model_ends_by_default():
    rt = streaming.load(device="cpu")
    assert rt.default_max_new_tokens == 200  # its generation_config.json
    s = rt.session(seed=0)
    responses = finish_within(s.chat([{"role": "user", "content": "Who is the narrator?"}]), 202)
    assert responses[-1].finish_reason in ("eos", "stop", "length")
    assert responses[-1].generated_tokens <= 200
    if responses[-1].finish_reason == "length":
        assert responses[-1].generated_tokens == 200
