"""The shipped warm timer and list stay in step with ``regmirror warm``: the unit runs
the documented command on the shipped list, and every line of the list parses."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from regmirror.cli import main
from regmirror.ops.reference import parse_reference, read_references

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def unit(name: str) -> configparser.ConfigParser:
    parsed = configparser.ConfigParser(strict=False, interpolation=None)
    parsed.optionxform = str  # type: ignore[assignment,method-assign]
    parsed.read(DEPLOY / "systemd" / name)
    return parsed


def test_the_warm_service_runs_warm_on_the_list_as_the_regmirror_user() -> None:
    service = unit("regmirror-warm.service")
    argv = shlex.split(service["Service"]["ExecStart"])
    assert argv[0] == shlex.split(unit("regmirror.service")["Service"]["ExecStart"])[0]
    assert argv[1:] == ["warm", "--from", "/etc/regmirror/warm.list"]
    with pytest.raises(SystemExit) as exc:  # the flags exist: --help parses after them
        main([*argv[1:], "--help"])
    assert exc.value.code == 0
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["User"] == "regmirror"
    assert "regmirror.service" in service["Unit"]["After"]
    assert "regmirror status" in service["Service"]["ExecStartPre"]  # waits for ready


def test_the_timer_warms_after_boot_and_weekly_spread_over_the_fleet() -> None:
    timer = unit("regmirror-warm.timer")["Timer"]
    assert timer["OnBootSec"] and timer["OnCalendar"].startswith("Mon ")
    assert timer["RandomizedDelaySec"] == "1h"
    assert timer["Persistent"] == "true"


def test_every_line_of_the_example_list_is_a_reference_warm_accepts() -> None:
    references = read_references((DEPLOY / "warm.list.example").read_text())
    parsed = [parse_reference(text) for text in references]
    assert len(parsed) == 5
    assert parsed[0].ns == "docker.io" and parsed[0].name == "library/alpine"
    assert parsed[-1].ns is None and parsed[-1].name == "team/base"
