# pyright: strict
"""Masking of secrets in what the library shows: reprs, error messages, logs.

A server spec carries credentials: a password or token in its URL, HTTP headers, environment
variables, command-line arguments such as ``--api-key X``. The spec keeps the real values (they
are what the connection uses); everything *shown* goes through this module: :func:`mask_url`
and :func:`mask_args` rewrite a URL or an argument list with the secret parts replaced by
``***``, and :func:`scrub` removes known secret values from free text (an exception's message,
which may quote a URL or an argument).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

__all__ = [
    "MASK",
    "URLMaskingFilter",
    "mask_args",
    "mask_mapping",
    "mask_url",
    "scrub",
    "secrets_of_args",
    "secrets_of_url",
]

MASK: Final = "***"

# Shorter values are too common in ordinary text ("on", "1", "yes") to be erased from it:
# they are still masked in reprs and descriptions, where their position is known.
_MIN_SCRUB_LENGTH: Final = 4

# A flag or variable whose name says it holds a secret (--api-key, --token=, DB_PASSWORD=).
_SECRET_NAME: Final = re.compile(
    r"(?:^|[-_.])(?:token|secret|passw(?:or)?d|pwd|pass|api[-_]?key|apikey|key|auth|authorization|"
    r"credentials?|bearer|cookie|session|signature|sig|private[-_]?key|access[-_]?key)(?:$|[-_.])",
    re.IGNORECASE,
)
# Values that look like credentials whatever flag carries them.
_TOKEN: Final = re.compile(
    r"\b(?:sk|pk|rk)[-_](?:live_|test_|proj-|ant-)?[A-Za-z0-9_-]{16,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}|\bAKIA[0-9A-Z]{16}\b|\bAIza[0-9A-Za-z_-]{30,}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"
)
# A long run of letters and digits (both) reads as a key, not a word or a path. "/" ends a run:
# paths with a digit somewhere ("/srv/app2/...") are far more common in a command line than
# standard-base64 keys, whose 32-character pieces are still masked.
_OPAQUE: Final = re.compile(
    r"(?<![A-Za-z0-9_+=-])(?=[A-Za-z0-9_+=-]*[0-9])(?=[A-Za-z0-9_+=-]*[A-Za-z])[A-Za-z0-9_+=-]{32,}"
    r"(?![A-Za-z0-9_+=-])"
)
_FLAG: Final = re.compile(r"(-{1,2}[A-Za-z][A-Za-z0-9_.-]*)(=)(.*)", re.DOTALL)
_ASSIGNMENT: Final = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*)(=)(.*)", re.DOTALL)


def _secret_name(name: str) -> bool:
    return _SECRET_NAME.search(name.lstrip("-")) is not None


def _secret_value(value: str) -> bool:
    return _TOKEN.search(value) is not None or _OPAQUE.search(value) is not None


def mask_url(url: str) -> str:
    """``url`` with its password (or a user-only token) and secret query values masked.

    ``https://user:pw@host/p?token=abc&page=2`` becomes
    ``https://user:***@host/p?token=***&page=2``.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return _TOKEN.sub(MASK, url)
    netloc = parts.netloc
    if "@" in netloc:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if port is not None:
            host = f"{host}:{port}"
        user = MASK if parts.password is None else quote(unquote(parts.username or ""), safe="")
        netloc = f"{user}:{MASK}@{host}" if parts.password is not None else f"{user}@{host}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(_secret_name(k) or _secret_value(v) for k, v in pairs):
        query = urlencode(
            [(k, MASK if _secret_name(k) or _secret_value(v) else v) for k, v in pairs], safe="*"
        )
    return urlunsplit((parts.scheme, netloc, _TOKEN.sub(MASK, parts.path), query, parts.fragment))


