from . import node_pb2 as _node_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SignedStep(_message.Message):
    __slots__ = ("step", "hidden_states", "position_ids", "attention_mask", "output_digest", "signature")
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    step: int
    hidden_states: _node_pb2.Tensor
    position_ids: _node_pb2.Tensor
    attention_mask: _node_pb2.Tensor
    output_digest: str
    signature: str
    def __init__(self, step: _Optional[int] = ..., hidden_states: _Optional[_Union[_node_pb2.Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[_node_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_node_pb2.Tensor, _Mapping]] = ..., output_digest: _Optional[str] = ..., signature: _Optional[str] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("model_key", "node_id", "node_key", "node_address", "session_id", "start_block", "end_block", "steps", "output", "expected", "witnesses", "error", "tolerance")
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    WITNESSES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    model_key: str
    node_id: str
    node_key: str
    node_address: str
    session_id: str
    start_block: int
    end_block: int
    steps: _containers.RepeatedCompositeFieldContainer[SignedStep]
    output: _node_pb2.Tensor
    expected: _node_pb2.Tensor
    witnesses: _containers.RepeatedScalarFieldContainer[str]
    error: float
    tolerance: float
    def __init__(self, model_key: _Optional[str] = ..., node_id: _Optional[str] = ..., node_key: _Optional[str] = ..., node_address: _Optional[str] = ..., session_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[SignedStep, _Mapping]]] = ..., output: _Optional[_Union[_node_pb2.Tensor, _Mapping]] = ..., expected: _Optional[_Union[_node_pb2.Tensor, _Mapping]] = ..., witnesses: _Optional[_Iterable[str]] = ..., error: _Optional[float] = ..., tolerance: _Optional[float] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("evidence", "reporter", "reporter_key", "at", "signature")
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    REPORTER_FIELD_NUMBER: _ClassVar[int]
    REPORTER_KEY_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    evidence: bytes
    reporter: str
    reporter_key: str
    at: float
    signature: str
    def __init__(self, evidence: _Optional[bytes] = ..., reporter: _Optional[str] = ..., reporter_key: _Optional[str] = ..., at: _Optional[float] = ..., signature: _Optional[str] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("evidence_digest", "reporters")
    EVIDENCE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REPORTERS_FIELD_NUMBER: _ClassVar[int]
    evidence_digest: str
    reporters: int
    def __init__(self, evidence_digest: _Optional[str] = ..., reporters: _Optional[int] = ...) -> None: ...

class ReportsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportedNode(_message.Message):
    __slots__ = ("node_key", "account", "node_ids", "addresses", "reporters", "reports", "evidence", "last_report_at", "models")
    NODE_KEY_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    REPORTERS_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_AT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    node_key: str
    account: str
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    reporters: int
    reports: int
    evidence: _containers.RepeatedScalarFieldContainer[str]
    last_report_at: float
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_key: _Optional[str] = ..., account: _Optional[str] = ..., node_ids: _Optional[_Iterable[str]] = ..., addresses: _Optional[_Iterable[str]] = ..., reporters: _Optional[int] = ..., reports: _Optional[int] = ..., evidence: _Optional[_Iterable[str]] = ..., last_report_at: _Optional[float] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class ReportsResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[ReportedNode]
    def __init__(self, nodes: _Optional[_Iterable[_Union[ReportedNode, _Mapping]]] = ...) -> None: ...
