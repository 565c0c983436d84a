"""The websocket chat server, served for real on port 0 and driven with the websockets client."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from apps.protocol import Limits
from apps.server import ServerConfig, running
from apps.server.engine_spec import PackedState

LIMITS = Limits(max_message_bytes=4096, max_prompt_tokens=300, max_new_tokens=16,
                max_new_tokens_cap=100_000, max_sessions=4, idle_timeout_s=60, sinks=4, window=60)
LONG = {"max_new_tokens": 100_000, "temperature": 1.0, "seed": 1}  # runs until cancelled


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    import streaming
    from tests.tiny_checkpoint import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "lckv")
    return streaming.load(str(path), device="cpu", dtype="float32")


def serve(rt, **changes):
    """`async with serve(rt) as app:` a real server on a free port."""
    limits = changes.pop("limits", LIMITS)
    return running(rt, ServerConfig(host="127.0.0.1", port=0, limits=limits, chunk=32,
                                    model_name="tiny", **changes))


def ws_url(app, query: str = "") -> str:
    return f"ws://127.0.0.1:{app.port}/ws{query}"


async def send(ws, **msg) -> None:
    await ws.send(json.dumps(msg))


async def recv(ws, timeout: float = 20.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def until(ws, pred, timeout: float = 30.0) -> list[dict]:
    """Events up to and including the first one matching pred."""
    events = []
    deadline = time.monotonic() + timeout
    while True:
        ev = await recv(ws, max(0.1, deadline - time.monotonic()))
        events.append(ev)
        if pred(ev):
            return events


async def create(ws, **fields) -> str:
    await send(ws, type="session.create", **fields)
    ev = await until(ws, lambda e: e["type"] in ("session.created", "error"))
    assert ev[-1]["type"] == "session.created", ev[-1]
    return ev[-1]["session"]


def done_of(sid):
    return lambda e: e["type"] == "done" and e["session"] == sid


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def http_get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_page_and_health_check(rt):
    async def main():
        async with serve(rt) as app:
            base = f"http://127.0.0.1:{app.port}"
            status, headers, body = await asyncio.to_thread(http_get, base + "/healthz")
            assert status == 200 and json.loads(body)["status"] == "ok"
            status, headers, body = await asyncio.to_thread(http_get, base + "/")
            assert status == 200 and b"<title>sinkstream" in body
            assert "script-src 'self'" in headers["Content-Security-Policy"]
            status, headers, _ = await asyncio.to_thread(http_get, base + "/app.js")
            assert status == 200 and headers["Content-Type"].startswith("text/javascript")
            status, _, _ = await asyncio.to_thread(http_get, base + "/nope")
            assert status == 404
            # DNS-rebinding guard: a loopback server answers only to loopback host names.
            status, _, _ = await asyncio.to_thread(http_get, base + "/healthz", {"Host": "evil.example"})
            assert status == 403
            # Names that only look like loopback addresses resolve wherever their owner says.
            for host in ("127.evil.example", f"127.0.0.1.evil.example:{app.port}", "localhost.evil.example"):
                status, _, _ = await asyncio.to_thread(http_get, base + "/healthz", {"Host": host})
                assert status == 403, host
            for host in (f"127.0.0.2:{app.port}", f"[::1]:{app.port}", f"LOCALHOST:{app.port}"):
                status, _, _ = await asyncio.to_thread(http_get, base + "/healthz", {"Host": host})
                assert status == 200, host
            rebound = f"127.0.0.1.evil.example:{app.port}"  # a rebinding page: same origin as its Host
            handshake = {"Host": rebound, "Origin": f"http://{rebound}", "Upgrade": "websocket",
                         "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
            status, _, _ = await asyncio.to_thread(http_get, base + "/ws", handshake)
            assert status == 403
            # Two Host headers: a clean refusal, not an internal error.
            with pytest.raises(InvalidStatus) as refused:
                async with connect(ws_url(app), additional_headers={"Host": "localhost"}):
                    pass
            assert refused.value.response.status_code == 400
    run(main())


def test_two_sessions_stream_independently(rt):
    greedy = {"temperature": 0.0, "max_new_tokens": 24}

    async def main():
        async with serve(rt) as app:
            async with connect(ws_url(app)) as ws:
                a, b = await create(ws), await create(ws, system="You are terse.")
                assert a != b
                await send(ws, type="message", session=a, text="Tell me about rivers.", sampling=greedy)
                await send(ws, type="message", session=b, text="Count the stars.", sampling=greedy)
                events, finished = [], set()
                while finished != {a, b}:
                    ev = await recv(ws)
                    events.append(ev)
                    if ev["type"] == "done":
                        finished.add(ev["session"])
            # The same prompt alone in a fresh session on a second connection gives the same text.
            async with connect(ws_url(app)) as ws2:
                c = await create(ws2)
                await send(ws2, type="message", session=c, text="Tell me about rivers.", sampling=greedy)
                solo = await until(ws2, done_of(c))
            gc.collect()  # one collection at least, whatever the thresholds did meanwhile
            _, _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{app.port}/healthz")
            engine = json.loads(body)["engine"]
            assert engine["gc_collections"] >= 1 and engine["longest_gc_ms"] > 0
            # Both replies advanced in shared steps: at least one step per token of the longer reply.
            generated = max(e["usage"]["completion_tokens"] for e in events if e["type"] == "done")
            assert engine["steps"] >= generated and 0 < engine["mean_step_ms"] <= engine["longest_step_ms"]
            return events, a, b, solo

    events, a, b, solo = run(main())
    assert not [e for e in events if e["type"] == "error"], events
    texts = {}
    for sid in (a, b):
        deltas = [e for e in events if e["type"] == "delta" and e["session"] == sid]
        assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
        done = [e for e in events if e["type"] == "done" and e["session"] == sid][0]
        assert done["finish_reason"] in ("length", "eos", "stop")
        u = done["usage"]
        assert u["completion_tokens"] >= 1 and u["prompt_tokens"] > 0
        assert 0 < u["tokens_in_cache"] <= u["cache_capacity"] == LIMITS.sinks + LIMITS.window
        texts[sid] = "".join(d["text"] for d in deltas)
    # Replies were produced step by step side by side, not one after the other.
    order = [e["session"] for e in events if e["type"] == "delta"]
    first_done = next(i for i, e in enumerate(events) if e["type"] == "done")
    assert {a, b} <= {e["session"] for e in events[:first_done] if e["type"] == "delta"}, order
    assert texts[a] == "".join(e["text"] for e in solo if e["type"] == "delta")


def test_cancel_stops_generation_and_session_goes_on(rt):
    async def main():
        async with serve(rt) as app:
            async with connect(ws_url(app)) as ws:
                sid = await create(ws)
                await send(ws, type="message", session=sid, text="Go on forever.", sampling=LONG)
                await until(ws, lambda e: e["type"] == "delta")
                t0 = time.monotonic()
                await send(ws, type="cancel", session=sid)
                done = (await until(ws, done_of(sid)))[-1]
                latency = time.monotonic() - t0
                # A second message in the same session works (the partial reply stayed in the cache).
                await send(ws, type="message", session=sid, text="Again.", sampling={"max_new_tokens": 5})
                again = (await until(ws, done_of(sid)))[-1]
                return done, latency, again

    done, latency, again = run(main())
    assert done["finish_reason"] == "cancelled"
    assert 0 < done["usage"]["completion_tokens"] < 100_000
    assert latency < 5.0
    assert again["finish_reason"] in ("length", "eos", "stop")
    assert again["usage"]["completion_tokens"] <= 5


def test_disconnect_stops_generation_and_session_resumes(rt):
    async def main():
        async with serve(rt) as app:
            async with connect(ws_url(app)) as ws:
                sid = await create(ws)
                await send(ws, type="message", session=sid, text="Keep talking.", sampling=LONG)
                await until(ws, lambda e: e["type"] == "delta")
            st = app.sessions.by_id[sid]
            deadline = time.monotonic() + 5
            while st.busy and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            stopped = not st.busy
            while st.parked is None and time.monotonic() < deadline:  # detached: parked, row given back
                await asyncio.sleep(0.01)
            assert st.session is None and app.sessions.active == 0 and await app.engine.free_rows() == LIMITS.max_sessions
            parked_length = lambda: int(unpacked(st.parked)[0]["length"][0])  # noqa: E731
            seen = parked_length()
            await asyncio.sleep(0.3)
            assert parked_length() == seen  # nothing generated after the stop
            async with connect(ws_url(app)) as ws:
                await send(ws, type="session.create", resume=sid)
                created = await recv(ws)
                await send(ws, type="message", session=sid, text="Welcome back.",
                           sampling={"max_new_tokens": 4})
                done = (await until(ws, done_of(sid)))[-1]
            return stopped, created, done, seen

    stopped, created, done, seen = run(main())
    assert stopped
    assert created["type"] == "session.created" and created["resumed"] is True
    assert created["messages"] == 2  # the user message and the partial reply
    assert done["finish_reason"] in ("length", "eos", "stop")
    assert done["usage"]["tokens_seen"] > seen


def test_bad_frames_get_errors_and_other_sessions_keep_streaming(rt):
    async def main():
        async with serve(rt) as app:
            async with connect(ws_url(app)) as ws:
                good, idle = await create(ws), await create(ws)
                await send(ws, type="message", session=good, text="Talk.", sampling=LONG)
                await until(ws, lambda e: e["type"] == "delta")
                errors, events = {}, {}
                bad = {
                    "bad_json": "{not json",
                    "unknown_type": json.dumps({"type": "launch.rockets"}),
                    "bad_request": json.dumps({"type": "message", "session": good, "text": "x",
                                               "sampling": {"temperature": "hot"}}),
                    "unknown_session": json.dumps({"type": "cancel", "session": "nope"}),
                    "busy": json.dumps({"type": "message", "session": good, "text": "again"}),
                    "frame_too_large": json.dumps({"type": "message", "session": good,
                                                   "text": "x" * 10_000}),
                    "bad_frame": b"\x00\x01",
                    "not_object": "[1, 2, 3]",
                    "surrogate": '{"type": "message", "session": "%s", "text": "\\ud800"}' % good,
                    # Lone surrogates where the server used to echo them back (the encoding failed
                    # and the connection was aborted without an event).
                    "surrogate_id": '{"type": "cancel", "session": "x", "id": "\\ud800"}',
                    "surrogate_session": '{"type": "cancel", "session": "\\udfff", "id": 3}',
                    "surrogate_resume": '{"type": "session.create", "resume": "a\\ud800b"}',
                    "deep": "[" * 1500 + "]" * 1500,  # was a RecursionError (internal) per frame
                    "top_p_zero": json.dumps({"type": "message", "session": idle, "text": "x",
                                              "sampling": {"top_p": 0}}),
                    "no_reply": json.dumps({"type": "cancel", "session": idle, "id": "c1"}),
                }
                for name, frame in bad.items():
                    await ws.send(frame)
                    ev = await until(ws, lambda e: e["type"] == "error")
                    errors[name], events[name] = ev[-1]["code"], ev[-1]
                # The streaming session was not disturbed: cancel it and get its `done`.
                await send(ws, type="cancel", session=good)
                done = (await until(ws, done_of(good)))[-1]
            # A frame over the transport limit closes only its own connection (code 1009).
            async with connect(ws_url(app), max_size=None) as other, connect(ws_url(app)) as big:
                sid = await create(other)
                await big.send("x" * (2 << 20))
                with pytest.raises(ConnectionClosed) as closed:
                    await recv(big)
                await send(other, type="message", session=sid, text="Still there?")
                ok = (await until(other, done_of(sid)))[-1]
            return errors, events, done, closed.value, ok

    errors, events, done, closed, ok = run(main())
    assert errors == {"bad_json": "bad_json", "unknown_type": "unknown_type", "bad_request": "bad_request",
                      "unknown_session": "unknown_session", "busy": "busy",
                      "frame_too_large": "frame_too_large", "bad_frame": "bad_frame",
                      "not_object": "bad_request", "surrogate": "bad_request", "surrogate_id": "bad_request",
                      "surrogate_session": "bad_request", "surrogate_resume": "bad_request", "deep": "bad_json",
                      "top_p_zero": "bad_request", "no_reply": "no_reply"}
    assert "id" not in events["surrogate_id"] and events["surrogate_session"]["id"] == 3
    assert "session" not in events["surrogate_session"] and "at most 16" in events["deep"]["message"]
    assert "(0, 1]" in events["top_p_zero"]["message"]
    assert events["no_reply"]["id"] == "c1" and events["no_reply"]["session"]
    assert done["finish_reason"] == "cancelled"
    assert closed.rcvd is not None and closed.rcvd.code == 1009
    assert ok["finish_reason"] in ("length", "eos", "stop")


def test_limits_sessions_prompt_length_idle_timeout(rt):
    limits = Limits(**{**LIMITS.as_dict(), "max_sessions": 2, "max_prompt_tokens": 20,
                       "idle_timeout_s": 1.5})  # long enough for the steps before the expiry on a busy runner

    async def main():
        async with serve(rt, limits=limits) as app:
            async with connect(ws_url(app)) as ws:
                a = await create(ws)
                await create(ws)
                await send(ws, type="session.create", id=7)
                full = await recv(ws)
                await send(ws, type="message", session=a, text="word " * 200)
                long = await recv(ws)
                # Wait for `a`'s own expiry: the other session (touched earlier) may expire first.
                expired = await until(ws, lambda e: e.get("code") == "idle_timeout" and e.get("session") == a,
                                      timeout=5)
                await send(ws, type="message", session=a, text="hello")
                gone = (await until(ws, lambda e: e.get("code") != "idle_timeout"))[-1]
            return full, long, expired[-1], gone, len(app.sessions)

    full, long, expired, gone, left = run(main())
    assert full["code"] == "too_many_sessions" and full["id"] == 7
    assert long["code"] == "prompt_too_long" and "20" in long["message"]
    assert expired["type"] == "error"
    assert gone["code"] == "unknown_session"
    assert left == 0


def test_origin_and_token_checks(rt):
    async def main():
        async with serve(rt, token="s3cret", allowed_origins=("https://trusted.example",)) as app:
            outcomes = {}
            for name, url, origin in [
                ("no token", ws_url(app), None),
                ("wrong token", ws_url(app, "?token=nope"), None),
                ("token", ws_url(app, "?token=s3cret"), None),
                ("same origin", ws_url(app, "?token=s3cret"), f"http://127.0.0.1:{app.port}"),
                ("allowed origin", ws_url(app, "?token=s3cret"), "https://trusted.example"),
                ("foreign origin", ws_url(app, "?token=s3cret"), "https://evil.example"),
            ]:
                try:
                    async with connect(url, origin=origin) as ws:
                        await create(ws)
                        outcomes[name] = "ok"
                except InvalidStatus as e:
                    outcomes[name] = e.response.status_code
            async with connect(ws_url(app), additional_headers={"Authorization": "Bearer s3cret"}) as ws:
                await create(ws)
                outcomes["bearer"] = "ok"
            base = f"http://127.0.0.1:{app.port}/healthz"
            for name, url, headers in [("health, no token", base, None),
                                       ("health, token", base + "?token=s3cret", None),
                                       ("health, bearer", base, {"Authorization": "Bearer s3cret"})]:
                status, _, _ = await asyncio.to_thread(http_get, url, headers)
                outcomes[name] = "ok" if status == 200 else status
            return outcomes

    assert run(main()) == {"no token": 401, "wrong token": 401, "token": "ok", "same origin": "ok",
                           "allowed origin": "ok", "foreign origin": 403, "bearer": "ok",
                           "health, no token": 401, "health, token": "ok", "health, bearer": "ok"}


def test_concurrent_replies_share_batched_decode_steps(rt):
    """Three sessions streaming at once advance together: the engine's batched step serves them all."""
    async def main():
        async with serve(rt) as app:
            calls = []
            engine = app.engine.pool.engine
            real_decode = engine.decode_rows

            def counting_decode(rows, features):
                calls.append(int(rows.shape[0]))
                return real_decode(rows, features)

            engine.decode_rows = counting_decode
            async with connect(ws_url(app)) as ws:
                sids = [await create(ws) for _ in range(3)]
                for sid in sids:
                    await send(ws, type="message", session=sid, text="Go on.", sampling={"max_new_tokens": 12})
                done = set()
                while len(done) < 3:
                    event = await recv(ws)
                    if event["type"] == "done":
                        assert event["usage"]["completion_tokens"] == 12
                        done.add(event["session"])
            assert max(calls) >= 2, calls  # some steps served several replies at once
            assert sum(calls) == 3 * 12  # one row-step per generated token, nothing else
    run(main())


