"""``python -m loopscope.demo [--loop uvloop] [--duration 60]`` runs the whole demo;
``python -m loopscope.demo serve ...`` runs only the instrumented service."""

from __future__ import annotations

import sys

from . import driver, service

if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(service.main(sys.argv[2:]))
    sys.exit(driver.main(sys.argv[1:]))
