"""gRPC settings shared by nodes and clients."""

from __future__ import annotations

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # a prefill of thousands of tokens exceeds gRPC's 4 MiB default


def grpc_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel/server options: larger messages, and keepalives so a dead peer is noticed."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
