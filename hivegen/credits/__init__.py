"""Credits: nodes earn for the compute they serve, clients pay, through signed work receipts and a ledger."""

from hivegen.credits.identity import Identity, account_of, default_identity_path, verify_signature
from hivegen.credits.journal import JournalEntry
from hivegen.credits.ledger import Ledger
from hivegen.credits.receipts import WORK_UNITS_PER_CREDIT, Receipt, SignedReceipt, sign_receipt, verify_receipt

__all__ = [
    "WORK_UNITS_PER_CREDIT",
    "Identity",
    "JournalEntry",
    "Ledger",
    "Receipt",
    "SignedReceipt",
    "account_of",
    "default_identity_path",
    "sign_receipt",
    "verify_receipt",
    "verify_signature",
]
