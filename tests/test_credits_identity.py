"""Identities: Ed25519 keys on disk, the accounts they name, and their signatures."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from hivegen.credits.identity import IDENTITY_ENV, Identity, account_of, default_identity_path, verify_signature
from hivegen.errors import CreditsError


def test_saved_identity_loads_back_with_the_same_account(tmp_path: Path) -> None:
    identity = Identity.generate()
    identity.save(tmp_path / "identity")
    loaded = Identity.load(tmp_path / "identity")
    assert loaded.account == identity.account
    assert loaded.public_key_hex == identity.public_key_hex


def test_saved_key_file_is_readable_only_by_its_owner(tmp_path: Path) -> None:
    Identity.generate().save(tmp_path / "identity")
    assert stat.S_IMODE((tmp_path / "identity").stat().st_mode) == 0o600


def test_account_is_hg_and_40_hex_chars_of_the_public_key_hash() -> None:
    identity = Identity.generate()
    assert identity.account == account_of(identity.public_key_hex)
    assert identity.account.startswith("hg") and len(identity.account) == 42
    assert len(bytes.fromhex(identity.public_key_hex)) == 32


def test_load_or_create_creates_once_under_hivegen_home_then_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(IDENTITY_ENV, raising=False)
    monkeypatch.setenv("HIVEGEN_HOME", str(tmp_path / "home"))
    first = Identity.load_or_create()
    second = Identity.load_or_create()
    assert first.account == second.account
    assert stat.S_IMODE((tmp_path / "home" / "identity").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "home").stat().st_mode) == 0o700


def test_hivegen_identity_names_the_key_file_and_wins_over_hivegen_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIVEGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(IDENTITY_ENV, str(tmp_path / "keys" / "me.pem"))
    assert default_identity_path() == tmp_path / "keys" / "me.pem"
    created = Identity.load_or_create()
    assert (tmp_path / "keys" / "me.pem").exists() and not (tmp_path / "home").exists()
    assert Identity.load(tmp_path / "keys" / "me.pem").account == created.account


def test_key_file_open_to_others_still_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    identity = Identity.generate()
    identity.save(tmp_path / "identity")
    os.chmod(tmp_path / "identity", 0o644)
    with caplog.at_level(logging.WARNING, logger="hivegen.credits.identity"):
        assert Identity.load(tmp_path / "identity").account == identity.account
    assert "chmod 600" in caplog.text


def test_a_file_that_is_not_a_key_is_a_credits_error(tmp_path: Path) -> None:
    (tmp_path / "identity").write_text("not a key")
    with pytest.raises(CreditsError, match="not a PEM private key"):
        Identity.load(tmp_path / "identity")


def test_signature_verifies_and_a_flipped_bit_fails() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"payload")
    assert verify_signature(identity.public_key_hex, signature, b"payload")
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify_signature(identity.public_key_hex, flipped, b"payload")
    assert not verify_signature(identity.public_key_hex, signature, b"payloae")


def test_signature_by_another_key_or_a_malformed_key_does_not_verify() -> None:
    signature = Identity.generate().sign(b"payload")
    assert not verify_signature(Identity.generate().public_key_hex, signature, b"payload")
    assert not verify_signature("zz" * 32, signature, b"payload")


def test_private_key_stays_out_of_repr() -> None:
    identity = Identity.generate()
    assert "private" not in repr(identity)
    assert identity.account in repr(identity)
