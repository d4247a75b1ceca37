"""Runnable examples of loopscope (each one is exercised by tests/test_examples.py)."""
