"""A KV cache that is memory: one pool per node, allocated once from a budget and handed out in pages.

Every layer of a span keeps its keys and values in one pre-allocated tensor of `slots` token positions
([kv_heads, slots, head_dim]); a slot is one position of one sequence in every layer at once. A session reserves
the pages for its whole `max_length` when it opens, so it can never run out of memory halfway, and gives them back
when it closes.

A forward sees the pool through a `PagedView`: a transformers `Cache` over any number of rows (sequences of
different sessions, of different lengths). The view writes each row's new keys and values into the row's own slots
and hands attention the rows' past, gathered and left-padded to a common length, with the padding masked out. So
the decode steps of many sessions run as one batched forward, and a session alone computes exactly what a
`DynamicCache` would (the same tensors reach attention).

Whether a model's blocks can use the pool is checked, not assumed (`paged_support`): its layers must keep plain
key/value caches, and the pooled and batched results must match the model's own cache.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from hivegen.model.blocks import CHUNKED_ATTENTION
from hivegen.model.span import BlockSpan

PAGE_SIZE = 16  # token positions per page
NULL_PAGE = 0  # never handed out: padding reads its zeros (and is masked)
# How far a pooled or batched result may drift from the model's own cache and still count as the same
# computation (relative L2 per position); measured drift on the test models is ~1e-7 in float32.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


class CacheFull(Exception):
    """The pool has fewer free pages than a session needs."""


@dataclass(frozen=True)
class LayerShape:
    """Per-token key and value shapes of one layer: (kv_heads, head_dim) each."""

    keys: tuple[int, int]
    values: tuple[int, int]
    window: int | None = None  # a sliding-window layer attends to this many positions (the newest included)

    @property
    def elements(self) -> int:
        return self.keys[0] * self.keys[1] + self.values[0] * self.values[1]


def slot_bytes(shapes: Sequence[LayerShape], dtype: torch.dtype) -> int:
    """Bytes of one token position over every layer of a span."""
    return sum(s.elements for s in shapes) * torch.empty((), dtype=dtype).element_size()


class KVPool:
    """The span's keys and values for `tokens` positions (rounded down to whole pages), allocated at once."""

    def __init__(
        self, shapes: Sequence[LayerShape], tokens: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        pages = tokens // PAGE_SIZE + 1  # + the null page
        slots = pages * PAGE_SIZE
        self.shapes = list(shapes)
        self.dtype = dtype
        self.keys = [torch.empty((s.keys[0], slots, s.keys[1]), dtype=dtype, device=device) for s in shapes]
        self.values = [torch.empty((s.values[0], slots, s.values[1]), dtype=dtype, device=device) for s in shapes]
        for tensor in (*self.keys, *self.values):
            tensor[:, :PAGE_SIZE].zero_()  # the null page
        self.slot_bytes = slot_bytes(shapes, dtype)
        self.pages_total = pages - 1
        self._free = list(range(pages - 1, NULL_PAGE, -1))  # popped from the end: low pages first
        self._lock = threading.Lock()

    @property
    def tokens_total(self) -> int:
        return self.pages_total * PAGE_SIZE

    @property
    def tokens_free(self) -> int:
        with self._lock:
            return len(self._free) * PAGE_SIZE

    @property
    def bytes_total(self) -> int:
        """What the pool holds in memory (the null page included)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @staticmethod
    def pages_for(rows: int, length: int) -> int:
        return rows * math.ceil(length / PAGE_SIZE)

    def reserve(self, rows: int, length: int) -> torch.Tensor:
        """Slots for `rows` sequences of up to `length` positions: an int64 tensor [rows, length] (free it with
        `release`). Raises CacheFull when the pool cannot hold them."""
        per_row = math.ceil(length / PAGE_SIZE)
        with self._lock:
            if rows * per_row > len(self._free):
                raise CacheFull(f"{rows * per_row * PAGE_SIZE} cache tokens needed, {len(self._free) * PAGE_SIZE} free")
            pages = [self._free.pop() for _ in range(rows * per_row)]
        table = torch.tensor(pages, dtype=torch.int64).view(rows, per_row, 1) * PAGE_SIZE
        slots = (table + torch.arange(PAGE_SIZE)).view(rows, per_row * PAGE_SIZE)[:, :length]
        return slots.contiguous()

    def release(self, slots: torch.Tensor) -> None:
        pages = sorted({int(s) // PAGE_SIZE for s in slots.flatten().tolist()}, reverse=True)
        with self._lock:
            self._free.extend(pages)


class _PagedLayer(CacheLayerMixin):
    """One model layer of a PagedView (layers outside the span hold nothing and refuse updates)."""

    def __init__(self, view: PagedView, index: int | None, window: int | None) -> None:
        super().__init__()
        self.view, self.index, self.window = view, index, window
        self.is_sliding = window is not None
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index is None:
            raise RuntimeError("a layer outside the node's span wrote to its cache")
        view, pool = self.view, self.view.pool
        return (
            view.exchange(pool.keys[self.index], key_states, self.window),
            view.exchange(pool.values[self.index], value_states, self.window),
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """As the model's own cache: a sliding-window layer sees its window's newest past positions only."""
        assert query_length == self.view.new
        return self.view.mask_sizes(self.window)

    def get_seq_length(self) -> int:
        return self.view.past

    def get_max_length(self) -> int:
        return -1


class PagedView(Cache):
    """The pool as one forward's cache: rows of different sessions and lengths, left-padded to `past`.

    `read` [rows, past + new] holds each row's slots for its past and new positions, right-aligned, padded on the
    left with null slots; `write` [rows, new] the slots its new positions go to."""

    def __init__(
        self, pool: KVPool, num_layers: int, first_layer: int, read: torch.Tensor, write: torch.Tensor
    ) -> None:
        inside = range(first_layer, first_layer + len(pool.keys))
        layers = [
            _PagedLayer(self, i - first_layer, pool.shapes[i - first_layer].window)
            if i in inside
            else _PagedLayer(self, None, None)
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)  # type: ignore[arg-type]
        self.pool = pool
        self.rows, self.new = write.shape
        self.past = read.shape[1] - self.new
        self.device = pool.keys[0].device if pool.keys else torch.device("cpu")
        self.read = read
        self.write = write.to(self.device).flatten()
        self._reads: dict[int | None, torch.Tensor] = {}

    def _read(self, window: int | None) -> torch.Tensor:
        """The slots attention reads: every row's past and new ones, or a sliding window's newest."""
        if window not in self._reads:
            kept, _ = self.mask_sizes(window)
            self._reads[window] = self.read[:, self.read.shape[1] - kept :].to(self.device).flatten()
        return self._reads[window]

    def mask_sizes(self, window: int | None) -> tuple[int, int]:
        if window is not None and self.past >= window:
            return window - 1 + self.new, self.past - window + 1
        return self.past + self.new, 0

    def exchange(self, store: torch.Tensor, states: torch.Tensor, window: int | None) -> torch.Tensor:
        """Write the new `states` [rows, heads, new, dim] into `store`, return every row's past and new states
        [rows, heads, positions, dim] (the newest `window - 1 + new` on a sliding-window layer)."""
        heads, dim = store.shape[0], store.shape[2]
        store.index_copy_(1, self.write, states.to(store.dtype).transpose(0, 1).reshape(heads, -1, dim))
        read = self._read(window)
        gathered = store.index_select(1, read).view(heads, self.rows, read.numel() // self.rows, dim)
        return gathered.transpose(0, 1).contiguous()


@dataclass
class Row:
    """One sequence in a batched forward: its slots and how many positions it holds already."""

    slots: torch.Tensor  # [max_length] int64
    length: int


def view_for(pool: KVPool, span: BlockSpan, rows: Sequence[Row], new: int) -> PagedView:
    """A PagedView over `rows`, each about to take `new` positions."""
    total = max(r.length for r in rows) + new
    read = torch.full((len(rows), total), NULL_PAGE * PAGE_SIZE, dtype=torch.int64)
    write = torch.empty((len(rows), new), dtype=torch.int64)
    for i, row in enumerate(rows):
        end = row.length + new
        read[i, total - end :] = row.slots[:end]
        write[i] = row.slots[row.length : end]
    return PagedView(pool, int(span.config.num_hidden_layers), span.start, read, write)


def layer_shapes(span: BlockSpan) -> list[LayerShape]:
    """Each span layer's per-token key/value shapes, read off the model's own cache after one token (raises
    ValueError when a layer keeps something else than a plain key/value cache)."""
    cache = span.new_cache()
    hidden = torch.zeros((1, 1, span.hidden_size), dtype=span.dtype)
    span.forward(hidden, torch.zeros((1, 1), dtype=torch.int64), torch.ones((1, 1), dtype=torch.int64), cache)
    shapes = []
    for i in range(span.start, span.end):
        layer = cache.layers[i] if i < len(cache.layers) else None
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise ValueError(f"block {i} keeps a {type(layer).__name__} cache, not plain keys and values")
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.ndim != 4 or keys.shape[2] != 1 or values.shape[2] != 1:
            raise ValueError(f"block {i} does not cache one key per position")
        window = layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None
        shapes.append(LayerShape((keys.shape[1], keys.shape[3]), (values.shape[1], values.shape[3]), window))
    return shapes


def nominal_shapes(span: BlockSpan) -> list[LayerShape]:
    """Per-token key/value shapes as the config states them (to size a budget for blocks whose own cache is
    used instead of the pool)."""
    config = span.config
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    dim = int(getattr(config, "head_dim", None) or span.hidden_size // int(config.num_attention_heads))
    return [LayerShape((heads, dim), (heads, dim))] * (span.end - span.start)


def _drift(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).norm(dim=-1) / (a.norm(dim=-1) + b.norm(dim=-1) + 1e-12)).max())


@dataclass(frozen=True)
class PagedSupport:
    """What a span can do with the pool: `shapes` is None when it cannot use it at all; `batching` is False
    (with `reason`) when sessions may use the pool but not share a forward."""

    shapes: list[LayerShape] | None
    batching: bool
    reason: str = ""
    drift: float = 0.0  # the largest drift measured between batched and separate runs


def paged_support(span: BlockSpan) -> PagedSupport:
    """Try the pool on this span: the model's own cache, the pool for one sequence and for two sequences of
    different lengths in one forward must all agree."""
    try:
        shapes = layer_shapes(span)
    except Exception as exc:
        return PagedSupport(None, False, f"its blocks' cache cannot be pooled ({exc})")
    tolerance = PROBE_TOLERANCE.get(span.dtype, 1e-2)
    generator = torch.Generator().manual_seed(0)
    lengths = (5, 3)
    ones = lambda n: torch.ones((1, n), dtype=torch.int64)  # noqa: E731
    inputs = [torch.randn((1, n + 1, span.hidden_size), generator=generator).to(span.dtype) for n in lengths]
    pool = KVPool(shapes, 4 * PAGE_SIZE, span.dtype, span.device)
    try:
        own, rows = [], []
        for x, n in zip(inputs, lengths, strict=True):  # the model's own cache: prefill n, then one step
            cache = span.new_cache()
            span.forward(x[:, :n], torch.arange(n)[None], torch.ones((1, n), dtype=torch.int64), cache)
            own.append(span.forward(x[:, n:], torch.tensor([[n]]), torch.ones((1, n + 1), dtype=torch.int64), cache))
            row = Row(pool.reserve(1, 2 * PAGE_SIZE)[0], 0)  # the pool, alone: prefill n
            span.forward(
                x[:, :n], torch.arange(n)[None], torch.ones((1, n), dtype=torch.int64), view_for(pool, span, [row], n)
            )
            row.length = n
            rows.append(row)
        alone = view_for(pool, span, rows[:1], 1)  # the first sequence's step, alone
        single = span.forward(inputs[0][:, 5:], torch.tensor([[5]]), ones(6), alone)
        if not torch.equal(single, own[0]) and _drift(single, own[0]) > tolerance:
            return PagedSupport(None, False, f"pooled keys and values change its output ({_drift(single, own[0]):.1e})")
        if any(kind == CHUNKED_ATTENTION for kind in span.layer_types):
            return PagedSupport(shapes, False, "chunked attention counts positions from the start of the batch")
        # Both sequences' steps in one forward (left-padded): redo the first step from the same cache state.
        both = view_for(pool, span, rows, 1)
        mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
        hidden = torch.cat([inputs[0][:, 5:], inputs[1][:, 3:]])
        batched = span.forward(hidden, torch.tensor([[5], [3]]), mask, both)
    except Exception as exc:
        return PagedSupport(None, False, f"its blocks failed on pooled keys and values ({type(exc).__name__}: {exc})")
    drift = max(_drift(batched[i : i + 1], own[i]) for i in range(2))
    if drift > tolerance:
        return PagedSupport(shapes, False, f"batched steps drift {drift:.1e} from separate ones", drift)
    return PagedSupport(shapes, True, drift=drift)
