"""The /metrics endpoint: where it binds, what it serves, TLS, client certificates, basic
authentication, and label values that come from the application."""

from __future__ import annotations

import asyncio
import base64
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import loopscope
from loopscope import _installation

Run = Callable[[Callable[[], Awaitable[Any]]], Any]
TIMEOUT = 10.0

# Without openssl the TLS tests skip, except under CI, where they fail.
_NO_OPENSSL = shutil.which("openssl") is None and not os.environ.get("CI")


class Pki:
    """A throw-away CA with a server certificate for 127.0.0.1 and a client certificate."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_key, self.ca_cert = root / "ca.key", root / "ca.pem"
        self.server_key, self.server_cert = root / "server.key", root / "server.pem"
        self.client_key, self.client_cert = root / "client.key", root / "client.pem"
        self.other_ca_cert = root / "other-ca.pem"
        # Extensions that strict X.509 verification (Python 3.13's default) requires.
        ca_ext = [
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-addext",
            "subjectKeyIdentifier=hash",
        ]
        self._openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=loopscope test CA",
            *ca_ext,
            "-keyout",
            self.ca_key,
            "-out",
            self.ca_cert,
        )
        self._openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=unrelated CA",
            *ca_ext,
            "-keyout",
            root / "other-ca.key",
            "-out",
            self.other_ca_cert,
        )
        self._leaf(
            "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
        )
        self._leaf("client", "extendedKeyUsage=clientAuth")

    def _openssl(self, *args: object) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    def _leaf(self, name: str, extension: str) -> None:
        key, csr, cert = (self.root / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        ext_file = self.root / f"{name}.ext"
        ext_file.write_text(
            extension + "\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        )
        self._openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            key,
            "-out",
            csr,
        )
        self._openssl(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            self.ca_cert,
            "-CAkey",
            self.ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext_file,
            "-out",
            cert,
        )

    def client_context(self, with_cert: bool = False) -> ssl.SSLContext:
        """A client context that trusts the test CA (and presents the client certificate)."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        if with_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


@pytest.fixture(scope="module", name="pki")
def fixture_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates generated for this test run."""
    if _NO_OPENSSL:
        pytest.skip("needs openssl")
    return Pki(tmp_path_factory.mktemp("pki"))


def _get(
    port: int,
    path: str = "/metrics",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT, context=context)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def _some_work() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _install_tls(registry: CollectorRegistry, pki: Pki, **options: Any) -> loopscope.Installation:
    """install() serving HTTPS on a free port with the test PKI's server certificate."""
    return loopscope.install(
        registry=registry,
        port=0,
        tls_certfile=str(pki.server_cert),
        tls_keyfile=str(pki.server_key),
        **options,
    )


def _nothing_installed(registry: CollectorRegistry) -> bool:
    return (
        _installation.current() is None
        and getattr(asyncio.BaseEventLoop.__init__, "__wrapped__", None) is None
        and registry.get_sample_value("asyncio_loop_task_steps_total", {"loop": "MainThread"})
        is None
    )


