"""Settings: embedded defaults, a YAML file, REGMIRROR_* variables and flags, in that order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from regmirror import cli
from regmirror.config import ConfigError, Settings, load, parse_size


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "regmirror.yaml"
    path.write_text(text)
    return path


# -- defaults --------------------------------------------------------------------


def test_defaults_listen_on_loopback_port_5000():
    settings = load(environ={})

    assert settings.listen == "127.0.0.1:5000"
    assert settings.host_port() == ("127.0.0.1", 5000)


def test_defaults_have_no_s3_no_upstreams_and_loopback_anonymous_pull():
    settings = load(environ={})

    assert settings.s3.bucket is None
    assert settings.upstreams == []
    assert settings.auth.htpasswd is None
    assert settings.auth.anonymous_pull == ["127.0.0.0/8", "::1/128"]


def test_default_data_dir_is_under_xdg_data_home_for_non_root(monkeypatch, tmp_path):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))

    assert load(environ={}).data_dir == str(tmp_path / "regmirror")


def test_default_data_dir_for_root_is_var_lib(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 0)

    assert load(environ={}).data_dir == "/var/lib/regmirror"


# -- file ----------------------------------------------------------------------------


def test_yaml_file_sets_every_section(tmp_path):
    path = write_config(
        tmp_path,
        """
listen: 0.0.0.0:5001
data_dir: /srv/regmirror
cache:
  max_bytes: 10GiB
  min_free_bytes: 512MB
s3:
  bucket: images
  prefix: registry
  region: eu-west-1
  endpoint_url: http://127.0.0.1:9000
  path_style: true
upstreams:
  - url: https://registry-1.docker.io
    prefix: docker.io
    ns: docker.io
    username: ci
    password: secret
    tag_ttl: 60
  - url: https://ghcr.io
auth:
  htpasswd: /etc/regmirror/htpasswd
  anonymous_pull: [10.0.0.0/8]
