"""What a newcomer trying the README runs into, through the real command: one clear line and a non-zero exit for
every mistake, help texts that say what the defaults are. No swarm is needed for any of it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hivegen.model.tiny_chat import make_tiny_chat_model

HIVEGEN = [sys.executable, "-m", "hivegen"]
PEERS = ["--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HIVEGEN, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1, not 0"),
        (["--top-p", "2"], "--top-p: must be a number in (0, 1], not 2.0"),
        (["--temperature", "-1"], "--temperature: must be a number in [0, 2] (0 is greedy), not -1.0"),
        (["--top-k", "0"], "--top-k: must be an integer >= 1, not 0"),
        (["--seed", "-3"], "--seed: must be an integer in [0, 2**63 - 1], not -3"),
    ],
)
def test_generate_refuses_bad_sampling_flags_in_one_line_before_loading_anything(
    flags: list[str], says: str, tmp_path: Path
) -> None:
    done = run("generate", "--model", str(tmp_path / "no-model"), "--prompt", "hi", *PEERS, *flags)
    assert done.returncode == 2
    assert done.stderr.strip() == f"hivegen: error: {says}"  # the flag, not the missing model: checked first


def test_chat_refuses_bad_sampling_flags_the_same_way(tmp_path: Path) -> None:
    done = run("chat", "--model", str(tmp_path / "no-model"), *PEERS, "--top-p", "0")
    assert (done.returncode, done.stderr.strip()) == (2, "hivegen: error: --top-p: must be a number in (0, 1], not 0.0")


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--throughput", "0"], "argument --throughput: must be a finite number > 0, got 0"),
        (["--throughput", "inf"], "argument --throughput: must be a finite number > 0, got inf"),
        (["--throughput", "nan"], "argument --throughput: must be a finite number > 0, got nan"),
        (["--batch-wait", "-1"], "argument --batch-wait: must be 'auto' or a number of seconds from 0 to 1, got -1"),
        (["--batch-wait", "30"], "argument --batch-wait: must be 'auto' or a number of seconds from 0 to 1, got 30"),
        (["--batch-wait", "soon"], "argument --batch-wait: 'soon' is neither 'auto' nor a number of seconds"),
        (["--throughput", "fast"], "argument --throughput: 'fast' is not a number"),
        (["--cache-tokens", "-5"], "argument --cache-tokens: must be a finite number > 0, got -5"),
    ],
)
def test_node_serve_refuses_bad_numbers_in_one_line(flags: list[str], says: str, tmp_path: Path) -> None:
    done = run("node", "serve", "--model", str(tmp_path / "no-model"), "--blocks", "0:1", *flags)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"hivegen node serve: error: {says}"


def test_a_balance_for_a_key_file_that_does_not_exist_is_an_error_not_zero(tmp_path: Path) -> None:
    missing = tmp_path / "nonsense"
    done = run("credits", "balance", "--identity", str(missing), "--coordinator", "127.0.0.1:9")
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"hivegen: error: no key file at {missing}")
    assert "Traceback" not in done.stderr and not missing.exists()  # no key was made up on the way


def test_credits_balance_takes_no_account_argument() -> None:
    done = run("credits", "balance", "nonsense")
    assert done.returncode == 2 and "unrecognized arguments: nonsense" in done.stderr


@pytest.mark.parametrize(
    ("command", "phrases"),
    [
        (["generate"], ["$HIVEGEN_HOME/store", "the most tokens to generate", "sample from the smallest set",
                        "replayable from the store", "$HIVEGEN_IDENTITY"]),
        (["cluster", "up"], ["coordinator", "--api-port", "OpenAI-compatible API"]),
        (["store", "ls"], ["$HIVEGEN_HOME/store"]),
        (["node", "serve"], ["$HIVEGEN_HOME/node", "never pays your own node"]),
        (["coordinator", "serve"], ["$HIVEGEN_HOME/coordinator"]),
        (["api", "serve"], ["$HIVEGEN_HOME/store", "--api-key", "x-hivegen-replayed"]),
        (["chat"], ["/reset", "$HIVEGEN_HOME/store"]),
    ],
)  # fmt: skip
def test_help_texts_say_what_the_defaults_are(command: list[str], phrases: list[str]) -> None:
    done = run(*command, "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # argparse wraps lines
    for phrase in phrases:
        assert phrase in text, (command, phrase)


def test_benchmark_help_cites_only_what_the_repository_has() -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "benchmarks/generate.py", "--help"], capture_output=True, text=True,
                          cwd=root, timeout=120)  # fmt: skip
    assert done.returncode == 0
    for cited in {word.strip("().,;:`'") for word in done.stdout.split() if word.strip("().,;:`'").endswith(".md")}:
        assert (root / cited).exists(), cited


@pytest.mark.parametrize(
    ("peer", "why"),
    [
        ("garbage", "it must begin with /"),
        ("/ip4/1.2.3.4/tcp/9", "it must end in /p2p/PEER_ID"),
        ("/ip4/999.1.1.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN", "is not an ip4 address"),
        ("/ip4/1.2.3.4/tcp/99999/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN", "between 1 and 65535"),
        ("/ip4/1.2.3.4/tcp/9/p2p/not-a-peer-id", "is not a peer id"),
    ],
)
def test_a_malformed_initial_peer_is_refused_in_one_line_before_anything_starts(
    peer: str, why: str, tmp_path: Path
) -> None:
    done = run("generate", "--model", str(tmp_path / "no-model"), "--prompt", "hi", "--initial-peers", peer)
    assert done.returncode == 2
    assert done.stderr.startswith(f"hivegen: error: initial peer {peer!r} is not a peer's multiaddr: ")
    assert why in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_generate_with_a_model_without_a_tokenizer_says_so(tiny_model: Any) -> None:
    done = run("generate", "--model", str(tiny_model("llama")), "--prompt", "hi", *PEERS)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "has no tokenizer" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_initial_peers_come_from_the_environment_when_no_flag_gives_them(tmp_path: Path) -> None:
    env = {**os.environ, "HIVEGEN_INITIAL_PEERS": "garbage, /ip4/1.2.3.4/tcp/9"}
    done = subprocess.run([*HIVEGEN, "generate", "--model", str(tmp_path / "m"), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert done.returncode == 2 and "initial peer 'garbage'" in done.stderr  # read, split, checked
    assert "--initial-peers" in run("generate", "--help").stdout.replace("\n", " ")


def test_a_peer_that_does_not_answer_is_named_without_the_daemons_text(tmp_path: Path) -> None:
    silent = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    model = make_tiny_chat_model(tmp_path / "chat", num_layers=1)
    done = run("generate", "--model", str(model), "--prompt", "hi", "--initial-peers", silent, timeout=120)
    assert done.returncode == 2
    assert f"hivegen: error: could not join the swarm via {silent}: no peer answered there" in done.stderr
    assert "Daemon failed" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--model", "m", "--prompt", "hi"],
        ["chat", "--model", "m"],
        ["api", "serve", "--model", "m"],
        ["node", "serve", "--model", "m", "--blocks", "0:1"],
        ["credits", "balance"],
        ["status"],
    ],
)
def test_every_coordinator_flag_defaults_to_the_environment(command: list[str], monkeypatch: Any) -> None:
    from hivegen.cli import build_parser

    monkeypatch.setenv("HIVEGEN_COORDINATOR", "203.0.113.7:50051")
    monkeypatch.setenv("HIVEGEN_INITIAL_PEERS", PEERS[1])
    assert build_parser().parse_args(command).coordinator == "203.0.113.7:50051"
    assert build_parser().parse_args([*command, "--coordinator", "127.0.0.1:1"]).coordinator == "127.0.0.1:1"
    monkeypatch.delenv("HIVEGEN_COORDINATOR")
    assert build_parser().parse_args(command).coordinator is None


def test_cluster_processes_do_not_inherit_the_users_swarm_from_the_environment(monkeypatch: Any) -> None:
    from hivegen.peers import child_env

    monkeypatch.setenv("HIVEGEN_COORDINATOR", "203.0.113.7:50051")
    monkeypatch.setenv("HIVEGEN_INITIAL_PEERS", PEERS[1])
    env = child_env(EXTRA="1")
    assert "HIVEGEN_COORDINATOR" not in env and "HIVEGEN_INITIAL_PEERS" not in env
    assert env["EXTRA"] == "1" and env["PATH"] == os.environ["PATH"]
