"""loopscope makes no reference cycles: what a connection leaves behind (its protocol, its
transport, an SSL context) is freed by reference counting as soon as the loop lets go of it,
with loopscope installed exactly as without it.

The cyclic garbage collector is off while each scenario runs, so an object caught in a
cycle stays alive and the test sees it through a weak reference.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import loopscope
from loopscope import _hotpath
from loopscope._describe import describe_callback
from loopscope._stats import LoopStats
from loopscope._uvloop_hooks import instrument_protocol, is_timed_io

from .conftest import make_loop

# Without openssl the TLS test skips, except under CI, where it fails.
_NO_OPENSSL = shutil.which("openssl") is None and not os.environ.get("CI")


@pytest.fixture(scope="module", name="certificate")
def fixture_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed server certificate and its key (an EC key: quick to make)."""
    if _NO_OPENSSL:
        pytest.skip("needs openssl")
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", key, "-out", cert],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(name="no_gc")
def fixture_no_gc() -> Iterator[None]:
    """The cyclic garbage collector off during the test."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Tracker:
    """Weak references to what a scenario made, and the protocols' own observations."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[Any]] = []
        self.instrumented: list[bool] = []

    def track(self, obj: object) -> None:
        self.refs.append(weakref.ref(obj))

    def factory(self, cls: Callable[[], Any]) -> Callable[[], Any]:
        """A protocol factory that tracks what it makes."""

        def make() -> Any:
            protocol = cls()
            self.track(protocol)
            return protocol

        return make

    def alive(self) -> list[str]:
        return [type(obj).__name__ for obj in (ref() for ref in self.refs) if obj is not None]


class StreamProtocol(asyncio.Protocol):
    """Echoes, and notes whether uvloop's calls go through loopscope's wrappers."""

    tracker: Tracker | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.tracker is not None:
            self.tracker.instrumented.append(is_timed_io(vars(self).get("data_received")))

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport.close()  # (asyncio's TLS transport warns, unclosed, before 3.11)


