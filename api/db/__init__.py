"""Database: tables, sessions and job events. Imports no FastAPI, so the worker can use it."""
