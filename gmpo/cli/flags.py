"""Exact flag matching for the `gmpo` commands: no abbreviations, and an unknown flag or config key is an error that
names the closest valid one."""

import difflib

from gmpo.cli.exit_status import UsageError


def closest(name: str, valid: list[str]) -> str | None:
    """The valid name most similar to `name` (difflib ratio >= 0.6), or None."""
    matches = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return matches[0] if matches else None


def check_no_leftovers(leftovers: list[str], valid_flags: list[str], help_hint: str) -> None:
    """Raise a UsageError for the first argument the parser did not consume.

    `leftovers` are what argparse's parse_known_args left over: an unknown `--flag` (possibly `--flag=value`) or a
    stray positional value.
    """
    if not leftovers:
        return
    token = leftovers[0]
    if not token.startswith("-"):
        raise UsageError(f"unexpected argument {token!r} ({help_hint})")
    flag = token.split("=", 1)[0]
    suggestion = closest(flag, valid_flags)
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    raise UsageError(f"unknown flag {flag}{hint} ({help_hint})")


def check_config_keys(leftovers: list[str], valid_keys: list[str], config_path: str) -> None:
    """Raise a UsageError for the first key of the YAML config that is not a field (`leftovers` alternate
    '--key', 'value', as TrlParser.set_defaults_with_config returns them)."""
    if not leftovers:
        return
    key = leftovers[0].removeprefix("--")
    suggestion = closest(key, valid_keys)
    hint = f"; did you mean {suggestion!r}?" if suggestion else "; keys are field names, as in gmpo train --help"
    raise UsageError(f"unknown key {key!r} in config file {config_path}{hint}")


def split_config_flag(argv: list[str]) -> tuple[list[str], str | None]:
    """`argv` with `--config=PATH` written as `--config PATH`, and the config path (None without one).

    TrlParser reads `--config PATH` itself, before argparse; a missing path is a usage error here, not an IndexError.
    """
    out = []
    for token in argv:
        out.extend(token.split("=", 1) if token.startswith("--config=") else [token])
    if "--config" not in out:
        return out, None
    index = out.index("--config")
    if index + 1 >= len(out) or out[index + 1].startswith("--"):
        raise UsageError("--config needs the path of a YAML file: --config recipe.yaml")
    if out.count("--config") > 1:
        raise UsageError("--config is given more than once; pass one YAML file")
    return out, out[index + 1]
