"""Database: tables, sessions, job events and migrations. No FastAPI: the worker uses it too."""
