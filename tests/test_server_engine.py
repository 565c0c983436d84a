"""The server on the engine: streams keep flowing while a long prompt is ingested, a cancel ends a
reply once its message is in, and a session closed while its reply finishes gives its row back."""

from __future__ import annotations

import dataclasses

from websockets.asyncio.client import connect

from tests.test_server import LIMITS, LONG, create, done_of, recv, rt, run, send, serve, until, ws_url  # noqa: F401

CHUNK = 32  # the servers of tests/test_server.py ingest prompts 32 tokens per engine step
BIG = dataclasses.replace(LIMITS, max_prompt_tokens=5000, max_message_bytes=1 << 16)


def long_text(rt, tokens: int) -> str:
    """Text of about `tokens` tokens (at most the server's prompt limit)."""
    words = "the quick brown fox jumps over a lazy dog".split()
    per_word = len(rt.tokenizer.encode(" ".join(words), add_bos=False)) / len(words)
    text = " ".join(words[i % len(words)] for i in range(int(tokens / per_word)))
    assert tokens // 2 <= len(rt.tokenizer.encode(text)) <= BIG.max_prompt_tokens
    return text


def test_a_stream_keeps_going_while_another_session_sends_a_long_prompt(rt):
    async def main():
        async with serve(rt, limits=BIG) as app:
            prompt = long_text(rt, 2000)
            n_prompt = len(rt.tokenizer.encode(prompt))
            async with connect(ws_url(app)) as ws:
                talker, reader = await create(ws), await create(ws)
                await send(ws, type="message", session=talker, text="Go on.", sampling=LONG)
                await until(ws, lambda e: e["type"] == "delta" and e["session"] == talker)
                await send(ws, type="message", session=reader, text=prompt, sampling={"max_new_tokens": 2})
                talker_events = 0
                while True:  # until the reader's first token: its whole prompt was ingested by then
                    event = await recv(ws)
                    if event["session"] == talker and event["type"] == "delta":
                        talker_events += 1
                    if event["session"] == reader:
                        assert event["type"] in ("delta", "done"), event
                        break
                await send(ws, type="cancel", session=talker)
                await until(ws, done_of(talker))
            # One engine step per prompt chunk, each also a decode step of the talker: it kept
            # streaming through the prompt (deltas may coalesce when the client reads slowly).
            chunks = -(-n_prompt // CHUNK)
            assert talker_events >= chunks // 4, (talker_events, chunks)
    run(main())


def test_cancel_during_a_long_prompt_ends_the_reply_once_the_prompt_is_in(rt):
    # A cancel sent right after the message lands while its prompt is being ingested: the reply ends
    # without a token, but the whole message (and the system prompt) goes into the cache first, as
    # the transcript records the turn; the next message then feeds only its own tokens.
    system = "You answer in one word."

    async def main():
        async with serve(rt, limits=BIG) as app:
            prompt = long_text(rt, 4000)
            async with connect(ws_url(app)) as ws:
                sid = await create(ws, system=system)
                await send(ws, type="message", session=sid, text=prompt, sampling={"max_new_tokens": 5})
                await send(ws, type="cancel", session=sid)
                done = (await until(ws, done_of(sid)))[-1]
            # The session goes on: the next message extends the conversation.
            async with connect(ws_url(app)) as ws:
                await send(ws, type="session.create", resume=sid)
                await until(ws, lambda e: e["type"] == "session.created")
                await send(ws, type="message", session=sid, text="Hello?", sampling={"max_new_tokens": 3})
                events = await until(ws, lambda e: e["type"] in ("done", "error"))
        return prompt, done, events

    prompt, done, events = run(main())
    assert done["finish_reason"] == "cancelled" and done["usage"]["completion_tokens"] == 0
    assert events[-1]["type"] == "done", events[-1]
    # What a session holds after the same turns with empty replies (tokens fed, counted by the API).
    first = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    second = first + [{"role": "assistant", "content": ""}, {"role": "user", "content": "Hello?"}]
    reference = rt.session(sinks=LIMITS.sinks, window=LIMITS.window)
    list(reference.chat(first, max_new_tokens=0))
    assert done["usage"]["tokens_seen"] == reference.stats().tokens_seen
    list(reference.chat(second, max_new_tokens=0))
    usage = events[-1]["usage"]
    assert usage["tokens_seen"] - usage["completion_tokens"] == reference.stats().tokens_seen


def test_close_while_the_reply_finishes_gives_the_row_back(rt):
    """Engine defect 2: a session.close racing the end of a reply used to leak the session's row."""
    async def main():
        async with serve(rt) as app:
            async with connect(ws_url(app)) as ws:
                for round_ in range(3 * LIMITS.max_sessions):
                    sid = await create(ws)
                    await send(ws, type="message", session=sid, text="Hi", sampling={"max_new_tokens": 1})
                    if round_ % 2:  # close at slightly different moments of the reply's end
                        await recv(ws)
                    await send(ws, type="session.close", session=sid)
                    await until(ws, lambda e: e["type"] == "session.closed" and e["session"] == sid)
                for _ in range(100):
                    if await app.engine.free_rows() == LIMITS.max_sessions:
                        break
                    await __import__("asyncio").sleep(0.05)
                return await app.engine.free_rows()
    assert run(main()) == LIMITS.max_sessions
