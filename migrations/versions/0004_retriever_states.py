"""Task states may carry the retriever's (query tower's) state beside the ranker's.

Revision ID: 0004_retriever_states
Revises: 0003_ops
Create Date: 2026-12-01

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_retriever_states"
down_revision: str | Sequence[str] | None = "0003_ops"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nullable: a task learned without tuning the retriever has no tower state."""
    with op.batch_alter_table("task_states", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tower_uri", sa.String(length=1000), nullable=True))
        batch_op.add_column(sa.Column("tower_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("tower_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("task_states", schema=None) as batch_op:
        batch_op.drop_column("tower_bytes")
        batch_op.drop_column("tower_sha256")
        batch_op.drop_column("tower_uri")
