"""A node that lies on purpose, for the adversarial tests and the verification benchmark.

    python tests/adversary.py CONTROL.json node serve --model DIR --blocks S:E ...

runs `hivegen node serve` with its span patched to misbehave as CONTROL.json says, read afresh whenever a
session opens, so one process can play every cheater in turn. It claims a huge throughput in its DHT record, as
a real cheater would, so that routers pick it first. CONTROL keys:

- "mode": honest | noise (adds noise to its answers) | weights (runs other weights, from "other_model", under
  the honest model key) | nan | identity (returns its inputs unchanged) | last (only the last position) |
  wide (one column too many) | huge (a 16 MiB answer) | unsigned (signs with another key) | hang (never answers) |
  nanpad (NaN at padded positions only, to poison the next hop) | refuse (refuses every session with a status no
  honest node would give);
- "after": the first step of each session it misbehaves at (default 0: from the first step);
- "rate": the share of steps it misbehaves at, drawn per step (default 1.0);
- "seed": for the draws and the noise;
- "only_checks": lie only in sessions that re-run someone else's work (one prefill that fills the session).
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import torch

from hivegen.cli import main
from hivegen.credits.identity import Identity
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.span import BlockSpan
from hivegen.node import batching, server, servicer, sessions
from hivegen.node.errors import RequestError
from hivegen.proto import node_pb2
from hivegen.proto.tensors import deserialize

CLAIMED_THROUGHPUT = 1e9
HUGE_BYTES = 16 << 20
HANG_SECONDS = 8.0  # well past the 2 s step deadline, short enough not to hold up the node's shutdown

_control = Path(sys.argv[1])
_modes: dict[str, dict[str, Any]] = {}  # session id -> its control, read when it opened (and its random draws)
_local = threading.local()  # per step: which span to run ("weights" mode)
_others: dict[tuple[int, int], BlockSpan] = {}
_impostor = Identity.generate()


def _read_control() -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(_control.read_text())
    except (OSError, ValueError):
        data = {}
    return {"mode": "honest", "after": 0, "rate": 1.0, "seed": 0, **data}


def _open(self: sessions.SessionManager, req: node_pb2.OpenSession) -> sessions.Session:
    control = _read_control()
    if control["mode"] == "refuse":
        raise RequestError(grpc.StatusCode.ALREADY_EXISTS, "this session exists (it does not)")
    session = _original_open(self, req)
    control["rng"] = random.Random(f"{control['seed']}-{session.session_id}")
    _modes[session.session_id] = control
    return session


def _step(self: sessions.SessionManager, session: sessions.Session, req: node_pb2.Step) -> tuple[torch.Tensor, float]:
    control = _modes.get(session.session_id) or {"mode": "honest"}
    mode = control["mode"]
    if req.step_id == 0:  # a re-execution fills its whole session in its first step
        control["check"] = req.hidden_states.shape[1] == session.max_length if req.hidden_states.shape else False
    lie = mode != "honest" and req.step_id >= control["after"] and control["rng"].random() < control["rate"]
    lie = lie and (control["check"] or not control.get("only_checks"))
    if lie and mode == "hang":
        time.sleep(HANG_SECONDS)
    _local.other = _other_span(self.span, control) if lie and mode == "weights" else None
    try:
        out, seconds = _original_step(self, session, req)
    finally:
        _local.other = None
    return (_tamper(out, req, mode, control["seed"] + req.step_id) if lie else out), seconds


def _tamper(out: torch.Tensor, req: node_pb2.Step, mode: str, seed: int) -> torch.Tensor:
    if mode == "noise":
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        return (out.float() + 0.5 * out.float().std() * noise).to(out.dtype)
    if mode == "nan":
        return torch.full_like(out, float("nan"))
    if mode == "identity":
        return deserialize(req.hidden_states)
    if mode == "last":
        return out[:, -1:].contiguous()
    if mode == "nanpad":
        padded = deserialize(req.attention_mask) == 0
        return out.masked_fill(padded[..., None], float("nan"))
    if mode == "wide":
        return torch.cat([out, out[..., :1]], dim=-1)
    if mode == "huge":
        return torch.zeros((out.shape[0], out.shape[1], HUGE_BYTES // 4 // out.shape[1]), dtype=torch.float32)
    return out  # weights (already run on other weights), unsigned (signed below)


def _other_span(span: BlockSpan, control: dict[str, Any]) -> BlockSpan:
    key = (span.start, span.end)
    if key not in _others:
        checkpoint = ModelCheckpoint.open(control["other_model"])
        _others[key] = BlockSpan(checkpoint, span.start, span.end, dtype=span.dtype, device=span.device)
    return _others[key]


def _run(self: batching.Scheduler, work: batching.Work) -> tuple[torch.Tensor, float]:
    """A lying step of "weights" mode runs alone, on this thread, through the other weights (into the session's
    own pages or cache): the node's scheduler would otherwise run it with the honest ones, batched or not."""
    other = getattr(_local, "other", None)
    if other is None:
        return _original_run(self, work)
    return _original_run(batching.Scheduler(other, self.pool, batching=False), work)


def _signed_result(
    self: servicer.NodeServicer, session: sessions.Session, step: node_pb2.Step, hidden: torch.Tensor, seconds: float
) -> node_pb2.StepResult:
    result = _original_signed_result(self, session, step, hidden, seconds)
    if _modes.get(session.session_id, {}).get("mode") == "unsigned":
        result.signature = _impostor.sign(b"not the claim").hex()
    return result


_original_open = sessions.SessionManager.open
_original_step = sessions.SessionManager.step
_original_run = batching.Scheduler.run
_original_signed_result = servicer.NodeServicer._signed_result
sessions.SessionManager.open = _open  # type: ignore[method-assign]
sessions.SessionManager.step = _step  # type: ignore[method-assign]
batching.Scheduler.run = _run  # type: ignore[method-assign]
servicer.NodeServicer._signed_result = _signed_result  # type: ignore[method-assign]
server.measure_throughput = lambda span, steps=3: CLAIMED_THROUGHPUT  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
