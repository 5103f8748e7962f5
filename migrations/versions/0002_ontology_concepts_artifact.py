"""Ontologies keep their concepts file as an artifact, for candidate generation.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nullable: ontologies registered before this revision have no stored file."""
    with op.batch_alter_table("ontologies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("artifact_uri", sa.String(length=1000), nullable=True))
        batch_op.add_column(sa.Column("artifact_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("artifact_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ontologies", schema=None) as batch_op:
        batch_op.drop_column("artifact_bytes")
        batch_op.drop_column("artifact_sha256")
        batch_op.drop_column("artifact_uri")
