"""The public namespace: everything re-exported, documented, typed, and shown as rmcp_actors.X."""

from __future__ import annotations

import importlib.metadata
import inspect
from pathlib import Path

import pytest

import rmcp_actors
from rmcp_actors import errors, lowlevel

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


def test_all_lists_exactly_the_public_names() -> None:
    assert set(rmcp_actors.__all__) == {*PUBLIC_OBJECTS, "__version__"}


@pytest.mark.parametrize("namespace", ["lowlevel", "runtime", "server", "stores", "testing"])
def test_each_namespace_lists_its_names(namespace: str) -> None:
    module = importlib.import_module(f"rmcp_actors.{namespace}")
    assert module.__all__
    for name in module.__all__:
        assert inspect.getdoc(getattr(module, name)), f"rmcp_actors.{namespace}.{name} has no docstring"


def test_version_is_the_installed_distributions() -> None:
    assert rmcp_actors.__version__ == importlib.metadata.version("rmcp-actors")


def test_install_is_exported_beside_fast_rmcp() -> None:
    assert rmcp_actors.install is rmcp_actors.server.install
    assert "install" in rmcp_actors.__all__
    assert "FastRMCP" in rmcp_actors.__all__


def test_lowlevel_names_are_documented_and_shown_under_their_namespace() -> None:
    for name in lowlevel.__all__:
        value = getattr(lowlevel, name)
        assert inspect.getdoc(value), f"lowlevel.{name} has no docstring"
        assert value.__module__ == "rmcp_actors.lowlevel", name
        assert name not in rmcp_actors.__all__, f"{name} is not everyday API: keep it in lowlevel only"
