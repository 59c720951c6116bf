"""Every RMCPError subclass survives pickling with all its fields (process pools, batch agents)."""

from __future__ import annotations

import copy
import importlib
import multiprocessing
import pickle
import pkgutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

import rmcp_actors
from rmcp_actors.errors import RMCPError, RMCPNackError
from rmcp_actors.lifecycle import LifecycleEvent, RequestState

CONTEXT: dict[str, Any] = {
    "server": "srv",
    "tool": "tool",
    "request_id": "req-1",
    "idempotency_key": "key-1",
    "may_have_executed": True,
}

# Classes with an __init__ of their own: how to build one with every field set. A subclass
# inheriting RMCPError's __init__ is built from CONTEXT; one inheriting another's uses its entry.
EXAMPLES: dict[str, Callable[[Any], RMCPError]] = {
    "RMCPConfigError": lambda cls: cls("must be positive", path="servers.a.retry.max_attempts"),
    "RMCPServerError": lambda cls: cls(-32050, "tool exploded", {"why": ["nested"]}, **CONTEXT),
    "RMCPNackError": lambda cls: cls("overloaded", "busy", retryable=True, retry_after_ms=250, **CONTEXT),
    "RMCPSupervisorError": lambda cls: cls("connections escalated", actor="connection:a"),
    "RMCPActorStoppedError": lambda cls: cls("crashed", actor="connection:a", **CONTEXT),
    "RMCPStoreError": lambda cls: cls("database is locked", operation="begin", **CONTEXT),
    "RMCPDeadlockError": lambda cls: cls(
        "would wait forever", lane="server 'a'", chain=("a/outer",), **CONTEXT
    ),
    "RMCPCircuitOpenError": lambda cls: cls(
        "open", half_open_at=12.5, retry_after_s=3.0, server_wide=True, **CONTEXT
    ),
    "RMCPTransactionError": lambda cls: cls(
        "timed out", transaction_id="t1", name="book", state="compensated"
    ),
    "RMCPCompensationError": lambda cls: cls(
        "undo failed", failed_steps=(2, 0), transaction_id="t1", name="book", state="compensation_failed"
    ),
    "RMCPTransactionInDoubtError": lambda cls: cls(
        "in doubt", step=1, transaction_id="t1", name="book", state="in_doubt", **CONTEXT
    ),
}


def _all_subclasses(cls: type[RMCPError]) -> list[type[RMCPError]]:
    found: list[type[RMCPError]] = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_subclasses(sub)]
    return list(dict.fromkeys(found))


def _load_every_module() -> None:
    # Error classes defined outside errors.py exist only once their module is imported.
    for module in pkgutil.walk_packages(rmcp_actors.__path__, "rmcp_actors."):
        importlib.import_module(module.name)


_load_every_module()
CLASSES = [RMCPError, *_all_subclasses(RMCPError)]


def _init_owner(cls: type[RMCPError]) -> type:
    return next(base for base in cls.__mro__ if "__init__" in vars(base))


def example(cls: type[RMCPError]) -> RMCPError:
    owner = _init_owner(cls)
    if owner is RMCPError:
        error = cls("what happened and what to do", **CONTEXT)
    else:
        build = EXAMPLES.get(owner.__name__)
        assert build is not None, (
            f"{owner.__module__}.{owner.__name__} has its own __init__: add an example of it to "
            "EXAMPLES in tests/test_errors_pickle.py"
        )
        error = build(cls)
    error.lifecycle = (
        LifecycleEvent(RequestState.QUEUED, 0, 1.5),
        LifecycleEvent(RequestState.SENT, 1, 2.0, "x"),
    )
    error.add_note("a note added on the way up")
    return error


def fields(error: BaseException) -> dict[str, Any]:
    return {"type": type(error), "args": error.args, "str": str(error), **vars(error)}


def test_the_walk_finds_the_known_classes() -> None:
    names = {cls.__name__ for cls in CLASSES}
    assert {"RMCPNackError", "RMCPIdempotencyConflictError", "RMCPTimeoutAfterSendError"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_pickles_with_all_its_fields(cls: type[RMCPError]) -> None:
    error = example(cls)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        restored = pickle.loads(pickle.dumps(error, protocol=protocol))
        assert fields(restored) == fields(error)
        assert (restored.outcome, restored.may_have_executed) == (error.outcome, error.may_have_executed)
    assert fields(copy.deepcopy(error)) == fields(error)


def _raise_a_nack() -> None:
    raise example(RMCPNackError)


def test_an_error_raised_in_a_worker_process_arrives_whole() -> None:
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"))
    with pool, pytest.raises(RMCPNackError) as caught:
        pool.submit(_raise_a_nack).result(timeout=30)
    expected = fields(example(RMCPNackError))
    # The pool chains the worker's formatted traceback as the cause; the fields are what matter.
    assert fields(caught.value) == expected
