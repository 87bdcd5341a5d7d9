"""One module per resource; `api.main` includes every module here that defines `router`."""
