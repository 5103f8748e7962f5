"""The update job's core: fold a new task into a model with no old data.

    result = run_update(model, priors, task, UpdateRequest(method="kfc"))
    result.model.save(folder); result.new_state.save(path)

A plain function the worker (and ``kronlink update``) call; no broker, no
database. Phases, the auto-λ rule and what the worker does around it:
``docs/update.md``.
"""

from kronlink.update.job import run_update
from kronlink.update.types import (
    HALF_DECADE_GRID,
    PAPER_GRID,
    PHASES,
    SelectionRow,
    UpdateProgress,
    UpdateRequest,
    UpdateResult,
)

__all__ = [
    "HALF_DECADE_GRID",
    "PAPER_GRID",
    "PHASES",
    "SelectionRow",
    "UpdateProgress",
    "UpdateRequest",
    "UpdateResult",
    "run_update",
]
