"""Owner-signed DHT values: only the holder of a key can create, refresh or withdraw the entries under its subkeys.

Every hivegen DHT entry lives under an *owned subkey* `<name>@<public key hex>` (a node id, or a model key plus its
announcer's key), and its value is a dict carrying "sig": the owner's Ed25519 signature over the key, the subkey,
the rest of the value and the expiration time. Binding the expiration stops a replay with a later expiry (hivemind
keeps the entry that expires later); binding the key stops a replay under another block. Values are signed in the
calling process, so no private key ever reaches hivemind's DHT process; the validator there only verifies.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

from hivegen.credits.identity import PUBLIC_KEY_PATTERN, Identity, verify_signature
from hivegen.store.encoding import EncodingError, canonical_bytes

logger = logging.getLogger(__name__)

SIGNATURE_FIELD = "sig"  # the value field holding the owner's signature (hex)
SIGNED_KIND = "hivegen.dht"  # domain separation: these bytes can never be mistaken for a receipt or an answer
SIGNED_VERSION = 1
_OWNED_SUBKEY = re.compile(r"^(?P<name>.+)@(?P<owner>[0-9a-f]{64})$", re.DOTALL)
_SIGNATURE_HEX = re.compile(r"^[0-9a-f]{128}$")


def owned_subkey(name: str, public_key_hex: str) -> str:
    """The subkey `<name>@<public key hex>` that only the holder of that key may write under."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"an owned subkey needs a non-empty name, got {name!r}")
    if not isinstance(public_key_hex, str) or not PUBLIC_KEY_PATTERN.fullmatch(public_key_hex):
        raise ValueError(f"public key {public_key_hex!r} is not 64 lowercase hex characters")
    return f"{name}@{public_key_hex}"


def split_owned(subkey: object) -> tuple[str, str] | None:
    """(name, owner public key hex) of an owned subkey; None for anything else."""
    match = _OWNED_SUBKEY.fullmatch(subkey) if isinstance(subkey, str) else None
    return (match["name"], match["owner"]) if match else None


def owner_of(subkey: object) -> str | None:
    """The public key hex that owns `subkey`, or None if it is not an owned subkey."""
    parts = split_owned(subkey)
    return parts[1] if parts else None


@functools.lru_cache(maxsize=1024)
def dht_key_id(key: str) -> bytes:
    """The bytes hivemind's validators see as a record's key: the DHTID of `key`."""
    return bytes(DHTID.generate(source=key).to_bytes())


def signed_bytes(key_id: bytes, subkey: str, value: dict[str, Any], expiration: float) -> bytes:
    """What the owner signs: canonical JSON of the key, subkey, value (without "sig") and expiration.

    Raises EncodingError if the value has no canonical encoding (non-str keys, bytes, non-finite floats).
    """
    unsigned = {k: v for k, v in value.items() if k != SIGNATURE_FIELD}
    return canonical_bytes(
        {
            "kind": SIGNED_KIND,
            "v": SIGNED_VERSION,
            "key": key_id.hex(),
            "subkey": subkey,
            "value": unsigned,
            "expiration": float(expiration),
        }
    )


def sign_value(identity: Identity, key: str, subkey: str, value: dict[str, Any], expiration: float) -> dict[str, Any]:
    """`value` plus "sig", ready to store under (key, subkey) until `expiration`; `identity` must own `subkey`."""
    owner = owner_of(subkey)
    if owner != identity.public_key_hex:
        raise ValueError(
            f"subkey {subkey!r} is not owned by this identity ({identity.public_key_hex}); "
            "build it with owned_subkey(name, identity.public_key_hex)"
        )
    try:
        payload = signed_bytes(dht_key_id(key), subkey, value, expiration)
    except EncodingError as e:
        raise ValueError(f"cannot sign the DHT value under {key!r}: {e}") from e
    unsigned = {k: v for k, v in value.items() if k != SIGNATURE_FIELD}
    return {**unsigned, SIGNATURE_FIELD: identity.sign(payload).hex()}


def verify_value(key_id: bytes, subkey: object, value: object, expiration: float) -> bool:
    """Whether `value`, stored under the key whose DHTID bytes are `key_id`, is signed by `subkey`'s owner."""
    owner = owner_of(subkey)
    if owner is None or not isinstance(value, dict) or not isinstance(key_id, bytes):
        return False
    signature = value.get(SIGNATURE_FIELD)
    if not isinstance(signature, str) or not _SIGNATURE_HEX.fullmatch(signature):
        return False
    assert isinstance(subkey, str)  # owner_of only accepts strings
    try:
        payload = signed_bytes(key_id, subkey, value, expiration)
    except (EncodingError, TypeError, ValueError, OverflowError):
        return False
    return _verify_cached(owner, signature, payload)


@functools.lru_cache(maxsize=4096)
def _verify_cached(owner: str, signature_hex: str, payload: bytes) -> bool:
    """Signature checks, remembered: clients and DHT peers see the same few records again every few seconds.

    The key is the whole signed payload, not just (key, subkey, sig, expiration): a value altered under a
    genuine signature must never hit a cached "valid".
    """
    return verify_signature(owner, bytes.fromhex(signature_hex), payload)


class OwnerSignatureValidator(RecordValidatorBase):
    """hivemind record validator: every record must sit under an owned subkey and carry its owner's signature.

    Plain values (no subkey) and unowned subkeys are refused, so a stranger can neither overwrite nor shadow a
    node's entries. Stateless (no keys, no handles), so it forks and pickles into the DHT process for free.
    """

    def validate(self, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
        except Exception:  # anything a stranger sends may fail to decode
            logger.debug("refusing a DHT record that does not decode")
            return False
        if verify_value(record.key, subkey, value, record.expiration_time):
            return True
        logger.debug("refusing a DHT record under subkey %r: not signed by its owner", subkey)
        return False

    @property
    def priority(self) -> int:
        return 10  # validate before any validator that would parse the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, OwnerSignatureValidator)  # one instance is enough
