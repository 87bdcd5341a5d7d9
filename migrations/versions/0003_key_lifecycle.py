"""Key lifecycle (public id, name, expiry, revocation), operators, idempotent job bodies.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.db.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("public_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("name", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("expires_at", core.db.models.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("revoked_at", core.db.models.UTCDateTime(timezone=True), nullable=True))
    keys = sa.table("api_keys", sa.column("pk", sa.Integer), sa.column("public_id", sa.String))
    connection = op.get_bind()
    for (pk,) in connection.execute(sa.select(keys.c.pk)).all():
        connection.execute(
            keys.update().where(keys.c.pk == pk).values(public_id=core.db.models.new_id("key"))
        )
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("public_id", existing_type=sa.String(length=40), nullable=False)
        batch.create_unique_constraint("uq_api_keys_public_id", ["public_id"])
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("is_operator", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("request_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_sha256")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("is_operator")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint("uq_api_keys_public_id", type_="unique")
        for column in ("revoked_at", "expires_at", "name", "public_id"):
            batch.drop_column(column)
