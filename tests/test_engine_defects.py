"""Regression tests for the defects the engine issue listed in the old pool and session code."""

import asyncio

import pytest
import torch

import streaming
from cache.errors import CacheConfigError
from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return streaming.load(make_tiny_checkpoint(tmp_path_factory.mktemp("lckv"), "lckv"))


def test_cancel_before_the_first_decode_step_keeps_the_chat_in_step(runtime):
    """Defect 1: a reply ended before it produced a token still counts as the assistant's turn, so
    the next message (with that empty reply in the history) extends the conversation."""
    pool = runtime.pool(2, sinks=2, window=60)
    session = pool.session(seed=0)
    conversation = [{"role": "user", "content": "hello there"}]
    handle = pool.begin_chat(session, conversation, max_new_tokens=10)
    pool.end(handle)  # cancelled before any step ran
    assert handle.job.cancelled and handle.job.generated == []
    conversation += [{"role": "assistant", "content": ""}, {"role": "user", "content": "still there?"}]
    reply = "".join(r.text for r in session.chat(conversation, max_new_tokens=5))
    assert isinstance(reply, str)  # no "messages must extend this session's conversation" error
    conversation += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and now?"}]
    list(session.chat(conversation, max_new_tokens=3))


def test_chunk_larger_than_the_window_is_refused_before_any_row_is_used(runtime):
    """Defect 3: such a pool used to be created, and every session creation then failed and leaked a row."""
    with pytest.raises(CacheConfigError, match="chunk"):
        runtime.pool(4, sinks=2, window=10, chunk=20)
    with pytest.raises(CacheConfigError, match="chunk"):
        runtime.session(sinks=2, window=10, chunk=20)


def test_breaking_out_of_agenerate_does_not_lock_the_session(runtime):
    """Defect 4: `break` in `async for` leaves the async iterator unclosed; feed() right after
    used to raise SessionBusyError every time."""
    s = runtime.session(sinks=2, window=60, seed=0)

    async def main():
        got = 0
        async for response in s.agenerate("Once", max_new_tokens=None):
            got += len(response.token_ids)
            if got >= 3:
                break
        return s.feed(" more", return_logits=True)  # right after: no await in between

    logits = asyncio.run(main())
    assert logits.shape[0] >= 1
    assert s.stats().tokens_seen >= 3 + logits.shape[0]


@pytest.mark.parametrize("layout", ["0_3_4_3_4_5", "0_4_4_4_4_5", "0_2_2_0_5_5"])
def test_reused_pool_row_equals_a_fresh_session(tmp_path, layout):
    """Defect 5 (through the public API): a released and reused row gives a fresh session's logits."""
    rt = streaming.load(make_tiny_checkpoint(tmp_path, "lckv", layer_types=layout, force_nodiag=layout != "0_2_2_0_5_5"))
    pool = rt.pool(1, sinks=2, window=40, chunk=16)
    first = pool.session()
    first.feed(list(range(3, 60)))
    pool.release(first)
    reused = pool.session()
    ids = list(range(100, 130))  # chunks of 16 > m+b: the parallel, iterated prefill
    fresh = rt.session(sinks=2, window=40, chunk=16)
    torch.testing.assert_close(reused.feed(ids, return_logits=True), fresh.feed(ids, return_logits=True),
                               rtol=1e-4, atol=1e-4)
