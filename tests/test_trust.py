"""The client's trust machinery on its own: verification policies, node health and deadlines, the ban list, the
error measure, step attestations and how records show their verification."""

from __future__ import annotations

import math
import multiprocessing
import random
from pathlib import Path

import pytest
import torch

from hivegen.client.bans import BanList
from hivegen.client.health import COOLDOWN_SECONDS, MAX_STEP_TIMEOUT, MIN_STEP_TIMEOUT, TIMEOUT_FACTOR, HealthBook
from hivegen.client.verify import DEFAULT_RATE, Verifier, VerifyPolicy
from hivegen.credits.attestation import (
    StepClaim,
    relative_errors,
    sign_claim,
    step_input_digest,
    tensor_digest,
    verify_claim,
)
from hivegen.credits.identity import Identity
from hivegen.proto import node_pb2
from hivegen.proto.tensors import serialize
from hivegen.store.inspect import verified_label

KEY = "ab" * 32


@pytest.mark.parametrize(
    ("value", "mode", "rate"),
    [(None, "sample", DEFAULT_RATE), ("default", "sample", DEFAULT_RATE), ("off", "off", 0.0), (False, "off", 0.0),
     (0, "off", 0.0), ("all", "all", 1.0), (True, "all", 1.0), (1.0, "all", 1.0), ("0.5", "sample", 0.5),
     (0.1, "sample", 0.1)],
)  # fmt: skip
def test_verify_policies_parse_from_words_flags_and_rates(value: object, mode: str, rate: float) -> None:
    policy = VerifyPolicy.parse(value)  # type: ignore[arg-type]
    assert (policy.mode, policy.rate) == (mode, rate)
    assert policy.enabled == (mode != "off")


@pytest.mark.parametrize("value", ["sometimes", 1.5, -0.1])
def test_a_bad_verify_value_is_a_clear_error(value: object) -> None:
    with pytest.raises(ValueError, match="verify"):
        VerifyPolicy.parse(value)  # type: ignore[arg-type]


def test_unknown_dtypes_get_the_loosest_tolerance() -> None:
    policy = VerifyPolicy()
    assert policy.tolerance("float32") < policy.tolerance("float16") < policy.tolerance("bfloat16")
    assert policy.tolerance("float8") == policy.tolerance("bfloat16")


class _Span:
    """Just what the verifier's sampling looks at."""

    def __init__(self, node_id: str, steps: int) -> None:
        self.hop = type("Hop", (), {"node_id": node_id})()
        self.outputs = [torch.zeros(1)] * steps


def test_new_nodes_are_checked_in_full_then_sampled_with_spot_checks() -> None:
    verifier = Verifier(VerifyPolicy(rate=0.25), rng=random.Random(0))
    span = _Span("new", steps=20)
    assert verifier._steps_to_check(span) == 20  # type: ignore[arg-type]  # probation
    verifier._passed["new"] = 1
    draws = [verifier._steps_to_check(span) for _ in range(2000)]  # type: ignore[arg-type]
    assert all(1 <= d <= 20 for d in draws)  # every hop gets at least its first step re-executed
    assert 0.25 < sum(d == 20 for d in draws) / len(draws) < 0.35  # a quarter in full, plus spot checks reaching 20


def test_without_spot_checks_unsampled_hops_are_skipped() -> None:
    verifier = Verifier(VerifyPolicy(rate=0.0, spot=False, probation=0), rng=random.Random(0))
    assert verifier._steps_to_check(_Span("n", 5)) == 0  # type: ignore[arg-type]


def test_step_deadlines_follow_measurements_and_never_go_below_the_minimum() -> None:
    book = HealthBook()
    assert book.step_timeout("n", claimed_block_seconds=1e-9, blocks=3, positions=1) == MIN_STEP_TIMEOUT
    assert book.step_timeout("n", claimed_block_seconds=0.1, blocks=3, positions=1) == pytest.approx(
        TIMEOUT_FACTOR * 0.3
    )
    # a claim of a slow node is believed only so far, and no deadline exceeds the maximum
    assert book.step_timeout("n", claimed_block_seconds=1e9, blocks=3, positions=1) == TIMEOUT_FACTOR * 3 * 0.5
    assert book.step_timeout("n", claimed_block_seconds=1e9, blocks=3, positions=10**6) == MAX_STEP_TIMEOUT
    book.observe("n", seconds=0.6, blocks=3, positions=1)  # measured: 0.2 s per block beats the claim
    assert book.step_timeout("n", claimed_block_seconds=1e-9, blocks=3, positions=1) == pytest.approx(6.0)
    book.observe("n", seconds=60.0, blocks=3, positions=500)  # a prefill does not move the decode estimate
    assert book.measured() == {"n": pytest.approx(0.2)}


