"""loopscope for ``opentelemetry-instrument``: zero-code OpenTelemetry metrics.

``opentelemetry-instrument python app.py`` finds :class:`LoopscopeInstrumentor` through
the ``opentelemetry_instrumentor`` entry point, as it finds OpenTelemetry's contrib
instrumentations, and calls ``instrument()`` once the SDK it configured is the global
``MeterProvider``: loopscope is installed (configured by its ``LOOPSCOPE_*`` variables)
and its figures are exported as OpenTelemetry metrics.  Importing this module needs the
``otel`` extra (``pip install 'loopscope[otel]'``); ``import loopscope`` never does.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

import loopscope

__all__ = ("LoopscopeInstrumentor",)


class LoopscopeInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Installs loopscope and exports its figures to OpenTelemetry.

    ``instrument(meter_provider=...)`` uses that provider instead of the global one.  When
    loopscope was already installed, its installation gains the OpenTelemetry export;
    ``uninstrument()`` stops the export, and uninstalls loopscope if ``instrument()``
    installed it.
    """

    _installed_here = False

    def instrumentation_dependencies(self) -> Collection[str]:
        """Nothing to wait for: loopscope instruments the event loops of the standard
        library and uvloop, whichever are used."""
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        from loopscope._installation import current

        self._installed_here = current() is None
        installation = loopscope.install()
        installation.export_to_otel(kwargs.get("meter_provider"))

    def _uninstrument(self, **kwargs: Any) -> None:
        from loopscope._installation import current

        installation = current()
        if installation is None:
            return
        if self._installed_here:
            loopscope.uninstall()
        else:
            installation.stop_otel_export()
