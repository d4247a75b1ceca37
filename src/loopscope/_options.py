"""Options of install(): keyword arguments, ``LOOPSCOPE_*`` variables, ``loopscope run`` flags.

Every option can be given any of these ways; a keyword argument wins over the environment,
and an empty (or blank) variable is the same as an unset one.  The fields of
:class:`Options` are the one table of options: each carries its help text and how
``loopscope run`` takes it, and :func:`option_table` derives the variables and the flags
from them.  Validation happens before anything is installed, so a bad value leaves nothing
behind.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from prometheus_client.registry import REGISTRY, CollectorRegistry

from ._instrument import Instrument

__all__ = [
    "ConfigError",
    "OptionInfo",
    "Options",
    "bind_error",
    "conflicting_options",
    "option_table",
    "resolve_options",
]


class ConfigError(ValueError):
    """An option or ``LOOPSCOPE_*`` environment variable has a value loopscope cannot use."""


# Named where users import it from (tracebacks then read ``loopscope.ConfigError``).
ConfigError.__module__ = "loopscope"


_MEASUREMENT = "measurement"
_ENDPOINT = "/metrics endpoint"
_PROCESSES = "worker processes"
_EVENTS = "events and logs"
_EXPORT = "OpenTelemetry"


def _about(
    help: str,
    *,
    metavar: str = "VALUE",
    group: str = _MEASUREMENT,
    variable: bool = True,
    flag_reads_file: bool = False,
) -> dict[str, object]:
    """The metadata of one option: its help text (``loopscope run --help`` and the docs) and
    how ``loopscope run`` takes it."""
    return {
        "help": help,
        "metavar": metavar,
        "group": group,
        "variable": variable,
        "flag_reads_file": flag_reads_file,
    }


@dataclass(frozen=True)
class Options:
    """The validated configuration of one install().

    Every field is an option: a keyword argument of install(), a ``LOOPSCOPE_*`` variable
    and a ``loopscope run`` flag (see :func:`option_table`), described by its metadata."""

    slow_threshold: float = field(
        default=0.1,
        metadata=_about(
            "a step lasting this many seconds or more is slow; > 0 and <= 3600", metavar="SECONDS"
        ),
    )
    lag_interval: float = field(
        default=0.01,
        metadata=_about(
            "seconds between two heartbeats of the lag probe; > 0 and <= 60", metavar="SECONDS"
        ),
    )
    port: int | None = field(
        default=None,
        metadata=_about(
            "serve /metrics on this TCP port (0 to 65535, 0 picks a free one); "
            "default: no endpoint",
            metavar="PORT",
            group=_ENDPOINT,
        ),
    )
    addr: str = field(
        default="127.0.0.1",
        metadata=_about(
            "IP address or host name of this machine that the endpoint binds",
            metavar="ADDR",
            group=_ENDPOINT,
        ),
    )
    loop_name: str | None = field(
        default=None,
        metadata=_about(
            "value of the loop label (1 to 128 printable characters); default: the name of "
            "the loop's thread",
            metavar="NAME",
        ),
    )
    events: str = field(
        default="auto",
        metadata=_about(
            "where slow-step events are logged: auto (structlog when the application has "
            "configured it, else the standard logging module), structlog, logging or off",
            metavar="ROUTE",
            group=_EVENTS,
        ),
    )
    loop_blocked_after: float = field(
        default=1.0,
        metadata=_about(
            "a step still running after this many seconds (and at least the slow threshold) "
            "is reported as loop_blocked, again at doubling intervals up to once a minute; "
            "> 0 and <= 3600",
            metavar="SECONDS",
            group=_EVENTS,
        ),
    )
    log_stack: str = field(
        default="application",
        metadata=_about(
            "the stack a standard-logging record shows: application (the application's "
            "frames and those it called), full or none; its blocking_stack field keeps "
            "the whole stack",
            metavar="WHICH",
            group=_EVENTS,
        ),
    )
    import_events: str = field(
        default="once",
        metadata=_about(
            "log slow steps that were importing modules (an application imported inside "
            "the running loop): once (the first such step of the process), all or off; "
            "metrics and instruments get every one",
            metavar="WHICH",
            group=_EVENTS,
        ),
    )
    stderr_reports: bool = field(
        default=True,
        metadata=_about(
            "while a call that holds the GIL blocks a loop, write its reports to stderr "
            "(no Python code, logging included, can run meanwhile): true or false; off "
            "too when events is off. The events still come once the call returns",
            metavar="BOOL",
            group=_EVENTS,
        ),
    )
    events_endpoint: bool = field(
        default=True,
        metadata=_about(
            "with a port, serve the most recent slow-step and loop_blocked events as JSON on "
            "/loopscope/events (for loopscope top): true or false",
            metavar="BOOL",
            group=_ENDPOINT,
        ),
    )
    instruments: tuple[Instrument, ...] = field(
        default=(),
        compare=False,
        metadata=_about("loopscope.Instrument objects that receive every event", variable=False),
    )
    max_loop_labels: int = field(
        default=50,
        metadata=_about(
            "distinct loop labels kept (1 to 10000) before further loops count as 'other'",
            metavar="N",
        ),
    )
    max_locations: int = field(
        default=50,
        metadata=_about(
            "distinct location labels of slow steps kept per loop label (1 to 10000) "
            "before further ones count as 'other'",
            metavar="N",
        ),
    )
    max_executor_labels: int = field(
        default=20,
        metadata=_about(
            "distinct executor labels kept (1 to 10000) before further executors count as 'other'",
            metavar="N",
        ),
    )
    multiprocess_dir: str | None = field(
        default=None,
        metadata=_about(
            "existing writable local directory through which the worker processes of a "
            "service merge their figures; default: off (loopscope run: a new temporary "
            "directory, removed when the command has ended)",
            metavar="DIR",
            group=_PROCESSES,
        ),
    )
    registry: CollectorRegistry = field(
        default=REGISTRY,
        compare=False,
        metadata=_about(
            "prometheus_client registry the collector is registered on", variable=False
        ),
    )
    otel: object = field(
        default=False,
        metadata=_about(
            "also export the figures as OpenTelemetry metrics: true (the global "
            "MeterProvider) or false; in Python, also a MeterProvider to use (needs the "
            "otel extra: pip install 'loopscope[otel]')",
            metavar="BOOL",
            group=_EXPORT,
        ),
    )
    tls_certfile: str | None = field(
        default=None,
        metadata=_about(
            "PEM certificate (chain); with the key file, the endpoint serves HTTPS only",
            metavar="FILE",
            group=_ENDPOINT,
        ),
    )
    tls_keyfile: str | None = field(
        default=None,
        metadata=_about(
            "unencrypted PEM private key of the certificate", metavar="FILE", group=_ENDPOINT
        ),
    )
    tls_client_cafile: str | None = field(
        default=None,
        metadata=_about(
            "PEM CA certificates: scrapers must present a client certificate "
            "one of them signed (needs the certificate and key)",
            metavar="FILE",
            group=_ENDPOINT,
        ),
    )
    basic_auth_username: str | None = field(
        default=None,
        metadata=_about(
            "user name scrapers send with HTTP basic authentication (needs the password)",
            metavar="USER",
            group=_ENDPOINT,
        ),
    )
    basic_auth_password: str | None = field(
        default=None,
        repr=False,
        metadata=_about(
            "password scrapers send with HTTP basic authentication (never printed)",
            metavar="FILE",
            group=_ENDPOINT,
            flag_reads_file=True,
        ),
    )


@dataclass(frozen=True)
class OptionInfo:
    """How one option is given: keyword, ``LOOPSCOPE_*`` variable, ``loopscope run`` flag."""

    name: str
    help: str
    default: object
    #: Its ``LOOPSCOPE_*`` variable; None for an option that is a Python object.
    variable: str | None
    #: Its ``loopscope run`` flag (None when it has no variable either).
    flag: str | None
    metavar: str
    group: str
    #: The flag names a file holding the value (a secret: kept off the command line).
    flag_reads_file: bool


@functools.cache
def option_table() -> tuple[OptionInfo, ...]:
    """Every option, in the order of :class:`Options`: the one table the variables, the
    ``loopscope run`` flags and their help are derived from."""
    table = []
    for f in fields(Options):
        about = f.metadata
        variable = env_name(f.name) if about["variable"] else None
        reads_file = bool(about["flag_reads_file"])
        flag = None
        if variable is not None:
            flag = "--" + f.name.replace("_", "-") + ("-file" if reads_file else "")
        table.append(
            OptionInfo(
                name=f.name,
                help=str(about["help"]),
                default=f.default,
                variable=variable,
                flag=flag,
                metavar=str(about["metavar"]),
                group=str(about["group"]),
                flag_reads_file=reads_file,
            )
        )
    return tuple(table)


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


def _parse_choice(name: str, raw: object, choices: tuple[str, ...]) -> str:
    if isinstance(raw, str) and raw.strip().lower() in choices:
        return raw.strip().lower()
    raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_switch(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in (*_TRUE, *_FALSE):
        return raw.strip().lower() in _TRUE
    raise ConfigError(f"{name} must be true or false (or 1/0, yes/no, on/off); got {raw!r}")


def _parse_instruments(name: str, raw: object) -> tuple[Instrument, ...]:
    items: tuple[object, ...] | None = None
    if not isinstance(raw, (Instrument, str, bytes, dict)):  # one object is not a list
        try:
            items = tuple(raw)  # type: ignore[arg-type]
        except TypeError:
            items = None
    if items is None:
        raise ConfigError(f"{name} must be a list of loopscope.Instrument objects; got {raw!r}")
    for item in items:
        if isinstance(item, type) and issubclass(item, Instrument):
            raise ConfigError(
                f"{name} must be a list of loopscope.Instrument objects; {item.__name__} is "
                f"a class: pass an instance of it, {item.__name__}()"
            )
        if not isinstance(item, Instrument):
            raise ConfigError(
                f"{name} must be a list of loopscope.Instrument objects; {item!r} is not one "
                "(subclass loopscope.Instrument)"
            )
    return items  # type: ignore[return-value]


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


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_otel(name: str, raw: object) -> object:
    if isinstance(raw, str):
        word = raw.strip().lower()
        if word not in _TRUE + _FALSE:
            raise ConfigError(
                f"{name} must be true or false ({', '.join(_TRUE + _FALSE)}); got {raw!r}"
            )
        raw = word in _TRUE
    if raw is None:
        raw = False
    if not isinstance(raw, bool) and not callable(getattr(raw, "get_meter", None)):
        raise ConfigError(
            f"{name} must be true, false or an OpenTelemetry MeterProvider; got {raw!r}"
        )
    if raw is not False and not _importable("opentelemetry.metrics"):
        raise ConfigError(
            f"{name} needs the OpenTelemetry packages, which are not installed: "
            "pip install 'loopscope[otel]'"
        )
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
    "events": lambda name, raw: _parse_choice(name, raw, ("auto", "structlog", "logging", "off")),
    "loop_blocked_after": _parse_seconds,
    "log_stack": lambda name, raw: _parse_choice(name, raw, ("application", "full", "none")),
    "import_events": lambda name, raw: _parse_choice(name, raw, ("once", "all", "off")),
    "stderr_reports": _parse_switch,
    "events_endpoint": _parse_switch,
    "instruments": _parse_instruments,
    "max_loop_labels": _parse_label_cap,
    "max_locations": _parse_label_cap,
    "max_executor_labels": _parse_label_cap,
    "multiprocess_dir": _parse_directory,
    "registry": _parse_registry,
    "otel": _parse_otel,
    "tls_certfile": _parse_file,
    "tls_keyfile": _parse_file,
    "tls_client_cafile": _parse_file,
    "basic_auth_username": _parse_username,
    "basic_auth_password": _parse_password,
}

ENV_PREFIX = "LOOPSCOPE_"

#: ``LOOPSCOPE_*`` variables that are not options: accepted silently, never suggested.
#: ``LOOPSCOPE_PURE_PYTHON`` is read at import (``_hotpath``); the ``LOOPSCOPE_RUN*`` ones are
#: set by ``loopscope run`` for the processes it starts (``_run``).
INTERNAL_VARIABLES = frozenset(
    {"LOOPSCOPE_PURE_PYTHON", "LOOPSCOPE_RUN", "LOOPSCOPE_RUN_OWNER", "LOOPSCOPE_RUN_TMPDIR"}
)


#: Options that were renamed, with what to write now.
_RENAMED = {"slow_events": "events (false is now off)"}


def _renamed(names: list[str]) -> str:
    """`` (... is now ...)`` for those of ``names`` that were renamed."""
    now = [f"{name} is now {_RENAMED[name]}" for name in names if name in _RENAMED]
    return f" ({'; '.join(now)})" if now else ""


def env_name(option: str) -> str:
    """The environment variable that sets ``option``."""
    return ENV_PREFIX + option.upper()


def _is_blank(value: str) -> bool:
    return value.strip() == ""


def _environment_values(
    environ: Mapping[str, str], table: tuple[OptionInfo, ...]
) -> dict[str, str]:
    """The options set by ``LOOPSCOPE_*`` variables: a blank variable is the same as an
    unset one.  Raises :class:`ConfigError` for a variable that is no option."""
    variables = {info.variable: info.name for info in table if info.variable is not None}
    stray = sorted(
        k
        for k, v in environ.items()
        if k.startswith(ENV_PREFIX)
        and k not in variables
        and k not in INTERNAL_VARIABLES
        and not _is_blank(v)
    )
    if stray:
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(stray)}"
            f"{_renamed([k[len(ENV_PREFIX) :].lower() for k in stray])}; "
            f"known ones are {', '.join(sorted(variables))}"
        )
    return {
        name: environ[variable]
        for variable, name in variables.items()
        if variable in environ and not _is_blank(environ[variable])
    }


def resolve_options(
    kwargs: Mapping[str, object],
    environ: Mapping[str, str] | None = None,
    *,
    flags: Mapping[str, str] | None = None,
) -> Options:
    """Validate keyword arguments and ``LOOPSCOPE_*`` variables into one :class:`Options`.

    A keyword wins over its variable; a blank variable is the same as an unset one.  Raises
    :class:`ConfigError` naming the option (or the variable) at the first bad value.  With
    a ``port``, ``addr`` must be an address of this machine (it is resolved and bound).

    ``flags`` is for ``loopscope run``, which puts its flags' values in ``environ``: the
    flag of each option set that way, so that an error names the flag the user typed (and
    an option found missing is named by its flag and its variable)."""
    env = os.environ if environ is None else environ
    options, _sources = _resolve(kwargs, env, flags)
    return options


def _resolve(
    kwargs: Mapping[str, object],
    environ: Mapping[str, str],
    flags: Mapping[str, str] | None,
    *,
    check_endpoint: bool = True,
) -> tuple[Options, dict[str, str]]:
    table = option_table()
    known = [info.name for info in table]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))}{_renamed(unknown)}; "
            f"known options are {', '.join(known)}"
        )
    from_env = _environment_values(environ, table)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for info in table:
        parse = _PARSERS[info.name]
        if info.name in kwargs:
            sources[info.name] = f"option {info.name}"
            values[info.name] = parse(sources[info.name], kwargs[info.name])
        elif info.name in from_env:
            label = (flags or {}).get(info.name, f"environment variable {info.variable}")
            sources[info.name] = label
            values[info.name] = parse(label, from_env[info.name])
    options = Options(**values)
    if not check_endpoint:
        return options, sources
    if flags is None:
        missing = {info.name: f"option {info.name}" for info in table}
    else:
        missing = {info.name: f"{info.flag} or {info.variable}" for info in table}
    _check_endpoint(options, {**missing, **sources})
    return options, sources


def conflicting_options(
    installed: Options, kwargs: Mapping[str, object], environ: Mapping[str, str] | None = None
) -> list[str]:
    """The options that a later ``install(**kwargs)`` sets to other values than the
    ``installed`` ones, in :class:`Options` order: those it gives as keywords or through
    (non-blank) ``LOOPSCOPE_*`` variables.  An option it leaves out is no conflict: a plain
    ``install()`` after ``install(port=0)`` asks for nothing else.  ``registry`` is not
    compared (as in ``Options`` equality).  Meant for keyword arguments that
    :func:`resolve_options` has accepted: it does not load files or bind the address again
    (a bad value still raises :class:`ConfigError`)."""
    env = os.environ if environ is None else environ
    later, sources = _resolve(kwargs, env, None, check_endpoint=False)
    return [
        f.name
        for f in fields(Options)
        if f.compare and f.name in sources and getattr(later, f.name) != getattr(installed, f.name)
    ]


def _family(addr: str) -> socket.AddressFamily:
    # As the endpoint binds: an IPv6 literal has a colon; anything else is IPv4.
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def bind_error(addr: str, port: int) -> OSError | None:
    """Why a TCP socket cannot bind ``addr``:``port`` now (None if it can): bound with
    ``SO_REUSEADDR``, as the endpoint does, and closed at once."""
    try:
        sock = socket.socket(_family(addr), socket.SOCK_STREAM)
    except OSError as exc:
        return exc
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
    except OSError as exc:
        return exc
    finally:
        sock.close()
    return None


_DOTTED_NUMBERS = re.compile(r"[0-9.]+\Z")


def _check_addr(addr: str, name: str, *, bind: bool) -> None:
    """``addr`` must be a well-formed address and, to ``bind`` it (when there is a port),
    one of this machine: it is resolved and bound."""
    family = _family(addr)
    try:
        socket.getaddrinfo(addr, None, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        numeric = True
    except (OSError, UnicodeError):
        numeric = False
    if not numeric and (family == socket.AF_INET6 or _DOTTED_NUMBERS.match(addr)):
        version = "IPv6" if family == socket.AF_INET6 else "IPv4"
        raise ConfigError(
            f"{name}: {addr!r} is not a valid {version} address; give an IP address or host "
            "name of this machine, such as '127.0.0.1' or '0.0.0.0'"
        )
    if not bind:
        return
    try:
        error = bind_error(addr, 0)
    except UnicodeError as exc:  # a host name IDNA cannot encode
        error = OSError(str(exc))
    if error is None:
        return
    if isinstance(error, socket.gaierror):
        why = f"cannot resolve it: {error.strerror or error}"
    else:
        why = f"cannot bind it: {error.strerror or error}"
    raise ConfigError(
        f"{name}: {addr!r} is not an address of this machine ({why}); give an IP address or "
        "host name of this machine, such as '127.0.0.1' or '0.0.0.0'"
    )


def _check_endpoint(options: Options, sources: Mapping[str, str]) -> None:
    """Options of the endpoint that only make sense together; loads the TLS files so that a
    bad certificate or key is reported here, before anything is installed, and checks that
    the endpoint's address is one of this machine."""

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
    _check_addr(options.addr, source("addr"), bind=options.port is not None)


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
