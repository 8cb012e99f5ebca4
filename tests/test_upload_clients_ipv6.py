"""Upload-session caps per client count an IPv6 client by its network
(``uploads.client_ipv6_prefix``, /64 by default), not by its address.

One host is routinely handed a whole /64 and may take a fresh address (privacy
extensions, or on purpose) for every request; counted per address, it could open
sessions without end past ``uploads.max_sessions_per_client``. The client addresses
come through ``X-Forwarded-For`` from a trusted proxy on loopback.
"""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from regmirror.config import AuthSettings, ConfigError, UploadSettings, load
from regmirror.upload_caps import SessionCaps
from tests.support.api import client, data_dir, make_client  # noqa: F401  (fixtures)
from tests.support.auth import basic, write_htpasswd

NAME = "lib/app"
PATH = f"/v2/{NAME}/blobs/uploads/"
CI = ("ci", "ci-password")


async def open_from(client: Any, address: str) -> tuple[int, str]:
    headers = {"X-Forwarded-For": address, **basic(*CI)}
    response = await client.post(PATH, headers=headers)
    return response.status, await response.text()


async def capped(make_client: Any, tmp_path: Path, **uploads: Any) -> Any:
    """A registry with two sessions per client, behind a trusted proxy on loopback."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd", dict([CI]))
    return await make_client(
        uploads=UploadSettings(max_sessions_per_client=2, **uploads),
        auth=AuthSettings(htpasswd=str(htpasswd), trusted_proxies=["127.0.0.1/32"]),
    )


async def test_addresses_of_one_ipv6_64_share_one_clients_cap(make_client, tmp_path):
    client = await capped(make_client, tmp_path)

    first = [await open_from(client, f"2001:db8:1:2::{i}") for i in (1, 2)]
    third = await open_from(client, "2001:db8:1:2:ffff:ffff:ffff:ffff")
    neighbour = await open_from(client, "2001:db8:1:3::1")  # the next /64: another client

    assert [status for status, _ in first] == [202, 202]
    assert third[0] == 429 and "TOOMANYREQUESTS" in third[1]
    assert "from 2001:db8:1:2::/64" in third[1]
    assert neighbour[0] == 202


async def test_a_restart_counts_the_sessions_on_disk_by_network(make_client, tmp_path):
    client = await capped(make_client, tmp_path)
    for i in (1, 2):
        assert (await open_from(client, f"2001:db8:1:2::{i}"))[0] == 202

    restarted = await capped(make_client, tmp_path)

    assert (await open_from(restarted, "2001:db8:1:2::3"))[0] == 429


async def test_the_prefix_length_is_configurable(make_client, tmp_path):
    per_address = await capped(make_client, tmp_path, client_ipv6_prefix=128)
    for i in (1, 2, 3):
        assert (await open_from(per_address, f"2001:db8:5::{i}"))[0] == 202

    per_56 = await capped(make_client, tmp_path, client_ipv6_prefix=56)
    assert (await open_from(per_56, "2001:db8:6:100::1"))[0] == 202
    assert (await open_from(per_56, "2001:db8:6:1ff::1"))[0] == 202  # same /56
    assert (await open_from(per_56, "2001:db8:6:1ab::1"))[0] == 429


def test_ipv4_and_unknown_clients_count_as_themselves():
    caps = SessionCaps(total=10, per_client=1)
    assert caps.client_key("192.0.2.7") == "192.0.2.7"
    assert caps.client_key("-") == "-"
    assert caps.client_key("2001:db8::1") == "2001:db8::/64"


def test_client_ipv6_prefix_is_read_and_checked():
    assert load(environ={}).uploads.client_ipv6_prefix == 64
    env = {"REGMIRROR_UPLOADS__CLIENT_IPV6_PREFIX": "48"}
    assert load(environ=env).uploads.client_ipv6_prefix == 48
    for bad in ("0", "129"):
        with pytest.raises(ConfigError, match="uploads.client_ipv6_prefix"):
            load(environ={"REGMIRROR_UPLOADS__CLIENT_IPV6_PREFIX": bad})
