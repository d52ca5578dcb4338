"""Batching across jobs: one decode thread per model fills each generate() call with pieces of every job.

A pool worker runs several jobs at once. Each job's transcribe() hands its pieces to the
model's SharedDecoder (``decoder.session(check)`` is transcribe's ``decode`` seam) and waits;
the decoder thread takes pieces from all waiting jobs in turn, up to ``batch_size`` per round,
and decodes them together with ``decoding.decode_pieces`` (which sorts them longest first and
groups them by what a generate() call shares). So 24 concurrent 10 s clips make one or two
full batches on one warm GPU instead of 24 pods each loading the model.

- **Waiting for company** is capped: a round starts at once when it is full, else after at
  most ``max_wait_seconds`` since its oldest piece arrived.
- **Progress is per job**: finished pieces are handed back to their job's thread, which calls
  its own progress callback (status writes never run on the decoder thread).
- **Cancel**: a job whose check raises (deleted, assigned elsewhere) leaves the queue; its
  pieces not yet taken are never decoded.
- **Poison**: when a round with several jobs fails, each of them is decoded again on its own,
  so only the job whose pieces fail gets the error; the decoder thread goes on.
- ``cross_job=False`` decodes one job's pieces per round (the A/B switch of bench/pool.py).
- **Requests pass as they are**: a job's redo of a piece in its file's dominant language carries
  the encoder output its first decode kept (``PieceRequest.encoding``), and decode_pieces skips
  features and encoder for it while batching it with other jobs' fresh pieces; a piece that asks
  to keep it gets it on its result, as when the job decodes alone. (A fresh piece of a failed
  round, decoded again on its own below, is encoded again: the round's encoder outputs went with it.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from ifw.runner import decoding
from ifw.runner.models import WhisperModel

log = logging.getLogger(__name__)

GENERATE_CALLS = Counter("ifw_worker_generate_calls", "generate() calls made by the pool worker's decoders.")
PIECES_DECODED = Counter("ifw_worker_pieces_decoded", "Pieces (≤30 s clips) decoded, retries included.")
ROUNDS = Counter("ifw_worker_decode_rounds", "Decode rounds, by how many jobs shared them.", ["jobs"])
QUEUED_PIECES = Gauge("ifw_worker_queued_pieces", "Pieces waiting for the decoder.")


@dataclass(eq=False)
class _Ticket:
    """One decode call of one job: its pieces, what came back, and whether it still wants them."""

    requests: Sequence[decoding.PieceRequest]
    todo: list[int] = field(default_factory=list)  # indices not yet taken by a round, in order
    arrived: float = field(default_factory=time.monotonic)
    results: dict[int, decoding.PieceResult] = field(default_factory=dict)
    finished: list[int] = field(default_factory=list)  # done, not yet reported to the job
    error: BaseException | None = None
    alone: bool = False  # decode on its own from now on (it was in a round that failed)
    abandoned: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def waiting(self) -> int:
        return len(self.todo)

    @property
    def complete(self) -> bool:
        return self.error is not None or len(self.results) == len(self.requests)


class SharedDecoder:
    """The one thread that uses a model; jobs' threads queue pieces on it."""

    def __init__(self, whisper: WhisperModel, *, batch_size: int, max_wait_seconds: float, cross_job: bool = True):
        self.whisper = whisper
        self.batch_size = max(1, batch_size)
        self.max_wait_seconds = max_wait_seconds
        self.cross_job = cross_job
        self._queue: list[_Ticket] = []
        self._ready = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"decoder-{whisper.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """No more rounds; waits for the one under way (a daemon thread killed inside torch at
        interpreter exit aborts the process)."""
        with self._ready:
            self._stopped = True
            self._ready.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def session(self, check: Callable[[], None]) -> decoding.Decode:
        """transcribe()'s decode seam for one job; `check` raises when the job should stop."""

        def decode(requests: list[decoding.PieceRequest], on_done: decoding.OnDone | None):
            return self.decode(requests, on_done, check)

        return decode

    def decode(
        self,
        requests: Sequence[decoding.PieceRequest],
        on_done: decoding.OnDone | None,
        check: Callable[[], None],
    ) -> list[decoding.PieceResult]:
        """Queue the pieces, report them as they finish, return them in order (on this job's thread)."""
        if not requests:
            return []
        ticket = _Ticket(requests, todo=list(range(len(requests))))
        with self._ready:
            self._queue.append(ticket)
            QUEUED_PIECES.inc(len(requests))
            self._ready.notify_all()
        try:
            while True:
                with ticket.changed:
                    if not ticket.finished and not ticket.complete:
                        ticket.changed.wait(0.2)
                    finished, ticket.finished = ticket.finished, []
                if finished and on_done:
                    on_done(finished, [ticket.results[i] for i in finished])
                check()
                if ticket.complete and not ticket.finished:
                    break
        except BaseException:
            with self._ready:
                ticket.abandoned = True
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    QUEUED_PIECES.dec(ticket.waiting)
            raise
        if ticket.error is not None:
            raise ticket.error
        return [ticket.results[i] for i in range(len(requests))]

    # ------------------------------------------------------------------ the decoder thread

    def _take(self) -> list[tuple[_Ticket, int]] | None:
        """The next round's pieces, round robin over the waiting jobs; None once stopped."""
        with self._ready:
            while True:
                if self._stopped:
                    return None
                waiting = [t for t in self._queue if t.waiting]
                if waiting:
                    first = waiting[0]
                    if first.alone or not self.cross_job:
                        return self._claim([first], self.batch_size)
                    company = [t for t in waiting if not t.alone]
                    pieces = sum(t.waiting for t in company)
                    left = first.arrived + self.max_wait_seconds - time.monotonic()
                    if pieces >= self.batch_size or left <= 0:
                        return self._claim(company, self.batch_size)
                    self._ready.wait(left)
                else:
                    self._ready.wait()

    def _claim(self, tickets: list[_Ticket], limit: int) -> list[tuple[_Ticket, int]]:
        taken: list[tuple[_Ticket, int]] = []
        while len(taken) < limit and any(t.waiting for t in tickets):
            for t in tickets:
                if t.waiting and len(taken) < limit:
                    taken.append((t, t.todo.pop(0)))
        # Those served go to the back of the queue: a round smaller than the number of jobs
        # serves them in turn, and a long job cannot starve the others.
        served = list(dict.fromkeys(t for t, _ in taken))
        for t in served:
            self._queue.remove(t)
            if t.waiting:
                self._queue.append(t)
        QUEUED_PIECES.dec(len(taken))
        return taken

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            batch = [(t, i) for t, i in batch if not t.abandoned]
            if batch:
                self._round(batch)

    def _round(self, batch: list[tuple[_Ticket, int]]) -> None:
        tickets = list(dict.fromkeys(t for t, _ in batch))
        ROUNDS.labels(jobs=str(len(tickets))).inc()

        def on_done(indices: list[int], results: list[decoding.PieceResult]) -> None:
            for k, result in zip(indices, results, strict=True):
                ticket, i = batch[k]
                with ticket.changed:
                    ticket.results[i] = result
                    ticket.finished.append(i)
                    ticket.changed.notify_all()

        stats = decoding.DecodeStats()
        try:
            decoding.decode_pieces(self.whisper, [t.requests[i] for t, i in batch], batch_size=self.batch_size,
                                   on_done=on_done, stats=stats)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - it belongs to the jobs, not to the decoder
            self._failed(batch, tickets, error)
        finally:
            GENERATE_CALLS.inc(stats.generate_calls)
            PIECES_DECODED.inc(sum(stats.pieces))

    def _failed(self, batch: list[tuple[_Ticket, int]], tickets: list[_Ticket], error: Exception) -> None:
        if len(tickets) == 1:
            ticket = tickets[0]
            with ticket.changed:
                ticket.error = error
                ticket.changed.notify_all()
            return
        # Several jobs shared the round: each decodes its unfinished pieces again on its own,
        # so the error reaches only the job it comes from.
        log.warning("a decode round of %d jobs failed (%s): decoding each on its own", len(tickets), error)
        with self._ready:
            for ticket in tickets:
                redo = sorted(i for t, i in batch if t is ticket and i not in ticket.results)
                ticket.todo = redo + ticket.todo
                ticket.alone = True
                QUEUED_PIECES.inc(len(redo))
                if not ticket.abandoned and ticket not in self._queue:
                    self._queue.insert(0, ticket)
            self._ready.notify_all()
