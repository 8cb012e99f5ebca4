"""Numbers read from headers, config and files: ASCII digits only, and a bounded count.

Each case below reached ``int()`` through ``str.isdigit()`` before and raised a
ValueError (a 500 or a traceback instead of a clear error), or grew a list without bound.
"""

from __future__ import annotations

import pytest

from regmirror.auth.htpasswd import HtpasswdInvalid, parse
from regmirror.config import ConfigError, load
from regmirror.numbers import ascii_int, content_range_total

OTHER_DIGITS = ["²", "١٢", "１２", "߂"]  # superscript, Arabic-Indic, fullwidth, N'Ko


@pytest.mark.parametrize("text", [*OTHER_DIGITS, "", "-1", "+1", " 1", "1 ", "1.0", "0x1"])
def test_ascii_int_refuses_what_is_not_ascii_digits(text: str) -> None:
    assert ascii_int(text) is None


def test_ascii_int_bounds_the_digits() -> None:
    assert ascii_int("9" * 18) == int("9" * 18)
    assert ascii_int("9" * 19) is None
    assert ascii_int("65535", max_digits=5) == 65535
    assert ascii_int("065535", max_digits=5) is None


@pytest.mark.parametrize(
    ("header", "total"),
    [("bytes 0-9/1234", 1234), ("bytes 0-9/*", None), (None, None), ("bytes 0-1/²", None)],
)
def test_content_range_total(header: str | None, total: int | None) -> None:
    assert content_range_total(header) == total


@pytest.mark.parametrize("port", ["²", "５０００", "1" * 30])
def test_a_listen_port_in_other_digits_is_a_config_error(port: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load(environ={"REGMIRROR_LISTEN": f"127.0.0.1:{port}"}).host_port()


@pytest.mark.parametrize("index", ["²", "1000", "9" * 30])
def test_an_env_list_index_out_of_bounds_is_a_config_error(index: str) -> None:
    environ = {f"REGMIRROR_UPSTREAMS__{index}__URL": "http://127.0.0.1:1"}
    with pytest.raises(ConfigError, match="list index"):
        load(environ={"REGMIRROR_UPSTREAMS__0__URL": "http://127.0.0.1:1", **environ})


def test_a_bcrypt_cost_in_other_digits_is_an_invalid_htpasswd_line() -> None:
    with pytest.raises(HtpasswdInvalid, match="line 1"):
        parse("ci:$2y$1²$" + "a" * 53, "htpasswd")
