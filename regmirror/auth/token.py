"""Docker token auth: Bearer JWTs from a token service, checked as registry:2 checks them.

A token is trusted only through a key the operator configured (``auth.token``):

- ``x5c``: a certificate chain that must lead to a certificate of ``rootcertbundle``
  (each certificate issued by the next, issuers being CAs, all within their validity);
  the leaf's key checks the signature.
- ``kid``: names a key of ``rootcertbundle`` or ``jwks`` by its RFC 7638 thumbprint, by
  libtrust's key ID (what registry:2's own token services put there), or by the JWKS
  entry's ``kid``.
- neither: every trusted key is tried.

An embedded ``jwk`` is never key material. The algorithm must be one the operator allows
(never ``none``; HMAC only when listed, with ``oct`` keys of the JWKS) and one that fits
the key's type. Then PyJWT checks the signature, ``exp`` / ``nbf`` with ``LEEWAY``,
``iss`` and that ``aud`` names ``service``; the ``access`` claim says what it grants.

The key files are re-read when they change, so a rotated signing key needs no restart.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from regmirror.auth.access import ANY, Access
from regmirror.config import ConfigError, TokenSettings

log = logging.getLogger(__name__)

LEEWAY = 60.0  # seconds of clock difference tolerated on exp and nbf (registry:2's)
MAX_CHAIN = 8
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
KNOWN_ALGORITHMS = RSA_ALGORITHMS | set(EC_ALGORITHMS.values()) | {"EdDSA"} | HMAC_ALGORITHMS


class InvalidToken(Exception):
    """A token that does not hold; ``reason`` is a bounded word for logs and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TrustedKey:
    key: Any  # a cryptography public key, or bytes for an HMAC (oct) key
    algorithms: frozenset[str]
    ids: frozenset[str]


@dataclass(frozen=True)
class Token:
    """A verified token: who it was issued to and what it grants."""

    subject: str
    access: tuple[Access, ...]

    def grants(self, access: Access) -> bool:
        return all(
            any(
                (held.type, held.name) == (access.type, access.name)
                and (action in held.actions or ANY in held.actions)
                for held in self.access
            )
            for action in access.actions
        )


class TokenVerifier:
    def __init__(self, settings: TokenSettings) -> None:
        missing = [k for k in ("realm", "service", "issuer") if not getattr(settings, k)]
        if missing:
            raise ConfigError(f"auth.token needs {', '.join('auth.token.' + k for k in missing)}")
        if not settings.rootcertbundle and not settings.jwks:
            raise ConfigError("auth.token needs auth.token.rootcertbundle or auth.token.jwks")
        self.realm: str = settings.realm  # type: ignore[assignment]
        self.service: str = settings.service  # type: ignore[assignment]
        self.issuer: str = settings.issuer  # type: ignore[assignment]
        self.algorithms = _algorithms(settings.signing_algorithms)
        self._files = [path for path in (settings.rootcertbundle, settings.jwks) if path]
        self._bundle, self._jwks = settings.rootcertbundle, settings.jwks
        self._stamps = _stamps(self._files)
        self.roots, self.keys = self._load()  # at startup a bad file is a ConfigError

    def _load(self) -> tuple[list[x509.Certificate], list[TrustedKey]]:
        roots: list[x509.Certificate] = []
        keys: list[TrustedKey] = []
        if self._bundle:
            roots = _load_certificates(self._bundle)
            keys += [self._trusted(cert.public_key(), ()) for cert in roots]
        if self._jwks:
            keys += self._load_jwks(self._jwks)
        keys = [key for key in keys if key.algorithms]
        if not keys:
            raise ConfigError(
                "auth.token: no configured key can sign with auth.token.signing_algorithms"
            )
        return roots, keys

    def _refresh(self) -> None:
        """Re-read the key files when they change (a rotated signing key needs no
        restart); files that turn unusable trust nothing until fixed."""
        stamps = _stamps(self._files)
        if stamps == self._stamps:
            return
        self._stamps = stamps
        try:
            self.roots, self.keys = self._load()
        except ConfigError as exc:
            log.error("%s; refusing every token until the key files are fixed", exc)
            self.roots, self.keys = [], []
            return
        log.info("auth.token key files re-read: %d keys", len(self.keys))

    def verify(self, token: str, now: datetime.datetime | None = None) -> Token:
        """The token's grants, or InvalidToken saying why not."""
        self._refresh()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("malformed", f"not a JWT: {exc}") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or not isinstance(kid, str | None):
            raise InvalidToken("malformed", "the token's alg or kid is not a string")
        if alg not in self.algorithms:
            raise InvalidToken("algorithm", f"signing algorithm {str(alg)[:20]!r} is not allowed")
        candidates = [k for k in self._keys_for(header, now) if alg in k.algorithms]
        if not candidates:
            raise InvalidToken("untrusted_key", "the token names no trusted key for its algorithm")
        error: InvalidToken | None = None
        for candidate in candidates:
            try:
                claims = self._decode(token, candidate.key, alg)
                break
            except InvalidToken as exc:
                error = exc
                if exc.reason != "bad_signature":
                    raise
        else:
            assert error is not None
            raise error
        return Token(str(claims.get("sub", "")), _access(claims.get("access", [])))

    def challenge(self, accesses: Sequence[Access], error: str | None = None) -> str:
        params = [f'realm="{self.realm}"', f'service="{self.service}"']
        if accesses:
            params.append(f'scope="{" ".join(a.scope for a in accesses)}"')
        if error:
            params.append(f'error="{error}"')
        return "Bearer " + ",".join(params)

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.service,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("expired", "the token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidToken("not_yet_valid", "the token is not valid yet") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken("wrong_audience", f"the token is not for {self.service}") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidToken("wrong_issuer", f"the token is not from {self.issuer}") from exc
        except jwt.InvalidSignatureError as exc:
            raise InvalidToken("bad_signature", "the token's signature does not verify") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken("malformed", f"the token has no {exc.claim!r} claim") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken("malformed", f"the token cannot be used: {exc}") from exc
        return claims

    def _keys_for(self, header: Mapping[str, Any], now: datetime.datetime | None) -> list[Any]:
        if "x5c" in header:
            leaf = _verify_chain(header["x5c"], self.roots, now or _now())
            return [self._trusted(leaf.public_key(), ())]
        kid = header.get("kid")
        if kid is not None:
            return [key for key in self.keys if kid in key.ids]
        return list(self.keys)

    def _trusted(self, key: Any, ids: Sequence[str]) -> TrustedKey:
        allowed = _algorithms_for(key) & self.algorithms
        if isinstance(key, bytes):
            return TrustedKey(key, allowed, frozenset(ids))
        return TrustedKey(key, allowed, frozenset([*ids, thumbprint(key), libtrust_key_id(key)]))

    def _load_jwks(self, path: str) -> list[TrustedKey]:
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"auth.token.jwks: cannot read {path}: {exc}") from exc
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ConfigError(f'auth.token.jwks: {path} is not a JWKS ({{"keys": [...]}})')
        keys = []
        for i, entry in enumerate(entries):
            try:
                jwk = jwt.PyJWK(entry)
            except jwt.PyJWTError as exc:
                raise ConfigError(f"auth.token.jwks: {path} key {i}: {exc}") from exc
            key = jwk.key
            if hasattr(key, "public_key") and not isinstance(key, bytes):
                key = key.public_key()  # a private key in the file: only its public half
            keys.append(self._trusted(key, [jwk.key_id] if jwk.key_id else []))
        return keys


