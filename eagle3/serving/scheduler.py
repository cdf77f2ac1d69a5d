"""The serving loop: one thread owns the engine and runs its rounds; requests from any thread queue up, join
the running batch between rounds (continuous batching) and hear back through their sink.

    submit (any thread) -> waiting queue -> engine.add (a free row) -> engine.step rounds -> done | cancelled

A job's sink is called on the engine thread with ("text", delta) as text settles (stop strings held back),
then exactly once with ("done", result) or ("error", message). Cancelling (the client went away) frees the
row at the next round boundary. The counters in `stats` feed /metrics.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

from eagle3.decoding.engine import Engine, Request, SpeculativeResult

Sink = Callable[[str, object], None]
OUTCOMES = ("done", "cancelled", "error", "refused")  # refused: the queue was full, or the server stopping

# Buckets (seconds) of the latency histograms: time to first token and time per output token.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class QueueFull(RuntimeError):
    """Every row is busy and the waiting queue holds max_queue requests."""


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no new requests."""


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # cumulative per bucket, as Prometheus wants them
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.n += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


@dataclass
class Stats:
    """What /metrics reports; written on the engine thread (plain counters: readers may see one round late)."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    prompt_tokens: int = 0
    generation_tokens: int = 0
    rounds: int = 0
    drafted_rows: int = 0  # rows' rounds with a draft tree (a round of B drafted rows counts B)
    accepted_draft_tokens: int = 0  # draft tokens the target kept, over those
    batch_rows: int = 0  # rows in the last round
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))

    @property
    def tau(self) -> float:
        """Mean acceptance length of drafted rows' rounds (accepted draft tokens + 1), 0 before any."""
        rows = self.drafted_rows
        return (self.accepted_draft_tokens + rows) / rows if rows else 0.0


@dataclass
class Job:
    request: Request
    sink: Sink
    id: int
    stream: bool = False  # the sink hears the text as it settles
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # when its first token was drawn (after the prefill)
    seq_id: int | None = None  # the engine's id once it holds a row
    cancelled: bool = False
    ended: bool = False  # its sink has heard "done" or "error"


class Scheduler:
    """Runs `engine` on its own thread for up to engine.max_rows requests at a time, max_queue more waiting.
    The engine is opened for sequences of up to max_len positions (prompt and answer)."""

    def __init__(self, engine: Engine, max_len: int, max_queue: int = 64):
        self.engine, self.max_len, self.max_queue = engine, min(max_len, engine.target.context), max_queue
        self.stats = Stats()
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # engine id -> job
        self._cancels: list[Job] = []
        self._wake = threading.Condition()
        self._accepting, self._stop_now = True, False
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._counted = None  # the last round report counted in stats
        self._open = 0  # jobs submitted and not yet ended (queued, being admitted, or running)

    # -- any thread ------------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def start(self) -> None:
        self.engine.open(self.max_len)
        self._thread = threading.Thread(target=self._loop, name="eagle3-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, sink: Sink, stream: bool = False) -> Job:
        """Queues a request (raises QueueFull or ShuttingDown); its result arrives through sink, and with
        stream its text as it settles. The request must fit max_len (the caller checks, and says so its way)."""
        with self._wake:
            if not self._accepting:
                self.stats.requests["refused"] += 1
                raise ShuttingDown("the server is shutting down")
            if self._open >= self.engine.max_rows + self.max_queue:
                self.stats.requests["refused"] += 1
                rows = self.engine.max_rows
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting for {rows} rows)")
            job = Job(request, sink, next(self._ids), stream)
            self._waiting.append(job)
            self._open += 1
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The job's client went away: it leaves the queue, or its row at the next round boundary."""
        with self._wake:
            if job.cancelled or job.ended:
                return
            job.cancelled = True
            self._cancels.append(job)
            self._wake.notify()

    def stop(self, grace_s: float = 0.0) -> None:
        """Takes no new requests; lets running and queued ones finish for up to grace_s, cancels the rest, and
        ends the engine thread."""
        with self._wake:
            self._accepting = False
            self._wake.notify()
        deadline = time.monotonic() + grace_s
        while self._open and time.monotonic() < deadline and self._alive():
            time.sleep(0.02)
        with self._wake:
            self._stop_now = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the engine thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self._running or self._cancels or self._stop_now):
                    self._wake.wait()
                stopping = self._stop_now
                cancels, self._cancels = self._cancels, []
                if stopping:
                    cancels += [*self._waiting, *self._running.values()]
                    self._waiting.clear()
                free = self.engine.max_rows - len(self.engine.sequences)
                admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            for job in cancels:
                self._drop(job)
            if stopping:
                return
            try:
                for job in admitted:
                    self._admit(job)
                if self.engine.sequences:
                    self._step()
            except Exception as err:  # a bug: the batch's requests fail, the server lives on with a fresh batch
                for job in [*admitted, *self._running.values()]:
                    if not job.ended:
                        self._fail(job, f"internal error, {type(err).__name__}: {err}")
                self._running.clear()
                self.engine.open(self.max_len)

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            return
        request = replace(job.request, on_text=(lambda text: job.sink("text", text)) if job.stream else None)
        try:
            job.seq_id = self.engine.add(request)
        except ValueError as err:  # (checked before the prefill: the batch is untouched)
            self._fail(job, str(err))
            return
        job.first_token = time.perf_counter()
        self.stats.ttft.observe(job.first_token - job.submitted)
        self._running[job.seq_id] = job

    def _step(self) -> None:
        finished = self.engine.step()
        report = self.engine.last_round
        if report is not None and report is not self._counted:  # (a step may finish rows without a round)
            self._counted = report
            self.stats.rounds += 1
            self.stats.batch_rows = len(report.trees)
            if max(tree.size for tree in report.trees) > 1:
                self.stats.drafted_rows += len(report.trees)
                self.stats.accepted_draft_tokens += sum(report.accepted)
        for seq_id, result in finished:
            job = self._running.pop(seq_id, None)
            if job is not None:
                self._finish(job, result)

    def _drop(self, job: Job) -> None:
        """A cancelled job leaves the queue or its row; its sink hears ("done", None) unless it has ended."""
        if job.ended:
            return
        with self._wake:  # (submit appends under the lock)
            if job in self._waiting:
                self._waiting.remove(job)
        if job.seq_id is not None and self._running.pop(job.seq_id, None) is not None:
            result = self.engine.cancel(job.seq_id)
            if result is not None:
                self.stats.generation_tokens += result.new_tokens
                self.stats.prompt_tokens += result.prompt_tokens
        self.stats.requests["cancelled"] += 1
        self._end(job)
        job.sink("done", None)

    def _finish(self, job: Job, result: SpeculativeResult) -> None:
        stats = self.stats
        stats.requests["done"] += 1
        stats.prompt_tokens += result.prompt_tokens
        stats.generation_tokens += result.new_tokens
        if result.new_tokens > 1 and job.first_token is not None:
            stats.tpot.observe((time.perf_counter() - job.first_token) / (result.new_tokens - 1))
        self._end(job)
        job.sink("done", result)

    def _end(self, job: Job) -> None:
        with self._wake:
            job.ended = True
            self._open -= 1

    def _fail(self, job: Job, message: str) -> None:
        self.stats.requests["error"] += 1
        self._end(job)
        job.sink("error", message)
