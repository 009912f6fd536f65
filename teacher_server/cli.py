"""`teacher-server --config teachers.yaml`: validate the config, then serve it with uvicorn.

A bad config or API-key variable is one line on stderr and exit 2 before anything starts; a
teacher that fails to load stops the server with one line and exit 2. Logs are JSON lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from datetime import UTC, datetime

import uvicorn
from transformers.utils import logging as hf_logging

from shared.api_key import clean_api_key
from shared.errors import EXIT_INTERRUPTED, EXIT_USAGE, UserError
from shared.flags import add_flag
from shared.openmp import busy_cores_warning
from teacher_server.app import create_app
from teacher_server.config import load_config
from teacher_server.drain import DrainingServer
from teacher_server.http_protocol import bounded_protocol

_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
    "taskName",
}


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, _, status = record.args
            entry.update(client=client, method=method, path=path, status=status)
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLinesFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    hf_logging.disable_progress_bar()


def read_api_key(variable: str | None) -> str | None:
    """The key lives in the environment, never on the command line (it would show in ``ps``)."""
    if variable is None:
        return None
    return clean_api_key(os.environ.get(variable), f"--api_key_env {variable}")


def port_number(text: str) -> int:
    """argparse type: a TCP port, so a typo is a usage error rather than a traceback from bind()."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teacher-server",
        description="Serve BERT teachers over the KServe Open Inference Protocol v2 (REST).",
    )
    parser.add_argument("--config", required=True, help="YAML file listing the teachers")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (default: 8000)")
    add_flag(
        parser,
        "--api_key_env",
        old="--api-key-env",
        metavar="NAME",
        help="require 'Authorization: Bearer $NAME'",
    )
    parser.add_argument(
        "--key_for_docs_and_metrics",
        action="store_true",
        help="with --api_key_env: require the key for /openapi.json, /docs, /redoc and /metrics too. Off by "
        "default, as in vLLM and TEI: Prometheus scrapers and readers of the API document seldom hold the "
        "key, and these pages show the teachers' names, settings and request counts, never inputs or "
        "outputs. Turn it on when clients you do not trust can reach the port",
    )
    add_flag(
        parser,
        "--log_level",
        old="--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
    )
    return parser


def usable_cores() -> int:
    """The cores this process may run on (``sched_getaffinity`` is Linux only; macOS counts all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = load_config(args.config)
        api_key = read_api_key(args.api_key_env)
        if args.key_for_docs_and_metrics and api_key is None:
            raise UserError("--key_for_docs_and_metrics needs an API key: give --api_key_env too")
    except UserError as err:
        print(f"teacher-server: error: {err}", file=sys.stderr)
        return EXIT_USAGE

    on_cpu = any(teacher.device == "cpu" for teacher in config.teachers)
    warning = busy_cores_warning(os.environ, os.getloadavg()[0], usable_cores()) if on_cpu else None
    if warning:
        logging.getLogger("teacher_server").warning(warning, extra={"event": "busy_cores"})
    failures: list[str] = []

    def stop_serving(message: str) -> None:
        failures.append(message)
        server.should_exit = True

    app = create_app(
        config,
        api_key=api_key,
        key_for_docs_and_metrics=args.key_for_docs_and_metrics,
        on_load_failure=stop_serving,
    )
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_config=None,
            log_level=args.log_level,
            http=bounded_protocol(config),
            loop="auto",  # uvloop, a dependency (benchmarks/bench_server_stack.py)
            timeout_graceful_shutdown=config.drain_timeout_s,  # a float (0.5 s, or .inf) works
        ),
        app.state.service,
    )
    try:
        server.run()
        interrupted = server.stopped_by == signal.SIGINT  # Ctrl-C where SIGINT was ignored at start
    except KeyboardInterrupt:  # Ctrl-C: uvicorn raises the signal again once drained
        interrupted = True
    if interrupted:
        return EXIT_INTERRUPTED
    if failures:
        print(f"teacher-server: error: {' '.join(failures[0].split())}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
