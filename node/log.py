"""Logging setup: structlog for our events, stdlib logging (aiohttp, zeroconf, asyncio) routed
through the same renderer, everything to stderr.

Event names are stable identifiers ("agent.started", "gossip.member_joined") so log-based
tests and alerting can key on them; the human text lives in the fields.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

__all__ = ["LEVELS", "TRACE", "bind_context", "setup_logging"]

#: Below DEBUG: also lets third-party libraries' debug chatter through.
TRACE = 5
LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}

# Libraries that are noisy at DEBUG; below "trace" they only speak at WARNING and up.
_CHATTY = ("asyncio", "aiohttp", "zeroconf")


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def setup_logging(
    level: str = "info", json_format: bool = False, stream: TextIO | None = None
) -> None:
    """Configure structlog and the stdlib root logger; safe to call more than once."""
    stream = sys.stderr if stream is None else stream
    levelno = LEVELS[level]
    logging.addLevelName(TRACE, "TRACE")

    renderer: Processor
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json_format:
        final += [structlog.processors.dict_tracebacks]
        renderer = structlog.processors.JSONRenderer()
    else:
        isatty = getattr(stream, "isatty", None)
        renderer = structlog.dev.ConsoleRenderer(colors=bool(isatty and isatty()))
    final.append(renderer)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )

    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=final, foreign_pre_chain=_shared_processors()
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(levelno)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(
            logging.NOTSET if levelno <= TRACE else max(levelno, logging.WARNING)
        )
    logging.captureWarnings(True)


def bind_context(**values: Any) -> None:
    """Attach fields (node name, datacenter) to every later log line of this context."""
    structlog.contextvars.bind_contextvars(**values)
