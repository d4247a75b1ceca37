# loopscope's sitecustomize, put first on PYTHONPATH by `loopscope run`: it installs
# loopscope when the interpreter starts, before the application's code, then imports the
# sitecustomize module it shadows.  It must never stop an interpreter from starting, even
# one that has no loopscope (or is too old to import it): every error is swallowed here.


def _loopscope_start():  # type: () -> None
    try:
        from loopscope import _run
    except Exception:
        return
    try:
        _run.bootstrap()
    finally:
        _run.load_next_sitecustomize()


_loopscope_start()
del _loopscope_start
