"""Many users at once: decode steps of different sessions share forwards on a node (continuous batching) out of a
KV-cache pool that is memory, and every session still gets transformers' own tokens.

In-process tests drive the scheduler and the pool directly; the cluster tests send 8 concurrent clients of
different prompt lengths, batch sizes and lengths through the same two nodes and read the nodes' counters over
the wire."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from hivegen.client import RemoteModelForCausalLM
from hivegen.cluster import LocalCluster
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.paged import PAGE_SIZE, CacheFull, KVPool, layer_shapes, paged_support, slot_bytes
from hivegen.model.span import BlockSpan
from hivegen.node.batching import Abandoned, Scheduler, Work
from hivegen.proto import node_pb2_grpc
from hivegen.proto.options import grpc_options
from tests.conftest import ClusterFactory, TinyFactory, greedy_reference, wait_for
from tests.wire import Stream, info, new_id, node_infos, open_request, step_request

RELATIVE = 1e-5  # float32: a batched step may differ from a lone one in the last bits, no more


def drift(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / (a.norm(dim=-1) + b.norm(dim=-1) + 1e-12)).max())


@pytest.fixture(scope="module")
def span(tiny_model: TinyFactory) -> BlockSpan:
    return BlockSpan(ModelCheckpoint.open(tiny_model("gemma3")), 1, 4)  # sliding and full attention layers


def own_cache_run(span: BlockSpan, hidden: torch.Tensor, prompt: int) -> torch.Tensor:
    """The span on `hidden` [1, n, h] with the model's own cache: a prefill of `prompt` positions, then one by one."""
    cache = span.new_cache()
    n = hidden.shape[1]
    outs = [span.forward(hidden[:, :prompt], torch.arange(prompt)[None], torch.ones((1, prompt)), cache)]
    for p in range(prompt, n):
        outs.append(span.forward(hidden[:, p : p + 1], torch.tensor([[p]]), torch.ones((1, p + 1)), cache))
    return torch.cat(outs, dim=1)


def run_together(target: Callable[[int], None], count: int, timeout: float) -> None:
    """target(0) .. target(count - 1), each on its own thread, all joined within `timeout` seconds each."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)


def test_the_pool_and_batching_are_checked_on_the_models_blocks(span: BlockSpan) -> None:
    support = paged_support(span)
    assert support.batching and support.shapes == layer_shapes(span), support.reason
    assert support.drift < RELATIVE


def test_concurrent_sessions_of_different_lengths_share_forwards_and_match_their_own_cache(span: BlockSpan) -> None:
    """Six sessions (prompts of 3..40 positions, one of two rows) step concurrently through one scheduler: each
    output equals a lone run with the model's own cache, and the forwards were shared."""
    support = paged_support(span)
    assert support.shapes is not None
    pool = KVPool(support.shapes, 1024, span.dtype)
    scheduler = Scheduler(span, pool, batching=True, prefill_chunk=16)  # prompts over 16 run in chunks
    lengths, steps = [3, 7, 40, 12, 5, 21], 6
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn((2 if i == 1 else 1, n + steps, span.hidden_size), generator=generator) for i, n in
              enumerate(lengths)]  # fmt: skip
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(len(lengths))

    def session(i: int) -> None:
        x, n = inputs[i], lengths[i]
        rows = x.shape[0]
        slots = pool.reserve(rows, n + steps)
        barrier.wait()
        outs = []
        for begin, end in [(0, n), *((p, p + 1) for p in range(n, n + steps))]:
            positions = torch.arange(begin, end).expand(rows, -1)
            work = Work(span.start, span.end, x[:, begin:end], positions, torch.ones((rows, end)), slots, None)
            outs.append(scheduler.run(work)[0])
        results[i] = torch.cat(outs, dim=1)
        pool.release(slots)

    run_together(session, len(lengths), timeout=60)
    scheduler.stop()
    assert sorted(results) == list(range(len(lengths)))
    for i, n in enumerate(lengths):
        for row in range(inputs[i].shape[0]):
            alone = own_cache_run(span, inputs[i][row : row + 1], n)
            assert drift(results[i][row : row + 1], alone) < RELATIVE, (i, row)
    assert scheduler.stats.batched_steps > 0 and scheduler.stats.max_rows > 2
    assert pool.tokens_free == pool.tokens_total  # every page came back


