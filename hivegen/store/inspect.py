"""Looking into a store from the command line: list, show, export, verify. Pure functions over an ObjectStore.

`hivegen store ...` (hivegen/cli.py) parses arguments and prints what these functions return.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hivegen.store.backend import CorruptObjectError, InvalidNameError, ObjectStore, StoreError
from hivegen.store.directory import DirectoryStore
from hivegen.store.encoding import EncodingError, is_ref
from hivegen.store.index import GenerationIndex
from hivegen.store.records import GENERATION_KIND, TRACE_KIND, Generation, ModelRef

# The pointer namespace hivegen.client.trace.TRACES writes (that module imports torch, so it is not imported here).
TRACES = "traces"
MIN_PREFIX = 6
SHORT = 12  # hex characters of a ref shown in tables
PREFIX_PATTERN = re.compile(r"^[0-9a-f]+$")
PREVIEW_CHARS = 40

Decode = Callable[[ModelRef, Sequence[int]], str | None]  # a record's model and prompt ids -> its text, if known
OnError = Callable[[str, StoreError], None]


class StoreMissingError(StoreError):
    """There is no store where the command was told to look."""


class UnknownRefError(StoreError):
    """No object's ref starts with the given prefix."""


class AmbiguousRefError(StoreError):
    """More than one object's ref starts with the given prefix."""


@dataclass(frozen=True)
class GenerationSummary:
    """One row of `hivegen store ls` for a generation."""

    ref: str
    created_at: float
    model: str
    prompt_tokens: int
    tokens: int
    finish_reason: str
    parent: str | None
    preview: str
    verified: str  # "all", "k/n" hops re-executed and matched, "off", or "-" (recorded before verification)

    @classmethod
    def of(cls, g: Generation) -> GenerationSummary:
        return cls(
            g.ref,
            g.created_at,
            g.request.model.name,
            len(g.request.prompt_ids),
            len(g.tokens),
            g.finish_reason,
            g.parent,
            preview(g.text),
            verified_label(g.verification),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": GENERATION_KIND,
            "ref": self.ref,
            "short": self.ref[:SHORT],
            "created_at": iso_time(self.created_at),
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
            "parent": self.parent,
            "preview": self.preview,
            "verified": self.verified,
        }


@dataclass(frozen=True)
class TraceSummary:
    """One row of `hivegen store ls` for a trace: its name (the pointer key), latest ref and number of calls."""

    name: str
    ref: str
    calls: int

    def to_json(self) -> dict[str, Any]:
        return {"kind": TRACE_KIND, "name": self.name, "ref": self.ref, "short": self.ref[:SHORT], "calls": self.calls}


@dataclass(frozen=True)
class ObjectView:
    """An object as `hivegen store show` presents it; `request` is the request's data for a generation."""

    ref: str
    kind: str
    data: dict[str, Any] | None
    links: tuple[str, ...]
    request: dict[str, Any] | None = None
    size: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ref": self.ref, "kind": self.kind, "data": self.data, "links": list(self.links)}
        if self.request is not None:
            out["request"] = self.request
        if self.kind == "blob":
            out["size"] = self.size
        return out


@dataclass
class VerifyReport:
    objects: int
    corrupt: list[CorruptObjectError] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"objects": self.objects, "corrupt": [{"ref": e.ref, "location": e.location} for e in self.corrupt]}


