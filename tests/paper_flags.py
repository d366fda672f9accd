"""The paper's command-line form (`--name=value`) read into settings dictionaries, for the tests
that compare resolved configs with the paper's command lines."""

from __future__ import annotations

import shlex
from typing import Iterable

from lcp.config import ConfigError, RunConfig


def parse_flags(tokens: Iterable[str]) -> dict[str, str]:
    """['--a=1', '--b', '2'] -> {'a': '1', 'b': '2'}; values stay text (RunConfig coerces)."""
    out: dict[str, str] = {}
    items = list(tokens)
    i = 0
    while i < len(items):
        token = items[i]
        if not token.startswith("--"):
            raise ConfigError(f"expected a flag of the form --name=value, got {token!r}")
        body = token[2:]
        if "=" in body:
            name, value = body.split("=", 1)
        else:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise ConfigError(f"flag --{body} has no value (write --{body}=VALUE)")
            name, value = body, items[i + 1]
            i += 1
        name = name.replace("-", "_") if name not in RunConfig.field_names() else name
        if name in out:
            raise ConfigError(f"flag --{name} is given twice")
        out[name] = value
        i += 1
    return out


def parse_command_line(text: str) -> dict[str, str]:
    """A whole paper command line (`python3 run_classification.py --a=1 \\ ...`) -> flags."""
    tokens = shlex.split(text.replace("\\\n", " "))
    while tokens and not tokens[0].startswith("--"):
        tokens.pop(0)  # the interpreter and script name (or `lcp train`)
    return parse_flags(tokens)

