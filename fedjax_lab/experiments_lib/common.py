"""What every experiment command does around its run: validate, check outputs, write JSON."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedjax_lab.io.run_folder import check_output_file
from fedjax_lab.io.writers import write_json


def validated_run(cfg: Any, json_out: str | None, run: Callable[[Any], dict]) -> dict | None:
    """``run(cfg)`` after ``cfg.validate()`` and a check of the ``--json`` path.

    Bad input (a ValueError from validation, the output check or the run's own checks) is
    printed as one ``error:`` line and gives None, for the caller to exit with status 2; the
    results are written to ``json_out`` when given.
    """
    try:
        cfg.validate()
        if json_out:
            check_output_file(json_out, "--json")
        results = run(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if json_out:
        write_json(json_out, results)
    return results


def config_parser(prog: str, doc: str | None, config_cls: type, help: Mapping[str, str]) -> Any:
    """A strict parser with ``--json`` and one ``--flag`` per field of the config dataclass.

    Each field's default and type come from the dataclass; ``help`` must describe every field
    (a missing one is a KeyError at import of the command, not a silent empty help).
    """
    from fedjax_lab.cli import StrictParser

    parser = StrictParser(prog=prog, description=(doc or "").split("\n\n")[0])
    parser.add_argument("--json", dest="json_out", default=None,
                        help="also write the results to this file")
    for f in dataclasses.fields(config_cls):
        parser.add_flag(f.name, type(f.default), f.default, help=help[f.name])
    return parser


def parse_config(parser: Any, config_cls: type, argv: Sequence[str] | None) -> tuple[Any, Any]:
    """``(config, json_out)`` from the command line parsed by :func:`config_parser`."""
    args = vars(parser.parse_args(argv))
    json_out = args.pop("json_out")
    args.pop("config", None)  # --config is consumed by the parser (YAML defaults)
    return config_cls(**args), json_out
