"""``auth.rules``: what each htpasswd user may do, first matching rule wins.

A rule names a user (or ``*``), repository glob patterns (``fnmatch``: ``ci/*``,
``*``) and actions (pull, push, delete). For a repository, the first rule whose user
and a pattern match decides; no matching rule, no access. Without rules every user of
the file may pull and push everything (not delete).

The catalog lists every repository name, so only a user who may pull every repository
may read it: the user's rules, up to the first whose pattern is ``*``, all grant pull.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from regmirror.auth.access import PULL, PUSH, REPOSITORY_ACTIONS, Access
from regmirror.config import ConfigError, RuleSettings


@dataclass(frozen=True)
class Rule:
    user: str
    repositories: tuple[str, ...]
    actions: frozenset[str]

    def applies_to(self, user: str) -> bool:
        return self.user in ("*", user)


DEFAULT_RULES = (Rule("*", ("*",), frozenset({PULL, PUSH})),)


def build(settings: Sequence[RuleSettings]) -> tuple[Rule, ...]:
    rules = []
    for i, rule in enumerate(settings):
        where = f"auth.rules[{i}]"
        unknown = set(rule.actions) - REPOSITORY_ACTIONS
        if unknown:
            raise ConfigError(f"{where}.actions: {sorted(unknown)} not among pull, push, delete")
        if not rule.user or not rule.repositories:
            raise ConfigError(f"{where}: needs a user (or '*') and repository patterns")
        rules.append(Rule(rule.user, tuple(rule.repositories), frozenset(rule.actions)))
    return tuple(rules) or DEFAULT_RULES


def grants(rules: Sequence[Rule], user: str, access: Access) -> bool:
    """Whether ``user`` may do every action of ``access``."""
    if access.type == "registry" and access.name == "catalog":
        return _may_list(rules, user)
    if access.type != "repository":
        return False
    for rule in rules:
        if rule.applies_to(user) and any(fnmatchcase(access.name, p) for p in rule.repositories):
            return set(access.actions) <= rule.actions
    return False


def _may_list(rules: Sequence[Rule], user: str) -> bool:
    for rule in rules:
        if not rule.applies_to(user):
            continue
        if PULL not in rule.actions:
            return False
        if "*" in rule.repositories:
            return True
    return False
