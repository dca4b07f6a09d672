"""The error a node answers a refused request with."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request the node refuses: carries the gRPC status to end the stream with, and optional trailing
    metadata (machine-readable details such as the balance behind an insufficient-credits refusal)."""

    def __init__(self, code: grpc.StatusCode, message: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.metadata = metadata
