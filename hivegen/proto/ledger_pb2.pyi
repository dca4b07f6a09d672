from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Receipt(_message.Message):
    __slots__ = ("session_id", "client", "client_key", "node", "model_key", "seq", "work", "signature")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    WORK_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    client: str
    client_key: str
    node: str
    model_key: str
    seq: int
    work: int
    signature: str
    def __init__(self, session_id: _Optional[str] = ..., client: _Optional[str] = ..., client_key: _Optional[str] = ..., node: _Optional[str] = ..., model_key: _Optional[str] = ..., seq: _Optional[int] = ..., work: _Optional[int] = ..., signature: _Optional[str] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("receipts",)
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    receipts: _containers.RepeatedCompositeFieldContainer[Receipt]
    def __init__(self, receipts: _Optional[_Iterable[_Union[Receipt, _Mapping]]] = ...) -> None: ...

class SubmitResult(_message.Message):
    __slots__ = ("session_id", "seq", "transferred_units", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TRANSFERRED_UNITS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    transferred_units: int
    error: str
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., transferred_units: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitResult, _Mapping]]] = ...) -> None: ...

class CallAuth(_message.Message):
    __slots__ = ("account", "public_key", "at_ms", "nonce", "signature")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    account: str
    public_key: str
    at_ms: int
    nonce: str
    signature: str
    def __init__(self, account: _Optional[str] = ..., public_key: _Optional[str] = ..., at_ms: _Optional[int] = ..., nonce: _Optional[str] = ..., signature: _Optional[str] = ...) -> None: ...

class AccountRequest(_message.Message):
    __slots__ = ("account", "auth", "grant_proof")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    GRANT_PROOF_FIELD_NUMBER: _ClassVar[int]
    account: str
    auth: CallAuth
    grant_proof: int
    def __init__(self, account: _Optional[str] = ..., auth: _Optional[_Union[CallAuth, _Mapping]] = ..., grant_proof: _Optional[int] = ...) -> None: ...

class Balance(_message.Message):
    __slots__ = ("account", "units", "known")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    account: str
    units: int
    known: bool
    def __init__(self, account: _Optional[str] = ..., units: _Optional[int] = ..., known: _Optional[bool] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("account", "limit", "auth")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    account: str
    limit: int
    auth: CallAuth
    def __init__(self, account: _Optional[str] = ..., limit: _Optional[int] = ..., auth: _Optional[_Union[CallAuth, _Mapping]] = ...) -> None: ...

class JournalEntry(_message.Message):
    __slots__ = ("row", "at", "kind", "src", "dst", "units", "session_id", "seq", "hash")
    ROW_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    row: int
    at: float
    kind: str
    src: str
    dst: str
    units: int
    session_id: str
    seq: int
    hash: str
    def __init__(self, row: _Optional[int] = ..., at: _Optional[float] = ..., kind: _Optional[str] = ..., src: _Optional[str] = ..., dst: _Optional[str] = ..., units: _Optional[int] = ..., session_id: _Optional[str] = ..., seq: _Optional[int] = ..., hash: _Optional[str] = ...) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[JournalEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[JournalEntry, _Mapping]]] = ...) -> None: ...

class TopRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class TopEntry(_message.Message):
    __slots__ = ("account", "earned_units")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    EARNED_UNITS_FIELD_NUMBER: _ClassVar[int]
    account: str
    earned_units: int
    def __init__(self, account: _Optional[str] = ..., earned_units: _Optional[int] = ...) -> None: ...

class TopResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[TopEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[TopEntry, _Mapping]]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("ok", "bad_row", "message", "rows", "head_hash", "checked_at")
    OK_FIELD_NUMBER: _ClassVar[int]
    BAD_ROW_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    bad_row: int
    message: str
    rows: int
    head_hash: str
    checked_at: float
    def __init__(self, ok: _Optional[bool] = ..., bad_row: _Optional[int] = ..., message: _Optional[str] = ..., rows: _Optional[int] = ..., head_hash: _Optional[str] = ..., checked_at: _Optional[float] = ...) -> None: ...

class GrantPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GrantPolicy(_message.Message):
    __slots__ = ("grant_units", "proof_bits", "salt")
    GRANT_UNITS_FIELD_NUMBER: _ClassVar[int]
    PROOF_BITS_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    grant_units: int
    proof_bits: int
    salt: str
    def __init__(self, grant_units: _Optional[int] = ..., proof_bits: _Optional[int] = ..., salt: _Optional[str] = ...) -> None: ...

class CoordinatorInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CoordinatorInfo(_message.Message):
    __slots__ = ("status_url", "version")
    STATUS_URL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    status_url: str
    version: str
    def __init__(self, status_url: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...
