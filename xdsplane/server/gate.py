"""The server-wide gate of response writes: how many bytes are being encoded and written at
once, over all streams, in the order the streams asked (FIFO).

Without it, 1,000 streams syncing together each join their response (a full CDS of 2,000
clusters is 0.6-1 MB) and hand it to gRPC at once: the snapshot multiplied by the number of
streams, in Python bytes and again in gRPC's own copy, until the last write completes.
With it a stream joins its response's bytes (``Outgoing.encode``) only once it holds the
gate; a stream waiting for its turn holds references to the snapshot's shared pieces.

grpc.aio's ``context.write`` returns once gRPC's HTTP/2 transport has taken the message for
the wire, which needs the client's flow-control window: a client that stops reading stalls
the write for good. So a write keeps its place in the gate for at most ``stall`` seconds;
then the bytes are given back (counted in ``stalled``) while that write goes on outside the
gate. A client that never reads thus holds up the others by at most ``stall`` seconds once,
and costs at most the one response it is being written (a stream writes one at a time).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from xdsplane.server.limits import WRITE_BUDGET, WRITE_STALL
from xdsplane.server.state import Outgoing


class WriteGate:
    """FIFO admission of response writes by their size: a write enters when it fits within
    ``budget`` with those in progress, or when none is (a response larger than the budget
    is written alone)."""

    def __init__(self, budget: int = WRITE_BUDGET, stall: float = WRITE_STALL) -> None:
        self.budget = budget
        self.stall = stall
        self.in_use = 0  # bytes of the writes holding the gate
        self.peak = 0  # the most bytes held at once
        self.waited = 0  # writes that had to wait for their turn
        self.stalled = 0  # writes that gave their place back after ``stall`` seconds
        self.written = 0  # bytes of all writes admitted so far (mallocopts.Trimmer reads it)
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int) -> None:
        if not self._waiting and self._fits(size):
            self._take(size)
            return
        self.waited += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((size, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(size)  # admitted just before the cancellation: give it back
            else:
                self._wake()  # the next one in line may fit now
            raise

    def release(self, size: int) -> None:
        self.in_use -= size
        self._wake()

    async def write(self, context: Any, out: Outgoing) -> None:
        """Encode ``out`` and write it on ``context`` once it holds the gate; its place is
        given back when gRPC took it, or after ``stall`` seconds if it has not."""
        size = out.size()
        await self.acquire(size)
        self.written += size
        held = True

        def stalled() -> None:
            # The client does not take it (flow control): let the others go first.
            nonlocal held
            held = False
            self.stalled += 1
            self.release(size)

        timer = asyncio.get_running_loop().call_later(self.stall, stalled)
        try:
            await context.write(out.encode())
        finally:
            timer.cancel()
            if held:
                self.release(size)

    def as_dict(self) -> dict[str, int | float]:
        """For /status: the limits (serve --write-budget, --write-stall) and what they did."""
        return {
            "budget": self.budget,
            "stall": self.stall,
            "in_use": self.in_use,
            "peak": self.peak,
            "waited": self.waited,
            "stalled": self.stalled,
            "written": self.written,
        }

    # -- the queue ----------------------------------------------------------------------------

    def _fits(self, size: int) -> bool:
        return self.in_use == 0 or self.in_use + size <= self.budget

    def _take(self, size: int) -> None:
        self.in_use += size
        self.peak = max(self.peak, self.in_use)

    def _wake(self) -> None:
        waiting = self._waiting
        while waiting:
            size, fut = waiting[0]
            if fut.done():  # cancelled while waiting
                waiting.popleft()
                continue
            if not self._fits(size):
                return
            waiting.popleft()
            self._take(size)
            fut.set_result(None)
