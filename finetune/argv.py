"""Command-line arguments as a shell user means them, before Hydra's grammar reads them.

A shell expands ``~`` only at the start of a word, so ``data.root=~/photos`` reaches the
program with its ``~``, and Hydra's override grammar rejects ``~`` in a value (a lexer
error). Every path a user types may start with ``~``, so it is expanded here, once, for
every command.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

__all__ = ["expand_home", "hydra_quote"]

# A value, or an item of a [list] or a comma-separated value, that starts with ~ or ~user.
_HOME_ITEM = re.compile(r"(?:(?<=^)|(?<=[\[,]))(~[^/,\]\s]*)(?=[/,\]]|$)")


def hydra_quote(value: str) -> str:
    """``value`` as a Hydra quoted string that parses back to exactly ``value``."""
    value = value.replace("${", "\\${")  # OmegaConf's escape: a path is never an interpolation
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)  # Hydra: backslashes before a quote double
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)  # and so do those before the closing quote
    return f"'{value}'"


def _expand_value(value: str) -> str:
    def home(m: re.Match[str]) -> str:
        expanded = os.path.expanduser(m.group(1))
        return m.group(1) if expanded == m.group(1) else expanded

    out = _HOME_ITEM.sub(home, value)
    if out == value:
        return value
    # Quote plain values: a home directory may hold characters Hydra's grammar reads as syntax.
    if not value.startswith("[") and "," not in value:
        return hydra_quote(out)
    return out


def expand_home(args: Iterable[str]) -> list[str]:
    """``args`` with a leading ``~`` (or ``~user``) expanded in each ``key=value``'s value and its list items.

    ``data.root=~/photos`` becomes ``data.root='/home/me/photos'``; ``images=[~/a.png,~/b.png]``
    and ``images=~/a.png,~/b.png`` expand each item. Quoted values (the user asked for them
    literally), ``~key`` deletions and flags are left alone.
    """
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key and not key.startswith(("-", "~")) and value[:1] not in ("'", '"') and "~" in value:
            arg = f"{key}={_expand_value(value)}"
        out.append(arg)
    return out
