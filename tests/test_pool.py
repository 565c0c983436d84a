"""SessionPool: sessions on rows of one cache, decode steps batched, equal to sessions run alone."""

import pytest
import torch

import streaming
from streaming.errors import InvalidInputError, PoolFullError
from tests.tiny_checkpoint import make_tiny_checkpoint

PROMPTS = ["Once upon a time", "The", "A long time ago in a land far away there lived a king who"]


@pytest.fixture(scope="module", params=["lckv", "plain"])
def runtime(request, tmp_path_factory):
    return streaming.load(make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param))


def _alone(runtime, prompt, **kwargs):
    s = runtime.session(sinks=2, window=30, chunk=8, seed=0)
    return [r for r in s.generate(prompt, **kwargs)], s


@pytest.mark.parametrize("with_idle_row", [True, False])  # a subset of the rows steps / every row steps
def test_batched_replies_equal_replies_run_alone(runtime, with_idle_row):
    pool = runtime.pool(4 if with_idle_row else 3, sinks=2, window=30, chunk=8)
    sessions = [pool.session(seed=0) for _ in PROMPTS]
    if not with_idle_row:
        sessions = sessions[1:] + sessions[:1]  # sessions not in row order
    idle = pool.session(seed=0) if with_idle_row else runtime.session(sinks=2, window=30, chunk=8, seed=0)
    idle.feed("an idle stream")
    # 40 tokens through a 32-slot cache: every row evicts during the batched steps.
    settings = dict(max_new_tokens=40, temperature=0.9, top_k=20, seed=5)
    got = {id(s): [] for s in sessions}
    for session, response in pool.generate(list(zip(sessions, PROMPTS)), **settings):
        got[id(session)].append(response)
    for session, prompt in zip(sessions, PROMPTS):
        expected, alone = _alone(runtime, prompt, **settings)
        mine = got[id(session)]
        assert [r.token_ids for r in mine] == [r.token_ids for r in expected]
        assert "".join(r.text for r in mine) == "".join(r.text for r in expected)
        assert mine[-1].finish_reason == "length" and session.stats() == alone.stats()
        torch.testing.assert_close(session.next_logits, alone.next_logits, rtol=1e-4, atol=1e-4)  # batched GEMM rounding
    # The idle row was written by every batched step but never advanced: it continues exactly.
    reference = runtime.session(sinks=2, window=30, chunk=8, seed=0)
    reference.feed("an idle stream")
    assert idle.stats() == reference.stats()
    torch.testing.assert_close(idle.feed(" goes on", return_logits=True),
                               reference.feed(" goes on", return_logits=True), rtol=1e-5, atol=1e-5)


def test_replies_of_different_lengths_finish_independently(runtime):
    pool = runtime.pool(3, sinks=2, window=30)
    a, b = pool.session(seed=0), pool.session(seed=0)
    stop_text = runtime.session(sinks=2, window=30, seed=0).generate_text("The", max_new_tokens=12)[4:7]
    reasons = {}
    for session, response in pool.generate([(a, "The"), (b, "Once")], max_new_tokens=12, stop=[stop_text]):
        if response.finish_reason:
            reasons[id(session)] = response.finish_reason
    assert reasons[id(a)] == "stop" and reasons[id(b)] in ("stop", "length")
    assert a.generate_text(max_new_tokens=3) is not None  # the sessions stay usable one by one


def test_pool_limits_and_release(runtime):
    pool = runtime.pool(2, sinks=2, window=16)
    a, _ = pool.session(), pool.session()
    with pytest.raises(PoolFullError):
        pool.session()
    before = a.stats().cache_bytes
    assert before * 3 == pool.cache.nbytes  # each session owns exactly its row (+ the engine's scratch row)
    handle = pool.begin(a, "open reply", max_new_tokens=3)
    with pytest.raises(streaming.SessionBusyError):
        pool.release(a)  # a reply is open: the row stays with the session
    assert pool.free_slots == 0
    pool.end(handle)
    pool.release(a)
    with pytest.raises(InvalidInputError):
        a.feed("released")
    with pytest.raises(InvalidInputError):
        pool.release(a)
    c = pool.session()
    assert c.stats().tokens_seen == 0 and pool.free_slots == 0
    with pytest.raises(InvalidInputError):
        pool.generate([(c, "x"), (c, "y")])
    other = runtime.pool(1, sinks=2, window=16).session()
    with pytest.raises(InvalidInputError):
        pool.generate([(other, "x")])
    with pytest.raises(InvalidInputError):
        runtime.pool(0)


def test_externally_driven_chat_replies_equal_session_chat(runtime):
    pool = runtime.pool(2, sinks=2, window=60)
    sessions = [pool.session(seed=0), pool.session(seed=0)]
    conversations = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "tell me more"}]]
    handles = [pool.begin_chat(s, c, max_new_tokens=10) for s, c in zip(sessions, conversations)]
    with pytest.raises(streaming.SessionBusyError):
        sessions[0].feed("busy while its reply is open")
    texts = ["", ""]
    while handles:
        for handle, response in zip(handles, pool.step(handles)):
            texts[sessions.index(handle.session)] += response.text
        for handle in [h for h in handles if h.reply.finished]:
            pool.end(handle)
        handles = [h for h in handles if not h.ended]
    for session, conversation, text in zip(sessions, conversations, texts):
        alone = runtime.session(sinks=2, window=60, seed=0)
        assert "".join(r.text for r in alone.chat(conversation, max_new_tokens=10)) == text
        # The chat bookkeeping was recorded: the next turn continues both streams the same way.
        follow = conversation + [{"role": "assistant", "content": text}, {"role": "user", "content": "and?"}]
        assert session.chat_turn(follow).prompt == alone.chat_turn(follow).prompt
        assert session.stats() == alone.stats()
