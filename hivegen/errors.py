"""Errors a user can hit. Each says what went wrong and what to do next; the CLI prints them plainly."""

from __future__ import annotations


class HivegenError(Exception):
    """Base class of every error hivegen raises on purpose."""


class ModelLoadError(HivegenError):
    """A model directory is missing, malformed, or not a supported decoder-only checkpoint."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture does not follow the decoder-layer interface hivegen drives."""


class NoRouteError(HivegenError):
    """No chain of announced nodes covers every block of the model."""

    def __init__(self, model_key: str, missing_blocks: list[int], failures: list[str] | None = None) -> None:
        self.model_key = model_key
        self.missing_blocks = missing_blocks
        self.failures = failures or []
        if self.failures:  # nodes exist, but the client had to route around them
            super().__init__(
                f"no usable node serves blocks {format_blocks(missing_blocks)} of {model_key}: "
                + "; ".join(self.failures)
            )
        else:
            super().__init__(
                f"no node serves blocks {format_blocks(missing_blocks)} of {model_key}; "
                "start a node for them with `hivegen node serve --blocks START:END` or check --initial-peers"
            )


class InvalidParameterError(HivegenError, ValueError):
    """A request parameter is out of range or malformed; `param` names it (as the caller spelled it)."""

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        super().__init__(f"{param}: {message}")


class RemoteError(HivegenError):
    """A node refused or failed a request; `code` is the gRPC status name."""

    def __init__(self, address: str, code: str, details: str) -> None:
        self.address = address
        self.code = code
        self.details = details
        super().__init__(f"node {address} answered {code}: {details}")


class SessionError(HivegenError):
    """An inference session was used wrongly (closed, past its max length, wrong batch size)."""


def format_blocks(blocks: list[int]) -> str:
    """Render [0, 1, 2, 5] as '0-2, 5'."""
    if not blocks:
        return "(none)"
    ranges: list[str] = []
    start = prev = blocks[0]
    for b in [*blocks[1:], None]:
        if b is not None and b == prev + 1:
            prev = b
            continue
        ranges.append(str(start) if start == prev else f"{start}-{prev}")
        if b is not None:
            start = prev = b
    return ", ".join(ranges)


class TraceDivergenceError(HivegenError):
    """A strict trace replay met a call that differs from the recorded one at the same position."""

    def __init__(self, trace: str, index: int, detail: str) -> None:
        self.trace = trace
        self.index = index
        super().__init__(f"trace {trace!r}: call {index} differs from the recording: {detail}")


class CreditsError(HivegenError):
    """Base class of the credit ledger's errors: identities, receipts and the journal."""


class InsufficientCredits(CreditsError):
    """A client's balance does not cover the cost of the work it asked for."""

    def __init__(self, account: str, balance: int, needed: int, what: str = "this step costs") -> None:
        from hivegen.credits.units import format_credits

        self.account = account
        self.balance = balance  # work units
        self.needed = needed  # work units
        super().__init__(
            f"account {account} has {format_credits(balance)} credits but {what} {format_credits(needed)}; "
            "earn credits by serving blocks with `hivegen node serve`"
        )


class GrantProofNeeded(InsufficientCredits):
    """A new account has nothing until it claims the starter grant, which asks for a proof of work first."""

    def __init__(self, account: str, grant_units: int, bits: int, salt: str, wrong_proof: bool = False) -> None:
        from hivegen.credits.units import format_credits

        self.grant_units = grant_units
        self.bits = bits
        self.salt = salt
        CreditsError.__init__(
            self,
            f"account {account} is new to the ledger, which grants {format_credits(grant_units)} credits once for a "
            f"{bits}-bit proof of work"
            + (" (the proof sent is wrong)" if wrong_proof else "")
            + "; hivegen's client solves it for you, or run `hivegen credits open`",
        )
        self.account, self.balance, self.needed = account, 0, 0


class ForgedReceiptError(CreditsError):
    """A receipt failed verification; `reason` is bad-signature, wrong-signer, session-owner or malformed."""

    REASONS = ("bad-signature", "wrong-signer", "session-owner", "malformed")

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown forged-receipt reason {reason!r}; use one of {self.REASONS}")
        self.reason = reason
        super().__init__(f"receipt rejected ({reason})" + (f": {detail}" if detail else ""))


class JournalError(CreditsError):
    """The credit journal's hash chain or its replay disagrees with the stored state; `row` names where."""

    def __init__(self, row: int, detail: str) -> None:
        self.row = row
        super().__init__(f"credit journal fails verification at row {row}: {detail}")


class VerificationError(HivegenError):
    """Re-execution on other nodes could not settle whether a node's answer was right (no third node to break a
    tie, or three nodes that all disagree); nothing is committed. `nodes` names the nodes involved."""

    def __init__(self, message: str, nodes: list[str]) -> None:
        self.nodes = nodes
        super().__init__(message)


class GenerationCancelled(HivegenError):
    """The caller stopped wanting a generation (an HTTP client went away): it ends at its next step, the nodes are
    settled for what they did, and nothing is committed."""


class GenerationRetracted(HivegenError):
    """Verification proved that a node's wrong answer shaped the tokens from index `valid_tokens` on: those
    tokens (already streamed) are void. The liar is banned; generate again with `generated=` set to the first
    `valid_tokens` tokens to continue from the last good one (`generate()` and `Client` do this themselves)."""

    def __init__(self, valid_tokens: int, liars: list[str]) -> None:
        self.valid_tokens = valid_tokens
        self.liars = liars
        super().__init__(
            f"node(s) {', '.join(liars)} returned wrong hidden states; tokens from index {valid_tokens} on are void "
            "and must be generated again (the node is banned)"
        )
