"""rmcp_actors: Reliable MCP, a supervised actor runtime that makes MCP tool calls reliable.

The implementation lives in private modules and sub-packages; the everyday API is re-exported
here, and users import from ``rmcp_actors`` only. What is not everyday API has a namespace of its
own, as in trio: ``rmcp_actors.lowlevel`` (statistics snapshots, the server middleware class),
``rmcp_actors.runtime`` (the actor kernel), ``rmcp_actors.server`` and ``rmcp_actors.stores``
(the RMCP server side), ``rmcp_actors.testing`` (fault injection for tests).
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

import attrs as _attrs

from .client._tasks import MemoryTaskStore as MemoryTaskStore
from .client._tasks import SQLiteTaskStore as SQLiteTaskStore
from .client._tasks import TaskStore as TaskStore
from .client.auth import EnvBearerAuth as EnvBearerAuth
from .client.auth import FileTokenStorage as FileTokenStorage
from .client.auth import LoopbackCallback as LoopbackCallback
from .client.auth import MemoryTokenStorage as MemoryTokenStorage
from .client.auth import default_token_dir as default_token_dir
from .client.callbacks import ServerCallbacks as ServerCallbacks
from .client.connection import ConnectionState as ConnectionState
from .config import AuthConfig as AuthConfig
from .config import CallPolicy as CallPolicy
from .config import CircuitBreakerOverrides as CircuitBreakerOverrides
from .config import CircuitBreakerPolicy as CircuitBreakerPolicy
from .config import HedgeOverrides as HedgeOverrides
from .config import HedgePolicy as HedgePolicy
from .config import PolicyOverrides as PolicyOverrides
from .config import RateLimitOverrides as RateLimitOverrides
from .config import RateLimitPolicy as RateLimitPolicy
from .config import ReconnectOverrides as ReconnectOverrides
from .config import ReconnectPolicy as ReconnectPolicy
from .config import RetryBudgetOverrides as RetryBudgetOverrides
from .config import RetryBudgetPolicy as RetryBudgetPolicy
from .config import RetryOverrides as RetryOverrides
from .config import RetryPolicy as RetryPolicy
from .config import RMCPConfig as RMCPConfig
from .config import RuntimeSettings as RuntimeSettings
from .config import ServerPolicy as ServerPolicy
from .config import ServerSpec as ServerSpec
from .config import ToolOverrides as ToolOverrides
from .config import TransactionSettings as TransactionSettings
from .config import TransferOverrides as TransferOverrides
from .config import TransferPolicy as TransferPolicy
from .errors import Outcome as Outcome
from .errors import RMCPActorStoppedError as RMCPActorStoppedError
from .errors import RMCPArgumentError as RMCPArgumentError
from .errors import RMCPAuthError as RMCPAuthError
from .errors import RMCPCircuitOpenError as RMCPCircuitOpenError
from .errors import RMCPCompensationError as RMCPCompensationError
from .errors import RMCPConfigError as RMCPConfigError
from .errors import RMCPDeadlockError as RMCPDeadlockError
from .errors import RMCPError as RMCPError
from .errors import RMCPIdempotencyConflictError as RMCPIdempotencyConflictError
from .errors import RMCPNackError as RMCPNackError
from .errors import RMCPNetworkError as RMCPNetworkError
from .errors import RMCPOutcomeUnknownError as RMCPOutcomeUnknownError
from .errors import RMCPOverloadedError as RMCPOverloadedError
from .errors import RMCPResultValidationError as RMCPResultValidationError
from .errors import RMCPServerError as RMCPServerError
from .errors import RMCPStoreClosedError as RMCPStoreClosedError
from .errors import RMCPStoreError as RMCPStoreError
from .errors import RMCPSupervisorError as RMCPSupervisorError
from .errors import RMCPTaskCancelledError as RMCPTaskCancelledError
from .errors import RMCPTimeoutAfterSendError as RMCPTimeoutAfterSendError
from .errors import RMCPTimeoutError as RMCPTimeoutError
from .errors import RMCPTransactionError as RMCPTransactionError
from .errors import RMCPTransactionInDoubtError as RMCPTransactionInDoubtError
from .errors import RMCPTransferError as RMCPTransferError
from .errors import RMCPUnknownOwnerError as RMCPUnknownOwnerError
from .errors import UnknownServerError as UnknownServerError
from .errors import UnknownToolError as UnknownToolError
from .flow.breaker import BreakerChange as BreakerChange
from .flow.breaker import BreakerState as BreakerState
from .lifecycle import LifecycleEvent as LifecycleEvent
from .lifecycle import RequestState as RequestState
from .result import CallResult as CallResult
from .result import TransferStatistics as TransferStatistics
from .root import RMCPSupervisor as RMCPSupervisor
from .runtime.health import Health as Health
from .runtime.health import HealthStatus as HealthStatus
from .runtime.watchdog import StallReport as StallReport
from .server import FastRMCP as FastRMCP
from .server import install as install
from .stores import DedupStore as DedupStore
from .stores import MemoryStore as MemoryStore
from .stores import SQLiteStore as SQLiteStore
from .transactions import Compensation as Compensation
from .transactions import RecoveryReport as RecoveryReport
from .transactions import StepHistory as StepHistory
from .transactions import Transaction as Transaction
from .transactions import TransactionEvent as TransactionEvent
from .transactions import TransactionHistory as TransactionHistory
from .transactions import TransactionState as TransactionState
from .transactions import TransactionSummary as TransactionSummary

try:
    __version__ = _version("rmcp-actors")
except _PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "AuthConfig",
    "BreakerChange",
    "BreakerState",
    "CallPolicy",
    "CallResult",
    "CircuitBreakerOverrides",
    "CircuitBreakerPolicy",
    "Compensation",
    "ConnectionState",
    "DedupStore",
    "EnvBearerAuth",
    "FileTokenStorage",
    "FastRMCP",
    "Health",
    "HealthStatus",
    "HedgeOverrides",
    "HedgePolicy",
    "LifecycleEvent",
    "LoopbackCallback",
    "MemoryStore",
    "MemoryTokenStorage",
    "MemoryTaskStore",
    "Outcome",
    "PolicyOverrides",
    "RMCPActorStoppedError",
    "RMCPArgumentError",
    "RMCPAuthError",
    "RMCPCircuitOpenError",
    "RMCPCompensationError",
    "RMCPConfig",
    "RMCPConfigError",
    "RMCPDeadlockError",
    "RMCPError",
    "RMCPIdempotencyConflictError",
    "RMCPNackError",
    "RMCPNetworkError",
    "RMCPOutcomeUnknownError",
    "RMCPOverloadedError",
    "RMCPResultValidationError",
    "RMCPServerError",
    "RMCPStoreClosedError",
    "RMCPStoreError",
    "RMCPSupervisor",
    "RMCPSupervisorError",
    "RMCPTaskCancelledError",
    "RMCPTimeoutAfterSendError",
    "RMCPTimeoutError",
    "RMCPTransactionError",
    "RMCPTransactionInDoubtError",
    "RMCPUnknownOwnerError",
    "RateLimitOverrides",
    "RateLimitPolicy",
    "ReconnectOverrides",
    "ReconnectPolicy",
    "RecoveryReport",
    "RequestState",
    "RetryBudgetOverrides",
    "RetryBudgetPolicy",
    "RetryOverrides",
    "RetryPolicy",
    "RuntimeSettings",
    "SQLiteStore",
    "ServerCallbacks",
    "SQLiteTaskStore",
    "ServerPolicy",
    "ServerSpec",
    "StallReport",
    "StepHistory",
    "TaskStore",
    "ToolOverrides",
    "Transaction",
    "TransactionEvent",
    "TransactionHistory",
    "TransactionSettings",
    "TransactionState",
    "TransactionSummary",
    "UnknownServerError",
    "UnknownToolError",
    "default_token_dir",
    "install",
    "RMCPTransferError",
    "TransferOverrides",
    "TransferPolicy",
    "TransferStatistics",
]


def _show_public_module() -> None:
    """Make reprs and tracebacks say ``rmcp_actors.CallResult``, the name users import."""
    for name in __all__:
        value = globals()[name]
        if getattr(value, "__module__", "").startswith("rmcp_actors."):
            if _attrs.has(value):
                # String annotations resolve in the defining module: resolve them while it is known.
                _attrs.resolve_types(value)
            value.__module__ = __name__


_show_public_module()
