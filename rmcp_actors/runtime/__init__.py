"""The actor runtime: actors with bounded inboxes and Erlang/OTP-style supervisors, on anyio."""

from .actor import Actor as Actor
from .actor import ActorStatistics as ActorStatistics
from .actor import ReplySlot as ReplySlot
from .supervisor import ChildSpec as ChildSpec
from .supervisor import ChildStatistics as ChildStatistics
from .supervisor import Restart as Restart
from .supervisor import RestartIntensity as RestartIntensity
from .supervisor import Strategy as Strategy
from .supervisor import Supervisor as Supervisor
from .supervisor import SupervisorStatistics as SupervisorStatistics

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
]
