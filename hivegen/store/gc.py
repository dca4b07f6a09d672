"""Garbage collection: pointers are the roots; objects not reachable from them through links are removed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hivegen.store.backend import CorruptObjectError, ObjectNotFoundError, ObjectStore
from hivegen.store.directory import DirectoryStore
from hivegen.store.encoding import EncodingError, is_ref

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    """What a collection kept (a count) and removed (or would remove, on a dry run)."""

    kept: int
    removed: list[str] = field(default_factory=list)


def reachable(store: ObjectStore) -> set[str]:
    """Every ref reachable from a pointer value, following objects' links; unreadable objects are kept, not followed."""
    seen: set[str] = set()
    frontier = [v for ns in store.namespaces() for v in store.list_pointers(ns).values() if is_ref(v)]
    while frontier:
        ref = frontier.pop()
        if ref in seen:
            continue
        seen.add(ref)
        try:
            obj = store.get_object(ref)
        except ObjectNotFoundError:
            continue  # a dangling pointer or link: nothing to keep
        except (CorruptObjectError, EncodingError) as exc:
            log.warning("gc keeps %s without following its links: %s", ref, exc)
            continue
        frontier.extend(link for link in obj.links if link not in seen)
    return seen


def collect_garbage(store: ObjectStore, dry_run: bool = False) -> GcReport:
    """Delete every object no pointer reaches (none on a dry run); run it while nothing else writes the store."""
    keep = reachable(store)
    report = GcReport(kept=0)
    for ref in list(store.iter_refs()):
        if ref in keep:
            report.kept += 1
            continue
        report.removed.append(ref)
        if not dry_run:
            store.delete(ref)
    if isinstance(store, DirectoryStore) and not dry_run:
        stale = store.clean_tmp()
        if stale:
            log.info("gc removed %d stale temp files from %s", stale, store.location)
    verb = "would remove" if dry_run else "removed"
    log.info("gc of %s kept %d objects and %s %d", store.location, report.kept, verb, len(report.removed))
    return report
