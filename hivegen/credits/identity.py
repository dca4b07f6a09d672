"""A participant's identity: an Ed25519 key pair whose public key names its credit account."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hivegen.errors import CreditsError
from hivegen.model.demo import hivegen_home

logger = logging.getLogger(__name__)

ACCOUNT_PATTERN = re.compile(r"^hg[0-9a-f]{40}$")
PUBLIC_KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")


@functools.lru_cache(maxsize=4096)
def account_of(public_key_hex: str) -> str:
    """The account named by a raw Ed25519 public key (64 hex chars): "hg" + 40 hex chars of its SHA-256."""
    if not isinstance(public_key_hex, str) or not PUBLIC_KEY_PATTERN.fullmatch(public_key_hex):
        raise ValueError(f"public key {public_key_hex!r} is not 64 lowercase hex characters")
    return "hg" + hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:40]


def is_account(account: str) -> bool:
    """Whether `account` is well formed ("hg" + 40 lowercase hex characters)."""
    return isinstance(account, str) and ACCOUNT_PATTERN.fullmatch(account) is not None


def is_public_key(text: str) -> bool:
    """Whether `text` is a raw Ed25519 public key as hivegen writes it (64 lowercase hex characters)."""
    return isinstance(text, str) and PUBLIC_KEY_PATTERN.fullmatch(text) is not None


@functools.lru_cache(maxsize=4096)
def _public_key(public_key_hex: str) -> Ed25519PublicKey:
    """The parsed key (a node verifies every step of a session with the same one)."""
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))


def verify_signature(public_key_hex: str, signature: bytes, data: bytes) -> bool:
    """Whether `signature` is a valid Ed25519 signature of `data` by the key; malformed keys are simply invalid."""
    if not isinstance(public_key_hex, str) or not PUBLIC_KEY_PATTERN.fullmatch(public_key_hex):
        return False
    try:
        _public_key(public_key_hex).verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


IDENTITY_ENV = "HIVEGEN_IDENTITY"


def default_identity_path() -> Path:
    """Where this user's identity lives: `$HIVEGEN_IDENTITY`, else `$HIVEGEN_HOME/identity`, else
    `~/.hivegen/identity`."""
    if os.environ.get(IDENTITY_ENV):
        return Path(os.environ[IDENTITY_ENV]).expanduser()
    return hivegen_home() / "identity"


def default_node_identity_path() -> Path:
    """A node's own key, apart from its owner's client identity (a client must never pay its own node):
    `$HIVEGEN_HOME/node/identity`, else `~/.hivegen/node/identity`."""
    return hivegen_home() / "node" / "identity"


@dataclass(frozen=True)
class Identity:
    """An Ed25519 private key with the account and public key it implies; the key itself stays out of repr."""

    private_key: Ed25519PrivateKey = field(repr=False, compare=False)
    public_key_hex: str = field(init=False)
    account: str = field(init=False)

    def __post_init__(self) -> None:
        raw = self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        object.__setattr__(self, "public_key_hex", raw.hex())
        object.__setattr__(self, "account", account_of(raw.hex()))

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `data`."""
        return self.private_key.sign(data)

    def save(self, path: str | Path) -> None:
        """Write the key (PEM, PKCS8, unencrypted) with mode 0600, replacing `path` atomically."""
        tmp = self._write_temp(Path(path))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        """Read a key written by `save`; warn when the file is readable by others than its owner."""
        path = Path(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            logger.warning("identity file %s has mode %o; restrict it with `chmod 600 %s`", path, mode, path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CreditsError(
                f"identity file {path} is not a PEM private key ({exc}); move it away to make a new one"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise CreditsError(f"identity file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | Path | None = None) -> Identity:
        """Load the identity at `path` (default: `default_identity_path()`), creating it once if it is missing."""
        path = Path(path) if path is not None else default_identity_path()
        if path.exists():
            return cls.load(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = cls.generate()
        tmp = identity._write_temp(path)
        try:
            os.link(tmp, path)  # fails if another process created it meanwhile: then theirs wins
        except FileExistsError:
            return cls.load(path)
        finally:
            tmp.unlink()
        logger.info("created identity %s at %s", identity.account, path)
        return identity

    def _write_temp(self, path: Path) -> Path:
        """Write the key to a new 0600 file beside `path` and return its name."""
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp
