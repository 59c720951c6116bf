"""Idempotency keys are scoped to the authenticated principal (issue 7, section 4).

A real Streamable HTTP server on 127.0.0.1 that verifies bearer tokens (a ``TokenVerifier``,
as a resource server has), and the runtime as its clients, each with its own token.
"""

from __future__ import annotations

import trio
from _http import serve_http
from conftest import FAST_RECOVERY
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken, principal_components
from mcp.server.auth.settings import AuthSettings
from mcp.server.request_state import compact_json
from pydantic import AnyHttpUrl

from rmcp_actors import FastRMCP, MemoryStore, RMCPSupervisor, ServerSpec
from rmcp_actors._protocol import fingerprint
from rmcp_actors.server import InDoubtRun, Reconciliation, store_key
from rmcp_actors.stores import OwnerInfo

TOKENS = {
    "token-alice": AccessToken(token="token-alice", client_id="agent", scopes=[], subject="alice"),
    "token-bob": AccessToken(token="token-bob", client_id="agent", scopes=[], subject="bob"),
}


class Verifier:
    """Accepts the two tokens above, nothing else."""

    async def verify_token(self, token: str) -> AccessToken | None:
        return TOKENS.get(token)


def build_app(runs: list[str]) -> FastRMCP:
    app = FastRMCP(
        "bank",
        store=MemoryStore(),
        token_verifier=Verifier(),
        auth=AuthSettings(issuer_url=AnyHttpUrl("https://auth.example"), resource_server_url=None),
    )

    @app.tool()
    async def pay(amount: int) -> str:
        token = get_access_token()
        payer = token.subject if token is not None else "nobody"
        runs.append(f"{payer}:{amount}")
        return f"{payer} paid {amount}"

    return app


def as_user(name: str, url: str) -> ServerSpec:
    return ServerSpec.http(
        name, url, headers={"Authorization": f"Bearer token-{name}"}, overrides=FAST_RECOVERY
    )


async def test_another_principal_presenting_a_key_neither_replays_nor_learns_of_it() -> None:
    runs: list[str] = []
    app = build_app(runs)
    async with serve_http(app) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(as_user("alice", http.url))
        await sup.add_server(as_user("bob", http.url))
        first = await sup.call("alice", "pay", {"amount": 5}, idempotency_key="order-1", timeout=10)
        # Bob replays Alice's key and arguments: he gets a run of his own, not her result.
        same = await sup.call("bob", "pay", {"amount": 5}, idempotency_key="order-1", timeout=10)
    assert (first.text, first.duplicate) == ("alice paid 5", False)
    assert (same.text, same.duplicate) == ("bob paid 5", False)
    assert runs == ["alice:5", "bob:5"]


async def test_a_conflict_is_reported_only_within_one_principal() -> None:
    runs: list[str] = []
    app = build_app(runs)
    async with serve_http(app) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(as_user("alice", http.url))
        await sup.add_server(as_user("bob", http.url))
        await sup.call("alice", "pay", {"amount": 5}, idempotency_key="order-1", timeout=10)
        # Other arguments under her key: a conflict would tell Bob that the key exists.
        bob = await sup.call("bob", "pay", {"amount": 6}, idempotency_key="order-1", timeout=10)
    assert bob.text == "bob paid 6"
    assert runs == ["alice:5", "bob:6"]


async def test_a_reconnecting_client_gets_its_replay_on_a_new_session() -> None:
    runs: list[str] = []
    app = build_app(runs)
    async with serve_http(app) as http:
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(as_user("alice", http.url))
            first = await sup.call("alice", "pay", {"amount": 5}, idempotency_key="order-1", timeout=10)
        # A new client process: a new MCP session, the same credential.
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(as_user("alice", http.url))
            again = await sup.call("alice", "pay", {"amount": 5}, idempotency_key="order-1", timeout=10)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.text == "alice paid 5"
    assert runs == ["alice:5"]


async def test_a_run_in_flight_is_not_joined_by_another_principal() -> None:
    """In-flight duplicates wait for the first run's result: only the same principal's do."""
    runs: list[str] = []
    app = build_app(runs)
    release = trio.Event()

    @app.tool()
    async def slow_pay(amount: int) -> str:
        token = get_access_token()
        payer = token.subject if token is not None else "nobody"
        runs.append(f"{payer}:{amount}")
        await release.wait()
        return f"{payer} paid {amount}"

    texts: dict[str, str] = {}
    async with serve_http(app) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(as_user("alice", http.url))
        await sup.add_server(as_user("bob", http.url))

        async def call(user: str) -> None:
            result = await sup.call(user, "slow_pay", {"amount": 5}, idempotency_key="order-1", timeout=10)
            texts[user] = result.text

        async with trio.open_nursery() as nursery:
            try:
                nursery.start_soon(call, "alice")
                with trio.fail_after(5):
                    while not runs:
                        await trio.sleep(0.01)
                nursery.start_soon(call, "bob")
                with trio.fail_after(5):
                    while len(runs) < 2:
                        await trio.sleep(0.01)
            finally:
                release.set()
    assert texts == {"alice": "alice paid 5", "bob": "bob paid 5"}


async def test_a_reconciler_is_told_the_principal_of_the_in_doubt_key() -> None:
    """Keys are scoped to principals; a reconciler looking a run up by its key must look within
    the caller's principal, or it could report (and replay) another principal's run."""
    runs: list[str] = []
    app = build_app(runs)
    asked: list[InDoubtRun] = []

    async def look_up(run: InDoubtRun) -> Reconciliation:
        asked.append(run)
        return Reconciliation.did_not_run()

    app.rmcp.reconcilers["pay"] = look_up
    alice = compact_json(principal_components(TOKENS["token-alice"]))
    store = app.rmcp.store
    # Alice's run of order-1 is in doubt: its server claimed the key, entered the tool, died.
    await store.register_owner(OwnerInfo(instance_id="crashed", pid=1, host="elsewhere"), lease_s=30)
    key = store_key("order-1", alice)
    assert (
        await store.begin(key, fingerprint=fingerprint("pay", {"amount": 5}), tool="pay", owner="crashed")
    ).claimed
    assert await store.mark_entered(key, owner="crashed")
    await store.release_owner("crashed")
    async with serve_http(app) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(as_user("alice", http.url))
        result = await sup.call("alice", "pay", {"amount": 5}, idempotency_key="order-1", timeout=10)
    assert result.text == "alice paid 5"
    assert [(run.idempotency_key, run.principal) for run in asked] == [("order-1", alice)]
