"""The bundled demo: a small instrumented HTTP service and a load driver that shows
loopscope's figures live.  ``python -m loopscope.demo`` runs both."""
