"""`modulora worker`: registered on the `modulora` command through the entry-point group
`modulora.cli`; `python -m worker` runs it without the library's CLI (`modulora serve --with-worker`
starts it that way, so the API never imports the worker)."""

from __future__ import annotations

import argparse
from typing import Any

from core.config import get_settings

WORKER_HELP = "run a training worker (one per GPU: CUDA_VISIBLE_DEVICES)"


def run_worker(hostname: str | None = None, loglevel: str = "INFO") -> None:
    from worker.celery_app import app

    settings = get_settings()
    argv = ["worker", f"--loglevel={loglevel}", "-Q", settings.job_queue, "--concurrency=1"]
    app.worker_main(argv + (["--hostname", hostname] if hostname else []))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--hostname", help="worker name, unique per GPU, e.g. gpu0@%%h")
    parser.add_argument("--loglevel", default="INFO")


def _worker(args: argparse.Namespace) -> int:
    run_worker(args.hostname, args.loglevel)
    return 0


def register_worker(subparsers: Any) -> None:
    parser = subparsers.add_parser("worker", help=WORKER_HELP)
    _add_arguments(parser)
    parser.set_defaults(func=_worker)


def main(argv: list[str] | None = None) -> int:
    """`python -m worker [-n NAME] [--loglevel LEVEL]`."""
    parser = argparse.ArgumentParser(prog="python -m worker", description=WORKER_HELP)
    _add_arguments(parser)
    return _worker(parser.parse_args(argv))
