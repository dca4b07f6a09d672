"""Work receipts: signed by the paying client, rejected when altered, mis-signed or malformed."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from hivegen.credits.identity import Identity
from hivegen.credits.receipts import (
    WORK_UNITS_PER_CREDIT,
    Receipt,
    SignedReceipt,
    sign_receipt,
    verify_receipt,
)
from hivegen.credits.units import format_credits
from hivegen.errors import ForgedReceiptError

CLIENT = Identity.generate()
NODE = Identity.generate()


def make_receipt(seq: int = 1, work: int = 3 * WORK_UNITS_PER_CREDIT, client: Identity = CLIENT) -> Receipt:
    return Receipt("session-1", client.account, client.public_key_hex, NODE.account, "smollm2", seq, work)


def test_signed_receipt_verifies() -> None:
    verify_receipt(sign_receipt(CLIENT, make_receipt()))


def test_credits_are_shown_with_every_decimal_of_the_work() -> None:
    assert WORK_UNITS_PER_CREDIT == 10**8  # one credit: 10^8 parameter-tokens (the README's pricing)
    assert format_credits(3 * WORK_UNITS_PER_CREDIT - 1) == "2.99999999"
    assert format_credits(3 * WORK_UNITS_PER_CREDIT) == "3"
    assert format_credits(53_101_440) == "0.5310144"
    assert format_credits(12_345 * WORK_UNITS_PER_CREDIT) == "12,345"


@pytest.mark.parametrize(
    "change", [{"work": 4 * WORK_UNITS_PER_CREDIT}, {"seq": 2}, {"node": Identity.generate().account}]
)
def test_receipt_altered_after_signing_is_a_bad_signature(change: dict[str, Any]) -> None:
    signed = sign_receipt(CLIENT, make_receipt())
    altered = SignedReceipt(dataclasses.replace(signed.receipt, **change), signed.signature)
    with pytest.raises(ForgedReceiptError) as caught:
        verify_receipt(altered)
    assert caught.value.reason == "bad-signature"


def test_receipt_whose_key_does_not_own_the_client_account_is_wrong_signer() -> None:
    mallory = Identity.generate()
    receipt = dataclasses.replace(make_receipt(), client_key=mallory.public_key_hex)
    forged = SignedReceipt(receipt, mallory.sign(receipt.payload()).hex())
    with pytest.raises(ForgedReceiptError) as caught:
        verify_receipt(forged)
    assert caught.value.reason == "wrong-signer"


def test_sign_receipt_refuses_a_receipt_for_another_client() -> None:
    with pytest.raises(ValueError, match="not for this identity"):
        sign_receipt(Identity.generate(), make_receipt())


def test_dict_round_trip_keeps_the_receipt_verifiable() -> None:
    signed = sign_receipt(CLIENT, make_receipt())
    parsed = SignedReceipt.from_dict(signed.to_dict())
    assert parsed == signed
    verify_receipt(parsed)


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 0},
        {"seq": "1"},
        {"work": -1},
        {"work": 1.5},
        {"work": True},
        {"client": "alice"},
        {"client_key": "00"},
        {"session_id": ""},
        {"signature": "abc"},
        {"extra": 1},
    ],
)
def test_from_dict_with_a_bad_field_is_malformed(change: dict[str, Any]) -> None:
    data = {**sign_receipt(CLIENT, make_receipt()).to_dict(), **change}
    with pytest.raises(ForgedReceiptError) as caught:
        SignedReceipt.from_dict(data)
    assert caught.value.reason == "malformed"


def test_from_dict_with_a_missing_field_or_a_non_dict_is_malformed() -> None:
    data = sign_receipt(CLIENT, make_receipt()).to_dict()
    del data["work"]
    for bad in (data, ["not", "a", "dict"]):
        with pytest.raises(ForgedReceiptError) as caught:
            SignedReceipt.from_dict(bad)
        assert caught.value.reason == "malformed"


def test_verify_rejects_a_malformed_receipt_before_checking_the_signature() -> None:
    signed = sign_receipt(CLIENT, make_receipt())
    bad = SignedReceipt(dataclasses.replace(signed.receipt, work=-5), signed.signature)
    with pytest.raises(ForgedReceiptError) as caught:
        verify_receipt(bad)
    assert caught.value.reason == "malformed"