def test_failures_exclude_a_node_for_a_cooldown_that_doubles() -> None:
    book = HealthBook()
    book.failed("n", "UNAVAILABLE: gone")
    first = book.get("n")
    assert first is not None and "n" in book.excluded()
    book.failed("n", "UNAVAILABLE: gone")
    second = book.get("n")
    assert second is not None and second.failures == 2
    assert second.excluded_until - first.excluded_until == pytest.approx(COOLDOWN_SECONDS, abs=1.0)
    book.observe("n", 0.1, 1, 1)
    assert book.get("n").failures == 0  # type: ignore[union-attr]


def _ban_in_another_process(path: str, owner: str) -> None:
    BanList(Path(path)).ban(owner, f"peer@{owner}", "127.0.0.1:1", "test")


def test_bans_persist_and_merge_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "bans.json"
    mine = BanList(path)
    mine.ban(KEY, f"peer@{KEY}", "127.0.0.1:9", "wrong hidden states at step 3", "e" * 64)
    other = "cd" * 32
    process = multiprocessing.get_context("spawn").Process(target=_ban_in_another_process, args=(str(path), other))
    process.start()
    process.join(60)
    mine.ban("ef" * 32, "x@" + "ef" * 32, "127.0.0.1:8", "test")  # merges what the other process saved
    again = BanList(path)
    assert again.owners() == {KEY, other, "ef" * 32}
    ban = again.get(KEY)
    assert ban is not None and ban.evidence == "e" * 64 and "step 3" in ban.reason


def test_an_unreadable_ban_list_is_ignored_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "bans.json"
    path.write_text("{not json")
    assert BanList(path).owners() == set()


def test_relative_error_ignores_padding_and_counts_nan_as_infinite() -> None:
    expected = torch.ones(2, 3, 4)
    output = expected.clone()
    output[0, 1] *= 2.0  # twice as long at an unpadded position: half its norm away, whichever side is "expected"
    output[1, 0] = float("nan")  # garbage at a padded position: never used
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    errors = relative_errors(output, expected, mask)
    assert errors[0, 1] == pytest.approx(0.5) and errors[1, 0] == 0 and float(errors.sum()) == pytest.approx(0.5)
    output[1, 2] = float("nan")
    assert math.isinf(float(relative_errors(output, expected, mask).max()))


def test_a_step_claim_binds_every_field_and_the_exact_bytes() -> None:
    node = Identity.generate()
    step = node_pb2.Step(
        hidden_states=serialize(torch.randn(1, 2, 4)),
        position_ids=serialize(torch.tensor([[0, 1]])),
        attention_mask=serialize(torch.ones(1, 2, dtype=torch.int64)),
    )
    output = serialize(torch.randn(1, 2, 4))
    claim = StepClaim("m", "s", 0, 0, 3, step_input_digest(step), tensor_digest(output), "h" * 64)
    signature = sign_claim(node, claim)
    assert verify_claim(node.public_key_hex, claim, signature)
    changed = node_pb2.Tensor()
    changed.CopyFrom(output)
    changed.data = bytes([changed.data[0] ^ 1]) + changed.data[1:]
    altered = StepClaim(**{**vars(claim), "output_digest": tensor_digest(changed)})
    assert not verify_claim(node.public_key_hex, altered, signature)
    for field, value in [("step", 1), ("start", 1), ("end", 4), ("session_id", "t"), ("model_key", "n"),
                         ("history_digest", "g" * 64)]:  # fmt: skip
        assert not verify_claim(node.public_key_hex, StepClaim(**{**vars(claim), field: value}), signature)
    assert not verify_claim(Identity.generate().public_key_hex, claim, signature)
    assert not verify_claim(node.public_key_hex, claim, "zz")


@pytest.mark.parametrize(
    ("verification", "label"),
    [({}, "-"), ({"mode": "off", "hops": []}, "off"),
     ({"mode": "all", "hops": [{"result": "match"}, {"result": "match"}]}, "all"),
     ({"mode": "sample", "hops": [{"result": "match"}, {"result": "partial"}]}, "1/2"),
     ({"mode": "sample", "hops": [{"result": "lied"}, {"result": "match"}, {"result": "match"}]}, "all")],
)  # fmt: skip
def test_records_show_how_they_were_verified(verification: dict[str, object], label: str) -> None:
    assert verified_label(verification) == label
