"""The registry's exceptions, in one place.

    KronlinkError (kronlink.errors)
    └── RegistryError          anything the registry refuses
        ├── NotFoundError      no row with that id or name
        ├── ConflictError      a name, key or artifact already exists differently
        ├── InvalidTransitionError  a state change the state machine forbids
        └── LeaseLostError     a worker acts on a job it no longer holds

Artifact checksum mismatches raise :class:`kronlink.errors.CheckpointError`.
"""

from __future__ import annotations

from kronlink.errors import KronlinkError

__all__ = [
    "ConflictError",
    "InvalidTransitionError",
    "LeaseLostError",
    "NotFoundError",
    "RegistryError",
]


class RegistryError(KronlinkError):
    """Base class of the registry's errors."""


class NotFoundError(RegistryError, LookupError):
    """No row with the requested id or name."""


class ConflictError(RegistryError):
    """A unique name, idempotency key or artifact key is already taken."""


class InvalidTransitionError(RegistryError):
    """A version or job state change that the state machine does not allow."""


class LeaseLostError(RegistryError):
    """The job is no longer running under this owner (lease expired, reclaimed or finished)."""
