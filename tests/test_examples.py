"""The README's runnable examples still run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TinyFactory

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_records_example_replays_continues_and_rewinds(tiny_model: TinyFactory, tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "records.py"), str(tiny_model("llama"))],  # a temporary store, and cluster
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    assert result.returncode == 0, result.stderr
    assert not [p.name for p in temp.iterdir() if p.name.startswith("hivegen-")]  # nothing left behind
    lines = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines()}
    assert "network steps" in lines["generate 16 tokens"]
    assert "replayed from the store" in lines["same request again"]
    assert "replayed from the store" in lines["first 8 of it"]
    if " length " in lines["generate 16 tokens"]:  # it ran to 16 tokens: the next 16 need the network
        assert "16 network steps" in lines["continue to 32 tokens"]
    else:  # it ended early (eos): that is the answer for 32 tokens too
        assert "replayed from the store" in lines["continue to 32 tokens"]
    assert "trace replay: [True, True]" in result.stdout
    assert "after rewind(1): [True, False]" in result.stdout
