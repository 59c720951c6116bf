"""rmcp_actors: Reliable MCP, a supervised actor runtime that makes MCP tool calls reliable.

The implementation lives in private modules and sub-packages; everything a user needs is
re-exported here, and users import from ``rmcp_actors`` only.
"""

from .errors import Outcome as Outcome
from .errors import RMCPConfigError as RMCPConfigError
from .errors import RMCPError as RMCPError
from .errors import RMCPNetworkError as RMCPNetworkError
from .errors import RMCPOutcomeUnknownError as RMCPOutcomeUnknownError
from .errors import RMCPOverloadedError as RMCPOverloadedError
from .errors import RMCPResultValidationError as RMCPResultValidationError
from .errors import RMCPServerError as RMCPServerError
from .errors import RMCPSupervisorError as RMCPSupervisorError
from .errors import RMCPTimeoutAfterSendError as RMCPTimeoutAfterSendError
from .errors import RMCPTimeoutError as RMCPTimeoutError
from .errors import UnknownServerError as UnknownServerError
from .errors import UnknownToolError as UnknownToolError