""",
    )

    settings = load(path, environ={})

    assert settings.host_port() == ("0.0.0.0", 5001)
    assert settings.data_dir == "/srv/regmirror"
    assert settings.cache.max_bytes == 10 * 1024**3
    assert settings.cache.min_free_bytes == 512 * 10**6
    assert (settings.s3.bucket, settings.s3.prefix, settings.s3.region) == (
        "images",
        "registry",
        "eu-west-1",
    )
    assert settings.s3.endpoint_url == "http://127.0.0.1:9000"
    assert settings.s3.path_style is True
    docker, ghcr = settings.upstreams
    assert (docker.url, docker.prefix, docker.ns) == (
        "https://registry-1.docker.io",
        "docker.io",
        "docker.io",
    )
    assert (docker.username, docker.password, docker.tag_ttl) == ("ci", "secret", 60.0)
    assert (ghcr.url, ghcr.prefix, ghcr.tag_ttl) == ("https://ghcr.io", None, 300.0)
    assert settings.auth.htpasswd == "/etc/regmirror/htpasswd"
    assert settings.auth.anonymous_pull == ["10.0.0.0/8"]


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load(write_config(tmp_path, ""), environ={}) == load(environ={})


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "absent.yaml", environ={})


def test_invalid_yaml_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(write_config(tmp_path, "listen: [unclosed"), environ={})


def test_yaml_that_is_not_a_mapping_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load(write_config(tmp_path, "- a\n- b\n"), environ={})


# -- unknown keys and bad values -----------------------------------------------------


def test_unknown_top_level_key_is_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="lisen"):
        load(write_config(tmp_path, "lisen: 1.2.3.4:5000\n"), environ={})


def test_unknown_nested_key_is_config_error_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.max_byte\b"):
        load(write_config(tmp_path, "cache:\n  max_byte: 1GiB\n"), environ={})


def test_unknown_key_in_list_item_is_config_error_with_its_path(tmp_path):
    text = "upstreams:\n  - url: https://example.com\n    passwd: x\n"

    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.passwd"):
        load(write_config(tmp_path, text), environ={})


def test_unknown_key_from_environment_is_config_error_with_its_path():
    with pytest.raises(ConfigError, match=r"s3\.bukket"):
        load(environ={"REGMIRROR_S3__BUKKET": "images"})


def test_bad_size_is_config_error_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.max_bytes"):
        load(write_config(tmp_path, "cache:\n  max_bytes: lots\n"), environ={})


def test_non_boolean_path_style_is_config_error_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"s3\.path_style"):
        load(write_config(tmp_path, "s3:\n  path_style: maybe\n"), environ={})


def test_upstream_without_url_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"upstreams\[0\]"):
        load(write_config(tmp_path, "upstreams:\n  - prefix: docker.io\n"), environ={})


def test_section_that_is_not_a_mapping_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="s3"):
        load(write_config(tmp_path, "s3: images\n"), environ={})


@pytest.mark.parametrize("listen", ["localhost", "1.2.3.4:http", "1.2.3.4:0", ":70000"])
def test_listen_that_is_not_host_port_is_config_error(listen):
    with pytest.raises(ConfigError, match="listen"):
        Settings(listen=listen).host_port()


def test_listen_with_bracketed_ipv6_host():
    assert Settings(listen="[::1]:5000").host_port() == ("::1", 5000)


# -- environment -------------------------------------------------------------------


def test_env_sets_s3_bucket():
    assert load(environ={"REGMIRROR_S3__BUCKET": "images"}).s3.bucket == "images"


def test_env_sets_cache_max_bytes_with_size_suffix():
    settings = load(environ={"REGMIRROR_CACHE__MAX_BYTES": "10GiB"})

    assert settings.cache.max_bytes == 10 * 1024**3


def test_env_sets_cache_max_bytes_as_plain_number():
    assert load(environ={"REGMIRROR_CACHE__MAX_BYTES": "1048576"}).cache.max_bytes == 1048576


def test_env_creates_upstream_by_index():
    settings = load(environ={"REGMIRROR_UPSTREAMS__0__URL": "https://registry-1.docker.io"})

    assert [u.url for u in settings.upstreams] == ["https://registry-1.docker.io"]


def test_env_overrides_one_key_of_an_upstream_from_the_file(tmp_path):
    path = write_config(tmp_path, "upstreams:\n  - url: https://a.example\n    prefix: docker.io\n")

    settings = load(path, environ={"REGMIRROR_UPSTREAMS__0__URL": "https://b.example"})

    assert (settings.upstreams[0].url, settings.upstreams[0].prefix) == (
        "https://b.example",
        "docker.io",
    )


def test_env_overrides_file(tmp_path):
    path = write_config(tmp_path, "s3:\n  bucket: from-file\n  region: eu-west-1\n")

    settings = load(path, environ={"REGMIRROR_S3__BUCKET": "from-env"})

    assert settings.s3.bucket == "from-env"
    assert settings.s3.region == "eu-west-1"


def test_env_values_are_typed_as_yaml_scalars():
    settings = load(
        environ={
            "REGMIRROR_S3__PATH_STYLE": "true",
            "REGMIRROR_UPSTREAMS__0__URL": "https://a.example",
            "REGMIRROR_UPSTREAMS__0__TAG_TTL": "30",
        }
    )

    assert settings.s3.path_style is True
    assert settings.upstreams[0].tag_ttl == 30.0


@pytest.mark.parametrize("password", ["0123", "1_000", "0x1F", "yes", "null", "1.50", "12:30"])
def test_env_string_settings_keep_their_text_exactly(password):
    settings = load(
        environ={
            "REGMIRROR_UPSTREAMS__0__URL": "https://a.example",
            "REGMIRROR_UPSTREAMS__0__PASSWORD": password,
        }
    )

    assert settings.upstreams[0].password == password


def test_env_list_setting_is_read_as_yaml():
    settings = load(environ={"REGMIRROR_AUTH__ANONYMOUS_PULL": "[10.0.0.0/8, 192.168.0.0/16]"})

    assert settings.auth.anonymous_pull == ["10.0.0.0/8", "192.168.0.0/16"]


def test_env_without_prefix_or_with_bare_prefix_is_ignored():
    settings = load(environ={"S3__BUCKET": "x", "REGMIRROR_": "y", "HOME": "/root"})

    assert settings == load(environ={})


def test_env_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("REGMIRROR_S3__BUCKET", "from-process")

    assert load().s3.bucket == "from-process"


# -- flags ---------------------------------------------------------------------------


def test_flags_override_env_and_file(tmp_path):
    path = write_config(tmp_path, "listen: 10.0.0.1:5000\ndata_dir: /from/file\n")
    environ = {"REGMIRROR_LISTEN": "10.0.0.2:5000", "REGMIRROR_DATA_DIR": "/from/env"}

    settings = load(path, environ=environ, overrides={"listen": "10.0.0.3:5000"})

    assert settings.listen == "10.0.0.3:5000"
    assert settings.data_dir == "/from/env"


def test_flags_left_unset_do_not_override(tmp_path):
    path = write_config(tmp_path, "listen: 10.0.0.1:5000\n")

    settings = load(path, environ={}, overrides={"listen": None, "data_dir": None})

    assert settings.listen == "10.0.0.1:5000"


def test_env_overrides_file_for_listen(tmp_path):
    path = write_config(tmp_path, "listen: 10.0.0.1:5000\n")

    assert load(path, environ={"REGMIRROR_LISTEN": "10.0.0.2:6000"}).listen == "10.0.0.2:6000"


# -- sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10GiB", 10 * 1024**3),
        ("10gib", 10 * 1024**3),
        ("512MiB", 512 * 1024**2),
        ("512MB", 512 * 10**6),
        ("1.5G", int(1.5 * 10**9)),
        ("4KiB", 4096),
        ("1TiB", 1024**4),
        ("100", 100),
        ("100B", 100),
        (" 2 GiB ", 2 * 1024**3),
        (12345, 12345),
    ],
)
def test_parse_size_accepts_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GiB", "10XB", "GiB", "1e9", True])
def test_parse_size_rejects_non_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_unknown_non_string_key_is_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.5000"):
        load(write_config(tmp_path, "cache:\n  5000: x\n  max_bytes: 1GiB\n"), environ={})


def test_serve_flags_override_env_and_file_end_to_end(tmp_path, monkeypatch):
    path = write_config(tmp_path, f"listen: 127.0.0.1:5001\ndata_dir: {tmp_path / 'file'}\n")
    monkeypatch.setenv("REGMIRROR_LISTEN", "127.0.0.1:5002")
    monkeypatch.setenv("REGMIRROR_DATA_DIR", str(tmp_path / "env"))
    # One process: run_server is replaced in this one (workers would be forks of pytest).
    monkeypatch.setenv("REGMIRROR_SERVER__WORKERS", "1")
    served = {}

    def run_server(app, listen, **kwargs):
        served.update(host=listen.host, port=listen.port)

    monkeypatch.setattr("regmirror.cli.serve.run_server", run_server)

    status = cli.main(["serve", "--config", str(path), "--listen", "127.0.0.1:5003"])

    assert status == 0
    assert served == {"host": "127.0.0.1", "port": 5003}
    assert (tmp_path / "env").is_dir()
    assert not (tmp_path / "file").exists()


def test_serve_with_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    path = write_config(tmp_path, "cache:\n  max_byte: 1GiB\n")

    assert cli.main(["serve", "--config", str(path)]) == 2
    assert "cache.max_byte" in capsys.readouterr().err


def test_auth_settings_from_the_environment_including_lists_and_rules() -> None:
    settings = load(
        environ={
            "REGMIRROR_AUTH__HTPASSWD": "/etc/regmirror/htpasswd",
            "REGMIRROR_AUTH__REALM": "0123",
            "REGMIRROR_AUTH__ANONYMOUS_PULL": "[]",
            "REGMIRROR_AUTH__TRUSTED_PROXIES": "[10.0.0.5/32, 10.0.0.6/32]",
            "REGMIRROR_AUTH__RULES__0__USER": "ci",
            "REGMIRROR_AUTH__RULES__0__REPOSITORIES": "[team/*, base/*]",
            "REGMIRROR_AUTH__RULES__0__ACTIONS": "[pull, push]",
            "REGMIRROR_AUTH__RULES__1__USER": "*",
            "REGMIRROR_AUTH__RULES__1__REPOSITORIES": '["*"]',
            "REGMIRROR_AUTH__RULES__1__ACTIONS": "[pull]",
            "REGMIRROR_AUTH__TOKEN__SIGNING_ALGORITHMS__0": "ES256",
        }
    )

    auth = settings.auth
    assert (auth.htpasswd, auth.realm, auth.anonymous_pull) == (
        "/etc/regmirror/htpasswd",
        "0123",
        [],
    )
    assert auth.trusted_proxies == ["10.0.0.5/32", "10.0.0.6/32"]
    assert [(r.user, r.repositories, r.actions) for r in auth.rules] == [
        ("ci", ["team/*", "base/*"], ["pull", "push"]),
        ("*", ["*"], ["pull"]),
    ]
    assert auth.token.signing_algorithms == ["ES256"]
    assert auth.enabled


def test_anonymous_pull_items_from_the_environment_replace_the_default() -> None:
    settings = load(environ={"REGMIRROR_AUTH__ANONYMOUS_PULL__0": "10.0.0.0/8"})

    assert settings.auth.anonymous_pull == ["10.0.0.0/8"]
    assert not settings.auth.enabled


def test_token_settings_from_a_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
auth:
  token:
    realm: https://auth.example.com/token
    service: registry.example.com
    issuer: auth.example.com
    rootcertbundle: /etc/regmirror/token.pem
""",
    )

    token = load(path, environ={}).auth.token

    assert (token.realm, token.service, token.issuer) == (
        "https://auth.example.com/token",
        "registry.example.com",
        "auth.example.com",
    )
    assert token.rootcertbundle == "/etc/regmirror/token.pem"
    assert "RS256" in token.signing_algorithms and "HS256" not in token.signing_algorithms


