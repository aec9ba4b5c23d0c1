"""Admission control for generation requests, in the API process (one asyncio loop).

A request holds a place from the moment its key is checked - before its body is read, so
half-sent bodies count too - until it is answered. The server holds at most `capacity`
requests and one tenant at most `tenant_cap` of them; beyond that the answer is 429 with
Retry-After (QueueFull, TenantQueueFull), so one tenant can never take every place.

Admitted requests reach the workers' shared queue (LitServe's, first in first out) at most
`window` at a time, and one tenant's at most `tenant_window` of those; the others wait here,
one queue per tenant, and are handed over round robin as places in the window free up. So
a tenant with many queued requests delays another tenant's request by at most one turn, and
a tenant whose requests wait in a worker for their stack cannot fill the window.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass, field

from server.errors import QueueFull, TenantQueueFull


@dataclass(eq=False)
class Ticket:
    """One admitted request's place."""

    tenant: str
    dispatched: bool = False  # handed to the workers' queue (its window place is taken)
    turn: asyncio.Future | None = field(default=None, repr=False)


class Admission:
    def __init__(self, capacity: int, tenant_cap: int, window: int, tenant_window: int):
        self.capacity = capacity
        self.tenant_cap = tenant_cap
        self.window = window
        self.tenant_window = tenant_window
        self._held: Counter[str] = Counter()
        self._dispatched: Counter[str] = Counter()
        self._waiting: dict[str, deque[Ticket]] = {}
        self._turns: deque[str] = deque()  # tenants with waiting requests, in turn order

    @property
    def held(self) -> int:
        return sum(self._held.values())

    def admit(self, tenant: str) -> Ticket:
        """A place for one request of `tenant`, or 429."""
        if self._held[tenant] >= self.tenant_cap:
            raise TenantQueueFull(
                f"tenant {tenant!r} has {self._held[tenant]} requests in progress, its share "
                f"of this server's {self.capacity}; retry when some are answered"
            )
        if self.held >= self.capacity:
            raise QueueFull(
                f"the server holds {self.capacity} generation requests, all it may; retry later"
            )
        self._held[tenant] += 1
        return Ticket(tenant)

    async def dispatch(self, ticket: Ticket) -> None:
        """Wait for this request's turn to go to the workers' queue."""
        ticket.turn = asyncio.get_running_loop().create_future()
        if ticket.tenant not in self._waiting:
            self._waiting[ticket.tenant] = deque()
            self._turns.append(ticket.tenant)
        self._waiting[ticket.tenant].append(ticket)
        self._pump()
        await ticket.turn

    def release(self, ticket: Ticket) -> None:
        """The request is answered (or abandoned): free its place, and its window place."""
        self._held[ticket.tenant] -= 1
        if ticket.dispatched:
            self._dispatched[ticket.tenant] -= 1
        else:
            waiting = self._waiting.get(ticket.tenant)
            if waiting is not None and ticket in waiting:
                waiting.remove(ticket)
                if not waiting:
                    self._drop_turn(ticket.tenant)
        self._pump()

    def _drop_turn(self, tenant: str) -> None:
        del self._waiting[tenant]
        self._turns.remove(tenant)

    def _pump(self) -> None:
        """Hand waiting requests to the workers' queue while the window has room, taking
        tenants in turn."""
        while sum(self._dispatched.values()) < self.window and self._turns:
            for _ in range(len(self._turns)):
                tenant = self._turns[0]
                self._turns.rotate(-1)
                if self._dispatched[tenant] < self.tenant_window:
                    break
            else:
                return  # every waiting tenant has its whole share of the window
            ticket = self._waiting[tenant].popleft()
            if not self._waiting[tenant]:
                self._drop_turn(tenant)
            ticket.dispatched = True
            self._dispatched[tenant] += 1
            if ticket.turn is not None and not ticket.turn.done():
                ticket.turn.set_result(None)