def test_a_lone_session_computes_exactly_what_the_models_own_cache_does(span: BlockSpan) -> None:
    support = paged_support(span)
    assert support.shapes is not None
    pool = KVPool(support.shapes, 256, span.dtype)
    scheduler = Scheduler(span, pool, batching=True)
    x = torch.randn((1, 12, span.hidden_size), generator=torch.Generator().manual_seed(2))
    slots = pool.reserve(1, 12)
    outs = []
    for begin, end in [(0, 9), (9, 10), (10, 11), (11, 12)]:
        work = Work(span.start, span.end, x[:, begin:end], torch.arange(begin, end)[None], torch.ones((1, end)),
                    slots, None)  # fmt: skip
        outs.append(scheduler.run(work)[0])
    scheduler.stop()
    assert torch.equal(torch.cat(outs, dim=1), own_cache_run(span, x, 9))  # bit for bit


def test_a_step_whose_client_left_is_dropped_before_it_runs(span: BlockSpan) -> None:
    """A client that ends its stream while its step waits gets nothing computed: the forward is skipped, so the
    node can give the session's cache back at once instead of after a prompt nobody will read."""
    support = paged_support(span)
    assert support.shapes is not None
    pool = KVPool(support.shapes, 256, span.dtype)
    scheduler = Scheduler(span, pool, batching=True)
    slots = pool.reserve(1, 64)
    left = threading.Event()
    left.set()
    x = torch.randn((1, 64, span.hidden_size))
    work = Work(span.start, span.end, x, torch.arange(64)[None], torch.ones((1, 64)), slots, None, abandoned=left)
    with pytest.raises(Abandoned, match="ended the stream"):
        scheduler.run(work)
    stayed = Work(span.start, span.end, x[:, :4], torch.arange(4)[None], torch.ones((1, 4)), slots, None,
                  abandoned=threading.Event())  # fmt: skip
    assert scheduler.run(stayed)[0].shape == (1, 4, span.hidden_size)  # the next one runs as usual
    assert scheduler.stats.forwards == 1
    scheduler.stop()


class Stepper:
    """Sessions stepping one decode position at a time through one scheduler, each from a prefill of 4."""

    def __init__(self, span: BlockSpan, scheduler: Scheduler, pool: KVPool, names: str) -> None:
        self.span, self.scheduler = span, scheduler
        generator = torch.Generator().manual_seed(3)
        self.inputs = {n: torch.randn((1, 24, span.hidden_size), generator=generator) for n in names}
        self.slots = {n: pool.reserve(1, 24) for n in names}
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for name in names:
            self.step(name, 4)

    def step(self, name: str, new: int = 1) -> None:
        done = sum(out.shape[1] for out in self.outputs[name])
        end = done + new
        work = Work(self.span.start, self.span.end, self.inputs[name][:, done:end], torch.arange(done, end)[None],
                    torch.ones((1, end)), self.slots[name], None, session=name)  # fmt: skip
        self.outputs[name].append(self.scheduler.run(work)[0])

    def check_exact(self) -> None:
        for name, outs in self.outputs.items():
            got = torch.cat(outs, dim=1)
            assert drift(got, own_cache_run(self.span, self.inputs[name][:, : got.shape[1]], 4)) < RELATIVE, name


