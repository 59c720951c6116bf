"""Races and failures of the RMCP server side found in review, each shown with real parts.

In memory with MockClock where timing is the point; with SQLite (real time) where its
worker threads and locks are.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, cast

import anyio
import mcp
import pytest
import trio
import trio.testing
from conftest import durable_store
from mcp_types import RequestParamsMeta

from rmcp_actors import (
    FastRMCP,
    MemoryStore,
    PolicyOverrides,
    RetryOverrides,
    RMCPConfigError,
    RMCPStoreClosedError,
    RMCPSupervisor,
    ServerSpec,
    SQLiteStore,
)
from rmcp_actors._protocol import ServerSettings
from rmcp_actors.client.call import _check_dedup_still_covers, _Progress  # pyright: ignore[reportPrivateUsage]
from rmcp_actors.errors import RMCPOutcomeUnknownError
from rmcp_actors.flow._loop import EventLoop
from rmcp_actors.server import InDoubtRun, Reconciliation, store_key
from rmcp_actors.stores import BeginOutcome, DedupRecord


def meta(key: str, attempt: int = 1) -> RequestParamsMeta:
    return cast(
        RequestParamsMeta,
        {"rmcp": {"version": "0.2", "request_id": "r", "attempt": attempt, "idempotency_key": key}},
    )


def answer(result: Any) -> str:
    rmcp = result.meta["rmcp"]
    return rmcp.get("code") or ("duplicate" if rmcp["duplicate"] else "ran")


def hold_write_lock(path: Path, seconds: float) -> threading.Thread:
    """Another process's write transaction on the file, for ``seconds``."""

    def hold() -> None:
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        connection.execute("COMMIT")
        connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    return thread


@pytest.mark.parametrize("checkpoints", range(8))
async def test_duplicate_arriving_as_the_first_run_ends_is_never_stranded(
    checkpoints: int, autojump_clock: trio.testing.MockClock
) -> None:
    """The duplicate sends its early ACK (an await) after it found the run: the run may end
    meanwhile, and the duplicate must still be woken."""
    app = FastRMCP("t", store=MemoryStore(clock=trio.current_time))
    runs: list[int] = []

    @app.tool()
    async def pay(amount: int) -> str:
        runs.append(amount)
        for _ in range(checkpoints):
            await trio.lowlevel.checkpoint()
        return "paid"

    answers: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        pass

    async with mcp.Client(app, mode="legacy") as client, trio.open_nursery() as nursery:

        async def call(attempt: int) -> None:
            with trio.fail_after(100):
                result = await client.call_tool(
                    "pay", {"amount": 5}, meta=meta("k", attempt), progress_callback=on_progress
                )
            answers.append(answer(result))

        nursery.start_soon(call, 1)
        await trio.lowlevel.checkpoint()
        nursery.start_soon(call, 2)
    assert sorted(answers) == ["duplicate", "ran"]
    assert runs == [5]


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_local_duplicates_of_a_completed_key_wait_on_a_slow_claim_not_in_doubt(
    tmp_path: Path, backend: str
) -> None:
    """The first handler found the key completed (it did not claim it): those waiting on it
    must look again, not report the key in doubt."""
    path = tmp_path / "rmcp.sqlite"

    async def main() -> dict[int, str]:
        app = FastRMCP("t", store=SQLiteStore(path))

        @app.tool()
        async def pay(amount: int) -> str:
            return f"paid {amount}"

        answers: dict[int, str] = {}
        async with mcp.Client(app) as client:
            answers[1] = answer(await client.call_tool("pay", {"amount": 5}, meta=meta("k", 1)))
            holder = hold_write_lock(path, 0.2)
            await anyio.sleep(0.02)

            async def duplicate(attempt: int) -> None:
                answers[attempt] = answer(
                    await client.call_tool("pay", {"amount": 5}, meta=meta("k", attempt))
                )

            async with anyio.create_task_group() as group:
                group.start_soon(duplicate, 2)
                group.start_soon(duplicate, 3)
            holder.join()
        return answers

    assert anyio.run(main, backend=backend) == {1: "ran", 2: "duplicate", 3: "duplicate"}


