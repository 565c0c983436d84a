"""Public Session API behaviour: generation layers, stops, busy sessions, chat turns, seeds."""

import asyncio

import pytest

import streaming
from streaming.errors import InvalidInputError, SessionBusyError
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
        assert len(s._chat_tail) <= CHAT_TAIL and s._chat_count == len(conversation)
    stream = tok.decode(list(s._recent))  # every id fed so far (the window is large enough)
    assert stream.startswith(tok.render_chat(conversation[:2], add_generation_prompt=True))
    for turn in range(6):  # each user turn was fed exactly once, with its generation prompt
        assert stream.count(f"question {turn}\n<|assistant|>\n") == 1


def test_cancelling_an_async_generation_leaves_the_session_usable(runtime, monkeypatch):
    import time

    import streaming.generate as generate_module

    real_sample = generate_module.sample

    def slow_sample(*args, **kwargs):  # every decode step takes 50 ms: the cancel lands mid-step
        time.sleep(0.05)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(generate_module, "sample", slow_sample)
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
