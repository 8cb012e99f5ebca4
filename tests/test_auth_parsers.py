"""The parsers of what clients send (Basic credentials, tokens, X-Forwarded-For) take any
input without raising anything but their own refusal."""

from __future__ import annotations

import base64
import ipaddress
import json

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regmirror.auth.clients import client_address, networks
from regmirror.auth.controllers import LoginFailed, basic_credentials
from regmirror.auth.token import InvalidToken, TokenVerifier
from regmirror.config import TokenSettings
from tests.support.token_server import ISSUER, SERVICE, TokenIssuer

TRUSTED = networks(["127.0.0.1/32", "10.0.0.0/8"], "test")


@pytest.fixture(scope="module")
def verifier(tmp_path_factory) -> TokenVerifier:
    path = tmp_path_factory.mktemp("token") / "root.pem"
    TokenIssuer().write_rootcertbundle(path)
    return TokenVerifier(
        TokenSettings(realm="http://t", service=SERVICE, issuer=ISSUER, rootcertbundle=str(path))
    )


def b64(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_basic_credentials_take_any_header(text):
    try:
        user, password = basic_credentials("Basic " + text)
    except LoginFailed as exc:
        assert exc.reason == "malformed"
    else:
        assert isinstance(user, str) and isinstance(password, str)


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_basic_credentials_take_any_bytes_encoded(raw):
    try:
        basic_credentials("Basic " + base64.b64encode(raw).decode())
    except LoginFailed:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_as_token_is_refused_as_invalid(verifier, text):
    with pytest.raises(InvalidToken):
        verifier.verify(text)


HEADER_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=20),
    st.lists(st.text(max_size=10), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["alg", "kid", "x5c", "jwk", "typ", "crit"]), HEADER_VALUES),
    st.dictionaries(
        st.sampled_from(["iss", "aud", "exp", "nbf", "access", "sub"]),
        HEADER_VALUES,
    ),
)
def test_any_json_header_and_claims_are_refused_as_invalid(verifier, header, claims):
    token = f"{b64(header)}.{b64(claims)}.{base64.urlsafe_b64encode(b'sig').decode()}"
    with pytest.raises(InvalidToken):
        verifier.verify(token)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": ["RS256"]},
        {"alg": "RS256", "kid": ["a"]},
        {"alg": "RS256", "kid": {"a": 1}},
        {"alg": "RS256", "x5c": "MIIB"},
        {"alg": "RS256", "x5c": [1, 2]},
        {"alg": "RS256", "x5c": ["!!!"]},
        {"alg": "RS256", "x5c": []},
    ],
)
def test_header_fields_of_the_wrong_type_are_invalid_tokens(verifier, header):
    with pytest.raises(InvalidToken):
        verifier.verify(f"{b64(header)}.{b64({})}.c2ln")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=60), max_size=4), st.sampled_from(["127.0.0.1", "192.0.2.1"]))
def test_any_forwarded_for_yields_an_address_or_none(values, peer):
    address = client_address(peer, values, TRUSTED)
    assert address is None or isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address)
    if peer == "192.0.2.1":  # not trusted: the header is never consulted
        assert str(address) == peer


def test_forwarded_for_walks_from_the_right_past_trusted_hops():
    hops = ["203.0.113.9, 198.51.100.7, 10.1.1.1"]
    assert str(client_address("127.0.0.1", hops, TRUSTED)) == "198.51.100.7"
    assert str(client_address("127.0.0.1", ["10.1.1.1", "10.2.2.2"], TRUSTED)) == "10.1.1.1"
    assert client_address("127.0.0.1", ["garbage"], TRUSTED) is None
    assert str(client_address("::ffff:127.0.0.1", ["[2001:db8::1]:443"], TRUSTED)) == "2001:db8::1"


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """(verifier, issuer): a verifier trusting the issuer's key."""
    issuer = TokenIssuer()
    path = issuer.write_rootcertbundle(tmp_path_factory.mktemp("signed") / "root.pem")
    settings_ = TokenSettings(
        realm="http://t", service=SERVICE, issuer=ISSUER, rootcertbundle=str(path)
    )
    return TokenVerifier(settings_), issuer


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["iss", "aud", "exp", "nbf", "iat", "access", "sub"]), HEADER_VALUES
    )
)
def test_signed_tokens_with_any_claims_verify_or_are_invalid(signed, claims):
    verifier, issuer = signed
    # Signed at the JWS layer: PyJWT's encoder would refuse some of these claims.
    payload = json.dumps(claims).encode()
    token = jwt.api_jws.encode(payload, issuer.key, algorithm="RS256", headers={"kid": issuer.kid})
    try:
        verified = verifier.verify(token)
    except InvalidToken:
        return
    assert isinstance(verified.subject, str)
