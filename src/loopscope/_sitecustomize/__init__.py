"""Holds loopscope's ``sitecustomize`` module, which ``loopscope run`` puts first on PYTHONPATH."""
