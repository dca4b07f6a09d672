from . import ledger_pb2 as _ledger_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id", "model_key", "start_block", "end_block", "max_length", "batch_size", "client_account", "client_key", "ledger_open")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    LEDGER_OPEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model_key: str
    start_block: int
    end_block: int
    max_length: int
    batch_size: int
    client_account: str
    client_key: str
    ledger_open: _ledger_pb2.AccountRequest
    def __init__(self, session_id: _Optional[str] = ..., model_key: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., max_length: _Optional[int] = ..., batch_size: _Optional[int] = ..., client_account: _Optional[str] = ..., client_key: _Optional[str] = ..., ledger_open: _Optional[_Union[_ledger_pb2.AccountRequest, _Mapping]] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("session_id", "step_id", "hidden_states", "position_ids", "attention_mask", "receipt")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_id: int
    hidden_states: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    receipt: _ledger_pb2.Receipt
    def __init__(self, session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., receipt: _Optional[_Union[_ledger_pb2.Receipt, _Mapping]] = ...) -> None: ...

class Settle(_message.Message):
    __slots__ = ("session_id", "receipt")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    receipt: _ledger_pb2.Receipt
    def __init__(self, session_id: _Optional[str] = ..., receipt: _Optional[_Union[_ledger_pb2.Receipt, _Mapping]] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("open", "step", "settle")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SETTLE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    step: Step
    settle: Settle
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., settle: _Optional[_Union[Settle, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "start_block", "end_block", "dtype", "node_account", "params_per_token", "node_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NODE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_block: int
    end_block: int
    dtype: str
    node_account: str
    params_per_token: int
    node_key: str
    def __init__(self, session_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., dtype: _Optional[str] = ..., node_account: _Optional[str] = ..., params_per_token: _Optional[int] = ..., node_key: _Optional[str] = ...) -> None: ...

class Settled(_message.Message):
    __slots__ = ("session_id", "seq")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("session_id", "step_id", "hidden_states", "compute_seconds", "signature")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_id: int
    hidden_states: Tensor
    compute_seconds: float
    signature: str
    def __init__(self, session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., compute_seconds: _Optional[float] = ..., signature: _Optional[str] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("opened", "result", "settled")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    result: StepResult
    settled: Settled
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ..., settled: _Optional[_Union[Settled, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeCounters(_message.Message):
    __slots__ = ("sessions_opened", "steps", "tokens_processed", "errors", "compute_seconds", "forwards", "batched_steps", "max_batch_rows")
    SESSIONS_OPENED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    sessions_opened: int
    steps: int
    tokens_processed: int
    errors: int
    compute_seconds: float
    forwards: int
    batched_steps: int
    max_batch_rows: int
    def __init__(self, sessions_opened: _Optional[int] = ..., steps: _Optional[int] = ..., tokens_processed: _Optional[int] = ..., errors: _Optional[int] = ..., compute_seconds: _Optional[float] = ..., forwards: _Optional[int] = ..., batched_steps: _Optional[int] = ..., max_batch_rows: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "model_key", "model_name", "start_block", "end_block", "num_blocks", "dtype", "hidden_size", "cache_tokens_total", "cache_tokens_free", "active_sessions", "counters", "num_parameters", "version", "account", "receipts_pending", "cache_bytes_total", "batching")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_FREE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_PENDING_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model_key: str
    model_name: str
    start_block: int
    end_block: int
    num_blocks: int
    dtype: str
    hidden_size: int
    cache_tokens_total: int
    cache_tokens_free: int
    active_sessions: int
    counters: NodeCounters
    num_parameters: int
    version: str
    account: str
    receipts_pending: int
    cache_bytes_total: int
    batching: bool
    def __init__(self, node_id: _Optional[str] = ..., model_key: _Optional[str] = ..., model_name: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., dtype: _Optional[str] = ..., hidden_size: _Optional[int] = ..., cache_tokens_total: _Optional[int] = ..., cache_tokens_free: _Optional[int] = ..., active_sessions: _Optional[int] = ..., counters: _Optional[_Union[NodeCounters, _Mapping]] = ..., num_parameters: _Optional[int] = ..., version: _Optional[str] = ..., account: _Optional[str] = ..., receipts_pending: _Optional[int] = ..., cache_bytes_total: _Optional[int] = ..., batching: _Optional[bool] = ...) -> None: ...
