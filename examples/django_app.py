"""A single-file Django project served over ASGI, instrumented at start-up, with /metrics.

    uvicorn examples.django_app:application --port 8000    # uvloop; --loop asyncio for asyncio's
    loopscope run -- daphne -p 8000 examples.django_app:application

then GET /block, /offload and /metrics.  The settings are made in code, so there is no
``manage.py`` and no settings module; ``DJANGO_ALLOWED_HOSTS`` (comma-separated, default
``127.0.0.1,localhost``) names the hosts it answers.

loopscope is installed when this module is imported.  uvicorn imports the application
before it creates its loop (with ``--workers``, inside each worker's running loop), and
``install()`` instruments both.  daphne creates its loop before it imports the
application: start it under ``loopscope run``, which installs loopscope before daphne
starts (this module's own ``install()`` is then harmless).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time

from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        # Nothing here signs data (no sessions, no CSRF), so a per-process key is enough.
        SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50),
        ALLOWED_HOSTS=os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(","),
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
    )

# Imported once the settings exist: these modules read them.
from django.core.asgi import get_asgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import loopscope

BLOCK_SECONDS = 0.3


async def block(request: HttpRequest) -> HttpResponse:
    """A synchronous call in an async view: it blocks the event loop, a slow step."""
    time.sleep(BLOCK_SECONDS)
    return JsonResponse({"pid": os.getpid()})


async def offload(request: HttpRequest) -> HttpResponse:
    """The same work in the default executor: the loop stays free."""
    await asyncio.to_thread(time.sleep, BLOCK_SECONDS)
    return JsonResponse({"pid": os.getpid()})


async def metrics(request: HttpRequest) -> HttpResponse:
    """The exposition of prometheus_client's default registry, where loopscope exports."""
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)


urlpatterns = [
    path("block", block),
    path("offload", offload),
    path("metrics", metrics),
]

loopscope.install()
application = get_asgi_application()