class DatagramProtocol(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received = data


class PipeProtocol(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport


class ProcessProtocol(asyncio.SubprocessProtocol):
    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)  # the process exited and its pipes are closed


async def tcp(tracker: Tracker, certificate: Any) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(tracker.factory(StreamProtocol), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def streams(tracker: Tracker, certificate: Any) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tracker.track(writer.transport.get_protocol())
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    tracker.track(writer.transport.get_protocol())
    tracker.track(writer)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def tls(tracker: Tracker, certificate: Any) -> None:
    loop = asyncio.get_running_loop()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(*certificate)
    server = await loop.create_server(
        tracker.factory(StreamProtocol), "127.0.0.1", 0, ssl=server_context
    )
    port = server.sockets[0].getsockname()[1]
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    tracker.track(client_context)
    answered = loop.create_future()

    class Client(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            answered.set_result(data)

    transport, _ = await loop.create_connection(
        tracker.factory(Client), "127.0.0.1", port, ssl=client_context
    )
    del client_context
    transport.write(b"ping")
    assert await answered == b"ping"
    transport.close()
    server.close()
    await server.wait_closed()


async def udp(tracker: Tracker, certificate: Any) -> None:
    loop = asyncio.get_running_loop()
    receiver, protocol = await loop.create_datagram_endpoint(
        tracker.factory(DatagramProtocol), local_addr=("127.0.0.1", 0)
    )
    sender, _ = await loop.create_datagram_endpoint(
        tracker.factory(DatagramProtocol), remote_addr=receiver.get_extra_info("sockname")
    )
    while not hasattr(protocol, "received"):
        sender.sendto(b"ping")
        await asyncio.sleep(0.001)
    del protocol
    sender.close()
    receiver.close()


async def pipes(tracker: Tracker, certificate: Any) -> None:
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    read_end, write_end = os.fdopen(read_fd, "rb", 0), os.fdopen(write_fd, "wb", 0)
    reader, _ = await loop.connect_read_pipe(tracker.factory(PipeProtocol), read_end)
    writer, _ = await loop.connect_write_pipe(tracker.factory(PipeProtocol), write_end)
    writer.write(b"ping")
    writer.close()
    reader.close()


async def process(tracker: Tracker, certificate: Any) -> None:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        tracker.factory(ProcessProtocol), sys.executable, "-c", ""
    )
    await protocol.lost
    del protocol
    transport.close()
    # Rarely (seen on Python 3.13 under load) uvloop keeps a finished subprocess's
    # transport alive from C, with no reference anyone can see: the protocol is taken out
    # of it, so that what is checked is whether anything else still holds the protocol.
    transport.set_protocol(asyncio.SubprocessProtocol())


async def refused(tracker: Tracker, certificate: Any) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OSError):
        await loop.create_connection(tracker.factory(StreamProtocol), "127.0.0.1", port)


SCENARIOS = [tcp, streams, tls, udp, pipes, process, refused]
#: Scenarios in which uvloop makes a protocol (asyncio's loop makes none for a refused
#: connection).
UVLOOP_MAKES_PROTOCOLS = {scenario.__name__ for scenario in SCENARIOS}


async def _until_freed(tracker: Tracker) -> None:
    """Let the loop finish closing: transports are let go of within a few iterations (a
    subprocess's once the child watcher has seen it exit: up to 2 s on a busy machine)."""
    for _ in range(400):
        if not tracker.alive():
            return
        await asyncio.sleep(0.005)


@pytest.mark.usefixtures("no_gc")
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_connections_are_freed_by_reference_counting(
    loop_kind: str,
    registry: CollectorRegistry,
    certificate: tuple[Path, Path],
    scenario: Callable[[Tracker, Any], Awaitable[None]],
) -> None:
    """A closed connection's protocol and what it holds are freed without the cyclic GC,
    with loopscope installed (and with the protocol's methods wrapped on uvloop)."""
    loopscope.install(registry=registry, events="off")
    tracker = Tracker()
    StreamProtocol.tracker = tracker
    loop = make_loop(loop_kind)
    try:
        loop.run_until_complete(scenario(tracker, certificate))
        loop.run_until_complete(_until_freed(tracker))
    finally:
        StreamProtocol.tracker = None
        loop.close()
    # uvloop can hold a finished subprocess's transport, and so its protocol, until the
    # loop closes: the loop is closed and dropped before the check.
    del loop
    assert tracker.alive() == []
    assert tracker.refs or loop_kind == "asyncio"
    if loop_kind == "uvloop" and tracker.instrumented:
        assert all(tracker.instrumented)


@pytest.mark.usefixtures("no_gc")
@pytest.mark.parametrize("uninstall", [False, True], ids=["closed", "uninstalled"])
def test_a_closed_loop_is_freed_by_reference_counting(
    loop_kind: str, registry: CollectorRegistry, uninstall: bool
) -> None:
    """A loop that ran is freed as soon as it is closed and dropped, whether loopscope was
    still installed or uninstalled before (the probe, in a cycle with its recorder, lets
    go of it)."""
    loopscope.install(registry=registry, events="off")
    loop = make_loop(loop_kind)
    loop.run_until_complete(asyncio.sleep(0.001))
    if uninstall:
        loopscope.uninstall()
    ref = weakref.ref(loop)
    loop.close()
    del loop
    assert ref() is None


class _Probe:
    """What a protocol's wrappers need of a probe."""

    active = True

    def __init__(self) -> None:
        self.stats = LoopStats()
        self.recorder = _hotpath.twin.Recorder(self, time.monotonic, 1.0, False, ())

    def fault(self, exc: BaseException) -> None:
        raise AssertionError("a fault of the wrapper") from exc


class Plain(asyncio.Protocol):
    def data_received(self, data: bytes, *more: object) -> object:
        if data == b"raise":
            raise ValueError(data)
        return (self, data, more)


def _held_by(wrapper: object) -> list[object]:
    """What a wrapper refers to, looking into the tuple the pure twin keeps its state in."""
    held: list[object] = []
    for obj in gc.get_referents(wrapper):
        held.extend(obj if type(obj) is tuple else (obj,))
    return held


class TestProtocolWrappers:
    """What instrument_protocol gives a protocol: weak where the protocol's class defines
    the method, strong otherwise, and transparent either way."""

    def test_a_class_method_does_not_hold_the_protocol(self) -> None:
        """A method defined on the class is wrapped without a reference to the protocol;
        the wrapper's repr() and callback are the bound method's."""
        protocol = Plain()
        instrument_protocol(protocol, _Probe())
        wrapper = vars(protocol)["data_received"]
        assert is_timed_io(wrapper)
        assert not any(obj is protocol for obj in _held_by(wrapper))
        assert repr(wrapper) == repr(Plain.data_received.__get__(protocol))
        assert wrapper.callback == Plain.data_received.__get__(protocol)
        ref = weakref.ref(protocol)
        del protocol, wrapper
        assert ref() is None

    def test_calls_are_passed_through(self) -> None:
        """Arguments, the result and exceptions pass through, however the wrapper is called
        (with room for the protocol in front of the arguments or not, with many of them)."""
        protocol = Plain()
        instrument_protocol(protocol, _Probe())
        many = tuple(range(12))
        assert protocol.data_received(b"a") == (protocol, b"a", ())
        assert protocol.data_received(*(b"b", 1)) == (protocol, b"b", (1,))
        assert protocol.data_received(b"c", *many) == (protocol, b"c", many)
        with pytest.raises(ValueError, match="raise"):
            protocol.data_received(b"raise")

    def test_a_method_whose_protocol_is_gone_does_nothing(self) -> None:
        """A wrapper kept after its protocol was freed returns None when called, raises
        nothing, and still has a repr()."""
        protocol = Plain()
        instrument_protocol(protocol, _Probe())
        wrapper = vars(protocol)["data_received"]
        del protocol
        assert wrapper(b"a") is None
        assert wrapper.callback is None
        assert "data_received" in repr(wrapper)

    @pytest.mark.parametrize("kind", ["instance", "static", "descriptor", "callable", "slots"])
    def test_other_attributes_are_held_as_they_are(self, kind: str) -> None:
        """An instance attribute, a static method, another descriptor, a callable object,
        or a class without weak references: the wrapper holds what the protocol gave."""
        seen: list[object] = []

        class Callable_:
            def __call__(self, data: bytes) -> None:
                seen.append(data)

        class Descriptor:
            def __get__(self, obj: object, owner: object = None) -> Any:
                return lambda data: seen.append(data)

        class Slotted(asyncio.Protocol):
            __slots__ = ("__dict__",)

            def data_received(self, data: bytes) -> None:
                seen.append(data)

        attributes: dict[str, object] = {
            "static": staticmethod(seen.append),
            "descriptor": Descriptor(),
            "callable": Callable_(),
        }
        protocol: Any
        if kind == "slots":
            protocol = Slotted()
        elif kind == "instance":
            protocol = Plain()
            protocol.data_received = seen.append
        else:
            protocol = type("Other", (asyncio.Protocol,), {"data_received": attributes[kind]})()
        instrument_protocol(protocol, _Probe())
        wrapper = vars(protocol)["data_received"]
        assert is_timed_io(wrapper)
        held = wrapper.callback
        assert any(obj is held for obj in _held_by(wrapper))
        protocol.data_received(b"x")
        assert seen == [b"x"]


class _SlowSteps(loopscope.Instrument):
    def __init__(self) -> None:
        self.slow: list[loopscope.SlowStep] = []

    def slow_step(self, event: loopscope.SlowStep) -> None:
        self.slow.append(event)


class Sleeper(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        time.sleep(0.1)
        self.transport.write(data)


def test_a_slow_protocol_method_is_named_as_its_bound_method(registry: CollectorRegistry) -> None:
    """On uvloop, the slow_step event of a protocol method names it as it names the bound
    method (its class, its name, where it is defined)."""
    instrument = _SlowSteps()
    loopscope.install(
        registry=registry, slow_threshold=0.05, events="off", instruments=[instrument]
    )
    loop = make_loop("uvloop")

    async def main() -> None:
        server = await loop.create_server(Sleeper, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    named = describe_callback(Sleeper().data_received)
    assert named.startswith("Sleeper.data_received (")
    assert [event.callback for event in instrument.slow] == [named]
