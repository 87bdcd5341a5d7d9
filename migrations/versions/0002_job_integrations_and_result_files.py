"""Jobs record their integrations (OpenAI's `integrations`) and result files (the step-metrics CSV).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 04:05:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("integrations", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("result_files", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("result_files")
        batch.drop_column("integrations")
