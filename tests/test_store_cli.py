"""`hivegen store ls|show|export|verify|gc` on a directory store filled directly with records (no network)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hivegen.cli import main
from hivegen.store import DirectoryStore, encode_object, ref_of
from hivegen.store.index import GenerationIndex
from hivegen.store.inspect import TRACES, AmbiguousRefError, UnknownRefError, resolve_ref
from hivegen.store.records import TRACE_KIND, Generation, GenerationRequest, ModelRef

MODEL = ModelRef(name="tiny", digest="0" * 64)
HIVEGEN = [sys.executable, "-m", "hivegen"]


def commit(store: DirectoryStore, prompt: list[int], tokens: list[int], text: str, created_at: float,
           parent: str | None = None) -> Generation:  # fmt: skip
    request = GenerationRequest(model=MODEL, prompt_ids=tuple(prompt), max_new_tokens=len(tokens))
    generation = Generation(
        request=request,
        tokens=tuple(tokens),
        text=text,
        finish_reason="length",
        route=({"node_id": "n1", "address": "127.0.0.1:5000", "start": 0, "end": 6, "dtype": "float32"},),
        step_seconds=(0.02, 0.01, 0.01),
        work={"positions": len(prompt) + len(tokens) - 1, "block_positions": 6 * (len(prompt) + len(tokens) - 1)},
        parent=parent,
        created_at=created_at,
    )
    return GenerationIndex(store).commit(generation)


def commit_trace(store: DirectoryStore, name: str, calls: list[Generation]) -> str:
    """A trace object and its pointer, as hivegen.client.trace.TraceRecorder.commit writes them."""
    data = {"name": name, "calls": [{"request": g.request_ref, "generation": g.ref} for g in calls], "replay_of": None}
    ref = store.put_object(TRACE_KIND, data, links=[g.ref for g in calls] + [g.request_ref for g in calls])
    store.set_pointer(TRACES, name, ref)
    return ref


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    return DirectoryStore(tmp_path / "store")


@pytest.fixture
def filled(store: DirectoryStore) -> tuple[DirectoryStore, list[Generation], str]:
    """Two generations (the second continues the first) and a trace of both."""
    first = commit(store, [1, 2, 3], [7, 8, 9], "Once upon a time", created_at=1_700_000_000.0)
    second = commit(store, [1, 2, 3, 4], [5, 6, 7], "there was a store\nof records", 1_700_000_100.0, first.ref)
    return store, [first, second], commit_trace(store, "story", [first, second])


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["store", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    return json.loads(out)


def test_ls_lists_generations_newest_first_then_traces(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, (first, second), trace = filled
    code, out, _ = run(capsys, "ls", "--store", store.location)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["REF", "CREATED", "MODEL", "PROMPT", "TOKENS", "FINISH", "VERIFIED", "PARENT", "TEXT"]
    assert lines[1].startswith(second.ref[:12]) and first.ref[:12] in lines[1]  # its parent
    assert "2023-11-14T22:15:00Z" in lines[1] and "tiny" in lines[1] and "there was a store\\nof records" in lines[1]
    assert lines[2].startswith(first.ref[:12]) and "Once upon a time" in lines[2]
    assert lines[4].split() == ["TRACE", "REF", "CALLS"]
    assert lines[5].split() == ["story", trace[:12], "2"]


def test_ls_kind_filters_generations_or_traces(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, _, _ = filled
    assert {row["kind"] for row in run_json(capsys, "ls", "--store", store.location, "--kind", "trace")} == {"trace"}
    assert {row["kind"] for row in run_json(capsys, "ls", "--store", store.location, "--kind", "generation")} == {
        "generation"
    }


def test_ls_json_gives_full_refs_and_fields(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, (first, second), trace = filled
    rows = run_json(capsys, "ls", "--store", store.location)
    assert [row["ref"] for row in rows] == [second.ref, first.ref, trace]
    assert rows[0] == {
        "kind": "generation",
        "ref": second.ref,
        "short": second.ref[:12],
        "created_at": "2023-11-14T22:15:00Z",
        "model": "tiny",
        "prompt_tokens": 4,
        "tokens": 3,
        "finish_reason": "length",
        "parent": first.ref,
        "preview": "there was a store\\nof records",
        "verified": "-",  # made without verification
    }
    assert rows[2] == {"kind": "trace", "name": "story", "ref": trace, "short": trace[:12], "calls": 2}


def test_ls_of_an_empty_store_says_so(store: DirectoryStore, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ls", "--store", store.location)
    assert code == 0 and "nothing to list" in out


def test_trace_pointer_namespace_is_the_clients(filled: Any) -> None:
    from hivegen.client import trace

    assert trace.TRACES == TRACES


def test_show_generation_by_full_ref(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, (first, second), _ = filled
    code, out, _ = run(capsys, "show", second.ref, "--store", store.location)
    assert code == 0
    assert out.startswith(f"generation {second.ref}\n")
    for expected in ["tokens:     3 [5, 6, 7]", "prompt:     4 tokens [1, 2, 3, 4]", f"parent:     {first.ref}",
                     "finish:     length", "route:      0:6 at 127.0.0.1:5000", "sampling:   greedy",
                     "steps:      3 steps in 0.040 s", "    there was a store\n    of records"]:  # fmt: skip
        assert expected in out


def test_show_json_has_data_links_and_request(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, (first, second), _ = filled
    shown = run_json(capsys, "show", second.ref, "--store", store.location)
    assert shown["ref"] == second.ref and shown["kind"] == "generation"
    assert shown["data"]["tokens"] == [5, 6, 7] and shown["data"]["text"] == second.text
    assert sorted(shown["links"]) == sorted([second.request_ref, first.ref])
    assert shown["request"]["prompt_ids"] == [1, 2, 3, 4] and shown["request"]["model"]["name"] == "tiny"


def test_show_by_unique_prefix(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, _, trace = filled
    code, out, _ = run(capsys, "show", trace[:8].upper(), "--store", store.location)
    assert code == 0
    assert out.startswith(f"trace {trace}\n") and "calls:" in out and "  2" in out


def test_show_other_kinds_prints_raw_data(store: DirectoryStore, capsys: pytest.CaptureFixture[str]) -> None:
    ref = store.put_object("note", {"hello": "world"})
    shown = run_json(capsys, "show", ref, "--store", store.location)
    assert shown == {"ref": ref, "kind": "note", "data": {"hello": "world"}, "links": []}


def absent_prefix(store: DirectoryStore) -> str:
    present = {ref[:6] for ref in store.iter_refs()}
    return next(p for p in (f"{i:06x}" for i in range(1 << 24)) if p not in present)


def test_ambiguous_prefix_is_an_error_naming_the_candidates(
    store: DirectoryStore, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, int] = {}  # find two notes whose refs share 6 hex characters (a birthday search, ~5000 tries)
    for i in itertools.count():
        prefix = ref_of(encode_object("note", {"i": i}))[:6]
        if prefix in seen:
            break
        seen[prefix] = i
    refs = sorted(store.put_object("note", {"i": j}) for j in (seen[prefix], i))
    code, _, err = run(capsys, "show", prefix, "--store", store.location)
    assert code == 2 and f"{prefix} is the start of 2 refs ({refs[0][:12]}, {refs[1][:12]})" in err
    with pytest.raises(AmbiguousRefError):
        resolve_ref(store, prefix)


def test_unknown_prefix_is_an_error_without_traceback(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, _, _ = filled
    code, out, err = run(capsys, "show", absent_prefix(store), "--store", store.location)
    assert code == 2 and out == ""
    assert err.startswith("hivegen: error: no object's ref starts with") and "Traceback" not in err


def test_too_short_or_non_hex_ref_is_an_error(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, _, _ = filled
    for bad in ["abc12", "not-a-ref"]:
        code, _, err = run(capsys, "show", bad, "--store", store.location)
        assert code == 2 and "at least 6" in err


def test_unknown_full_ref_is_an_error(store: DirectoryStore) -> None:
    with pytest.raises(UnknownRefError):
        resolve_ref(store, "f" * 64)


def test_export_jsonl_has_one_line_per_generation(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, (first, second), _ = filled
    code, out, _ = run(capsys, "export", "--format", "jsonl", "--store", store.location)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["ref"] for row in rows] == [first.ref, second.ref]  # oldest first
    assert rows[1] == {
        "ref": second.ref,
        "model": {"name": "tiny", "digest": "0" * 64},
        "prompt_ids": [1, 2, 3, 4],
        "completion": "there was a store\nof records",
        "completion_ids": [5, 6, 7],
        "finish_reason": "length",
    }


def test_export_to_a_file(filled: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    store, generations, _ = filled
    target = tmp_path / "out.jsonl"
    code, out, _ = run(capsys, "export", "--store", store.location, "--output", str(target))
    assert code == 0 and out == f"exported 2 generations to {target}\n"
    assert [json.loads(line)["completion_ids"] for line in target.read_text().splitlines()] == [
        list(g.tokens) for g in generations
    ]


def test_export_decodes_prompts_with_a_tokenizer(
    filled: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "a", "b", "c", "d", "e", "f", "g", "h", "i"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "tok")
    store, _, _ = filled
    code, out, _ = run(capsys, "export", "--store", store.location, "--tokenizer", str(tmp_path / "tok"))
    assert code == 0
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["a b c", "a b c d"]


def test_export_rejects_other_formats(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, _, _ = filled
    with pytest.raises(SystemExit) as exc:
        main(["store", "export", "--format", "csv", "--store", store.location])
    assert exc.value.code == 2 and "invalid choice: 'csv'" in capsys.readouterr().err


def test_verify_passes_on_an_intact_store(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, _, _ = filled
    code, out, _ = run(capsys, "verify", "--store", store.location)
    assert code == 0 and out == "5 objects verified, all intact\n"  # 2 requests, 2 generations, 1 trace


def flip_one_byte(store: DirectoryStore, ref: str) -> Path:
    path = store.root / "objects" / ref[:2] / ref[2:]
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def test_verify_names_a_corrupt_object_and_exits_1(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, (first, _), _ = filled
    path = flip_one_byte(store, first.ref)
    code, out, _ = run(capsys, "verify", "--store", store.location)
    assert code == 1
    assert f"corrupt: {first.ref} at {path}" in out and "1 of 5 objects are corrupt" in out
    code, out, _ = run(capsys, "verify", "--store", store.location, "--json")
    assert code == 1 and json.loads(out) == {"objects": 5, "corrupt": [{"ref": first.ref, "location": str(path)}]}


def test_show_of_a_corrupt_object_is_an_error(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, (first, _), _ = filled
    flip_one_byte(store, first.ref)
    code, _, err = run(capsys, "show", first.ref[:10], "--store", store.location)
    assert code == 2 and err.startswith(f"hivegen: error: object {first.ref} at") and "corrupt" in err


def test_gc_removes_unreachable_objects_and_keeps_indexed_ones(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, generations, trace = filled
    orphan = store.put_object("note", {"unreferenced": True})
    report = run_json(capsys, "gc", "--store", store.location)
    assert report == {"kept": 5, "removed": [orphan], "dry_run": False}
    assert not store.has(orphan)
    assert all(store.has(g.ref) and store.has(g.request_ref) for g in generations) and store.has(trace)


def test_gc_dry_run_removes_nothing(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, _, _ = filled
    orphan = store.put_object("note", {"unreferenced": True})
    code, out, _ = run(capsys, "gc", "--dry-run", "--store", store.location)
    assert code == 0 and out == "kept 5 objects, would remove 1\n"
    assert store.has(orphan)


@pytest.mark.parametrize("argv", [["ls"], ["show", "0" * 64], ["export"], ["verify"], ["gc"]])
def test_missing_store_is_an_error_and_is_not_created(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    code, _, err = run(capsys, *argv, "--store", str(missing))
    assert code == 2 and err.startswith(f"hivegen: error: no hivegen store at {missing}")
    assert not missing.exists()


@pytest.mark.parametrize("argv", [["ls"], ["show", "PREFIX"], ["export"], ["verify"], ["gc", "--dry-run"]])
def test_every_command_honours_hivegen_store(
    argv: list[str], filled: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store, (first, _), _ = filled
    monkeypatch.setenv("HIVEGEN_STORE", store.location)
    code, out, _ = run(capsys, *[first.ref[:8] if a == "PREFIX" else a for a in argv])
    assert code == 0 and out
    monkeypatch.setenv("HIVEGEN_STORE", str(store.root.parent / "elsewhere"))  # --store wins over the variable
    code, out2, _ = run(capsys, *[first.ref[:8] if a == "PREFIX" else a for a in argv], "--store", store.location)
    assert code == 0 and out2 == out


def test_exit_codes_of_the_command(filled: Any) -> None:
    store, (first, _), _ = filled

    def hivegen(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*HIVEGEN, "store", *argv, "--store", store.location], capture_output=True, text=True)

    assert hivegen("verify").returncode == 0
    unknown = hivegen("show", absent_prefix(store))
    assert unknown.returncode == 2 and "hivegen: error:" in unknown.stderr and "Traceback" not in unknown.stderr
    flip_one_byte(store, first.ref)
    corrupt = hivegen("verify")
    assert corrupt.returncode == 1 and first.ref in corrupt.stdout


def test_export_decodes_prompts_with_the_records_own_model_when_it_is_here(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --tokenizer: a record whose model (same name, same weights digest) is a directory here gets its prompt
    text from that model's tokenizer; a record of a model not found keeps ids only, and the export says so."""
    from transformers import AutoTokenizer

    from hivegen.model.checkpoint import ModelCheckpoint
    from hivegen.model.tiny_chat import make_tiny_chat_model

    chat = make_tiny_chat_model(tmp_path / "mychat", num_layers=1)
    monkeypatch.chdir(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    prompt = tokenizer("Hello! How are you?")["input_ids"]
    store = DirectoryStore(tmp_path / "store")
    own = GenerationRequest(model=ModelRef("mychat", ModelCheckpoint.open(chat).digest), prompt_ids=tuple(prompt),
                            max_new_tokens=1)  # fmt: skip
    GenerationIndex(store).commit(Generation(request=own, tokens=(5,), text="x", finish_reason="length",
                                             created_at=1.0))  # fmt: skip
    commit(store, [1, 2, 3], [7], "y", created_at=2.0)  # the "tiny" model: nowhere here
    code, out, err = run(capsys, "export", "--store", store.location)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and rows[0]["prompt"] == "Hello! How are you?" and "prompt" not in rows[1]
    assert "no tokenizer found for model tiny" in err and "--tokenizer" in err
