"""`sinkstream serve --state-dir`: conversations survive `kill -9` and a restart.

The real console script is killed with SIGKILL in the middle of a reply and started again on the same
directory: the session resumes from its last finished reply, its transcript is the same JSON as an
uninterrupted server's, and its next greedy reply equals that server's. A corrupt file next to it is
skipped with a log line.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading

import pytest
from websockets.asyncio.client import connect

from apps.protocol import Limits
from apps.server import ServerConfig, running
from cache import state as cache_state
from tests.test_cli import ENV, SINKSTREAM

GREEDY = {"temperature": 0.0, "max_new_tokens": 12}
FLAGS = ["--device", "cpu", "--port", "0", "--window", "60", "--chunk", "16", "--max-new-tokens-cap", "100000"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "lckv")


class Server:
    """The console script in a subprocess; `lines` collects its stderr."""

    def __init__(self, checkpoint, state_dir):
        self.proc = subprocess.Popen(SINKSTREAM + ["serve", "--model", str(checkpoint), "--state-dir", str(state_dir),
                                                   "-v", *FLAGS], stderr=subprocess.PIPE, text=True, env=ENV)
        self.lines = []
        for line in self.proc.stderr:
            self.lines.append(line)
            if "serving on" in line:
                self.url = line.split("serving on ")[1].split()[0].replace("http://", "ws://").rstrip("/") + "/ws"
                break
        else:
            raise AssertionError("server did not start:\n" + "".join(self.lines))
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def _recv(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), 60))


async def _say(ws, sid, text, sampling=GREEDY):
    await ws.send(json.dumps({"type": "message", "session": sid, "text": text, "sampling": sampling}))
    parts = []
    while True:
        ev = await _recv(ws)
        if ev.get("session") == sid and ev["type"] == "delta":
            parts.append(ev["text"])
        elif ev.get("session") == sid and ev["type"] in ("done", "error"):
            assert ev["type"] == "done", ev
            return "".join(parts)


async def _create(ws, **fields):
    await ws.send(json.dumps({"type": "session.create", **fields}))
    ev = await _recv(ws)
    assert ev["type"] == "session.created", ev
    return ev


def test_conversations_survive_kill_9_and_restart(checkpoint, tmp_path):
    import streaming

    state_dir = tmp_path / "state"
    first = Server(checkpoint, state_dir)
    try:
        async def before_kill():
            async with connect(first.url) as ws:
                sid = (await _create(ws, system="You are terse."))["session"]
                reply = await _say(ws, sid, "Name a river.")
                await ws.send(json.dumps({"type": "message", "session": sid, "text": "Tell me more.",
                                          "sampling": {"max_new_tokens": 100000, "temperature": 1.0}}))
                while (await _recv(ws))["type"] != "delta":  # the second reply is running
                    pass
                first.kill()  # SIGKILL mid-reply: no chance to write anything more
                return sid, reply

        sid, reply = asyncio.run(before_kill())
    finally:
        if first.proc.poll() is None:
            first.kill()
    (state_dir / ("x" * 22 + ".session.safetensors")).write_bytes(b"not a state file" * 10)  # corrupt

    second = Server(checkpoint, state_dir)
    try:
        async def after_restart():
            async with connect(second.url) as ws:
                created = await _create(ws, resume=sid)
                return created, await _say(ws, sid, "And a mountain?")

        created, resumed_reply = asyncio.run(after_restart())
    finally:
        second.stop()
    saved = cache_state.load(state_dir / f"{sid}.session.safetensors")[2]["server"]
    assert any("skipping saved session" in line and "x" * 22 in line for line in second.lines), second.lines

    # The same conversation on a server that was never interrupted (in-process, same model and limits).
    rt = streaming.load(str(checkpoint), device="cpu", dtype="float32")
    limits = Limits(max_new_tokens_cap=100000, window=60)

    async def reference():
        async with running(rt, ServerConfig(port=0, limits=limits, chunk=16)) as app:
            async with connect(f"ws://127.0.0.1:{app.port}/ws") as ws:
                ref = (await _create(ws, system="You are terse."))["session"]
                texts = [await _say(ws, ref, "Name a river."), await _say(ws, ref, "And a mountain?")]
                return texts, json.loads(json.dumps(app.sessions.by_id[ref].history))

    (ref_first, ref_second), ref_history = asyncio.run(reference())
    assert created["resumed"] and created["messages"] == 3  # system, user, assistant: the killed turn is gone
    assert reply == ref_first and resumed_reply == ref_second
    assert saved["history"] == ref_history  # the transcript, as JSON, is the uninterrupted one


def test_a_failed_state_write_never_breaks_the_chat(checkpoint, tmp_path, monkeypatch, caplog):
    """A full or read-only disk: the reply still ends with `done`, the error is logged, and the last
    good file stays in place."""
    import streaming
    from apps.server.state_dir import StateDir

    rt = streaming.load(str(checkpoint), device="cpu", dtype="float32")

    async def main():
        async with running(rt, ServerConfig(port=0, limits=Limits(window=60), chunk=16,
                                            state_dir=str(tmp_path / "state"))) as app:
            async with connect(f"ws://127.0.0.1:{app.port}/ws") as ws:
                sid = (await _create(ws))["session"]
                before = (tmp_path / "state" / f"{sid}.session.safetensors").read_bytes()

                def full_disk(self, *args):
                    raise OSError(28, "No space left on device")

                # The disk stays full until the server has stopped: the park on disconnect writes too
                # (restoring the real write here raced with that park and made the test flaky).
                monkeypatch.setattr(StateDir, "_write_temp", full_disk)  # (what every write path calls)
                text = await _say(ws, sid, "Name a river.")
                return sid, before, text

    with caplog.at_level("ERROR", logger="sinkstream.server"):
        sid, before, text = asyncio.run(main())
    assert text  # the reply arrived and ended with `done`
    assert "could not save session" in caplog.text and "No space left" in caplog.text
    assert (tmp_path / "state" / f"{sid}.session.safetensors").read_bytes() == before
