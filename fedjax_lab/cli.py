"""Strict experiment command lines: ``--x/--no-x``, no abbreviations, ``--config FILE.yaml``.

:class:`StrictParser` is the ``argparse`` parser of every experiment script:

- booleans are ``--x`` / ``--no-x`` (``--x true|false`` is accepted too, as documented before);
- prefixes are never expanded (``--rou 3`` is an error, not ``--rounds 3``);
- an unknown flag names the closest valid one (``--client_lr`` -> ``--client-lr``);
- ``--config FILE.yaml`` reads a mapping whose keys are the flag names (without ``--``); flags
  on the command line override it. A malformed file or an unknown key exits with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

CONFIG_FLAG = "--config"


def parse_bool(text: str) -> bool:
    """``true/false`` (also ``1/0``, ``yes/no``, ``on/off``), case-insensitive."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def finite_float(text: str) -> float:
    """A float that is not nan/inf (never a valid hyperparameter, timeout or fraction)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def value_parser(tp: type, optional: bool) -> Callable[[str], Any]:
    """The text -> value function of a flag of type ``tp`` (``none`` when ``optional``)."""
    base: Callable[[str], Any]
    if tp is bool:
        base = parse_bool
    elif tp is float:
        base = finite_float
    elif tp in (int, str):
        base = tp
    else:
        raise TypeError(f"unsupported flag type {tp}")
    if not optional:
        return base

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else base(text)

    parse.__name__ = base.__name__  # argparse names the type in "invalid int value" messages
    return parse


class BoolAction(argparse.Action):
    """``--x`` (true), ``--x VALUE`` (true/false) and ``--no-x`` (false) for one boolean."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.pop("type", None)
        super().__init__(option_strings, dest, nargs="?", metavar="true|false", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string is not None and option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value (it means false)")
            setattr(namespace, self.dest, False)
            return
        try:
            setattr(namespace, self.dest, True if values is None else parse_bool(values))
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument {option_string}: {e}")


class StrictParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` without abbreviations, with suggestions and ``--config``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(allow_abbrev=False, **kwargs)
        self.flags: dict[str, str] = {}  # flag name (no "--") -> dest
        self.add_argument(
            CONFIG_FLAG, metavar="FILE.yaml", default=None,
            help="read flags from a YAML mapping whose keys are the flag names (without --); "
                 "flags given here override it. OUT/config.yaml of a run reproduces it.",
        )

    def add_flag(
        self, name: str, tp: type, default: Any, help: str, *, optional: bool = False,
        choices: Sequence[str] | None = None, group: Any = None,
    ) -> None:
        """Adds ``--name-with-dashes`` (and ``--no-...`` for booleans) storing into ``name``."""
        flag = name.replace("_", "-")
        container = group if group is not None else self
        if tp is bool:
            container.add_argument(f"--{flag}", f"--no-{flag}", dest=name, action=BoolAction,
                                   default=default, help=help)
            self.flags[f"no-{flag}"] = name
        else:
            metavar = None
            if choices is not None and optional:
                # `none` parses to None, which argparse then checks against the choices too
                # (a run's written config.yaml says `none` for an unset optional choice).
                metavar = "{" + ",".join([*choices, "none"]) + "}"
                choices = (*choices, None)
            container.add_argument(f"--{flag}", dest=name, default=default, help=help,
                                   type=value_parser(tp, optional), choices=choices,
                                   metavar=metavar)
        self.flags[flag] = name

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def closest(self, name: str) -> str | None:
        """The valid flag closest to ``name`` (``--client_lr`` -> ``--client-lr``), if any."""
        bare = name.lstrip("-").split("=")[0]
        candidates = [*self.flags, CONFIG_FLAG[2:]]
        if bare.replace("_", "-") in candidates:
            return "--" + bare.replace("_", "-")
        close = difflib.get_close_matches(bare, candidates, n=1, cutoff=0.6)
        return f"--{close[0]}" if close else None

    def config_argv(self, path: str) -> list[str]:
        """The flags of a ``--config`` file, in order; exits 2 naming a bad file or key."""
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as e:
            self.error(f"{CONFIG_FLAG} {path}: cannot read it ({e.strerror})")
        except yaml.YAMLError as e:
            self.error(f"{CONFIG_FLAG} {path} is not valid YAML: {' '.join(str(e).split())}")
        if data is None:
            return []
        if not isinstance(data, Mapping):
            self.error(f"{CONFIG_FLAG} {path} must be a mapping of flag names to values, got a "
                       f"{type(data).__name__}")
        argv: list[str] = []
        for key, value in data.items():
            if not isinstance(key, str) or key not in self.flags or key.startswith("no-"):
                close = self.closest(str(key))
                hint = f" (did you mean {close[2:]}?)" if close and close != CONFIG_FLAG else ""
                self.error(f"{CONFIG_FLAG} {path}: unknown key {key!r}{hint}; the keys are the "
                           "flag names without -- (see --help)")
            if isinstance(value, list | dict):
                self.error(f"{CONFIG_FLAG} {path}: key {key!r} needs one value, got {value!r}")
            if value is None:
                text = "none"
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            argv += [f"--{key}", text]
        return argv

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        config: list[str] = []
        for i, arg in enumerate(args):
            if arg == CONFIG_FLAG and i + 1 < len(args):
                config += self.config_argv(args[i + 1])
            elif arg.startswith(CONFIG_FLAG + "="):
                config += self.config_argv(arg.split("=", 1)[1])
        # The file's flags come first: a flag on the command line overrides it.
        ns, extras = self.parse_known_args([*config, *args], namespace)
        if extras:
            unknown = [a for a in extras if a.startswith("-")] or extras
            hints = []
            for arg in unknown:
                close = self.closest(arg) if arg.startswith("-") else None
                hints.append(f"{arg} (did you mean {close}?)" if close else arg)
            self.error(f"unrecognized arguments: {' '.join(hints)}")
        return ns
