"""structlog set-up: JSON lines by default, readable console lines on request.

Session context (session_id, turn_id, trace_id) is bound once per connection
with `structlog.contextvars` and so follows the work into tasks and threads
started from that context.
"""

from __future__ import annotations

import logging
import sys

import structlog

from agent.config import LoggingConfig


def configure_logging(config: LoggingConfig) -> None:
    level = getattr(logging, config.level.upper())
    renderer: structlog.typing.Processor
    if config.format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # websockets logs handshake failures through the stdlib; keep them quiet.
    logging.getLogger("websockets").setLevel(logging.WARNING)
