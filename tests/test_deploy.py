"""The deployment artefacts in deploy/ and the Dockerfile stay in step with the code:
the example config loads, the JSON and YAML parse, and every unit and image runs the
documented CLI."""

from __future__ import annotations

import configparser
import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import tomllib
import typing
from pathlib import Path

import pytest
import yaml

from regmirror.cli import main
from regmirror.config import ServerSettings, Settings, load

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PLANNED_METRICS = {
    "regmirror_http_requests_total",
    "regmirror_http_request_duration_seconds_bucket",
    "regmirror_upstream_errors_total",
    "regmirror_s3_errors_total",
    "regmirror_fills_total",
    "regmirror_cache_bytes",
    "regmirror_cache_max_bytes",
    "regmirror_bytes_served_total",
    "regmirror_cache_requests_total",
    "regmirror_fill_waiters_total",
}


def _setting_paths(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf setting, as a path; list items of dataclasses under index 0."""
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint):
            paths += _setting_paths(hint, (*prefix, f.name))  # type: ignore[arg-type]
        elif item is not None and dataclasses.is_dataclass(item):
            paths += _setting_paths(item, (*prefix, f.name, "0"))  # type: ignore[arg-type]
        else:
            paths.append((*prefix, f.name))
    return paths


def test_example_config_loads() -> None:
    settings = load(DEPLOY / "config.example.yml", environ={})
    assert settings.data_dir == "/var/lib/regmirror"
    assert settings.host_port() == ("127.0.0.1", 5000)
    default = [u for u in settings.upstreams if u.prefix is None]
    assert [u.url for u in default] == ["https://registry-1.docker.io"]
    assert any(u.prefix == "ghcr.io" and u.url == "https://ghcr.io" for u in settings.upstreams)


def test_example_config_documents_every_setting_and_its_variable() -> None:
    text = (DEPLOY / "config.example.yml").read_text()
    raw = yaml.safe_load(text)
    missing = []
    for path in _setting_paths(Settings):
        node = raw
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node.get(part, KeyError)
            if node is KeyError:
                break
        variable = "REGMIRROR_" + "__".join(path).upper()
        if node is KeyError or not re.search(rf"\b{variable}\b", text):
            missing.append(f"{'.'.join(path)} ({variable})")
    assert not missing, f"deploy/config.example.yml does not document: {', '.join(missing)}"


def test_example_config_values_from_environment_override_the_file() -> None:
    settings = load(
        DEPLOY / "config.example.yml",
        environ={"REGMIRROR_S3__BUCKET": "other", "REGMIRROR_UPSTREAMS__0__PASSWORD": "s3cret"},
    )
    assert settings.s3.bucket == "other"
    assert settings.upstreams[0].password == "s3cret"
    assert settings.upstreams[0].url == "https://registry-1.docker.io"


def test_docker_daemon_json_points_at_the_local_mirror() -> None:
    daemon = json.loads((DEPLOY / "docker" / "daemon.json").read_text())
    assert daemon["registry-mirrors"] == ["http://localhost:5000"]
    assert "localhost:5000" in daemon["insecure-registries"]


@pytest.mark.parametrize("path", sorted((DEPLOY / "containerd").glob("*/hosts.toml")))
def test_containerd_hosts_toml_delegates_pull_and_resolve_only(path: Path) -> None:
    hosts = tomllib.loads(path.read_text())
    assert hosts["server"].startswith("https://")
    assert hosts["host"]["http://localhost:5000"]["capabilities"] == ["pull", "resolve"]


def test_containerd_docker_io_falls_back_to_docker_hub() -> None:
    hosts = tomllib.loads((DEPLOY / "containerd" / "docker.io" / "hosts.toml").read_text())
    assert hosts["server"] == "https://registry-1.docker.io"


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "regmirror.service")
    return unit


def test_systemd_unit_runs_the_documented_cli() -> None:
    argv = shlex.split(_unit()["Service"]["ExecStart"])
    assert Path(argv[0]).name == "regmirror"
    assert argv[1:] == ["serve", "--config", "/etc/regmirror/config.yml"]
    with pytest.raises(SystemExit) as exc:  # the flags exist: --help parses after them
        main([*argv[1:], "--help"])
    assert exc.value.code == 0


def test_systemd_unit_is_hardened_and_drains() -> None:
    service = _unit()["Service"]
    assert service["User"] == "regmirror"
    assert service["StateDirectory"] == "regmirror"
    assert service["ReadWritePaths"] == "/var/lib/regmirror"
    assert service["EnvironmentFile"] == "-/etc/regmirror/env"
    assert service["Restart"] == "on-failure"
    for key in ("NoNewPrivileges", "PrivateTmp"):
        assert service[key] == "yes"
    assert service["ProtectSystem"] == "strict"
    # The drain's total bound, plus room to close sessions, before systemd's SIGKILL.
    assert int(service["TimeoutStopSec"].rstrip("s")) >= ServerSettings().drain_timeout + 10
    assert int(service["LimitNOFILE"]) >= 65536


def test_dockerfile_entrypoint_serves_on_all_interfaces_from_the_volume() -> None:
    text = (ROOT / "Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert entrypoint is not None
    argv = json.loads(entrypoint[1])
    assert argv[:2] == ["regmirror", "serve"]
    assert argv[argv.index("--listen") + 1] == "0.0.0.0:5000"
    assert argv[argv.index("--data-dir") + 1] == "/var/lib/regmirror"
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"^USER (?!root)\S+", text, re.MULTILINE)
    assert re.search(r'^VOLUME \["/var/lib/regmirror"\]', text, re.MULTILINE)
    assert re.search(r"^EXPOSE 5000$", text, re.MULTILINE)
    healthcheck = re.search(r"^HEALTHCHECK(?:.*\\\n)*.*", text, re.MULTILINE)
    assert healthcheck is not None and "/healthz" in healthcheck[0]


def test_dockerignore_keeps_what_pip_install_needs() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    for needed in ("pyproject.toml", "README.md", "regmirror"):
        assert needed not in ignored


def _alert_rules() -> list[dict[str, typing.Any]]:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in alerts["groups"] for rule in group["rules"]]


def test_prometheus_alerts_cover_the_failure_modes() -> None:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert {g["name"] for g in alerts["groups"]} == {
        "regmirror-availability",
        "regmirror-latency",
        "regmirror-dependencies",
        "regmirror-disk",
    }
    exprs = {rule["alert"]: rule["expr"] for rule in _alert_rules()}
    assert "up{" in exprs["RegmirrorInstanceDown"]
    for alert, metric in [
        ("RegmirrorHigh5xxRate", "regmirror_http_requests_total"),
        ("RegmirrorLoginFailuresHigh", "regmirror_auth_failures_total"),
        ("RegmirrorP99LatencyHigh", "regmirror_http_request_duration_seconds_bucket"),
        ("RegmirrorUpstreamErrorsRising", "regmirror_upstream_errors_total"),
        ("RegmirrorS3ErrorsRising", "regmirror_s3_errors_total"),
        ("RegmirrorFillsFailing", "regmirror_fills_total"),
        ("RegmirrorCacheNearBudget", "regmirror_cache_max_bytes"),
    ]:
        assert metric in exprs[alert], alert


def test_prometheus_scrape_config_scrapes_metrics_and_loads_the_rules() -> None:
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "scrape.yml").read_text())
    assert scrape["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "regmirror"]
    assert job["metrics_path"] == "/metrics"


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "regmirror-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard_queries_only_known_metrics() -> None:
    used = set()
    for expr in _dashboard_exprs():
        used |= set(re.findall(r"\b(regmirror_[a-z0-9_]+)", expr))
    assert used == PLANNED_METRICS


def test_metric_names_in_code_match_the_deploy_files() -> None:
    from regmirror.metrics import Metrics

    names = {m.name for m in Metrics().registry.collect()}
    assert {"regmirror_http_requests", "regmirror_http_request_duration_seconds"} <= names


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules_and_the_dashboard_queries(tmp_path: Path) -> None:
    prometheus = DEPLOY / "prometheus"
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "scrape.yml"]):
        subprocess.run(["promtool", *args], cwd=prometheus, check=True, capture_output=True)
    substitutions = {"$__rate_interval": "5m", "$job": "regmirror", "$instance": ".*"}
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    subprocess.run(["promtool", "check", "rules", str(path)], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_the_tier_config(tmp_path: Path) -> None:
    tier = (DEPLOY / "nginx" / "regmirror-tier.conf").read_text()
    tier = re.sub(r"regmirror-(\d)\.internal", r"127.0.0.\1", tier)  # no DNS in tests
    tier = tier.replace("/var/cache/nginx", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "tier.conf").write_text(tier)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path}/body;\n"
        f"  proxy_temp_path {tmp_path}/proxy;\n  include {tmp_path}/tier.conf;\n}}\n"
    )
    result = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
