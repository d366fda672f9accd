"""Reading docker/compose.yaml the way `docker compose` does, for the tests (Docker itself cannot
run here): YAML with merge keys, then variable interpolation (`${VAR}`, `${VAR:-default}`,
`${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`, `${VAR+alt}`, `$VAR`, `$$`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}"
                  r"|([A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(ValueError):
    pass


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match) -> str:
        dollar, name, op, arg, bare = match.groups()
        if dollar:
            return "$"
        if bare:
            return env.get(bare, "")
        value = env.get(name)
        if op is None:
            return value or ""
        arg = interpolate(arg or "", env)
        unset_or_empty = not value
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else value is None) else value
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else value is None:
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return arg if not (unset_or_empty if op == ":+" else value is None) else ""
        raise AssertionError(op)

    return _VAR.sub(replace, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def load_raw(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def load(env: Mapping[str, str], path: Path = COMPOSE) -> dict:
    """The compose file as `docker compose config` would see it with `env` (no `x-` keys)."""
    doc = interpolate_tree(load_raw(path), env)
    return {k: v for k, v in doc.items() if not str(k).startswith("x-")}


def command_of(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else list(command)