def in_stride(steps: Stepper, names: str, rounds: int, start: float, leave: set[str] | None = None) -> list[int]:
    """Each session steps from its own thread on its own clock, every 0.4 s, the i-th 0.1 s after the first; a
    session in `leave` stops after half the rounds (its client is done but keeps its session open). Returns the
    scheduler's forward count when the first session starts each round."""
    forwards: list[int] = []

    def client(i: int) -> None:
        name = names[i]
        for k in range(rounds // 2 if leave and name in leave else rounds):
            time.sleep(max(0.0, start + 0.4 * k + 0.1 * i - time.monotonic()))
            if i == 0:
                forwards.append(steps.scheduler.stats.forwards)
            steps.step(name)

    run_together(client, len(names), timeout=60)
    return forwards


def test_a_round_waits_for_a_session_that_is_due_so_both_share_one_forward(span: BlockSpan) -> None:
    """Two clients step every 0.4 s, "b" 0.1 s after "a": once the scheduler knows their pace, "a"'s round waits
    about 0.1 s for "b"'s step (due within the 0.3 s bound) and the two share one forward; outputs stay each
    session's own."""
    pool = KVPool(layer_shapes(span), 256, span.dtype)
    scheduler = Scheduler(span, pool, batching=True, batch_wait=0.3)
    steps = Stepper(span, scheduler, pool, "ab")
    forwards = in_stride(steps, "ab", 6, time.monotonic() + 0.2)
    assert len(steps.outputs["a"]) == len(steps.outputs["b"]) == 7
    per_round = [later - earlier for earlier, later in itertools.pairwise(forwards)]
    assert per_round[-3:] == [1, 1, 1], per_round  # paces known: one forward a round, not two
    assert scheduler.stats.waits >= 3
    assert 0.03 < scheduler.stats.wait_seconds / scheduler.stats.waits < 0.3  # about the 0.1 s until "b" came
    scheduler.stop()
    steps.check_exact()


def test_a_session_that_does_not_come_is_waited_for_once_then_not_until_it_steps(span: BlockSpan) -> None:
    """ "b" stops stepping but keeps its session (a finished client, a chat between turns, a hostile peer): one
    round waits for it in vain, no longer than the bound, and the rounds right after it, while "b" would still
    count as due, do not wait for it; once "b" steps again it counts as before."""
    pool = KVPool(layer_shapes(span), 256, span.dtype)
    scheduler = Scheduler(span, pool, batching=True, batch_wait=0.3)
    steps = Stepper(span, scheduler, pool, "ab")
    in_stride(steps, "ab", 4, time.monotonic() + 0.2)
    time.sleep(max(0.0, scheduler._paces["b"].expected - 0.1 - time.monotonic()))  # "b" is due in 0.1 s
    waits, waited = scheduler.stats.waits, scheduler.stats.wait_seconds
    began = time.monotonic()
    for _ in range(4):  # back to back, all within "b"'s due window
        steps.step("a")
    assert scheduler.stats.waits == waits + 1  # the first round waited in vain; then "b" was missed
    assert 0.2 < scheduler.stats.wait_seconds - waited < 0.6 and time.monotonic() - began < 1.5
    assert scheduler._paces["b"].missed
    steps.step("b")
    assert not scheduler._paces["b"].missed
    scheduler.stop()
    steps.check_exact()


def test_no_round_waits_for_a_lone_session_a_quiet_one_or_a_closed_one(span: BlockSpan) -> None:
    """Waiting is for sessions that are due: a lone session never waits, and a session late by more than the
    bound (gone quiet) or closed (forgotten) is not waited for; batch_wait 0, the default, never waits."""
    pool = KVPool(layer_shapes(span), 256, span.dtype)
    scheduler = Scheduler(span, pool, batching=True, batch_wait=0.2)
    steps = Stepper(span, scheduler, pool, "ab")
    for _ in range(4):
        steps.step("a")
    assert scheduler.stats.waits == 0  # "b" has sent no decode step: no pace, nothing to wait for
    scheduler.batch_wait = 0  # both learn a pace of a few milliseconds (one thread steps both: none may wait)
    for _ in range(3):
        steps.step("a")
        steps.step("b")
    scheduler.batch_wait = 0.2
    scheduler.forget("b")  # closed
    steps.step("a")
    assert scheduler.stats.waits == 0
    scheduler.batch_wait = 0
    steps.step("b")  # "b" is back, in stride with "a" again
    steps.step("b")
    scheduler.batch_wait = 0.2
    time.sleep(0.5)  # ...then quiet, late by more than the bound
    steps.step("a")
    assert scheduler.stats.waits == 0
    scheduler.stop()
    steps.check_exact()
    assert Scheduler(span, pool, batching=True)._wait_bound() == 0.0  # the default


def test_a_node_stopping_while_a_round_waits_fails_the_waiting_step_at_once(span: BlockSpan) -> None:
    """A node stops while a round waits for a due step: the waiting step fails at once, not after the wait."""
    pool = KVPool(layer_shapes(span), 256, span.dtype)
    scheduler = Scheduler(span, pool, batching=True, batch_wait=1.0)
    steps = Stepper(span, scheduler, pool, "ab")
    in_stride(steps, "ab", 3, time.monotonic() + 0.1)
    failure: list[BaseException] = []

    def step_a() -> None:
        try:
            steps.step("a")
        except RuntimeError as exc:
            failure.append(exc)

    # "b" is due in 0.15 s and will not come: the round waits until it is late by the bound, over a second
    time.sleep(max(0.0, steps.scheduler._paces["b"].expected - 0.15 - time.monotonic()))
    waiting = threading.Thread(target=step_a)
    waiting.start()
    time.sleep(0.05)
    assert waiting.is_alive()  # the round waits for "b"
    began = time.monotonic()
    scheduler.stop()
    waiting.join(timeout=5)
    assert not waiting.is_alive() and time.monotonic() - began < 0.5
    assert [str(exc) for exc in failure] == ["the node is stopping"]


def test_the_pool_is_the_budget_and_refuses_what_does_not_fit(span: BlockSpan) -> None:
    shapes = layer_shapes(span)
    pool = KVPool(shapes, 100, span.dtype)  # rounded down to whole pages: 96 positions
    assert pool.tokens_total == 96 and pool.tokens_free == 96
    assert pool.bytes_total == (96 + PAGE_SIZE) * slot_bytes(shapes, span.dtype)  # + the null page, nothing else
    first = pool.reserve(2, 20)  # 2 rows x 2 pages
    assert first.shape == (2, 20) and len(set(first.flatten().tolist())) == 40  # no slot shared
    assert pool.tokens_free == 96 - 64
    with pytest.raises(CacheFull):
        pool.reserve(1, 33)  # 3 pages, 2 free
    second = pool.reserve(1, 32)
    assert pool.tokens_free == 0
    pool.release(first)
    pool.release(second)
    assert pool.tokens_free == 96


# ---- through a cluster: 8 concurrent clients -----------------------------------------------------------------

CLIENTS = [  # (prompt length, batch rows, new tokens): different everything
    (4, 1, 12), (9, 1, 6), (17, 2, 10), (6, 1, 16), (30, 1, 8), (11, 3, 9), (5, 1, 14), (23, 1, 11),
]  # fmt: skip
BUDGET_TOKENS = 512  # 32 pages: the 8 clients below reserve 22 of them


@pytest.fixture(scope="module")
def model_path(tiny_model: TinyFactory) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(model_path: Path, start_cluster: ClusterFactory) -> LocalCluster:
    # --batch-wait auto: the concurrent clients below check that waiting for due steps keeps every token exact
    args = ["--cache-tokens", str(BUDGET_TOKENS), "--batch-wait", "auto"]
    return start_cluster(model_path, spans=[(0, 3), (3, 6)], node_args=args)


@pytest.fixture(scope="module")
def model(model_path: Path, cluster: LocalCluster) -> Iterator[RemoteModelForCausalLM]:
    with RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers, verify="off") as remote:
        yield remote