@pytest.mark.parametrize("with_auth", [False, True])
def test_serve_warns_beyond_loopback_only_without_auth(tmp_path, monkeypatch, caplog, with_auth):
    monkeypatch.setattr("regmirror.cli.serve.run_server", lambda app, listen, **kwargs: None)
    for key in [k for k in os.environ if k.startswith("REGMIRROR_")]:
        monkeypatch.delenv(key)
    # One process: run_server is replaced in this one (workers would be forks of pytest).
    monkeypatch.setenv("REGMIRROR_SERVER__WORKERS", "1")
    if with_auth:
        (tmp_path / "htpasswd").write_text("")
        monkeypatch.setenv("REGMIRROR_AUTH__HTPASSWD", str(tmp_path / "htpasswd"))
    caplog.set_level("INFO", logger="regmirror")

    status = cli.main(["serve", "--listen", "0.0.0.0:5004", "--data-dir", str(tmp_path / "d")])

    assert status == 0
    warned = "with no authentication" in caplog.text
    assert warned is not with_auth
    assert ("access control: htpasswd" in caplog.text) is with_auth


def test_serve_with_a_non_bcrypt_htpasswd_exits_2_naming_the_line(tmp_path, capsys):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("ci:$apr1$abcdefgh$0123456789abcdefghijkl\n")
    path = write_config(tmp_path, f"auth:\n  htpasswd: {htpasswd}\ndata_dir: {tmp_path / 'd'}\n")

    assert cli.main(["serve", "--config", str(path)]) == 2
    assert f"{htpasswd} line 1" in capsys.readouterr().err


