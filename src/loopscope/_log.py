"""loopscope's logger in the standard ``logging`` module, looked up each time it is used.

Not made at import: ``logging.config.dictConfig()`` disables every logger that exists
when it runs and that its configuration does not name (``disable_existing_loggers``, true
by default), so a logger made when loopscope is imported, before the application (or its
server, such as uvicorn's ``--log-config``) configures logging, would be silenced.  Made
at its first message, it exists only once loopscope has something to say.
"""

from __future__ import annotations

import logging

__all__ = ["NAME", "logger"]

#: The name of loopscope's logger.
NAME = "loopscope"


def logger() -> logging.Logger:
    """loopscope's logger (made at the first call)."""
    return logging.getLogger(NAME)