def secrets_of_url(url: str) -> list[str]:
    """The secret parts of ``url`` (as written and decoded), for :func:`scrub`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _TOKEN.findall(url)
    found: list[str] = []
    if parts.password is not None:
        found.append(parts.password)
    elif parts.username is not None:
        found.append(parts.username)
    found.extend(
        v for k, v in parse_qsl(parts.query, keep_blank_values=True) if _secret_name(k) or _secret_value(v)
    )
    found.extend(_TOKEN.findall(parts.path))
    return [form for value in found for form in {value, unquote(value), quote(value, safe="")}]


def _mask_arg(arg: str, after_secret_flag: bool) -> str:
    if after_secret_flag and not arg.startswith("-"):
        return MASK
    if "://" in arg:
        return mask_url(arg)
    for pattern in (_FLAG, _ASSIGNMENT):
        if (match := pattern.fullmatch(arg)) is not None:
            name, _, value = match.groups()
            if _secret_name(name) or _secret_value(value):
                return f"{name}={MASK}"
            return f"{name}={_mask_arg(value, False)}" if "://" in value else arg
    if _OPAQUE.fullmatch(arg):
        return MASK
    return _OPAQUE.sub(MASK, _TOKEN.sub(MASK, arg))


def mask_args(args: Sequence[str]) -> tuple[str, ...]:
    """``args`` with secret-looking values masked.

    Masked: the value of a flag named like a secret (``--token=X``, ``--api-key X``), of an
    assignment ``API_KEY=X``, a URL's password and secret query values, and values that look
    like credentials (``sk-...``, ``ghp_...``, JWTs, long opaque keys).
    """
    masked: list[str] = []
    previous = ""
    for arg in args:
        flag = previous.startswith("-") and "=" not in previous and _secret_name(previous)
        masked.append(_mask_arg(arg, flag))
        previous = arg
    return tuple(masked)


def secrets_of_args(args: Sequence[str]) -> list[str]:
    """The values :func:`mask_args` hides, for :func:`scrub`."""
    found: list[str] = []
    for arg, masked in zip(args, mask_args(args), strict=True):
        if arg == masked:
            continue
        if "://" in arg:
            found.extend(secrets_of_url(arg[arg.index("=") + 1 :] if "=" in arg.split("://")[0] else arg))
        elif masked == MASK:
            found.append(arg)
        elif masked.endswith(f"={MASK}"):
            found.append(arg.partition("=")[2])
        found.extend(_TOKEN.findall(arg))
        found.extend(_OPAQUE.findall(arg))
    return found


def mask_mapping(mapping: Mapping[str, str]) -> dict[str, str]:
    """``mapping`` with every value masked (headers, environment: all may hold credentials)."""
    return dict.fromkeys(mapping, MASK)


def _forms(secret: str) -> Iterator[str]:
    """The ways a message may quote ``secret``: as is, without surrounding whitespace (a token
    read from a file keeps its newline, which a message may drop), and escaped as a ``str`` or
    ``bytes`` repr (h11: ``Illegal header value b'Bearer tok\\n'``)."""
    for value in {secret, secret.strip()}:
        yield value
        yield repr(value)[1:-1]
        yield repr(value.encode("utf-8", "backslashreplace"))[2:-1]


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret (of 4 characters or more) masked, whether
    quoted as is, stripped of surrounding whitespace, or repr-escaped."""
    forms = {form for secret in secrets for form in _forms(secret) if len(form) >= _MIN_SCRUB_LENGTH}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MASK)
    return _TOKEN.sub(MASK, text)


_URL_IN_TEXT: Final = re.compile(r"https?://[^\s\"'<>]+")


class URLMaskingFilter(logging.Filter):
    """A logging filter that masks the secrets of every URL in a record (see :func:`mask_url`).

    For loggers of libraries under the transport that print request URLs (``httpx2`` at INFO,
    the SDK's streamable HTTP client at DEBUG), where a query-string token cannot be kept out
    of the URL. The message, a logged exception's traceback (``exc_info=True``: httpx's
    ``HTTPStatusError`` quotes the URL) and the stack are masked. A record without such a URL
    passes unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = _mask_urls(message)
        if masked != message:
            record.msg, record.args = masked, None
        traceback = record.exc_text
        if not traceback and record.exc_info is not None and record.exc_info[0] is not None:
            traceback = logging.Formatter().formatException(record.exc_info)
        if traceback:
            masked = _mask_urls(traceback)
            if masked != traceback:
                # Formatters print exc_text as it is; the exception itself is dropped, since a
                # handler that formats exc_info again (or reads the exception) would print the URL.
                record.exc_text, record.exc_info = masked, None
        if record.stack_info:
            record.stack_info = _mask_urls(record.stack_info)
        return True


def _mask_urls(text: str) -> str:
    return _URL_IN_TEXT.sub(lambda match: mask_url(match.group()), text)
