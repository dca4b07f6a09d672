"""Nodes this user's clients caught returning wrong answers, remembered across processes in ~/.hivegen.

A ban is keyed by the node's owner key (the Ed25519 key that signs its DHT records and its answers), so every
node run with that key is avoided, whatever its address or peer id. Bans are only ever added by proof: a
re-execution on two other nodes that agreed with each other and not with the banned one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hivegen.files import write_json_atomic
from hivegen.model.demo import hivegen_home

logger = logging.getLogger(__name__)
BANS_FILE = "banned-nodes.json"


@dataclass(frozen=True)
class Ban:
    """Why a node key is banned."""

    owner: str  # the node's public key, hex
    node_id: str
    address: str
    reason: str
    evidence: str  # SHA-256 of the evidence bytes (see hivegen.proto.reports_pb2.Evidence), "" if none
    at: float


class BanList:
    """Banned node keys, kept in memory and (unless `path` is None) in a JSON file shared by processes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._bans: dict[str, Ban] = {}
        self._lock = threading.Lock()
        self._load()

    @classmethod
    def default(cls) -> BanList:
        """The user's ban list: `$HIVEGEN_HOME/banned-nodes.json` (default `~/.hivegen`)."""
        return cls(hivegen_home() / BANS_FILE)

    def is_banned(self, owner: str) -> bool:
        with self._lock:
            return owner in self._bans

    def owners(self) -> set[str]:
        with self._lock:
            return set(self._bans)

    def get(self, owner: str) -> Ban | None:
        with self._lock:
            return self._bans.get(owner)

    def ban(self, owner: str, node_id: str, address: str, reason: str, evidence: str = "") -> Ban:
        """Ban `owner` now and save the list (merged with bans other processes saved meanwhile)."""
        entry = Ban(owner, node_id, address, reason, evidence, time.time())
        with self._lock:
            self._bans.setdefault(owner, entry)
            if self.path is not None:
                self._merge_from_disk()
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(self.path, {"bans": [asdict(b) for b in self._bans.values()]})
                except OSError as exc:
                    logger.warning("could not save the ban list to %s: %s", self.path, exc)
            return self._bans[owner]

    def _load(self) -> None:
        with self._lock:
            self._merge_from_disk()

    def _merge_from_disk(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            for item in data.get("bans", []):
                ban = Ban(**item)
                self._bans.setdefault(ban.owner, ban)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            logger.warning("ignoring an unreadable ban list %s (%s); move it away to silence this", self.path, exc)
