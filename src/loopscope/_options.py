"""Options of install(): keyword arguments and ``LOOPSCOPE_*`` environment variables.

Every option can be given either way; a keyword argument wins over the environment.
Validation happens before anything is installed, so a bad value leaves nothing behind.
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from prometheus_client.registry import REGISTRY, CollectorRegistry

__all__ = ["ConfigError", "Options", "resolve_options"]


class ConfigError(ValueError):
    """An option or ``LOOPSCOPE_*`` environment variable has a value loopscope cannot use."""


@dataclass(frozen=True)
class Options:
    """The validated configuration of one install()."""

    slow_threshold: float = 0.1
    """Seconds; a step at or over this is a slow step."""
    lag_interval: float = 0.01
    """Seconds between two heartbeats of the lag probe."""
    port: int | None = None
    """TCP port of the /metrics endpoint; None serves nothing, 0 picks a free port."""
    addr: str = "127.0.0.1"
    """Address the /metrics endpoint binds."""
    loop_name: str | None = None
    """Value of the ``loop`` label; None names each loop after its thread."""
    slow_events: bool = True
    """Log a ``slow_callback`` event through structlog for every slow step."""
    max_loop_labels: int = 50
    """Distinct ``loop`` label values kept before further loops are counted as ``other``."""
    max_locations: int = 50
    """Distinct ``location`` label values of slow steps per loop label before ``other``."""
    max_executor_labels: int = 20
    """Distinct ``executor`` label values kept before further executors count as ``other``."""
    multiprocess_dir: str | None = None
    """Shared directory through which worker processes merge their figures; None: off."""
    registry: CollectorRegistry = field(default=REGISTRY, compare=False)
    """prometheus_client registry the collector is registered on."""
    tls_certfile: str | None = None
    """PEM certificate chain of the /metrics endpoint; set with tls_keyfile to serve HTTPS."""
    tls_keyfile: str | None = None
    """PEM private key of ``tls_certfile``."""
    tls_client_cafile: str | None = None
    """PEM CA bundle; when set, scrapers must present a client certificate it signed."""
    basic_auth_username: str | None = None
    """User name scrapers must send with HTTP basic authentication."""
    basic_auth_password: str | None = field(default=None, repr=False)
    """Password scrapers must send with HTTP basic authentication (never printed)."""


def _parse_seconds(name: str, raw: object, *, upper: float = 3600.0) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConfigError(f"{name} must be a number of seconds (> 0 and <= {upper:g}); got {raw!r}")
    try:
        value = float(raw)
    except (ValueError, OverflowError):
        raise ConfigError(
            f"{name} must be a number of seconds (> 0 and <= {upper:g}); got {raw!r}"
        ) from None
    if not math.isfinite(value) or value <= 0 or value > upper:
        raise ConfigError(f"{name} must be a number of seconds (> 0 and <= {upper:g}); got {raw!r}")
    return value


def _parse_port(name: str, raw: object) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        text = raw.strip()
        if text == "":
            return None
        if not (text.isascii() and text.isdigit()) or len(text) > 5:
            raise ConfigError(f"{name} must be a TCP port from 0 to 65535; got {raw!r}")
        raw = int(text)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 65535:
        raise ConfigError(f"{name} must be a TCP port from 0 to 65535; got {raw!r}")
    return raw


def _parse_addr(name: str, raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip() or any(c.isspace() for c in raw):
        raise ConfigError(
            f"{name} must be a host name or IP address such as '127.0.0.1'; got {raw!r}"
        )
    return raw


def _parse_loop_name(name: str, raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw or len(raw) > 128 or not raw.isprintable():
        raise ConfigError(f"{name} must be a printable string of 1 to 128 characters; got {raw!r}")
    return raw


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ConfigError(f"{name} must be true or false (1/0, yes/no, on/off); got {raw!r}")


def _parse_label_cap(name: str, raw: object) -> int:
    text = raw.strip() if isinstance(raw, str) else ""
    if text.isascii() and text.isdigit() and len(text) <= 5:
        raw = int(text)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 10_000:
        raise ConfigError(f"{name} must be a whole number from 1 to 10000; got {raw!r}")
    return raw


def _parse_directory(name: str, raw: object) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if not isinstance(raw, str):
        raise ConfigError(f"{name} must be the path of a writable directory; got {raw!r}")
    if raw.strip() == "":
        return None
    if not os.path.isdir(raw) or not os.access(raw, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} must be the path of a writable directory; got {raw!r}")
    return os.path.abspath(raw)


def _parse_registry(name: str, raw: object) -> CollectorRegistry:
    if not isinstance(raw, CollectorRegistry):
        raise ConfigError(f"{name} must be a prometheus_client CollectorRegistry; got {raw!r}")
    return raw


def _parse_file(name: str, raw: object) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if not isinstance(raw, str) or "\x00" in raw:
        raise ConfigError(f"{name} must be the path of a readable PEM file; got {raw!r}")
    if raw == "":
        return None
    if not os.path.isfile(raw) or not os.access(raw, os.R_OK):
        raise ConfigError(f"{name} must be the path of a readable PEM file; {raw!r} is not one")
    return raw


def _parse_username(name: str, raw: object) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or len(raw) > 256 or ":" in raw or not raw.isprintable():
        raise ConfigError(f"{name} must be 1 to 256 printable characters without ':'; got {raw!r}")
    return raw


def _parse_password(name: str, raw: object) -> str | None:
    # The value is never echoed: it is a secret.
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or len(raw) > 1024 or not raw.isprintable():
        raise ConfigError(f"{name} must be 1 to 1024 printable characters (value not shown)")
    return raw


_PARSERS: dict[str, Callable[[str, object], Any]] = {
    "slow_threshold": _parse_seconds,
    "lag_interval": lambda name, raw: _parse_seconds(name, raw, upper=60.0),
    "port": _parse_port,
    "addr": _parse_addr,
    "loop_name": _parse_loop_name,
    "slow_events": _parse_bool,
    "max_loop_labels": _parse_label_cap,
    "max_locations": _parse_label_cap,
    "max_executor_labels": _parse_label_cap,
    "multiprocess_dir": _parse_directory,
    "registry": _parse_registry,
    "tls_certfile": _parse_file,
    "tls_keyfile": _parse_file,
    "tls_client_cafile": _parse_file,
    "basic_auth_username": _parse_username,
    "basic_auth_password": _parse_password,
}

#: Options that have no environment variable (they are Python objects).
_NO_ENV = frozenset({"registry"})

ENV_PREFIX = "LOOPSCOPE_"


def env_name(option: str) -> str:
    """The environment variable that sets ``option``."""
    return ENV_PREFIX + option.upper()


def resolve_options(
    kwargs: Mapping[str, object], environ: Mapping[str, str] | None = None
) -> Options:
    """Validate keyword arguments and ``LOOPSCOPE_*`` variables into one :class:`Options`.

    Raises :class:`ConfigError` naming the option (and the variable) at the first bad value.
    """
    known = [f.name for f in fields(Options)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))}; "
            f"known options are {', '.join(known)}"
        )
    env = os.environ if environ is None else environ
    known_env = {env_name(n) for n in known if n not in _NO_ENV}
    # Variables the library itself reads elsewhere, not install() options.
    known_env |= {"LOOPSCOPE_PURE_PYTHON"}
    # Set by `loopscope run` for the processes it starts (see _run.py).
    known_env |= {"LOOPSCOPE_RUN", "LOOPSCOPE_RUN_OWNER"}
    stray = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known_env)
    if stray:
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(stray)}; "
            f"known ones are {', '.join(sorted(known_env))}"
        )
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in known:
        parse = _PARSERS[name]
        if name in kwargs:
            sources[name] = f"option {name}"
            values[name] = parse(sources[name], kwargs[name])
        elif name not in _NO_ENV and env_name(name) in env:
            sources[name] = f"environment variable {env_name(name)}"
            values[name] = parse(sources[name], env[env_name(name)])
    options = Options(**values)
    _check_endpoint(options, sources)
    return options


def _check_endpoint(options: Options, sources: Mapping[str, str]) -> None:
    """Options of the endpoint that only make sense together; loads the TLS files so that a
    bad certificate or key is reported here, before anything is installed."""

    def source(name: str) -> str:
        return sources.get(name, f"option {name}")

    if (options.tls_certfile is None) != (options.tls_keyfile is None):
        missing = "tls_keyfile" if options.tls_keyfile is None else "tls_certfile"
        given = "tls_certfile" if missing == "tls_keyfile" else "tls_keyfile"
        raise ConfigError(
            f"{source(missing)} is required when {source(given)} is set "
            "(HTTPS needs both a certificate and its key)"
        )
    if options.tls_client_cafile is not None and options.tls_certfile is None:
        raise ConfigError(
            f"{source('tls_client_cafile')} needs tls_certfile and tls_keyfile "
            "(client certificates are checked only over HTTPS)"
        )
    if (options.basic_auth_username is None) != (options.basic_auth_password is None):
        missing = (
            "basic_auth_password" if options.basic_auth_password is None else "basic_auth_username"
        )
        raise ConfigError(
            f"{source(missing)} is required: basic authentication needs both "
            "basic_auth_username and basic_auth_password"
        )
    if options.tls_certfile is not None:
        tls_context(options, sources)


def _no_password() -> str:
    raise ValueError("the private key is encrypted; loopscope needs an unencrypted key file")


def tls_context(options: Options, sources: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """The server-side TLS context of the endpoint (requires tls_certfile and tls_keyfile).

    Raises :class:`ConfigError` naming the option whose file cannot be used."""
    names = sources or {}
    assert options.tls_certfile is not None and options.tls_keyfile is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # A key protected by a passphrase fails here rather than prompting on the terminal.
        context.load_cert_chain(options.tls_certfile, options.tls_keyfile, password=_no_password)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{names.get('tls_certfile', 'option tls_certfile')} and "
            f"{names.get('tls_keyfile', 'option tls_keyfile')}: cannot load the certificate "
            f"{options.tls_certfile!r} with the key {options.tls_keyfile!r} ({exc}); "
            "both must be PEM files and the key must match the certificate"
        ) from None
    if options.tls_client_cafile is not None:
        try:
            context.load_verify_locations(cafile=options.tls_client_cafile)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{names.get('tls_client_cafile', 'option tls_client_cafile')}: cannot load "
                f"CA certificates from {options.tls_client_cafile!r} ({exc}); "
                "it must be a PEM file of CA certificates"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
