"""The browser client, in headless Chromium driven through chromedriver's W3C WebDriver HTTP API.

Starts `sinkstream serve` (the console script) on a free port, loads the page, sends a message
with the keyboard, watches the reply stream in, stops it with the Stop button and then with
Escape. A screenshot is saved under the test's tmp dir (browser-chat.png).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.test_cli import ENV, SINKSTREAM

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
ENTER, ESCAPE = "\ue007", "\ue00c"  # WebDriver key codes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """The few W3C WebDriver commands this test needs, over plain HTTP."""

    def __init__(self, base: str) -> None:
        self.base, self.sid = base, None

    def call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read()[:500]!r}") from None

    def start(self, user_data_dir) -> None:
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1000,760", f"--user-data-dir={user_data_dir}"]
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}
        self.sid = self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def s(self, path: str) -> str:
        return f"/session/{self.sid}{path}"

    def get(self, url: str) -> None:
        self.call("POST", self.s("/url"), {"url": url})

    def find(self, css: str) -> str:
        el = self.call("POST", self.s("/element"), {"using": "css selector", "value": css})
        return next(iter(el.values()))

    def run(self, script: str, *args):
        return self.call("POST", self.s("/execute/sync"), {"script": script, "args": list(args)})

    def keys(self, element: str, text: str) -> None:
        self.call("POST", self.s(f"/element/{element}/value"), {"text": text})

    def click(self, element: str) -> None:
        self.call("POST", self.s(f"/element/{element}/click"), {})

    def screenshot(self, path) -> None:
        path.write_bytes(base64.b64decode(self.call("GET", self.s("/screenshot"))))

    def quit(self) -> None:
        if self.sid:
            self.call("DELETE", self.s(""))

    def wait(self, script: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.run(script)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for: {script}")


@pytest.fixture
def server(tmp_path):
    yield from _serve(tmp_path)


@pytest.fixture
def one_session_server(tmp_path):
    yield from _serve(tmp_path, "--max-sessions", "1")


def _serve(tmp_path, *flags):
    from tests.tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "lckv")
    p = subprocess.Popen(SINKSTREAM + ["serve", "--model", str(ckpt), "--device", "cpu", "--port", "0",
                                       "--window", "60", "--chunk", "16", "--max-new-tokens-cap",
                                       "100000", *flags], stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        url = None
        for line in p.stderr:  # "sinkstream serving on http://127.0.0.1:PORT/ ..."
            if "serving on" in line:
                url = line.split("serving on ")[1].split()[0]
                break
        assert url, "server did not start"
        threading.Thread(target=p.stderr.read, daemon=True).start()  # keep the pipe drained
        yield url
    finally:
        p.terminate()
        p.wait(timeout=30)


@pytest.fixture
def driver(tmp_path):
    port = free_port()
    proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wd = WebDriver(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if wd.call("GET", "/status").get("ready"):
                    break
            except (OSError, AssertionError):
                pass
            assert time.monotonic() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        wd.start(tmp_path / "chromium-profile")
        yield wd
    finally:
        try:
            wd.quit()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


REPLY = "document.querySelector('.msg.assistant:last-of-type')"


def test_browser_chat_streams_and_stops(server, driver, tmp_path):
    driver.get(server)
    driver.wait("return document.getElementById('status').dataset.state === 'online'")
    # A reply long enough to stop by hand.
    driver.run("document.getElementById('max-tokens').value = '100000';"
               "document.getElementById('temperature').value = '0';")
    box = driver.find("#input")
    assert driver.run("return document.activeElement.id") == "input"  # autofocus: type at once

    driver.keys(box, "Hello, who are you?" + ENTER)  # Enter sends
    first = driver.wait(f"const m = {REPLY}; return m && m.querySelector('.text').textContent.length > 5 "
                        "&& m.querySelector('.text').textContent")
    grown = driver.wait(f"const t = {REPLY}.querySelector('.text').textContent; "
                        f"return t.length > {len(first)} && t")
    assert grown.startswith(first)  # text streams in, appended delta by delta
    assert driver.run("return document.getElementById('stop').disabled") is False
    driver.click(driver.find("#stop"))
    driver.wait(f"return {REPLY}.dataset.state === 'done'", timeout=10)
    assert driver.run(f"return {REPLY}.dataset.finish") == "cancelled"
    meta = driver.run(f"return {REPLY}.querySelector('.meta').textContent")
    assert "tokens/s" in meta and "cancelled" in meta
    assert "holds" in driver.run("return document.getElementById('cache-label').textContent")
    assert driver.run("return document.getElementById('stop').disabled") is True

    # Keyboard alone: type, Enter to send, Escape to stop.
    driver.keys(box, "And again?" + ENTER)
    driver.wait("return document.querySelectorAll('.msg.assistant').length === 2 && "
                f"{REPLY}.querySelector('.text').textContent.length > 5")
    driver.keys(box, ESCAPE)
    driver.wait(f"return {REPLY}.dataset.state === 'done'", timeout=10)
    assert driver.run(f"return {REPLY}.dataset.finish") == "cancelled"
    assert "tokens/s" in driver.run("return document.getElementById('rate').textContent")
    shot = tmp_path / "browser-chat.png"
    driver.screenshot(shot)
    assert shot.stat().st_size > 1000
    print(f"screenshot: {shot}")


def test_browser_says_server_full_and_connects_when_a_slot_frees(one_session_server, driver):
    """With the only session slot taken, the page says the server is full (status and one notice)
    instead of a raw error, keeps retrying, and connects once the slot is free."""
    import asyncio

    from websockets.asyncio.client import connect

    ws_url = one_session_server.replace("http://", "ws://").rstrip("/") + "/ws"

    async def hold_then_free(page_sees_full):
        async with connect(ws_url) as ws:
            await ws.send(json.dumps({"type": "session.create"}))
            sid = json.loads(await ws.recv())["session"]
            await asyncio.to_thread(page_sees_full)
            await ws.send(json.dumps({"type": "session.close", "session": sid}))
            await ws.recv()

    def page_sees_full():
        driver.get(one_session_server)
        driver.wait("return document.getElementById('status').dataset.state === 'full'")
        assert "full" in driver.run("return document.getElementById('status').textContent")
        notice = driver.wait("const n = document.querySelector('.notice'); return n && n.textContent")
        assert "server is full" in notice and "too_many_sessions" not in notice

    asyncio.run(hold_then_free(page_sees_full))
    driver.wait("return document.getElementById('status').dataset.state === 'online'", timeout=30)
    assert len(driver.run("return [...document.querySelectorAll('.notice')].map(n => n.textContent)")) == 1


def test_browser_reload_keeps_the_session_and_closing_the_tab_closes_it(server, driver):
    """A leaving page asks for a delayed close (it cannot tell a reload from a closed tab): the
    reloaded page resumes its session in time and keeps it; after leaving the page, the session is
    closed once the delay has passed."""
    def sessions() -> int:
        with urllib.request.urlopen(server.rstrip("/") + "/healthz", timeout=10) as r:
            return json.loads(r.read())["sessions"]

    session_id = "return sessionStorage.getItem('sinkstream.session')"
    driver.get(server)
    driver.wait("return document.getElementById('status').dataset.state === 'online'")
    first = driver.run(session_id)
    driver.run("location.reload()")
    driver.wait("const s = document.getElementById('status'); "
                "return s.dataset.state === 'online' && s.textContent.includes('resumed')")
    assert driver.run(session_id) == first
    time.sleep(11.5)  # past the page's delay (10 s): the resume called the close off
    assert sessions() == 1
    driver.get("about:blank")  # the tab leaves the page
    deadline = time.monotonic() + 20
    while sessions() != 0:
        assert time.monotonic() < deadline, "the left page's session was not closed"
        time.sleep(0.25)
