"""One connection's outgoing events, written together: what is queued in one event-loop iteration goes
to the socket in one write.

With a thousand streams every engine step wakes a thousand replies, and a connection that carries
several sessions got one socket write (a system call) per event: in a profile of the server process
that write was a third of the time spent per event. A `FrameWriter` queues a connection's events and
writes them after the other replies woken by the same step have queued theirs: still one websocket
frame per event (the protocol is unchanged), in one write.

Batched frames, for the `serve --ray` front door's links: a connection whose URL asks for it
(`?frames=batched`) gets the events of one write in one text frame, separated by newlines (JSON text
never holds a raw newline); the front door splits each frame back into one event per frame for its
client. Ordinary clients never ask for this.
"""

from __future__ import annotations

import asyncio

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

BATCHED_QUERY = "frames=batched"
SEPARATOR = "\n"
# Past this many queued events, or this many bytes in the socket's buffer, a sender waits for the
# writes to go out (a slow client then gets fewer, larger deltas instead of a growing queue).
MAX_QUEUED = 256
MAX_BUFFERED_BYTES = 1 << 20


def wants_batches(ws) -> bool:
    request = getattr(ws, "request", None)
    query = request.path.partition("?")[2] if request is not None else ""
    return BATCHED_QUERY in query.split("&")


class FrameWriter:
    """Queues one connection's event texts (any number per loop iteration) and writes them together."""

    def __init__(self, ws, *, batched: bool = False) -> None:
        self.ws, self.batched = ws, batched
        self.pending: list[str] = []
        self.task: asyncio.Task | None = None
        # Since when (event-loop time) a write has waited for the client to read: a client that stops
        # reading keeps this set (stalled_writers finds it); None while writes go out.
        self.waiting_since: float | None = None

    def send(self, text: str) -> bool:
        """Queue `text`; False when the connection is no longer open."""
        if self.ws.state is not State.OPEN:
            return False
        self.pending.append(text)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._flush())
        return True

    async def send_and_wait(self, text: str) -> bool:
        """`send`, then wait while the connection is backlogged (see MAX_QUEUED)."""
        if not self.send(text):
            return False
        if len(self.pending) >= MAX_QUEUED or _buffered(self.ws) >= MAX_BUFFERED_BYTES:
            task = self.task
            if task is not None:
                await asyncio.shield(task)
        return self.ws.state is State.OPEN

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # the other replies woken by the same engine step queue theirs first
            while self.pending:
                batch, self.pending = self.pending, []
                self.waiting_since = asyncio.get_running_loop().time()
                if self.batched:
                    await self.ws.send(SEPARATOR.join(batch))
                else:
                    await write_frames(self.ws, batch)
                self.waiting_since = None
        except ConnectionClosed:
            self.pending.clear()
        finally:
            self.task = None
            self.waiting_since = None


async def close_stalled(writers: dict, after_s: float | None, logger) -> None:
    """Forever: abort every connection of `writers` (websocket -> FrameWriter) whose writes have
    waited `after_s` seconds for its client to read (ServerConfig.write_stall_s; None: never). Its
    handler then ends as on any disconnect: its replies stop, its sessions are parked."""
    if after_s is None:
        return
    while True:
        await asyncio.sleep(min(1.0, after_s / 4))
        for ws in stalled_writers(writers, after_s):
            address = getattr(ws, "remote_address", None)
            logger.warning("closing the connection of %s: its client has read nothing for %.1f s",
                           address[0] if address else "?", after_s)
            writers.pop(ws, None)
            ws.transport.abort()


def stalled_writers(writers: dict, after_s: float) -> list:
    """The keys of `writers` (connection -> FrameWriter) whose writes have waited `after_s` seconds or
    more for their client to read."""
    now = asyncio.get_running_loop().time()
    return [conn for conn, writer in list(writers.items())
            if writer.waiting_since is not None and now - writer.waiting_since >= after_s]


async def write_frames(ws, texts: list[str]) -> None:
    """Send each text as a frame of its own, all in one socket write (websockets' documented
    `send_context` pattern, with the frames joined before they reach the transport)."""
    if len(texts) == 1 or not hasattr(ws, "send_context"):
        for text in texts:
            await ws.send(text)
        return
    async with ws.send_context():
        for text in texts:
            ws.protocol.send_text(text.encode())
        chunks = ws.protocol.data_to_send()
        if all(chunks):
            ws.transport.write(b"".join(chunks))
        else:  # (an end-of-stream marker: only when closing) leave them to send_context's exit
            ws.protocol.writes.extend(chunks)


def _buffered(ws) -> int:
    transport = getattr(ws, "transport", None)
    return transport.get_write_buffer_size() if transport is not None else 0
