"""``loopscope`` command line (``python -m loopscope``): ``loopscope run -- COMMAND``,
``loopscope top [URL ...]`` and ``loopscope report FILE``."""

from __future__ import annotations

import sys

from ._run import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
