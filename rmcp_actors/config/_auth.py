# pyright: strict
"""AuthConfig: how a configured HTTP server authenticates the client (``[servers.<name>.auth]``).

A configuration names the method and where each secret is, never the secret: a secret is read
from the environment variable a ``*_env`` key names when the server's first connection is made,
and kept across reconnects (an OAuth provider holds its tokens); a bearer token is read again at
every request, other rotated secrets once the server is removed and added again. An inline secret
is a configuration error.
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

import attrs

from ..errors import RMCPConfigError
from ._checks import one_of, show

__all__ = ["INLINE_SECRET_KEYS", "AuthConfig", "AuthMethod", "TokenStore"]

AuthMethod = Literal["bearer", "basic", "client_credentials", "authorization_code"]
TokenStore = Literal["file", "memory"]

#: Keys that would hold a secret inline, and the ``*_env`` key to use instead.
INLINE_SECRET_KEYS: Final = {
    "token": "token_env",
    "access_token": "token_env",
    "bearer_token": "token_env",
    "password": "password_env",
    "client_secret": "client_secret_env",
    "secret": "client_secret_env",
}

_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The keys each method reads; any other key set for it is a mistake worth reporting.
_REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "bearer": ("token_env",),
    "basic": ("username", "password_env"),
    "client_credentials": ("client_id", "client_secret_env"),
    "authorization_code": (),
}
_ALLOWED: Final[dict[str, frozenset[str]]] = {
    "bearer": frozenset({"token_env"}),
    "basic": frozenset({"username", "password_env"}),
    "client_credentials": frozenset(
        {
            "client_id",
            "client_secret_env",
            "scope",
            "issuer",
            "token_endpoint_auth_method",
            "token_store",
            "token_dir",
        }
    ),
    "authorization_code": frozenset(
        {
            "client_id",
            "client_secret_env",
            "scope",
            "redirect_uri",
            "client_metadata_url",
            "client_name",
            "token_endpoint_auth_method",
            "token_store",
            "token_dir",
        }
    ),
}
_DEFAULT_REDIRECT_URI: Final = "http://127.0.0.1:33418/callback"


def _env_name(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        # Never echo the value: a secret pasted where its variable's name belongs is the usual cause.
        raise RMCPConfigError(
            f"must name an environment variable (letters, digits, '_'; e.g. MCP_TOKEN), got a "
            f"{type(value).__name__} that is not one; put the secret itself in that variable",
            path=attribute.name,
        )


def _optional_text(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise RMCPConfigError(f"expected a non-empty string, got {show(value)}", path=attribute.name)


@attrs.frozen
class AuthConfig:
    """How a client authenticates to an HTTP server, as a configuration names it.

    Secrets are never stored here: the ``*_env`` keys name the environment variables that hold
    them, read when the server's first connection is made (``token_env`` at every request).
    ``ServerSpec.http(..., auth=...)`` also takes any ``httpx2.Auth`` (an SDK OAuth provider,
    for instance) when the server is built in Python.

    Attributes:
        method: ``"bearer"`` (a static token), ``"basic"`` (HTTP Basic), ``"client_credentials"``
            (OAuth machine-to-machine) or ``"authorization_code"`` (OAuth with PKCE, interactive).
        token_env: bearer: the variable holding the token.
        username: basic: the user name (not a secret).
        password_env: basic: the variable holding the password.
        client_id: client_credentials: the client's id; authorization_code: a pre-registered
            client's id (without one the client registers itself dynamically, or uses
            ``client_metadata_url``).
        client_secret_env: the variable holding the client's secret (a confidential client).
        scope: Space-separated scopes to ask for.
        issuer: client_credentials: the authorization server the secret belongs to; the secret
            is sent nowhere else.
        token_endpoint_auth_method: ``"client_secret_basic"`` or ``"client_secret_post"``.
        redirect_uri: authorization_code: a loopback URL (``http://127.0.0.1:<port>/<path>``) the
            runtime listens on for the authorization server's redirect.
        client_metadata_url: authorization_code: an HTTPS URL of a client ID metadata document
            (CIMD), used as the client id where the server supports it.
        client_name: authorization_code: the name shown on the consent page.
        token_store: OAuth methods: ``"file"`` (the default: tokens survive the process, in a
            0600 file under the user's data directory) or ``"memory"``.
        token_dir: The directory of the file store, instead of the user's data directory.

    Raises:
        RMCPConfigError: A key the method needs is missing, a key does not apply to the method,
            or a ``*_env`` value is not a variable name.
    """

    method: AuthMethod = attrs.field(
        validator=one_of("bearer", "basic", "client_credentials", "authorization_code")
    )
    token_env: str | None = attrs.field(default=None, validator=_env_name)
    username: str | None = attrs.field(default=None, validator=_optional_text)
    password_env: str | None = attrs.field(default=None, validator=_env_name)
    client_id: str | None = attrs.field(default=None, validator=_optional_text)
    client_secret_env: str | None = attrs.field(default=None, validator=_env_name)
    scope: str | None = attrs.field(default=None, validator=_optional_text)
    issuer: str | None = attrs.field(default=None, validator=_optional_text)
    token_endpoint_auth_method: Literal["client_secret_basic", "client_secret_post"] | None = attrs.field(
        default=None, validator=attrs.validators.optional(one_of("client_secret_basic", "client_secret_post"))
    )
    redirect_uri: str | None = attrs.field(default=None, validator=_optional_text)
    client_metadata_url: str | None = attrs.field(default=None, validator=_optional_text)
    client_name: str | None = attrs.field(default=None, validator=_optional_text)
    token_store: TokenStore | None = attrs.field(
        default=None, validator=attrs.validators.optional(one_of("file", "memory"))
    )
    token_dir: str | None = attrs.field(default=None, validator=_optional_text)

    def __attrs_post_init__(self) -> None:
        for key in _REQUIRED[self.method]:
            if getattr(self, key) is None:
                raise RMCPConfigError(f"the {self.method!r} method needs {key!r}", path=key)
        for field in attrs.fields(AuthConfig):
            unused = field.name != "method" and field.name not in _ALLOWED[self.method]
            if unused and getattr(self, field.name) is not None:
                raise RMCPConfigError(
                    f"{field.name!r} does not apply to the {self.method!r} method "
                    f"(it reads {', '.join(sorted(_ALLOWED[self.method]))})",
                    path=field.name,
                )
        if self.redirect_uri is not None and not self.redirect_uri.startswith(
            ("http://127.0.0.1:", "http://localhost:", "http://[::1]:")
        ):
            raise RMCPConfigError(
                "must be a loopback URL with a port (http://127.0.0.1:<port>/<path>): the runtime "
                f"listens there for the authorization server's redirect, got {self.redirect_uri!r}",
                path="redirect_uri",
            )

    @property
    def effective_redirect_uri(self) -> str:
        """The redirect URI of the authorization code flow (a default loopback one if unset)."""
        return self.redirect_uri or _DEFAULT_REDIRECT_URI


def check_no_inline_secret(table: object) -> None:
    """Refuse an auth table that writes a secret inline (before structuring, which would call
    it an unknown key without saying why).

    Raises:
        RMCPConfigError: ``path`` names the key; the message never quotes its value.
    """
    if not isinstance(table, dict):
        return
    for key in table:  # pyright: ignore[reportUnknownVariableType]
        if key in INLINE_SECRET_KEYS:
            instead = INLINE_SECRET_KEYS[key]
            raise RMCPConfigError(
                f"secrets are never written in the configuration: put it in an environment variable "
                f'and name the variable with {instead!r} (e.g. {instead} = "MCP_SECRET")',
                path=str(key),  # pyright: ignore[reportUnknownArgumentType]
            )
