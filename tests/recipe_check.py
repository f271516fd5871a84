"""Stands in for ``python`` when tests/test_recipes.py runs an ``experiments/*.sh`` recipe: instead of
training, every job of the recipe's multirun is composed, validated and its algorithm built; the report
call is recorded. What it saw goes to ``$RECIPE_LOG`` (JSON)."""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path


def check_multirun(overrides: list[str]) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cl_vla.cli import build_algorithm, validate_config
    from cl_vla.config.schema import register_configs
    from cl_vla.paths import conf_dir

    register_configs()
    fixed, swept = [], []
    for text, o in zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True):
        if o.key_or_group.startswith("hydra"):
            continue  # launcher and sweep-dir settings are Hydra's, not the job's
        if o.is_sweep_override():
            key = text.split("=", 1)[0]
            swept.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            fixed.append(text)
    jobs = list(itertools.product(*swept))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for job in jobs:
            cfg = validate_config(compose("config", overrides=[*fixed, *job]))
            build_algorithm(cfg.algorithm)
    return len(jobs)


def main(args: list[str]) -> None:
    log = Path(os.environ["RECIPE_LOG"])
    seen = json.loads(log.read_text()) if log.exists() else {}
    if args[:2] == ["-m", "cl_vla.results.sweep_report"]:
        seen["report"] = args[2:]
    elif Path(args[0]).name == "train.py" and args[1] == "-m":
        seen["jobs"] = check_multirun(args[2:])
        seen["overrides"] = args[2:]
    else:
        sys.exit(f"recipe_check: unexpected command {args}")
    log.write_text(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1:])
