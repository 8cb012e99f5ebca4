"""HTTPS for the registry port: the server's ``SSLContext``, renewed when its files change.

cert-manager and ACME clients replace the certificate and key files in place (or swap a
symlink to them) before the old certificate expires. Every TLS handshake looks at the
files' identity (inode, size, mtime: three ``stat`` calls, nothing next to a handshake);
when they changed, a new context is built from them and that connection and every later
one use it. A half-written renewal (the key not yet matching the certificate) is logged
once and the previous certificate is served until the files are whole again: no restart,
no connection refused.

``tls.client_ca`` turns on mutual TLS: a client must present a certificate signed by one
of those CAs (``CERT_REQUIRED``), or the handshake fails.
"""

from __future__ import annotations

import logging
import os
import ssl

from regmirror.config import ConfigError, TLSSettings

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

_Identity = tuple[tuple[int, int, int, int], ...]


class ServerTLS:
    """The context to listen with (:attr:`context`) and the files it reloads from."""

    def __init__(self, settings: TLSSettings):
        if settings.cert is None or settings.key is None:
            missing = "tls.key" if settings.key is None else "tls.cert"
            raise ConfigError(f"{missing} is required with tls.cert / tls.key (HTTPS needs both)")
        self.settings = settings
        self._files = [p for p in (settings.cert, settings.key, settings.client_ca) if p]
        self._identity = self._stat()
        self._refused: object = None  # the files (or error) of a failed reload, logged once
        # Connections start on the context built at startup; each is moved to the
        # current one (the same object until a renewal) when its ClientHello arrives.
        self.context = self._current = self._build()
        self.context.sni_callback = self._on_client_hello

    @property
    def current(self) -> ssl.SSLContext:
        """The context new connections get: built from the files as they are now."""
        self.refresh()
        return self._current

    def refresh(self) -> None:
        """Rebuild the context if the files changed since it was built."""
        try:
            identity = self._stat()
        except ConfigError as exc:  # mid-rotation: a file is missing for a moment
            self._refuse(str(exc), exc)
            return
        if identity == self._identity or identity == self._refused:
            return
        try:
            context = self._build()
        except ConfigError as exc:
            self._refuse(identity, exc)
            return
        self._current, self._identity, self._refused = context, identity, None
        log.info("TLS: loaded the renewed certificate from %s", self.settings.cert)

    def _refuse(self, what: object, exc: ConfigError) -> None:
        if what != self._refused:
            log.warning("TLS: keeping the previous certificate: %s", exc)
        self._refused = what

    def _on_client_hello(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        # Called for every handshake, with or without SNI; switching the connection's
        # context here is how OpenSSL serves another certificate to it.
        current = self.current
        if connection.context is not current:
            connection.context = current

    def _stat(self) -> _Identity:
        identity = []
        for path in self._files:
            try:
                st = os.stat(path)
            except OSError as exc:
                raise ConfigError(f"TLS file {path}: {exc.strerror}") from exc
            identity.append((st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns))
        return tuple(identity)

    def _build(self) -> ssl.SSLContext:
        settings = self.settings
        assert settings.cert is not None and settings.key is not None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = MINIMUM_VERSION
        try:
            context.load_cert_chain(settings.cert, settings.key)
        except OSError as exc:
            raise ConfigError(
                f"tls.cert / tls.key ({settings.cert}, {settings.key}): {exc}"
            ) from exc
        if settings.client_ca:
            try:
                context.load_verify_locations(cafile=settings.client_ca)
            except OSError as exc:  # ssl.SSLError is an OSError
                raise ConfigError(f"tls.client_ca ({settings.client_ca}): {exc}") from exc
            context.verify_mode = ssl.CERT_REQUIRED
            _no_resumption(context)
        return context


def server_tls(settings: TLSSettings) -> ServerTLS | None:
    """The registry port's TLS, or None when ``tls`` asks for plain HTTP."""
    if settings.cert is None and settings.key is None:
        if settings.client_ca is not None:
            raise ConfigError("tls.client_ca needs tls.cert and tls.key (mutual TLS is HTTPS)")
        return None
    return ServerTLS(settings)


def _no_resumption(context: ssl.SSLContext) -> None:
    """No TLS session resumption with mutual TLS: a resumed session shows no certificate,
    and OpenSSL resumes against the context a connection began on (the one built at
    startup), so a session begun under a client CA since taken out of ``tls.client_ca``
    would still be let in. Every connection presents its certificate."""
    context.options |= ssl.OP_NO_TICKET  # no stateless tickets (TLS 1.2)
    context.num_tickets = 0  # no TLS 1.3 tickets
