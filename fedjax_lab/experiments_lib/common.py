"""What every experiment command does around its run: validate, check outputs, write JSON."""

from __future__ import annotations

import sys
from collections.abc import Callable
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
