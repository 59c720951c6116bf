"""Types a program meets but rarely names, kept out of the everyday namespace (as ``trio.lowlevel``).

Statistics snapshots returned by ``statistics()`` methods, for monitoring and tests, the
class of the RMCP server middleware that :func:`rmcp_actors.install` puts on a server, and the
:class:`Batch` that ``sup.map`` returns, and the records a custom :class:`~rmcp_actors.TaskStore`
keeps (:class:`TaskRef`, :class:`TaskWire`).
"""

from .client._tasks import TaskRef as TaskRef
from .client._tasks import TaskWire as TaskWire
from .client.connection import ConnectionStatistics as ConnectionStatistics
from .flow.batch import Batch as Batch
from .flow.batch import BatchStatistics as BatchStatistics
from .flow.breaker import BreakerStatistics as BreakerStatistics
from .flow.budget import RetryBudgetStatistics as RetryBudgetStatistics
from .flow.limiter import GateStatistics as GateStatistics
from .flow.limiter import LimiterStatistics as LimiterStatistics
from .flow.scheduler import LaneStatistics as LaneStatistics
from .flow.scheduler import SchedulerStatistics as SchedulerStatistics
from .root import RuntimeStatistics as RuntimeStatistics
from .runtime.health import ComponentHealth as ComponentHealth
from .runtime.watchdog import WatchdogStatistics as WatchdogStatistics
from .runtime.watchdog import WorkItem as WorkItem
from .server import RMCPServerSide as RMCPServerSide
from .server import ServerStatistics as ServerStatistics
from .server import rmcp_of as rmcp_of

__all__ = [
    "BreakerStatistics",
    "ComponentHealth",
    "Batch",
    "BatchStatistics",
    "ConnectionStatistics",
    "GateStatistics",
    "LaneStatistics",
    "LimiterStatistics",
    "RMCPServerSide",
    "RetryBudgetStatistics",
    "RuntimeStatistics",
    "SchedulerStatistics",
    "ServerStatistics",
    "TaskRef",
    "TaskWire",
    "WatchdogStatistics",
    "WorkItem",
    "rmcp_of",
]


def _show_public_module() -> None:
    """Make reprs say ``rmcp_actors.lowlevel.LaneStatistics``, the name users import."""
    import attrs

    for name in __all__:
        value = globals()[name]
        if attrs.has(value):
            # String annotations resolve in the defining module: resolve them while it is known.
            attrs.resolve_types(value)
        value.__module__ = __name__


_show_public_module()