def test_server_settings_have_bounded_defaults_and_come_from_the_environment() -> None:
    default = load(environ={}).server
    assert (default.drain_timeout, default.header_timeout) == (30.0, 15.0)
    assert default.max_connections == 2048 and default.max_loop_lag == 5.0
    assert default.send_timeout == 60.0
    settings = load(
        environ={
            "REGMIRROR_SERVER__DRAIN_TIMEOUT": "5",
            "REGMIRROR_SERVER__HEADER_TIMEOUT": "2.5",
            "REGMIRROR_SERVER__KEEPALIVE_TIMEOUT": "30",
            "REGMIRROR_SERVER__MAX_CONNECTIONS": "900",
            "REGMIRROR_SERVER__MAX_LOOP_LAG": "1",
            "REGMIRROR_SERVER__SEND_TIMEOUT": "7",
        }
    ).server
    assert settings.drain_timeout == 5.0 and settings.header_timeout == 2.5
    assert settings.keepalive_timeout == 30.0 and settings.max_connections == 900
    assert settings.max_loop_lag == 1.0 and settings.send_timeout == 7.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DRAIN_TIMEOUT", "0"),
        ("HEADER_TIMEOUT", "-1"),
        ("MAX_CONNECTIONS", "0"),
        ("SEND_TIMEOUT", "0"),
    ],
)
def test_server_settings_must_be_positive(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key.lower()):
        load(environ={f"REGMIRROR_SERVER__{key}": value})