def open_existing_store(path: str | Path) -> DirectoryStore:
    """The directory store at `path`; unlike DirectoryStore(path), refuses to create one where there is none."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise StoreMissingError(
            f"no hivegen store at {root}: nothing has been stored there yet; pass --store DIR or set HIVEGEN_STORE"
        )
    if not (root / "FORMAT").is_file():
        raise StoreMissingError(f"{root} is not a hivegen store (it has no FORMAT file); pass --store DIR")
    return DirectoryStore(root)


def generations(store: ObjectStore, on_error: OnError | None = None) -> list[Generation]:
    """Every indexed generation, oldest first; an unreadable one raises, or goes to `on_error` and is skipped."""
    index = GenerationIndex(store)
    refs = index.all_refs()
    found: list[Generation] = []
    for ref in sorted(r for r in refs if is_ref(r)):
        try:
            found.append(index.load(ref))
        except StoreError as exc:
            if on_error is None:
                raise
            on_error(ref, exc)
    return sorted(found, key=lambda g: (g.created_at, g.ref))


def traces(store: ObjectStore, on_error: OnError | None = None) -> list[TraceSummary]:
    """Every named trace (pointer key -> latest trace ref), by name."""
    found: list[TraceSummary] = []
    for name, ref in store.list_pointers(TRACES).items():
        try:
            obj = store.get_object(ref)
            if obj.kind != TRACE_KIND:
                raise StoreError(f"trace {name!r} points to a {obj.kind!r}, not a trace")
        except StoreError as exc:
            if on_error is None:
                raise
            on_error(ref, exc)
            continue
        found.append(TraceSummary(name, ref, len(obj.data.get("calls", []))))
    return found


def list_entries(
    store: ObjectStore, kind: str = "all", on_error: OnError | None = None
) -> list[GenerationSummary | TraceSummary]:
    """What `ls` shows: generations newest first, then traces. `kind` is "generation", "trace" or "all"."""
    rows: list[GenerationSummary | TraceSummary] = []
    if kind in ("generation", "all"):
        rows += [GenerationSummary.of(g) for g in reversed(generations(store, on_error))]
    if kind in ("trace", "all"):
        rows += traces(store, on_error)
    return rows


def resolve_ref(store: ObjectStore, text: str) -> str:
    """A full ref that is present, or the one ref starting with a prefix of >= 6 hex characters."""
    prefix = text.strip().lower()
    if is_ref(prefix):
        if not store.has(prefix):
            raise UnknownRefError(f"no object {prefix} in the store at {store.location}; `hivegen store ls` lists them")
        return prefix
    if len(prefix) < MIN_PREFIX or len(prefix) > 64 or not PREFIX_PATTERN.fullmatch(prefix):
        raise InvalidNameError(f"{text!r} is not a ref: give a full ref or at least {MIN_PREFIX} of its hex characters")
    matches = sorted(ref for ref in store.iter_refs() if ref.startswith(prefix))
    if not matches:
        raise UnknownRefError(
            f"no object's ref starts with {prefix} in the store at {store.location}; `hivegen store ls` lists them"
        )
    if len(matches) > 1:
        shown = ", ".join(m[:SHORT] for m in matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise AmbiguousRefError(f"{prefix} is the start of {len(matches)} refs ({shown}); give more characters")
    return matches[0]


def view_object(store: ObjectStore, ref: str) -> ObjectView:
    """The decoded object at `ref` (a corrupt one raises); bytes that are not a typed object are a "blob"."""
    raw = store.get(ref)
    try:
        obj = store.get_object(ref)
    except EncodingError:
        return ObjectView(ref, "blob", None, (), size=len(raw))
    request = None
    if obj.kind == GENERATION_KIND and is_ref(obj.data.get("request", "")):
        request = store.get_object(obj.data["request"]).data
    return ObjectView(ref, obj.kind, obj.data, obj.links, request, len(raw))


def export_rows(store: ObjectStore, decode: Decode | None = None) -> Iterator[dict[str, Any]]:
    """One training-style row per generation, oldest first; "prompt" text when `decode(model, ids)` gives one."""
    for g in generations(store):
        row: dict[str, Any] = {
            "ref": g.ref,
            "model": {"name": g.request.model.name, "digest": g.request.model.digest},
            "prompt_ids": list(g.request.prompt_ids),
        }
        text = decode(g.request.model, g.request.prompt_ids) if decode is not None else None
        if text is not None:
            row["prompt"] = text
        row.update(completion=g.text, completion_ids=list(g.tokens), finish_reason=g.finish_reason)
        yield row


def verify(store: ObjectStore) -> VerifyReport:
    """Re-hash every object in the store."""
    count = sum(1 for _ in store.iter_refs())
    return VerifyReport(objects=count, corrupt=store.verify())


# --- text for people -----------------------------------------------------------------------------


def iso_time(ts: float) -> str | None:
    """A Unix time as ISO 8601 in UTC, or None for 0 (unknown)."""
    if not ts:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def preview(text: str, width: int = PREVIEW_CHARS) -> str:
    """The start of a text on one line."""
    flat = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", " ")
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def format_listing(rows: Sequence[GenerationSummary | TraceSummary], location: str) -> str:
    gens = [r for r in rows if isinstance(r, GenerationSummary)]
    trs = [r for r in rows if isinstance(r, TraceSummary)]
    parts: list[str] = []
    if gens:
        parts.append(
            table(
                ["REF", "CREATED", "MODEL", "PROMPT", "TOKENS", "FINISH", "VERIFIED", "PARENT", "TEXT"],
                [
                    [
                        g.ref[:SHORT],
                        iso_time(g.created_at) or "-",
                        g.model,
                        g.prompt_tokens,
                        g.tokens,
                        g.finish_reason,
                        g.verified,
                        g.parent[:SHORT] if g.parent else "-",
                        g.preview,
                    ]
                    for g in gens
                ],
            )
        )
    if trs:
        parts.append(table(["TRACE", "REF", "CALLS"], [[t.name, t.ref[:SHORT], t.calls] for t in trs]))
    if not parts:
        return f"nothing to list in the store at {location}"
    return "\n\n".join(parts)


def format_view(view: ObjectView) -> str:
    """A readable rendering of an object: generations and traces field by field, anything else as JSON."""
    if view.kind == "blob":
        return f"blob {view.ref}\n  {view.size} bytes, not a typed object"
    data = view.data or {}
    if view.kind == GENERATION_KIND and view.request is not None:
        return _format_generation(view.ref, data, view.request)
    if view.kind == TRACE_KIND:
        lines = [
            f"trace {view.ref}",
            *_fields(
                [
                    ("name", data.get("name")),
                    ("replay of", data.get("replay_of")),
                    ("calls", len(data.get("calls", []))),
                ]
            ),
        ]
        for i, call in enumerate(data.get("calls", [])):
            lines.append(f"    {i:>3}  generation {call['generation'][:SHORT]}  request {call['request'][:SHORT]}")
        return "\n".join(lines)
    body = json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True)
    links = "\n".join(f"  {link}" for link in view.links) or "  (none)"
    return f"{view.kind} {view.ref}\ndata:\n{body}\nlinks:\n{links}"


def _format_generation(ref: str, data: dict[str, Any], request: dict[str, Any]) -> str:
    model = request.get("model", {})
    sampling = "greedy"
    if request.get("do_sample"):
        knobs = [
            f"{k}={request.get(k)}" for k in ("temperature", "top_k", "top_p", "seed") if request.get(k) is not None
        ]
        sampling = "sample " + " ".join(knobs)
    route = "; ".join(f"{h.get('start')}:{h.get('end')} at {h.get('address', '?')}" for h in data.get("route", []))
    work = " ".join(f"{k}={v}" for k, v in sorted(data.get("work", {}).items()))
    tokens = data.get("tokens", [])
    lines = [
        f"generation {ref}",
        *_fields(
            [
                ("created", iso_time(data.get("created_at", 0.0))),
                ("model", f"{model.get('name')} (digest {str(model.get('digest', ''))[:SHORT]})"),
                ("request", data.get("request")),
                ("prompt", f"{len(request.get('prompt_ids', []))} tokens {_ids(request.get('prompt_ids', []))}"),
                ("max new", request.get("max_new_tokens")),
                ("sampling", sampling),
                ("stop", request.get("stop") or None),
                ("eos ids", request.get("eos_token_ids") or None),
                ("prefix ids", _ids(request["prefix_ids"]) if request.get("prefix_ids") else None),
                ("tokens", f"{len(tokens)} {_ids(tokens)}"),
                ("finish", data.get("finish_reason")),
                ("parent", data.get("parent")),
                ("route", route or None),
                ("work", work or None),
                ("steps", _steps(data.get("step_seconds", []))),
                ("verified", verified_label(data.get("verification") or {})),
            ]
        ),
    ]
    lines += _verification_lines(data.get("verification") or {})
    lines.append("  text:")
    lines += ["    " + line for line in str(data.get("text", "")).splitlines() or [""]]
    return "\n".join(lines)


def verified_label(verification: dict[str, Any]) -> str:
    """How a record's node work was checked, in a word: "all" hops re-executed and matched, "k/n" of them, "off",
    or "-" for records made before hivegen verified anything."""
    if not verification:
        return "-"
    if verification.get("mode") == "off":
        return "off"
    hops = verification.get("hops", [])
    checked = sum(1 for h in hops if h.get("result") in ("match", "lied"))
    if hops and checked == len(hops) and verification.get("verified", True):
        return "all"
    return f"{checked}/{len(hops)}" + ("+unchecked prefix" if verification.get("prefix_of") else "")


def _verification_lines(verification: dict[str, Any]) -> list[str]:
    """One line per hop: who served it, who re-ran it, and how close the answers were."""
    lines = [f"  hops ({verification.get('mode')}):"] if verification.get("hops") else []
    for hop in verification.get("hops", []):
        start, end = hop.get("blocks", ["?", "?"])
        line = f"    {start}:{end} at {hop.get('address')}: {hop.get('result')}"
        if hop.get("verified_by"):
            line += f" by {', '.join(str(n)[:16] for n in hop['verified_by'])}"
        if hop.get("max_error") is not None:
            line += f" (error {hop['max_error']:.2g}, tolerance {hop.get('tolerance'):.2g})"
        lines.append(line)
    for liar, evidence in zip(verification.get("liars", []), verification.get("evidence", []), strict=False):
        lines.append(f"    caught lying and banned: {liar} (evidence {str(evidence)[:SHORT]})")
    return lines


def _fields(pairs: Sequence[tuple[str, object]]) -> list[str]:
    return [f"  {label + ':':<12}{'-' if value is None else value}" for label, value in pairs]


def _ids(ids: Sequence[int], limit: int = 16) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"


def _steps(seconds: Sequence[float]) -> str | None:
    """Step timing: how many, total, prefill and the mean decode step."""
    if not seconds:
        return None
    text = f"{len(seconds)} steps in {sum(seconds):.3f} s (prefill {seconds[0]:.3f} s"
    if len(seconds) > 1:
        text += f", decode mean {sum(seconds[1:]) / (len(seconds) - 1):.4f} s"
    return text + ")"


def format_verify(report: VerifyReport) -> str:
    if not report.corrupt:
        return f"{report.objects} objects verified, all intact"
    lines = [f"corrupt: {e.ref} at {e.location}" for e in report.corrupt]
    lines.append(
        f"{len(report.corrupt)} of {report.objects} objects are corrupt; "
        "remove them and put them again from a good copy"
    )
    return "\n".join(lines)
