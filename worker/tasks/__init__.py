"""Celery tasks: thin glue over the `modulora` library."""
