"""What both stores' blob parts (:class:`~rmcp_actors.stores.BlobStore`) share: the layout
check, the size cap's error and the validation of their settings."""

from __future__ import annotations

from typing import Final

from .._transfer import TransferHandle
from ..errors import RMCPConfigError, RMCPStoreError
from ._base import TransferConflict

__all__ = [
    "DEFAULT_MAX_BLOB_BYTES",
    "DEFAULT_UPLOAD_TTL_S",
    "blob_cap_error",
    "check_blob_limits",
    "same_layout",
    "unknown_transfer",
]

DEFAULT_MAX_BLOB_BYTES: Final = 1 << 30
DEFAULT_UPLOAD_TTL_S: Final = 3_600.0


def same_layout(held: TransferHandle, wanted: TransferHandle) -> bool:
    """Whether two handles describe the same bytes cut the same way (encoding and media type
    only say how to present them)."""
    return (
        held.size == wanted.size
        and held.chunk_size == wanted.chunk_size
        and held.sha256 == wanted.sha256
        and held.chunks == wanted.chunks
    )


def check_blob_limits(max_blob_bytes: int, upload_ttl_s: float) -> None:
    """Reject settings a store cannot work with.

    Raises:
        RMCPConfigError: When ``max_blob_bytes`` or ``upload_ttl_s`` is not positive.
    """
    if max_blob_bytes <= 0:
        raise RMCPConfigError(
            f"must be a positive number of bytes, got {max_blob_bytes!r}", path="max_blob_bytes"
        )
    if not upload_ttl_s > 0:
        raise RMCPConfigError(
            f"must be a positive number of seconds, got {upload_ttl_s!r}", path="upload_ttl_s"
        )


def blob_cap_error(operation: str, held: int, adding: int, max_blob_bytes: int) -> RMCPStoreError:
    """The error of a write that would take the chunks held past ``max_blob_bytes``."""
    return RMCPStoreError(
        f"the store holds {held} bytes of transfer chunks and {adding} more would exceed its "
        f"max_blob_bytes of {max_blob_bytes}: nothing was stored. Retry once older transfers "
        "expire (purge_expired), raise max_blob_bytes, or lower the server's transfer threshold "
        "so that fewer payloads are kept",
        operation=operation,
    )


def unknown_transfer(transfer_id: str) -> TransferConflict:
    """The error of a write or seal of a transfer the store does not hold."""
    return TransferConflict(
        f"no transfer {transfer_id!r} in the store (never opened, expired or deleted): open it again"
    )
