"""The public namespace: everything re-exported, documented, typed, and shown as rmcp_actors.X."""

from __future__ import annotations

import inspect
from pathlib import Path

import rmcp_actors
from rmcp_actors import errors

PUBLIC = {name: value for name, value in vars(rmcp_actors).items() if not name.startswith("_")}
PUBLIC_OBJECTS = {name: value for name, value in PUBLIC.items() if not inspect.ismodule(value)}


def test_every_public_object_is_documented_and_shown_under_the_package() -> None:
    assert len(PUBLIC_OBJECTS) >= 30
    for name, value in PUBLIC_OBJECTS.items():
        assert inspect.getdoc(value), f"{name} has no docstring"
        assert value.__module__ == "rmcp_actors", name


def test_every_error_class_is_exported() -> None:
    defined = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, errors.RMCPError)
    }
    assert defined <= set(PUBLIC_OBJECTS)
    assert set(errors.__all__) <= set(PUBLIC_OBJECTS)


def test_public_methods_of_the_supervisor_are_documented() -> None:
    supervisor = rmcp_actors.RMCPSupervisor
    for name, member in inspect.getmembers(supervisor):
        if not name.startswith("_") and callable(member):
            assert inspect.getdoc(member), f"RMCPSupervisor.{name} has no docstring"


def test_package_is_marked_typed() -> None:
    assert (Path(rmcp_actors.__file__).parent / "py.typed").exists()


def test_timeout_after_send_is_both_a_timeout_and_an_unknown_outcome() -> None:
    error = rmcp_actors.RMCPTimeoutAfterSendError("late")
    assert isinstance(error, rmcp_actors.RMCPTimeoutError)
    assert isinstance(error, rmcp_actors.RMCPOutcomeUnknownError)
    assert error.may_have_executed is True
    assert rmcp_actors.RMCPTimeoutError("early").may_have_executed is False
