"""Log a message once per process: the one log-once helper of the package.

Fallbacks are never silent, and never noisy: the first time a reason is seen it is logged, later
times are not. Keys are any hashable value; messages go to the logger named by the caller.
"""

from __future__ import annotations

import logging
import threading

_seen: set = set()
_lock = threading.Lock()


def log_once(
    logger: logging.Logger | str, key, message: str, *args, level: int = logging.WARNING
) -> bool:
    """Log ``message % args`` on ``logger`` at ``level`` the first time ``key`` is seen.

    Returns whether it was logged.
    """
    with _lock:
        if key in _seen:
            return False
        _seen.add(key)
    if isinstance(logger, str):
        logger = logging.getLogger(logger)
    logger.log(level, message, *args)
    return True