def test_per_connection_cap_and_per_client_rate_limit(rt):
    """One client cannot take every session or flood the model: a connection holds at most
    max_sessions_per_connection sessions, and a client address gets max_requests_per_minute
    session creations and messages; refusals are errors, the connection goes on."""
    limits = Limits(**{**LIMITS.as_dict(), "max_sessions_per_connection": 2, "max_requests_per_minute": 5})

    async def main():
        async with serve(rt, limits=limits) as app:
            async with connect(ws_url(app)) as ws, connect(ws_url(app)) as other:
                a = await create(ws)  # request 1
                await create(ws)  # 2
                await send(ws, type="session.create", id="third")  # 3: over the per-connection cap
                capped = await recv(ws)
                await create(other)  # 4: another connection may still open one
                await send(ws, type="message", session=a, text="Hi.", sampling={"max_new_tokens": 2})  # 5
                await until(ws, done_of(a))
                await send(ws, type="message", session=a, text="Again.", id="m6")  # 6: over the rate
                limited = await recv(ws)
                await send(ws, type="cancel", session=a, id="c")  # not rate limited: answered
                answered = await recv(ws)
            return capped, limited, answered

    capped, limited, answered = run(main())
    assert capped["code"] == "too_many_sessions" and capped["id"] == "third" and "connection" in capped["message"]
    assert limited["code"] == "rate_limited" and limited["id"] == "m6"
    assert answered["code"] == "no_reply" and answered["id"] == "c"


def unpacked(state):
    """A parked state's (tensors, meta, extra): the engine process's comes as the bytes of its file."""
    return state.unpack() if isinstance(state, PackedState) else state
