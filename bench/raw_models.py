"""The simplest aggregate for the raw `eventsourcing` save limit.

It lives in its own importable module (not the `__main__` of a phase) so its event
topics are ordinary `module:Class` names, as an application's would be. It keeps no
payload in memory: the limit is the store's, not the aggregate's bookkeeping.
"""

from __future__ import annotations

from eventsourcing.domain import Aggregate, event


class Note(Aggregate):
    """An aggregate with one kind of event carrying a text payload."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.notes = 0

    @event("Noted")
    def note(self, text: str) -> None:
        self.notes += 1
