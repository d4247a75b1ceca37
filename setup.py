"""Build script for loopscope's optional C accelerator (everything else is in pyproject.toml).

The extension is marked optional: where it cannot be compiled (no compiler, an unusual
platform) the build goes on and loopscope installs as pure Python, which it also uses when
``LOOPSCOPE_PURE_PYTHON=1`` is set.
"""

import platform
import sys

from setuptools import Extension, setup

# The module's sources (src/loopscope/_c/speedups.h says what each file holds).  Listed by
# name rather than globbed, so that an sdist is built from what is named here; a test
# (tests/test_c_sources.py) checks that every .c file of the folder is listed.
C_DIR = "src/loopscope/_c"
C_SOURCES = [
    "module.c",
    "recorder.c",
    "uvloop_hooks.c",
    "timed_io.c",
    "classhook.c",
    "asyncio_hooks.c",
    "watch.c",
    "gilreader.c",
    "sentinel.c",
    "framecopy.c",
    "clock.c",
    "endpoint.c",
]
C_HEADERS = ["speedups.h", "compat.h", "timed.h", "wrapper.h", "clock.h", "gilreader.h"]

ext_modules = []
if platform.python_implementation() == "CPython" and sys.platform != "win32":
    ext_modules.append(
        Extension(
            "loopscope._speedups",
            sources=[f"{C_DIR}/{name}" for name in C_SOURCES],
            depends=[f"{C_DIR}/{name}" for name in C_HEADERS],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
