"""Continuous batching: a node runs one forward at a time, and the decode steps of different sessions that are
waiting at the same time run as one forward.

Step threads hand validated work to the `Scheduler`; one of them at a time runs a round for all. Each round takes
everything that is waiting: decode steps (one new position per row) of sessions over the same blocks are batched,
up to `max_rows` rows a forward; then one chunk of at most `prefill_chunk` positions of the oldest prefill runs,
so a long prompt delays running decodes by one chunk at a time, never by the whole prompt. Sessions join and leave
between rounds.

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
from hivegen.node.defaults import DEFAULT_MAX_ROWS, DEFAULT_PREFILL_CHUNK

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
class BatchStats:
    """Counters of the scheduler's forwards (read by NodeInfo and the metrics)."""

    forwards: int = 0
    batched_steps: int = 0  # steps that shared their forward with another session's
    max_rows: int = 0  # the most rows one forward ran


class Scheduler:
    """Runs every forward of the node, one at a time, batching what can be batched.

    There is no thread of its own: a step's thread that finds no forward running runs the next round itself, for
    everything waiting by then (so a lone session's step costs no hand-off between threads), and the threads still
    waiting take over in turn."""

    def __init__(
        self,
        span: BlockSpan,
        pool: KVPool | None,
        batching: bool,
        max_rows: int = DEFAULT_MAX_ROWS,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        self.span = span
        self.pool = pool
        self.batching = batching and pool is not None
        self.max_rows = max_rows
        self.prefill_chunk = prefill_chunk
        self.stats = BatchStats()
        self.on_forward: Callable[[int, float], None] | None = None  # (rows, seconds) of each forward
        self._waiting: deque[Work] = deque()
        self._prefills: deque[Work] = deque()  # prompts part-way through (touched only by the running round)
        self._cond = threading.Condition()
        self._running = False
        self._stopped = False

    def run(self, work: Work) -> tuple[torch.Tensor, float]:
        """Queue `work` and return its output [rows, new, hidden] and the seconds of compute it shared, running
        rounds of forwards whenever none is running."""
        with self._cond:
            if self._stopped:
                raise RuntimeError("the node is stopping")
            self._waiting.append(work)
            while not work.future.done():
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._cond.release()
                try:
                    self._round()
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
        return work.future.result()

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
