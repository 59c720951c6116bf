# pyright: strict
"""Configuration: runtime settings, per-server specs and layered call policies.

Everything here is a frozen attrs class. A configuration comes from a TOML file
(:meth:`RMCPConfig.from_toml`), from a plain mapping (:meth:`RMCPConfig.from_dict`) or is built
in Python. Either way every value is validated on construction, and a bad value raises
:class:`~rmcp_actors.errors.RMCPConfigError` whose ``path`` names the offending key (for
example ``servers.time.retry.max_attempts``).

Policies are layered: built-in defaults, then ``[defaults]``, then the server's table, then the
tool's table. A layer's ``None`` (or a key it does not name) inherits from the layer above;
:meth:`RMCPConfig.server_policy` and :meth:`RMCPConfig.call_policy` compute the resolved views.

Layout: each policy key is declared once in ``_policy.py`` (its built-in default, validator,
doc and the tables it may be written in); ``_keys.py`` derives the policy classes, the layering
and the key metadata from those declarations, ``_load.py`` the TOML tables and error paths.
"""

from ._auth import AuthConfig as AuthConfig
from ._auth import AuthMethod as AuthMethod
from ._config import RMCPConfig as RMCPConfig
from ._policy import BreakerMode as BreakerMode
from ._policy import BreakerProbe as BreakerProbe
from ._policy import CallPolicy as CallPolicy
from ._policy import CircuitBreakerOverrides as CircuitBreakerOverrides
from ._policy import CircuitBreakerPolicy as CircuitBreakerPolicy
from ._policy import HedgeOverrides as HedgeOverrides
from ._policy import HedgePolicy as HedgePolicy
from ._policy import Overflow as Overflow
from ._policy import PolicyOverrides as PolicyOverrides
from ._policy import RateLimitOverrides as RateLimitOverrides
from ._policy import RateLimitPolicy as RateLimitPolicy
from ._policy import ReconnectOverrides as ReconnectOverrides
from ._policy import ReconnectPolicy as ReconnectPolicy
from ._policy import RetryBudgetOverrides as RetryBudgetOverrides
from ._policy import RetryBudgetPolicy as RetryBudgetPolicy
from ._policy import RetryOverrides as RetryOverrides
from ._policy import RetryPolicy as RetryPolicy
from ._policy import RuntimeSettings as RuntimeSettings
from ._policy import ServerPolicy as ServerPolicy
from ._policy import ToolOverrides as ToolOverrides
from ._policy import TransactionSettings as TransactionSettings
from ._policy import TransferOverrides as TransferOverrides
from ._policy import TransferPolicy as TransferPolicy
from ._policy import WhenDisconnected as WhenDisconnected
from ._servers import ServerSpec as ServerSpec
from ._servers import Transport as Transport
from ._servers import Wire as Wire

__all__ = [
    "AuthConfig",
    "AuthMethod",
    "BreakerMode",
    "BreakerProbe",
    "CallPolicy",
    "CircuitBreakerOverrides",
    "CircuitBreakerPolicy",
    "HedgeOverrides",
    "HedgePolicy",
    "Overflow",
    "PolicyOverrides",
    "RMCPConfig",
    "RateLimitOverrides",
    "RateLimitPolicy",
    "ReconnectOverrides",
    "ReconnectPolicy",
    "RetryBudgetOverrides",
    "RetryBudgetPolicy",
    "RetryOverrides",
    "RetryPolicy",
    "RuntimeSettings",
    "ServerPolicy",
    "ServerSpec",
    "ToolOverrides",
    "TransactionSettings",
    "TransferOverrides",
    "TransferPolicy",
    "Transport",
    "WhenDisconnected",
    "Wire",
]
