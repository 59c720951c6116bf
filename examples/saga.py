"""A saga: reserve a seat, charge a card, issue a ticket; when the ticket fails, the charge and
the reservation are undone, in reverse order, each undo under its own derived key.

The three services are real MCP servers running in this process, with RMCP installed (so every
step and compensation sent twice with its key runs once). Run: ``python examples/saga.py``.
"""

from __future__ import annotations

import trio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from rmcp_actors import (
    Compensation,
    Outcome,
    RMCPSupervisor,
    ServerSpec,
    TransactionEvent,
    install,
)

ledger: list[str] = []


def booking_server() -> MCPServer:
    app = MCPServer("booking")

    @app.tool()
    async def reserve_seat(flight: str) -> dict[str, str]:
        """Hold a seat; returns the reservation."""
        ledger.append(f"seat reserved on {flight}")
        return {"reservation": f"R-{flight}-12A"}

    @app.tool()
    async def release_seat(reservation: str) -> str:
        """Release a reservation (a missing one is already released)."""
        ledger.append(f"seat released ({reservation})")
        return "released"

    @app.tool()
    async def charge(eur: int) -> str:
        """Charge the card."""
        ledger.append(f"card charged {eur} EUR")
        return "charged"

    @app.tool()
    async def refund(eur: int) -> str:
        """Refund the card."""
        ledger.append(f"card refunded {eur} EUR")
        return "refunded"

    @app.tool()
    async def issue_ticket(reservation: str) -> str:
        """Issue the ticket: the ticketing system is down today."""
        raise ToolError("ticketing is unavailable")

    return install(app)


class BookingFailed(Exception):
    pass


async def main() -> None:
    def show(event: TransactionEvent) -> None:
        step = "" if event.step is None else f" step {event.step}"
        print(f"  [{event.state.value:>12}] {event.what}{step} {event.detail or ''}")

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("booking", booking_server()))
        tx = sup.transaction("book LH123", on_event=show)
        try:
            async with tx:
                seat = await tx.call(
                    "booking",
                    "reserve_seat",
                    {"flight": "LH123"},
                    # Computed from the result: release exactly what was reserved.
                    compensate=lambda result: Compensation(
                        "booking", "release_seat", result.structured_content
                    ),
                )
                reservation = (seat.structured_content or {})["reservation"]
                await tx.call(
                    "booking",
                    "charge",
                    {"eur": 90},
                    compensate=Compensation("booking", "refund", {"eur": 90}),
                )
                ticket = await tx.call("booking", "issue_ticket", {"reservation": reservation})
                if ticket.outcome is Outcome.FAILED:
                    raise BookingFailed(ticket.text)
        except BookingFailed as error:
            print(f"\nbooking failed: {error}; the transaction is {tx.state.value}")
        print("\nledger:")
        for line in ledger:
            print("  " + line)


if __name__ == "__main__":
    trio.run(main)
