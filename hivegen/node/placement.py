"""Where a node without `--blocks` serves: the span where the swarm is weakest, and when moving pays.

A block's capacity is the sum of the throughputs (decode steps per second) of the online nodes that serve it; the
swarm's bottleneck is its weakest block, since every token goes through every block. A starting node takes the
`length` consecutive blocks whose weakest capacity is lowest (blocks nobody serves first, then the least served,
then the lowest sum, then the first such span). A running node moves only when its move raises the bottleneck by
a clear margin, and only if no node with a smaller id would make an overlapping move now: nodes with the same
view would otherwise all move into one gap at once, leave another behind, and chase each other around the model.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from hivegen.dht import SpanRecord

MOVE_MARGIN = 1.25  # a node moves when the bottleneck with it elsewhere is at least this many times today's


def block_capacities(records: Iterable[SpanRecord], num_blocks: int, exclude: str | None = None) -> list[float]:
    """Per block, the summed throughput of the online nodes serving it (leaving out node `exclude`)."""
    capacity = [0.0] * num_blocks
    for record in records:
        if record.state != "online" or record.node_id == exclude:
            continue
        for block in range(max(0, record.start), min(num_blocks, record.end)):
            capacity[block] += record.throughput
    return capacity


def choose_span(capacity: list[float], length: int) -> tuple[int, int]:
    """The `length` consecutive blocks [start, start + length) where the swarm is weakest."""
    if not 1 <= length <= len(capacity):
        raise ValueError(f"a span of {length} blocks does not fit in a model of {len(capacity)} blocks")
    best = min(
        range(len(capacity) - length + 1),
        key=lambda s: (min(capacity[s : s + length]), sum(capacity[s : s + length]), s),
    )
    return best, best + length


def bottleneck(capacity: list[float], start: int, end: int, throughput: float) -> float:
    """The swarm's weakest block once a node of `throughput` serves [start, end)."""
    return min(c + (throughput if start <= b < end else 0.0) for b, c in enumerate(capacity))


@dataclass(frozen=True)
class Move:
    """A better span for a running node, and the bottlenecks that justify it."""

    start: int
    end: int
    now: float  # the swarm's bottleneck with the node where it is
    after: float  # ... and with it on [start, end)


def better_span(
    records: Iterable[SpanRecord], num_blocks: int, me: SpanRecord, margin: float = MOVE_MARGIN
) -> Move | None:
    """Where node `me` should move to raise the swarm's bottleneck by `margin`, or None if it should stay."""
    others = block_capacities(records, num_blocks, exclude=me.node_id)
    length = me.end - me.start
    start, end = choose_span(others, length)
    now = bottleneck(others, me.start, me.end, me.throughput)
    after = bottleneck(others, start, end, me.throughput)
    if (start, end) == (me.start, me.end) or after <= now * margin:
        return None
    return Move(start, end, now, after)


def should_move(
    records: Collection[SpanRecord], num_blocks: int, me: SpanRecord, margin: float = MOVE_MARGIN
) -> Move | None:
    """`better_span` for `me`, unless an online node with a smaller id would move into overlapping blocks now
    (it goes first; the next check sees where it went)."""
    move = better_span(records, num_blocks, me, margin)
    if move is None:
        return None
    for other in records:
        if other.node_id >= me.node_id or other.state != "online":
            continue
        theirs = better_span(records, num_blocks, other, margin)
        if theirs is not None and theirs.start < move.end and move.start < theirs.end:
            return None
    return move
