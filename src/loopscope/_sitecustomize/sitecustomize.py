# loopscope's sitecustomize, put first on PYTHONPATH by `loopscope run`: it installs
# loopscope when the interpreter starts, before the application's code, then imports the
# sitecustomize module it shadows.  It must never stop an interpreter from starting, even
# one that has no loopscope (or is too old to import it): every error is swallowed here,
# and it is written for interpreters older than loopscope's (no f-strings).


def _loopscope_start():  # type: () -> None
    try:
        from loopscope import _run
    except Exception as exc:
        # The command `loopscope run` started (it keeps the launcher's process id) says
        # why it is not instrumented: the process the user asked for.  Any other
        # interpreter that cannot import loopscope (another Python the command starts)
        # starts silently.
        try:
            import os
            import sys

            if os.environ.get("LOOPSCOPE_RUN") == "1" and os.environ.get(
                "LOOPSCOPE_RUN_OWNER"
            ) == str(os.getpid()):
                sys.stderr.write(
                    "loopscope run: this Python (" + sys.executable + ") cannot import "
                    "loopscope (" + type(exc).__name__ + ": " + str(exc) + "), so the "
                    "command runs uninstrumented; install loopscope for it, or run the "
                    "command with the Python loopscope is installed for\n"
                )
                sys.stderr.flush()
        except Exception:
            pass
        return
    try:
        _run.bootstrap()
    finally:
        _run.load_next_sitecustomize()


_loopscope_start()
del _loopscope_start