class FailingResults:
    """A MemoryStore whose writes after a claim fail (a broken disk, say)."""

    def __init__(self) -> None:
        self.inner = MemoryStore(clock=trio.current_time)

    @property
    def durable(self) -> bool:
        return False

    async def complete(self, key: str, *, owner: str, result: bytes) -> None:
        raise OSError("disk I/O error")

    async def mark_in_doubt(self, key: str, *, owner: str) -> None:
        raise OSError("disk I/O error")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_store_that_cannot_record_the_outcome_leaves_no_retry_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store: Any = FailingResults()
    app = FastRMCP("t", store=store)
    runs: list[int] = []

    @app.tool()
    async def pay(amount: int) -> str:
        runs.append(amount)
        return "paid"

    async with mcp.Client(app) as client:
        first = await client.call_tool("pay", {"amount": 5}, meta=meta("k", 1))
        with trio.fail_after(10):
            retry = await client.call_tool("pay", {"amount": 5}, meta=meta("k", 2))
    # The caller got the result; a retry cannot know it and says so instead of waiting.
    assert (answer(first), answer(retry)) == ("ran", "in_doubt")
    assert runs == [5]


class SlowClaims:
    """A MemoryStore whose claims wait until the test lets them through."""

    def __init__(self) -> None:
        self.inner = MemoryStore(clock=trio.current_time)
        self.release = trio.Event()
        self.released_owners: list[str] = []

    @property
    def durable(self) -> bool:
        return False

    async def begin(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome:
        await self.release.wait()
        return await self.inner.begin(key, fingerprint=fingerprint, tool=tool, owner=owner, entered=entered)

    async def release_owner(self, instance_id: str) -> None:
        self.released_owners.append(instance_id)
        await self.inner.release_owner(instance_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_drain_waits_for_a_call_still_claiming_its_key(autojump_clock: trio.testing.MockClock) -> None:
    store = SlowClaims()
    app = FastRMCP("t", store=cast(Any, store))

    @app.tool()
    async def pay(amount: int) -> str:
        return "paid"

    drained = trio.Event()
    async with mcp.Client(app) as client, trio.open_nursery() as nursery:
        nursery.start_soon(lambda: client.call_tool("pay", {"amount": 5}, meta=meta("k")))
        await trio.testing.wait_all_tasks_blocked()

        async def drain() -> None:
            await app.rmcp.drain(timeout_s=50)
            drained.set()

        nursery.start_soon(drain)
        await trio.sleep(10)
        # The call was admitted before the drain: the owner is not released under it.
        assert not drained.is_set()
        assert store.released_owners == []
        store.release.set()
        await drained.wait()
    assert store.released_owners == [app.rmcp.instance_id]
    assert app.rmcp.statistics().executed == 1


@pytest.mark.parametrize(
    ("lost_on", "now", "covered"),
    [
        (
            ServerSettings(features=["dedup"], instance_id="a"),
            ServerSettings(features=["dedup"], instance_id="a"),
            True,
        ),
        (
            ServerSettings(features=["dedup"], instance_id="a"),
            ServerSettings(features=["dedup"], instance_id="b"),
            False,
        ),
        (
            ServerSettings(features=["dedup"], durable=True, instance_id="a"),
            ServerSettings(features=["dedup"], durable=True, instance_id="b"),
            True,
        ),
        # A durable store before the restart and a memory store after: the keys are gone.
        (
            ServerSettings(features=["dedup"], durable=True, instance_id="a"),
            ServerSettings(features=["dedup"], durable=False, instance_id="b"),
            False,
        ),
        # Servers that name no instance are never taken to be the same one.
        (ServerSettings(features=["dedup"]), ServerSettings(features=["dedup"]), False),
        (ServerSettings(features=["dedup"], durable=True, instance_id="a"), None, False),
    ],
)
def test_a_retry_after_a_lost_answer_needs_the_same_keys(
    lost_on: ServerSettings, now: ServerSettings | None, covered: bool
) -> None:
    progress = _Progress(request=cast(Any, None), loop=EventLoop())
    if covered:
        _check_dedup_still_covers(lost_on, now, progress)
    else:
        with pytest.raises(RMCPOutcomeUnknownError):
            _check_dedup_still_covers(lost_on, now, progress)


async def test_a_run_outliving_the_ttl_is_not_claimed_again_by_another_instance(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two server instances on one store (two processes on one SQLite file, here in memory)."""
    store = MemoryStore(ttl_s=5, clock=trio.current_time)
    runs: list[str] = []
    apps = [FastRMCP(name, store=store) for name in ("a", "b")]
    for app in apps:

        @app.tool()
        async def pay(amount: int) -> str:
            runs.append("run")
            await trio.sleep(20)
            return "paid"

    answers: list[str] = []
    async with mcp.Client(apps[0]) as first, mcp.Client(apps[1]) as second, trio.open_nursery() as nursery:

        async def call(client: mcp.Client, attempt: int) -> None:
            answers.append(answer(await client.call_tool("pay", {"amount": 5}, meta=meta("k", attempt))))

        nursery.start_soon(call, first, 1)
        await trio.sleep(10)  # the record's TTL has passed; its owner is alive and running it
        nursery.start_soon(call, second, 2)
    assert runs == ["run"]
    assert sorted(answers) == ["duplicate", "ran"]


async def test_an_owner_purged_by_another_process_registers_again(tmp_path: Path) -> None:
    path = tmp_path / "rmcp.sqlite"
    app = FastRMCP("t", store=SQLiteStore(path))

    @app.tool()
    async def pay(amount: int) -> str:
        return "paid"

    side = app.rmcp
    async with mcp.Client(app) as client:
        await client.call_tool("pay", {"amount": 5}, meta=meta("k"))
        with sqlite3.connect(path) as other:
            other.execute("DELETE FROM owners")
        await side._renew()  # pyright: ignore[reportPrivateUsage]
        store = side.store
        await store.begin("probe", fingerprint="f", tool="pay", owner=side.instance_id)
        record = await store.get("probe")
    assert isinstance(record, DedupRecord)
    assert record.owner_alive is True


async def test_a_server_whose_lease_lapsed_renews_it_and_runs_the_call_once(tmp_path: Path) -> None:
    """The store's clock passes the lease (the process was paused, or its renewals failed)
    while the server believes it fresh: its claim cannot be entered until it renews, and the
    call must neither spin on the refused mark nor run twice."""
    now = [1_700_000_000.0]
    app = FastRMCP("t", store=SQLiteStore(tmp_path / "rmcp.sqlite", clock=lambda: now[0]), lease_s=30)
    runs: list[int] = []

    @app.tool()
    async def pay(amount: int) -> str:
        runs.append(amount)
        return "paid"

    async with mcp.Client(app) as client:
        assert answer(await client.call_tool("pay", {"amount": 1}, meta=meta("k1"))) == "ran"
        now[0] += 31
        with trio.fail_after(10):
            assert answer(await client.call_tool("pay", {"amount": 2}, meta=meta("k2"))) == "ran"
        assert answer(await client.call_tool("pay", {"amount": 2}, meta=meta("k2", 2))) == "duplicate"
    assert runs == [1, 2]


async def test_a_server_whose_marks_are_refused_after_renewing_answers_unavailable(tmp_path: Path) -> None:
    """Released in the store behind its back, an instance's renewals change nothing and every
    entered mark is refused: the call must end with the retryable NACK, not loop on the store."""
    path = tmp_path / "rmcp.sqlite"
    app = FastRMCP("t", store=SQLiteStore(path))
    runs: list[int] = []

    @app.tool()
    async def pay(amount: int) -> str:
        runs.append(amount)
        return "paid"

    async with mcp.Client(app) as client:
        assert answer(await client.call_tool("pay", {"amount": 1}, meta=meta("k1"))) == "ran"
        with sqlite3.connect(path) as other:
            other.execute("UPDATE owners SET released = 1")
        with trio.fail_after(10):
            result = await client.call_tool("pay", {"amount": 2}, meta=meta("k2"))
    assert result.meta is not None
    assert (answer(result), result.meta["rmcp"]["retryable"]) == ("unavailable", True)
    assert runs == [1]


async def test_no_ack_timeout_on_the_in_process_direct_wire(autojump_clock: trio.testing.MockClock) -> None:
    """The direct wire's requests carry no progress token, so no early ACK can come back:
    the client must not wait for one (it would retry a healthy call until attempts ran out)."""
    app = FastRMCP("t", store=durable_store())

    @app.tool()
    async def pay(amount: int) -> str:
        return "paid"

    async def slow_to_start(ctx: Any, call_next: Any) -> Any:
        # Before the RMCP side, as a busy server would be: no ACK could come for 5 s anyway.
        if ctx.method == "tools/call":
            await trio.sleep(5)
        return await call_next(ctx)

    app.middleware.insert(0, slow_to_start)
    policy = PolicyOverrides(ack_timeout_s=1)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("t", app, wire="direct", overrides=policy))
        result = await sup.call("t", "pay", {"amount": 5}, timeout=60)
    assert result.attempts == 1
    assert app.rmcp.statistics().executed == 1


# --- Store failures before the claim, refusals, and the store's lifetime (issue 7, section 3) ---


def nack_of(result: Any) -> dict[str, Any]:
    return result.meta["rmcp"]


async def write_lock_held(path: Path, seconds: float) -> threading.Thread:
    """Another process's write transaction on the file, for ``seconds`` from now on."""
    locked = threading.Event()

    def hold() -> None:
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(seconds)
        connection.execute("COMMIT")
        connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    await trio.to_thread.run_sync(locked.wait)
    return thread


async def test_a_store_failing_before_the_claim_is_a_retryable_nack(tmp_path: Path) -> None:
    """A locked SQLite file fails the claim: nothing ran, so the answer is "retry", not a
    JSON-RPC -32603 that a client must read as "may have run"."""
    path = tmp_path / "rmcp.sqlite"
    app = FastRMCP("t", store=SQLiteStore(path, busy_timeout_s=0.05))
    runs: list[int] = []

    @app.tool()
    async def pay(amount: int) -> str:
        runs.append(amount)
        return "paid"

    async with mcp.Client(app) as client:
        await client.call_tool("pay", {"amount": 1}, meta=meta("warm-up"))
        holder = await write_lock_held(path, 0.5)
        refused = await client.call_tool("pay", {"amount": 5}, meta=meta("k", 1))
        await trio.to_thread.run_sync(holder.join)
        retried = await client.call_tool("pay", {"amount": 5}, meta=meta("k", 2))
    assert nack_of(refused)["code"] == "unavailable"
    assert nack_of(refused)["retryable"] is True
    assert refused.is_error is True
    assert answer(retried) == "ran"
    assert runs == [1, 5]


async def test_the_client_retries_an_unavailable_store_until_it_answers(tmp_path: Path) -> None:
    path = tmp_path / "rmcp.sqlite"
    app = FastRMCP("t", store=SQLiteStore(path, busy_timeout_s=0.05))
    runs: list[int] = []

    @app.tool()
    async def pay(amount: int) -> str:
        runs.append(amount)
        return "paid"

    fast = PolicyOverrides(retry=RetryOverrides(max_attempts=20, base_delay_s=0.05, max_delay_s=0.1))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("t", app, overrides=fast))
        await sup.call("t", "pay", {"amount": 1}, timeout=10)
        holder = await write_lock_held(path, 0.3)
        result = await sup.call("t", "pay", {"amount": 5}, timeout=10)
        await trio.to_thread.run_sync(holder.join)
    assert result.text == "paid"
    assert result.attempts >= 2
    assert runs == [1, 5]


class SilentClaims:
    """A MemoryStore whose claims never answer (a hung network store, say)."""

    def __init__(self) -> None:
        self.inner = MemoryStore(clock=trio.current_time)

    @property
    def durable(self) -> bool:
        return False

    async def begin(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_every_store_call_is_bounded_by_store_timeout(autojump_clock: trio.testing.MockClock) -> None:
    app = FastRMCP("t", store=cast(Any, SilentClaims()), store_timeout_s=2.0)
    runs: list[int] = []

    @app.tool()
    async def pay(amount: int) -> str:
        runs.append(amount)
        return "paid"

    async with mcp.Client(app) as client:
        started = trio.current_time()
        with trio.fail_after(60):
            refused = await client.call_tool("pay", {"amount": 5}, meta=meta("k"))
        waited = trio.current_time() - started
    assert nack_of(refused)["code"] == "unavailable"
    assert 2.0 <= waited < 3.0
    assert runs == []


@pytest.mark.parametrize("bad_option", [{"store_timeout_s": 0}, {"store_timeout_s": -1.0}])
def test_store_timeout_must_be_positive(bad_option: dict[str, Any]) -> None:
    with pytest.raises(RMCPConfigError, match="store_timeout_s"):
        FastRMCP("t", **bad_option)


async def test_an_unknown_tool_is_refused_before_its_key_is_claimed() -> None:
    """A refusal is not a run: the same key must work once the tool exists."""
    store = MemoryStore(clock=trio.current_time)
    app = FastRMCP("t", store=store)
    runs: list[int] = []

    async with mcp.Client(app) as client:
        refused = await client.call_tool("pay", {"amount": 5}, meta=meta("k", 1))
        assert await store.get(store_key("k")) is None

        @app.tool()
        async def pay(amount: int) -> str:
            runs.append(amount)
            return "paid"

        ran = await client.call_tool("pay", {"amount": 5}, meta=meta("k", 2))
    assert nack_of(refused)["code"] == "unknown_tool"
    assert nack_of(refused)["retryable"] is False
    assert answer(ran) == "ran"
    assert runs == [5]


async def test_arguments_the_sdk_rejects_are_refused_before_the_key_is_claimed() -> None:
    store = MemoryStore(clock=trio.current_time)
    app = FastRMCP("t", store=store)
    runs: list[int] = []

    @app.tool()
    async def pay(amount: int) -> str:
        runs.append(amount)
        return "paid"

    async with mcp.Client(app) as client:
        refused = await client.call_tool("pay", {"amount": "lots"}, meta=meta("k", 1))
        assert await store.get(store_key("k")) is None
        # Fixed arguments under the same key are a new call, not a conflict with a refusal.
        fixed = await client.call_tool("pay", {"amount": 5}, meta=meta("k", 2))
        # As lax as the SDK itself: a numeric string is an integer to it.
        lax = await client.call_tool("pay", {"amount": "7"}, meta=meta("other"))
    assert nack_of(refused)["code"] == "invalid_arguments"
    assert "amount" in nack_of(refused)["reason"]
    assert (answer(fixed), answer(lax)) == ("ran", "ran")
    assert runs == [5, 7]


async def test_the_store_is_closed_when_the_server_stops(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "rmcp.sqlite")
    app = FastRMCP("t", store=store)

    @app.tool()
    async def pay(amount: int) -> str:
        return "paid"

    async with mcp.Client(app) as client:
        await client.call_tool("pay", {"amount": 5}, meta=meta("k"))
    with pytest.raises(RMCPStoreClosedError):
        await store.get("k")


async def test_a_store_shared_by_two_servers_is_closed_when_the_last_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(clock=trio.current_time)
    apps = [FastRMCP(name, store=store) for name in ("a", "b")]
    for app in apps:

        @app.tool()
        async def pay(amount: int) -> str:
            return "paid"

    async with mcp.Client(apps[0]) as first:
        async with mcp.Client(apps[1]) as second:
            await second.call_tool("pay", {"amount": 5}, meta=meta("k"))
        replay = await first.call_tool("pay", {"amount": 5}, meta=meta("k", 2))
    assert answer(replay) == "duplicate"
    with pytest.raises(RMCPStoreClosedError):
        await store.get("k")


class RecordsFailThenLag:
    """A MemoryStore shared by two instances whose result writes fail until ``broken`` is
    cleared; then the first in-doubt mark waits for ``lag`` (a slow disk)."""

    def __init__(self) -> None:
        self.inner = MemoryStore(clock=trio.current_time)
        self.broken = True
        self.lagging: str | None = None
        self.lag = trio.Event()

    @property
    def durable(self) -> bool:
        return False

    async def complete(self, key: str, *, owner: str, result: bytes) -> None:
        if self.broken:
            raise OSError("disk I/O error")
        await self.inner.complete(key, owner=owner, result=result)

    async def mark_in_doubt(self, key: str, *, owner: str) -> None:
        if self.broken:
            raise OSError("disk I/O error")
        if self.lagging is None:
            self.lagging = key
            await self.lag.wait()
        await self.inner.mark_in_doubt(key, owner=owner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_the_lease_keeper_leaves_alone_a_key_run_again_meanwhile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Outcomes the store could not record are marked in doubt later by the lease keeper. One
    of them, retried meanwhile and (its reconciler finding no effect) run again, is a run in
    flight: marking it in doubt would let another instance's retry run it a third time."""
    store: Any = RecordsFailThenLag()
    ledger: list[str] = []
    fail_once = {"x1", "x2"}
    gates = {"x1": trio.Event(), "x2": trio.Event()}
    holds = dict(gates)
    running = trio.Event()

    async def look_up(run: InDoubtRun) -> Reconciliation:
        label = run.arguments["label"]
        return Reconciliation.did_run(f"paid {label}") if label in ledger else Reconciliation.did_not_run()

    apps = [FastRMCP(name, store=store, lease_s=30) for name in ("a", "b")]
    for app in apps:

        @app.tool(reconcile=look_up)
        async def pay(label: str) -> str:
            if label in fail_once:
                fail_once.discard(label)
                raise RuntimeError("declined before any effect")
            gate = holds.pop(label, None)
            if gate is not None:
                running.set()
                await gate.wait()
            ledger.append(label)
            return f"paid {label}"

    async with mcp.Client(apps[0]) as first, mcp.Client(apps[1]) as second, trio.open_nursery() as nursery:
        for label in ("x1", "x2"):
            await first.call_tool("pay", {"label": label}, meta=meta(label))
        store.broken = False
        while store.lagging is None:  # the lease keeper's next round, stuck on one key
            await trio.sleep(1)
        target = "x2" if store.lagging == store_key("x1") else "x1"
        answers: list[str] = []

        async def retry(client: mcp.Client, attempt: int) -> None:
            answers.append(
                answer(await client.call_tool("pay", {"label": target}, meta=meta(target, attempt)))
            )

        nursery.start_soon(retry, first, 2)
        await running.wait()  # told "did not run", the retry runs it again, here
        store.lag.set()
        await trio.sleep(1)  # the lease keeper goes on to the other key
        nursery.start_soon(retry, second, 3)
        await trio.sleep(1)
        gates[target].set()
    assert ledger.count(target) == 1
    assert sorted(answers) == ["duplicate", "ran"]
