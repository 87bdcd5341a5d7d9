"""The service core shared by `api/` and `worker/` (which never import each other): settings, the
database (tables, sessions, job events, migrations), a job's lifecycle and the task names.

It imports the library (`modulora`) but neither `api` nor `worker`, and no FastAPI or torch.
"""
