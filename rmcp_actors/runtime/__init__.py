"""The actor runtime: actors with bounded inboxes and Erlang/OTP-style supervisors, on anyio."""

from .actor import Actor as Actor
from .actor import ActorStatistics as ActorStatistics
from .actor import ReplySlot as ReplySlot
from .health import ComponentHealth as ComponentHealth
from .health import ComponentRegistry as ComponentRegistry
from .health import Health as Health
from .health import HealthStatus as HealthStatus
from .supervisor import ChildSpec as ChildSpec
from .supervisor import ChildStatistics as ChildStatistics
from .supervisor import Restart as Restart
from .supervisor import RestartIntensity as RestartIntensity
from .supervisor import Strategy as Strategy
from .supervisor import Supervisor as Supervisor
from .supervisor import SupervisorStatistics as SupervisorStatistics
from .watchdog import CheckNow as CheckNow
from .watchdog import InFlight as InFlight
from .watchdog import Liveness as Liveness
from .watchdog import StallReport as StallReport
from .watchdog import Tracked as Tracked
from .watchdog import WaitEdge as WaitEdge
from .watchdog import Watchdog as Watchdog
from .watchdog import WatchdogStatistics as WatchdogStatistics
from .watchdog import WorkItem as WorkItem
from .watchdog import WorkRegistry as WorkRegistry

__all__ = [
    "Actor",
    "ActorStatistics",
    "ReplySlot",
    "ChildSpec",
    "ChildStatistics",
    "Restart",
    "RestartIntensity",
    "Strategy",
    "Supervisor",
    "SupervisorStatistics",
    "ComponentHealth",
    "ComponentRegistry",
    "Health",
    "HealthStatus",
    "CheckNow",
    "InFlight",
    "Liveness",
    "StallReport",
    "Tracked",
    "WaitEdge",
    "Watchdog",
    "WatchdogStatistics",
    "WorkItem",
    "WorkRegistry",
]
