"""Server TLS: credentials that follow the certificate files as they are rotated, and the client identities
mutual TLS may be limited to (--tls-client-allow).

gRPC asks `CertificateFiles.fetch` before every TLS handshake (on one of its own threads): it answers None
(keep the certificate in use) unless a file changed, and then a new configuration only once the new
certificate and key are known to belong together. A half-written rotation (the certificate replaced, the
key not yet) therefore keeps the previous pair until the files agree again. Connections already open keep
the session they negotiated, so their calls and streams go on untouched.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Iterable

import grpc

from . import metrics
from .errors import refusal
from .interceptors import HEALTH_SERVICE, _split, wrap_handler

log = logging.getLogger("focalserve")


def _signature(paths: Iterable[str]) -> tuple:
    """What changes when a file is rewritten or a Kubernetes Secret volume swaps its `..data` link."""
    signature = []
    for path in paths:
        st = os.stat(path)
        signature.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(signature)


class CertificateFiles:
    """The server's PEM certificate (chain) and key, and the client CA bundle with mutual TLS."""

    def __init__(self, cert: str, key: str, client_ca: str = ""):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._paths = tuple(p for p in (cert, key, client_ca) if p)
        self._lock = threading.Lock()
        self._current: tuple | None = None  # signature of the files the server uses now
        self._refused: tuple | None = None  # signature already found unusable: warned once

    def load(self) -> tuple[tuple, grpc.ServerCertificateConfiguration]:
        """(signature, configuration) of the files as they are now; ValueError naming the flag at fault."""
        before = _signature(self._paths)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # also checks that the key is the certificate's; an encrypted key (which gRPC cannot use either)
            # fails instead of OpenSSL asking for its passphrase on the terminal
            context.load_cert_chain(self.cert, self.key, password=lambda: b"")
        except ssl.SSLError as e:
            raise ValueError(f"--tls-cert/--tls-key ({self.cert}, {self.key}): not a matching PEM certificate "
                             f"and private key ({e.reason or e})") from None
        if self.client_ca:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except ssl.SSLError as e:
                raise ValueError(f"--tls-client-ca ({self.client_ca}): not a PEM CA bundle ({e.reason or e})") \
                    from None
        with open(self.cert, "rb") as f:
            cert = f.read()
        with open(self.key, "rb") as f:
            key = f.read()
        client_ca = None
        if self.client_ca:
            with open(self.client_ca, "rb") as f:
                client_ca = f.read()
        if _signature(self._paths) != before:
            # rewritten while being read: what was read may mix two versions
            raise ValueError("the files changed while being read")
        return before, grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        try:
            self._current, configuration = self.load()
        except OSError as e:
            raise ValueError(f"TLS: cannot read {e.filename}: {e.strerror}") from None
        return grpc.dynamic_ssl_server_credentials(configuration, self.fetch,
                                                   require_client_authentication=bool(self.client_ca))

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate_configuration_fetcher: None keeps the configuration in use."""
        try:
            signature = _signature(self._paths)
            if signature == self._current or signature == self._refused:
                return None
            with self._lock:
                if signature == self._current:
                    return None
                try:
                    self._current, configuration = self.load()
                except (OSError, ValueError) as e:
                    if signature != self._refused:
                        self._refused = signature
                        log.warning("TLS: the certificate files changed but cannot be used yet (%s); still serving "
                                    "the previous certificate", e, extra={"fields": {
                                        "event": "tls_reload_failed", "error": str(e)}})
                    return None
            log.info("TLS: certificate reloaded from %s", self.cert,
                     extra={"fields": {"event": "tls_reloaded", "cert": self.cert}})
            return configuration
        except Exception:  # an exception here would fail the handshake; the previous certificate still works
            log.exception("TLS: checking the certificate files failed", extra={"fields": {"event": "tls_reload_failed"}})
            return None


# ---- mutual TLS limited to named clients ----

def peer_names(auth_context: dict) -> list[str]:
    """The names a client certificate carries: its subject alternative names (DNS, URI such as a SPIFFE ID,
    e-mail, IP) and its subject's common name."""
    names = []
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        names += [value.decode(errors="replace") for value in auth_context.get(key, ())]
    return names


class _Allowed:
    """One call: PERMISSION_DENIED at once unless the client certificate names an allowed identity."""

    __slots__ = ("allowed", "context")

    def __init__(self, allowed: frozenset, context):
        self.allowed, self.context = allowed, context

    async def __aenter__(self):
        names = peer_names(self.context.auth_context())
        if self.allowed.isdisjoint(names):
            metrics.REJECTED.labels("client_not_allowed").inc()
            shown = ", ".join(names[:8]) or "none"
            await self.context.abort_with_status(refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate: no name of it ({shown}) is in the server's --tls-client-allow list",
                "CLIENT_NOT_ALLOWED"))

    async def __aexit__(self, *exc):
        return False


class ClientIdentityInterceptor(grpc.aio.ServerInterceptor):
    """With mutual TLS, only clients whose certificate names one of `allowed` (as a subject alternative name
    or the common name, compared exactly) may call; health stays open to every client with a valid
    certificate, as it stays open without a token, so probes need no allowed identity."""

    def __init__(self, allowed: Iterable[str]):
        self._allowed = frozenset(allowed)
        self._wrapped: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or _split(handler_call_details.method)[0] == HEALTH_SERVICE:
            return handler
        if handler not in self._wrapped:
            self._wrapped[handler] = wrap_handler(handler, lambda context: _Allowed(self._allowed, context))
        return self._wrapped[handler]
