"""Build script for loopscope's optional C accelerator (everything else is in pyproject.toml).

The extension is marked optional: where it cannot be compiled (no compiler, an unusual
platform) the build goes on and loopscope installs as pure Python, which it also uses when
``LOOPSCOPE_PURE_PYTHON=1`` is set.
"""

import platform
import sys

from setuptools import Extension, setup

ext_modules = []
if platform.python_implementation() == "CPython" and sys.platform != "win32":
    ext_modules.append(
        Extension(
            "loopscope._speedups",
            sources=[
                "src/loopscope/_speedups.c",
                "src/loopscope/_endpoint.c",
                "src/loopscope/_clock.c",
            ],
            depends=["src/loopscope/_clock.h"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
