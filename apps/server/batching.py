"""Batched frames: several events in one websocket frame, for the `serve --ray` front door's links.

A connection whose URL asks for it (`?frames=batched`) gets the events of one event-loop iteration
in one text frame, separated by newlines (JSON text never holds a raw newline). The front door has
one such link per client connection and replica, and splits each frame back into one event per
frame for its client: with a thousand streams, a websocket frame received per event was what
limited it. Ordinary clients never ask for this and get one event per frame.
"""

from __future__ import annotations

import asyncio

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

BATCHED_QUERY = "frames=batched"
SEPARATOR = "\n"


def wants_batches(ws) -> bool:
    request = getattr(ws, "request", None)
    query = request.path.partition("?")[2] if request is not None else ""
    return BATCHED_QUERY in query.split("&")


class BatchedSender:
    """Queues one connection's event texts; what is queued in one loop iteration goes as one frame."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.pending: list[str] = []
        self.task: asyncio.Task | None = None

    def send(self, text: str) -> bool:
        """Queue `text`; False when the connection is no longer open."""
        if self.ws.state is not State.OPEN:
            return False
        self.pending.append(text)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._flush())
        return True

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # the other replies woken by the same engine step queue theirs first
            while self.pending:
                batch, self.pending = self.pending, []
                await self.ws.send(SEPARATOR.join(batch))
        except ConnectionClosed:
            self.pending.clear()
        finally:
            self.task = None
