"""The errors a round's scheduler raises: the user-facing ones subclass orchestrator.errors.UserError (one line,
exit 2); ClaimLost is internal (a shared round's worker stops its unit and goes on)."""
from __future__ import annotations

from orchestrator.errors import UserError


class SchedulerError(UserError):
    """A problem that stops a round and that the user can fix: bad hook settings, a worker command that cannot
    start, a failed batch probe, a round folder run with another storage."""


class RoundLocked(SchedulerError):
    """Another scheduler holds the round's lock."""


class ClaimLost(Exception):
    """Another worker took this worker's unit over: its heartbeats stopped for longer than the claim's timeout. The
    loop catches it (the unit is the other worker's now); it never reaches the user."""
