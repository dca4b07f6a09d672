"""Continuous batching: a node runs one forward at a time, and the decode steps of different sessions that are
waiting at the same time run as one forward.

Step threads hand validated work to the `Scheduler`; one of them at a time runs a round for all. Each round takes
everything that is waiting: decode steps (one new position per row) of sessions over the same blocks are batched,
up to `max_rows` rows a forward; then one chunk of at most `prefill_chunk` positions of the oldest prefill runs,
so a long prompt delays running decodes by one chunk at a time, never by the whole prompt. Sessions join and leave
between rounds.

A round may wait before it starts (`batch_wait`, off by default). The scheduler learns each session's pace (the usual
time between its decode steps); when other sessions over the same blocks are due to send their next step, the round
waits for them, at most `batch_wait` seconds (None: about one forward's time): their clients are still busy with
the previous token, and a moment's wait lets their rows share the forward instead of each running one of their
own. Nobody waits for a lone session, one that just stepped, one late by more than the bound, one closed, or one a
round already waited for in vain (until it steps again), so a session that keeps still cannot slow the others
more than once. Measured on a 2-core CPU machine where the clients share the cores with the nodes, waiting raised
the rows per forward (1.6 to 2.5 with 8 clients) but lowered the aggregate speed, as the cores idled while the
nodes waited; hence off unless the node's owner turns it on.

With a `KVPool` every session's keys and values live in the pool and any rows can share a forward
(`hivegen.model.paged`). Without one (a model whose blocks keep another kind of cache), or when the model's
blocks cannot batch, each step runs alone, in turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from hivegen.model.paged import KVPool, Row, view_for
from hivegen.model.span import BlockSpan
from hivegen.node.defaults import (
    DEFAULT_BATCH_WAIT,
    DEFAULT_MAX_ROWS,
    DEFAULT_PREFILL_CHUNK,
    MAX_BATCH_WAIT,
    MAX_BATCH_WAIT_SET,
)

logger = logging.getLogger(__name__)


@dataclass
class Work:
    """One session's step, validated: `hidden` [rows, new, hidden], `positions` [rows, new], `mask` [rows, past +
    new] (the session's whole padding mask with the new positions), over blocks [start, end)."""

    start: int
    end: int
    hidden: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    slots: torch.Tensor | None  # [rows, max_length] in the pool, or None with `cache`
    cache: Cache | None  # the session's own cache when there is no pool
    future: Future[tuple[torch.Tensor, float]] = field(default_factory=Future)
    abandoned: threading.Event | None = None  # set when the session's client went away: skip what has not run
    session: str = ""  # whose step (the scheduler learns each session's pace from its decode steps)
    done: int = 0  # positions already run (a prefill runs in chunks)
    outputs: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def new(self) -> int:
        return int(self.hidden.shape[1])

    @property
    def rows(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def past(self) -> int:
        return int(self.mask.shape[1]) - self.new


class Abandoned(Exception):
    """The step's session was abandoned (its client ended the stream) before the step ran: nobody wants it."""


@dataclass
class _Pace:
    """When a session's last decode step arrived, and the usual time between its steps (smoothed)."""

    blocks: tuple[int, int]  # [start, end) of its steps
    last: float  # when its last step arrived
    interval: float = 0.0  # 0 until its second decode step
    missed: bool = False  # a round waited for its step in vain: not waited for again until it steps

    @property
    def expected(self) -> float:
        """When its next step is due."""
        return self.last + self.interval


@dataclass
class BatchStats:
    """Counters of the scheduler's forwards (read by NodeInfo and the metrics)."""

    forwards: int = 0
    batched_steps: int = 0  # steps that shared their forward with another session's
    max_rows: int = 0  # the most rows one forward ran
    waits: int = 0  # rounds that waited for other sessions' steps before their forward
    wait_seconds: float = 0.0  # the time those rounds waited


class Scheduler:
    """Runs every forward of the node, one at a time, batching what can be batched.

    There is no thread of its own: a step's thread that finds no forward running runs the next round itself, for
    everything waiting by then (so a lone session's step costs no hand-off between threads), and the threads still
    waiting take over in turn.

    `batch_wait`: the most seconds a round waits for other sessions' due steps (None: about the time of one
    forward, measured, at most MAX_BATCH_WAIT; 0: never wait)."""

    def __init__(
        self,
        span: BlockSpan,
        pool: KVPool | None,
        batching: bool,
        max_rows: int = DEFAULT_MAX_ROWS,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        batch_wait: float | None = DEFAULT_BATCH_WAIT,
    ) -> None:
        self.span = span
        self.pool = pool
        self.batching = batching and pool is not None
        self.max_rows = max_rows
        self.prefill_chunk = prefill_chunk
        self.batch_wait = batch_wait
        self.stats = BatchStats()
        self.on_forward: Callable[[int, float], None] | None = None  # (rows, seconds) of each forward
        self._waiting: deque[Work] = deque()
        self._prefills: deque[Work] = deque()  # prompts part-way through (touched only by the running round)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # a round ended, or the node stops: step threads look again
        self._arrivals = threading.Condition(self._lock)  # a step arrived or a session closed: the gatherer looks
        self._running = False
        self._gathering = False
        self._stopped = False
        self._paces: dict[str, _Pace] = {}  # sessions' paces, by id (guarded by the lock)
        self._forward_seconds = 0.0  # smoothed time of a decode forward

    def run(self, work: Work) -> tuple[torch.Tensor, float]:
        """Queue `work` and return its output [rows, new, hidden] and the seconds of compute it shared, running
        rounds of forwards whenever none is running."""
        with self._cond:
            if self._stopped:
                raise RuntimeError("the node is stopping")
            self._waiting.append(work)
            self._note_pace(work)
            if self._gathering:
                self._arrivals.notify()  # the round waiting for due steps may be waiting for this one
            while not work.future.done():
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                try:
                    self._gather()
                    self._cond.release()
                    try:
                        self._round()
                    finally:
                        self._cond.acquire()
                finally:
                    self._running = False
                    self._cond.notify_all()
        return work.future.result()

    def forget(self, session: str) -> None:
        """The session ended: no round waits for it any more."""
        with self._cond:
            self._paces.pop(session, None)
            if self._gathering:
                self._arrivals.notify()

    def _note_pace(self, work: Work) -> None:
        """(under the lock) Learn the pace of the session's decode steps; any step of it ends a miss."""
        if not work.session:
            return
        now = time.monotonic()
        pace = self._paces.get(work.session)
        if pace is None:
            self._paces[work.session] = _Pace((work.start, work.end), now)
            return
        if work.new == 1 and not pace.missed:
            gap = now - pace.last
            pace.interval = gap if pace.interval == 0 else 0.7 * pace.interval + 0.3 * gap
        pace.blocks, pace.last, pace.missed = (work.start, work.end), now, False

    def _wait_bound(self) -> float:
        if not self.batching:
            return 0.0
        if self.batch_wait is not None:
            return min(self.batch_wait, MAX_BATCH_WAIT_SET)
        return min(self._forward_seconds, MAX_BATCH_WAIT)

    def _gather(self) -> None:
        """(under the lock, as the round's runner) Wait, within the bound, for the decode steps that other sessions
        over the blocks of a waiting decode step are due to send. A session waited for in vain is marked missed
        and not waited for again until it steps."""
        bound = self._wait_bound()
        if bound <= 0 or not self._waiting:
            return
        began = time.monotonic()
        deadline = began + bound
        waited = False
        self._gathering = True
        try:
            while (now := time.monotonic()) < deadline and (due := self._due(now, deadline, bound)):
                waited = True
                self._arrivals.wait(min(deadline, max(self._paces[s].expected + bound for s in due)) - now)
        finally:
            self._gathering = False
        if not waited:
            return
        now = time.monotonic()
        for session in self._due(now, now, bound):  # still due and not here: it did not come in time
            self._paces[session].missed = True
        self.stats.waits += 1
        self.stats.wait_seconds += now - began

    def _due(self, now: float, deadline: float, bound: float) -> list[str]:
        """The sessions worth waiting for: over the blocks of a waiting decode step whose forward has room for more
        rows, with no step waiting or running in chunks, and due: their next step (one usual interval after their
        last) is expected before `deadline`, within half an interval from now (a session that just stepped is not
        waited for), and is not late by more than the bound. Sessions missed once are left out until they step."""
        rows: dict[tuple[int, int], int] = {}
        for w in self._waiting:
            if w.new == 1:
                rows[(w.start, w.end)] = rows.get((w.start, w.end), 0) + w.rows
        if not rows:
            return []
        here = {w.session for w in (*self._waiting, *self._prefills)}
        due = []
        for session, pace in self._paces.items():
            if pace.interval == 0 or pace.missed or session in here:
                continue
            if rows.get(pace.blocks, self.max_rows) >= self.max_rows:  # not over these blocks, or no room left
                continue
            expected = pace.expected
            if expected <= deadline and expected - now <= pace.interval / 2 and now <= expected + bound:
                due.append(session)
        return due

    def stop(self) -> None:
        """Fail what is waiting; later steps are refused."""
        with self._cond:
            self._stopped = True
            pending = [*self._waiting, *self._prefills]
            self._waiting.clear()
            self._prefills.clear()
            for work in pending:
                work.future.set_exception(RuntimeError("the node is stopping"))
            self._cond.notify_all()
            self._arrivals.notify_all()

    def _round(self) -> None:
        """Every decode step waiting now (batched), then one chunk of the oldest prompt."""
        with self._cond:
            arrived = list(self._waiting)
            self._waiting.clear()
        decodes: list[Work] = []
        for work in arrived:
            if not _dropped(work):
                (decodes if work.new == 1 else self._prefills).append(work)
        self._run_decodes(decodes)
        if self._prefills:
            self._run_prefill_chunk()

    def _run_decodes(self, decodes: list[Work]) -> None:
        if not self.batching:
            for work in decodes:
                self._run_alone(work)
            return
        groups: dict[tuple[int, int], list[Work]] = {}
        for work in decodes:
            groups.setdefault((work.start, work.end), []).append(work)
        for group in groups.values():
            batch: list[Work] = []
            for work in group:
                if batch and sum(w.rows for w in batch) + work.rows > self.max_rows:
                    self._run_batch(batch)
                    batch = []
                batch.append(work)
            if batch:
                self._run_batch(batch)

    def _run_prefill_chunk(self) -> None:
        work = self._prefills[0]
        if _dropped(work):  # its client left between two chunks
            self._prefills.popleft()
            return
        if self.pool is None:  # the model's own cache: the prompt in one forward
            self._prefills.popleft()
            self._run_alone(work)
            return
        upto = min(work.new, work.done + self.prefill_chunk)
        try:
            out, seconds = self._forward([work], work.done, upto)
        except Exception as exc:
            self._prefills.popleft()
            work.future.set_exception(exc)
            return
        work.outputs.append(out)
        work.seconds += seconds
        work.done = upto
        if upto == work.new:
            self._prefills.popleft()
            output = work.outputs[0] if len(work.outputs) == 1 else torch.cat(work.outputs, dim=1)
            work.future.set_result((output, work.seconds))

    def _run_alone(self, work: Work) -> None:
        try:
            if self.pool is None:
                assert work.cache is not None
                began = time.perf_counter()
                out = self.span.forward(work.hidden, work.positions, work.mask, work.cache, work.start, work.end)
                _synchronize(out)
                seconds = time.perf_counter() - began
                self._count(1, work.rows, seconds)
            else:
                out, seconds = self._forward([work], 0, work.new)
        except Exception as exc:
            work.future.set_exception(exc)
            return
        work.future.set_result((out, seconds))

    def _run_batch(self, batch: list[Work]) -> None:
        try:
            out, seconds = self._forward(batch, 0, 1)
        except Exception as exc:
            for work in batch:
                work.future.set_exception(exc)
            return
        smoothed = self._forward_seconds
        self._forward_seconds = seconds if smoothed == 0 else 0.8 * smoothed + 0.2 * seconds
        if len(batch) > 1:
            self.stats.batched_steps += len(batch)
        row = 0
        for work in batch:
            work.future.set_result((out[row : row + work.rows], seconds))
            row += work.rows

    def _forward(self, batch: list[Work], begin: int, upto: int) -> tuple[torch.Tensor, float]:
        """Run positions [begin, upto) of the new ones of every work in `batch` (all over the same blocks) through
        the pool, as one forward of their rows, left-padded to the longest."""
        assert self.pool is not None
        new = upto - begin
        rows: list[Row] = []
        for work in batch:
            assert work.slots is not None
            rows += [Row(work.slots[r], work.past + begin) for r in range(work.rows)]
        total = max(r.length for r in rows) + new
        mask = torch.zeros((len(rows), total), dtype=torch.int64)
        hidden, positions = [], []
        i = 0
        for work in batch:
            seen = work.past + upto
            mask[i : i + work.rows, total - seen :] = work.mask[:, :seen]
            hidden.append(work.hidden[:, begin:upto])
            positions.append(work.positions[:, begin:upto])
            i += work.rows
        first = batch[0]
        view = view_for(self.pool, self.span, rows, new)
        began = time.perf_counter()
        out = self.span.forward(
            torch.cat(hidden) if len(hidden) > 1 else hidden[0],
            torch.cat(positions) if len(positions) > 1 else positions[0],
            mask,
            view,
            first.start,
            first.end,
        )
        _synchronize(out)
        seconds = time.perf_counter() - began
        self._count(len(batch), len(rows), seconds)
        return out, seconds

    def _count(self, steps: int, rows: int, seconds: float) -> None:
        self.stats.forwards += 1
        self.stats.max_rows = max(self.stats.max_rows, rows)
        if self.on_forward is not None:
            self.on_forward(rows, seconds)


def _dropped(work: Work) -> bool:
    """Fail `work` if its session was abandoned, so its cache can be freed without running it."""
    if work.abandoned is None or not work.abandoned.is_set():
        return False
    work.future.set_exception(Abandoned("the session's client ended the stream before this step ran"))
    return True


def _synchronize(out: torch.Tensor) -> None:
    """Wait for a GPU forward to end, so that its seconds are its compute, not the time to queue its kernels."""
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