class TestBindingAndPaths:
    """The endpoint listens on loopback by default and serves only the exposition."""

    def test_binds_loopback_by_default(self, registry: CollectorRegistry, run: Run) -> None:
        """Without addr the server listens on 127.0.0.1 only."""
        installation = loopscope.install(registry=registry, port=0)
        run(_some_work)
        assert installation.server is not None
        assert installation.server.httpd.server_address[0] == "127.0.0.1"
        status, headers, body = _get(installation.server.port)
        assert status == 200 and b"asyncio_loop_task_steps_total" in body
        assert headers["Content-Type"].startswith("text/plain")

    def test_ipv6_loopback(self, registry: CollectorRegistry, run: Run) -> None:
        """addr="::1" binds IPv6 loopback and serves there."""
        if not socket.has_ipv6:
            pytest.skip("no IPv6")
        try:
            installation = loopscope.install(registry=registry, port=0, addr="::1")
        except loopscope.ConfigError:
            pytest.skip("IPv6 loopback unavailable")
        run(_some_work)
        assert installation.port is not None
        conn = http.client.HTTPConnection("::1", installation.port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200 and b"asyncio_" in response.read()
        finally:
            conn.close()

    @pytest.mark.parametrize(
        "path", ["/metrics/../etc/passwd", "/favicon.ico", "/debug", "/metricsx", "/metrics/x"]
    )
    def test_other_paths_are_404(self, registry: CollectorRegistry, run: Run, path: str) -> None:
        """Any other path gets a 404 that carries no metric."""
        installation = loopscope.install(registry=registry, port=0)
        run(_some_work)
        assert installation.port is not None
        status, _headers, body = _get(installation.port, path)
        assert status == 404 and b"asyncio_" not in body

    @pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "TRACE"])
    def test_other_methods_are_405(self, registry: CollectorRegistry, method: str) -> None:
        """Only GET and HEAD are answered."""
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port is not None
        status, headers, body = _get(installation.port, method=method)
        assert status == 405 and headers["Allow"] == "GET, HEAD" and b"asyncio_" not in body

    def test_head_has_no_body(self, registry: CollectorRegistry) -> None:
        """HEAD answers the headers of GET without the exposition."""
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port is not None
        status, headers, body = _get(installation.port, method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


class TestTls:
    """HTTPS with the certificate and key given as options or variables."""

    def test_https_scrape(self, registry: CollectorRegistry, run: Run, pki: Pki) -> None:
        """A client that trusts the CA scrapes over HTTPS."""
        installation = _install_tls(registry, pki)
        run(_some_work)
        assert installation.port is not None
        status, _headers, body = _get(installation.port, context=pki.client_context())
        assert status == 200 and b"asyncio_loop_task_steps_total" in body

    def test_plain_http_gets_no_metrics(self, registry: CollectorRegistry, pki: Pki) -> None:
        """A plain-HTTP request to the TLS endpoint is refused without any metric."""
        installation = _install_tls(registry, pki)
        assert installation.port is not None
        with socket.create_connection(("127.0.0.1", installation.port), timeout=TIMEOUT) as raw:
            raw.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            received = b""
            try:
                while chunk := raw.recv(65536):
                    received += chunk
            except OSError:
                pass
        assert b"asyncio_" not in received

    def test_from_environment(
        self, registry: CollectorRegistry, pki: Pki, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """LOOPSCOPE_TLS_CERTFILE and LOOPSCOPE_TLS_KEYFILE configure HTTPS."""
        monkeypatch.setenv("LOOPSCOPE_TLS_CERTFILE", str(pki.server_cert))
        monkeypatch.setenv("LOOPSCOPE_TLS_KEYFILE", str(pki.server_key))
        monkeypatch.setenv("LOOPSCOPE_PORT", "0")
        installation = loopscope.install(registry=registry)
        assert installation.port is not None
        status, _headers, _body = _get(installation.port, context=pki.client_context())
        assert status == 200

    def test_silent_client_blocks_nobody(self, registry: CollectorRegistry, pki: Pki) -> None:
        """A connection that never starts its handshake does not hold up other scrapers."""
        installation = _install_tls(registry, pki)
        assert installation.port is not None
        with socket.create_connection(("127.0.0.1", installation.port), timeout=TIMEOUT):
            status, _headers, _body = _get(installation.port, context=pki.client_context())
        assert status == 200

    def test_client_certificate_required(self, registry: CollectorRegistry, pki: Pki) -> None:
        """With tls_client_cafile, only clients with a certificate from that CA get in."""
        installation = _install_tls(registry, pki, tls_client_cafile=str(pki.ca_cert))
        assert installation.port is not None
        status, _headers, body = _get(installation.port, context=pki.client_context(True))
        assert status == 200 and b"asyncio_" in body
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _get(installation.port, context=pki.client_context(False))

    def test_client_from_other_ca_refused(self, registry: CollectorRegistry, pki: Pki) -> None:
        """A client certificate the configured CA did not sign is refused."""
        installation = _install_tls(registry, pki, tls_client_cafile=str(pki.other_ca_cert))
        assert installation.port is not None
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _get(installation.port, context=pki.client_context(True))


class TestTlsOptionErrors:
    """A TLS option that cannot be used names itself and leaves nothing installed."""

    def test_certfile_without_keyfile(self, registry: CollectorRegistry, pki: Pki) -> None:
        """A certificate without its key names tls_keyfile."""
        with pytest.raises(loopscope.ConfigError, match="tls_keyfile"):
            loopscope.install(registry=registry, port=0, tls_certfile=str(pki.server_cert))
        assert _nothing_installed(registry)

    def test_not_pem(self, registry: CollectorRegistry, pki: Pki, tmp_path: Path) -> None:
        """A file that is not a certificate names tls_certfile."""
        junk = tmp_path / "junk.pem"
        junk.write_text("not a certificate\n")
        with pytest.raises(loopscope.ConfigError, match="tls_certfile"):
            loopscope.install(
                registry=registry, port=0, tls_certfile=str(junk), tls_keyfile=str(pki.server_key)
            )
        assert _nothing_installed(registry)

    def test_key_does_not_match(self, registry: CollectorRegistry, pki: Pki) -> None:
        """A key of another certificate is refused."""
        with pytest.raises(loopscope.ConfigError, match="tls_keyfile"):
            loopscope.install(
                registry=registry,
                port=0,
                tls_certfile=str(pki.server_cert),
                tls_keyfile=str(pki.client_key),
            )
        assert _nothing_installed(registry)

    def test_encrypted_key(self, registry: CollectorRegistry, pki: Pki, tmp_path: Path) -> None:
        """A passphrase-protected key is refused at once, without prompting for it."""
        key, cert = tmp_path / "enc.key", tmp_path / "enc.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-passout",
                "pass:secret",
                "-days",
                "1",
                "-subj",
                "/CN=enc",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        with pytest.raises(loopscope.ConfigError, match="encrypted"):
            loopscope.install(
                registry=registry, port=0, tls_certfile=str(cert), tls_keyfile=str(key)
            )
        assert _nothing_installed(registry)

    def test_missing_file_from_environment(
        self,
        registry: CollectorRegistry,
        pki: Pki,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
    ) -> None:
        """A variable naming a missing file is reported by its variable name."""
        monkeypatch.setenv("LOOPSCOPE_TLS_CLIENT_CAFILE", str(tmp_path / "absent.pem"))
        with pytest.raises(loopscope.ConfigError, match="LOOPSCOPE_TLS_CLIENT_CAFILE"):
            _install_tls(registry, pki)
        assert _nothing_installed(registry)

    def test_bad_client_ca(self, registry: CollectorRegistry, pki: Pki, tmp_path: Path) -> None:
        """A CA file without certificates names tls_client_cafile."""
        junk = tmp_path / "ca.pem"
        junk.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        with pytest.raises(loopscope.ConfigError, match="tls_client_cafile"):
            _install_tls(registry, pki, tls_client_cafile=str(junk))
        assert _nothing_installed(registry)

    def test_client_ca_without_tls(self, registry: CollectorRegistry, pki: Pki) -> None:
        """Client certificates without HTTPS are a configuration error."""
        with pytest.raises(loopscope.ConfigError, match="tls_client_cafile"):
            loopscope.install(registry=registry, port=0, tls_client_cafile=str(pki.ca_cert))
        assert _nothing_installed(registry)


class TestBasicAuth:
    """HTTP basic authentication in front of everything the endpoint answers."""

    @pytest.fixture(name="port")
    def fixture_port(self, registry: CollectorRegistry, run: Run) -> int:
        """An endpoint that wants user "prom" with password "s3cret:with colon"."""
        installation = loopscope.install(
            registry=registry,
            port=0,
            basic_auth_username="prom",
            basic_auth_password="s3cret:with colon",
        )
        run(_some_work)
        assert installation.port is not None
        return installation.port

    def test_right_credentials(self, port: int) -> None:
        """The right user and password get the exposition."""
        status, _headers, body = _get(port, headers=_basic("prom", "s3cret:with colon"))
        assert status == 200 and b"asyncio_loop_task_steps_total" in body

    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"Authorization": "Basic"},
            {"Authorization": "Basic !!!notbase64"},
            {"Authorization": "Bearer cHJvbTpzM2NyZXQ="},
            _basic("prom", "wrong"),
            _basic("other", "s3cret:with colon"),
            _basic("prom", "s3cret:with colo"),
        ],
    )
    def test_wrong_credentials(self, port: int, headers: dict[str, str]) -> None:
        """Anything but the right credentials gets 401 with a challenge and no metrics."""
        status, got, body = _get(port, headers=headers)
        assert status == 401 and got["WWW-Authenticate"].startswith("Basic realm=")
        assert b"asyncio_" not in body

    def test_other_paths_need_credentials_too(self, port: int) -> None:
        """An unauthenticated client cannot even probe which paths exist."""
        status, _headers, _body = _get(port, "/nowhere")
        assert status == 401

    def test_password_never_shown(self, registry: CollectorRegistry) -> None:
        """Neither repr(options) nor an error message contains the password."""
        installation = loopscope.install(
            registry=registry, basic_auth_username="u", basic_auth_password="hunter2-secret"
        )
        assert "hunter2-secret" not in repr(installation.options)
        loopscope.uninstall()
        with pytest.raises(loopscope.ConfigError) as caught:
            loopscope.install(registry=registry, basic_auth_password="hunter2\nsecret")
        assert "hunter2" not in str(caught.value)
        assert "basic_auth_password" in str(caught.value)

    def test_password_without_user(self, registry: CollectorRegistry) -> None:
        """A password alone names basic_auth_username; nothing is installed."""
        with pytest.raises(loopscope.ConfigError, match="basic_auth_username"):
            loopscope.install(registry=registry, port=0, basic_auth_password="pw")
        assert _nothing_installed(registry)

    def test_with_tls(self, registry: CollectorRegistry, pki: Pki) -> None:
        """Basic authentication and TLS work together."""
        installation = _install_tls(
            registry, pki, basic_auth_username="prom", basic_auth_password="pw"
        )
        assert installation.port is not None
        context = pki.client_context()
        assert _get(installation.port, context=context)[0] == 401
        assert _get(installation.port, headers=_basic("prom", "pw"), context=context)[0] == 200


class TestLabelEscaping:
    """Label values that come from the application are escaped in the exposition."""

    @pytest.mark.parametrize("name", ['quote " back\\slash', "new\nline", "brace} =, x", "ünï"])
    def test_thread_name_round_trips(
        self, registry: CollectorRegistry, loop_kind: str, name: str
    ) -> None:
        """A loop in a thread with a hostile name is exported under exactly that name."""
        from .conftest import make_loop

        installation = loopscope.install(registry=registry, port=0)

        def body() -> None:
            loop = make_loop(loop_kind)
            try:
                loop.run_until_complete(_some_work())
            finally:
                loop.close()

        thread = threading.Thread(target=body, name=name)
        thread.start()
        thread.join(TIMEOUT)
        assert installation.port is not None
        status, _headers, text = _get(installation.port)
        assert status == 200
        loops = {
            s.labels["loop"]
            for family in text_string_to_metric_families(text.decode())
            if family.name == "asyncio_loop_task_steps"
            for s in family.samples
        }
        assert name in loops