def test_eight_concurrent_clients_get_transformers_tokens_and_their_steps_are_batched(
    model_path: Path, cluster: LocalCluster, model: RemoteModelForCausalLM
) -> None:
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 250, (rows, length), generator=generator) for length, rows, _ in CLIENTS]
    before = node_infos(cluster)
    outputs: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(CLIENTS))

    def client(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            outputs[i] = model.generate(prompts[i], max_new_tokens=CLIENTS[i][2], eos_token_id=[])
        except BaseException as exc:
            errors.append(exc)

    run_together(client, len(CLIENTS), timeout=240)
    assert not errors, errors
    for i, (length, rows, new) in enumerate(CLIENTS):
        for row in range(rows):
            got = outputs[i][row, length:].tolist()
            assert got == greedy_reference(model_path, prompts[i][row].tolist(), new), (i, row)
    after = node_infos(cluster)
    for was, now in zip(before, after, strict=True):
        assert now.batching and now.counters.batched_steps > was.counters.batched_steps
        assert now.counters.max_batch_rows >= 3  # sessions (and a session's rows) shared forwards
        assert now.counters.forwards - was.counters.forwards < now.counters.steps - was.counters.steps
        assert now.cache_tokens_free == now.cache_tokens_total  # every session gave its pages back


def test_a_node_refuses_a_session_its_pool_cannot_hold_before_any_work(
    cluster: LocalCluster, model: RemoteModelForCausalLM
) -> None:
    node = cluster.nodes[0]
    with grpc.insecure_channel(node.address, options=grpc_options()) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        total = info(stub).cache_tokens_total
        assert total == BUDGET_TOKENS
        assert info(stub).cache_bytes_total > 0
        big = 15 * PAGE_SIZE  # two such sessions leave 2 pages
        with Stream(stub) as held, Stream(stub) as held_too:
            for stream in (held, held_too):
                assert stream.send(open_request(cluster.model_key, new_id(), max_length=big, end=3)).opened
            assert info(stub).cache_tokens_free == 2 * PAGE_SIZE
            with Stream(stub) as too_big, pytest.raises(grpc.RpcError) as refused:
                too_big.send(open_request(cluster.model_key, new_id(), max_length=3 * PAGE_SIZE, end=3))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "node is full: the session needs 48 cache tokens" in str(refused.value.details())
            with Stream(stub) as small:  # what fits still runs, beside the big sessions
                sid = new_id()
                assert small.send(open_request(cluster.model_key, sid, max_length=2 * PAGE_SIZE, end=3)).opened
                assert info(stub).cache_tokens_free == 0
                assert small.send(step_request(sid, 0, info(stub).hidden_size, new=4)).HasField("result")
            wait_for(lambda: info(stub).cache_tokens_free == 2 * PAGE_SIZE, 30, "the small session's pages")
        wait_for(lambda: info(stub).cache_tokens_free == total, 30, "every page back")


def test_concurrent_opens_beyond_the_budget_never_overfill_the_pool(cluster: LocalCluster) -> None:
    """12 clients race to open 64-token sessions on a node whose pool holds 512 tokens: exactly 8 get in (each
    runs a step), the other 4 are refused before any work, and the memory in use, polled over the wire while
    they race, never passes the budget; every page comes back once they leave."""
    node = cluster.nodes[0]
    with grpc.insecure_channel(node.address, options=grpc_options()) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        wait_for(lambda: info(stub).cache_tokens_free == BUDGET_TOKENS, 30, "a free pool")
        hidden_size, racers, size = info(stub).hidden_size, 12, 4 * PAGE_SIZE
        admitted: list[int] = []
        refusals: list[str] = []
        used: list[int] = []
        everyone_tried = threading.Barrier(racers + 1)
        leave = threading.Event()

        def racer(i: int) -> None:
            sid = new_id()
            with Stream(stub) as stream:
                try:
                    stream.send(open_request(cluster.model_key, sid, max_length=size, end=3))
                    assert stream.send(step_request(sid, 0, hidden_size, new=8)).HasField("result")
                    admitted.append(i)
                except grpc.RpcError as exc:
                    refusals.append(f"{exc.code().name}: {exc.details()}")
                everyone_tried.wait(timeout=120)
                leave.wait(timeout=120)

        def poll() -> None:
            while not leave.is_set():
                now = info(stub)
                used.append(now.cache_tokens_total - now.cache_tokens_free)
                leave.wait(0.01)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            threads = [threading.Thread(target=racer, args=(i,), daemon=True) for i in range(racers)]
            for thread in threads:
                thread.start()
            everyone_tried.wait(timeout=120)
            during = info(stub)
            used.append(during.cache_tokens_total - during.cache_tokens_free)
        finally:
            leave.set()
            poller.join(30)
        for thread in threads:
            thread.join(60)
        assert len(admitted) == BUDGET_TOKENS // size == 8, refusals
        assert len(refusals) == racers - 8
        full = "RESOURCE_EXHAUSTED: node is full: the session needs 64 cache tokens"
        assert all(refusal.startswith(full) for refusal in refusals), refusals
        assert (during.cache_tokens_free, during.active_sessions) == (0, 8)
        assert len(used) > 1 and all(0 <= u <= BUDGET_TOKENS for u in used), used
        wait_for(lambda: info(stub).cache_tokens_free == BUDGET_TOKENS, 30, "every page back")