def _stamps(paths: Sequence[str]) -> list[tuple[int, ...] | None]:
    stamps: list[tuple[int, ...] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
    return stamps


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _algorithms(configured: Sequence[str]) -> frozenset[str]:
    for name in configured:
        if name.lower() == "none":
            raise ConfigError(
                "auth.token.signing_algorithms: unsigned tokens ('none') are never accepted"
            )
        if name not in KNOWN_ALGORITHMS:
            raise ConfigError(
                f"auth.token.signing_algorithms: unknown algorithm {name!r} "
                f"(known: {', '.join(sorted(KNOWN_ALGORITHMS))})"
            )
    return frozenset(configured)


def _algorithms_for(key: Any) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return (
            frozenset({EC_ALGORITHMS[key.curve.name]})
            if key.curve.name in EC_ALGORITHMS
            else frozenset()
        )
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    if isinstance(key, bytes):
        return HMAC_ALGORITHMS
    return frozenset()


def _load_certificates(path: str) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"auth.token.rootcertbundle: cannot read {path}: {exc.strerror}") from exc
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"auth.token.rootcertbundle: {path} holds no PEM certificate") from exc
    return certificates


def _verify_chain(
    x5c: Any, roots: Sequence[x509.Certificate], now: datetime.datetime
) -> x509.Certificate:
    """The leaf of an ``x5c`` chain that leads to one of ``roots``; InvalidToken if none."""
    if not isinstance(x5c, list) or not x5c or len(x5c) > MAX_CHAIN:
        raise InvalidToken("malformed", "the token's x5c is not a certificate chain")
    try:
        chain = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c]
    except (ValueError, TypeError) as exc:
        raise InvalidToken(
            "malformed", "the token's x5c holds something else than certificates"
        ) from exc
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise InvalidToken("untrusted_key", "a certificate of the token's x5c is not valid now")
    trusted = {root.public_bytes(Encoding.DER) for root in roots}
    for index, cert in enumerate(chain):
        if cert.public_bytes(Encoding.DER) in trusted:
            return chain[0]  # every certificate before this one was issued by the next
        if index + 1 == len(chain):
            if any(_issued(cert, root) for root in roots):
                return chain[0]
            break
        issuer = chain[index + 1]
        if not _is_ca(issuer) or not _issued(cert, issuer):
            break
    raise InvalidToken("untrusted_key", "the token's x5c does not lead to a trusted certificate")


def _issued(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _access(claim: Any) -> tuple[Access, ...]:
    if not isinstance(claim, list):
        raise InvalidToken("malformed", "the token's access claim is not a list")
    granted = []
    for entry in claim:
        if not isinstance(entry, dict):
            raise InvalidToken("malformed", "an entry of the token's access claim is not an object")
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions") or []
        if not isinstance(kind, str) or not isinstance(name, str) or not isinstance(actions, list):
            raise InvalidToken("malformed", "an entry of the token's access claim is malformed")
        granted.append(Access(kind, name, tuple(str(a) for a in actions)))
    return tuple(granted)


def thumbprint(key: Any) -> str:
    """The RFC 7638 JWK thumbprint of a public key (base64url of SHA-256, unpadded)."""
    if isinstance(key, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
        members: tuple[str, ...] = ("e", "kty", "n")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
        members = ("crv", "kty", "x", "y")
    else:
        jwk = OKPAlgorithm.to_jwk(key, as_dict=True)
        members = ("crv", "kty", "x")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def libtrust_key_id(key: Any) -> str:
    """libtrust's key ID, which registry:2's token services put in ``kid``: the first 240
    bits of SHA-256 over the DER SubjectPublicKeyInfo, base32, in groups of four."""
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(text[i : i + 4] for i in range(0, len(text), 4))
