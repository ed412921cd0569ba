"""``ops config validate | show``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from db.settings import ConfigError
from ops.settings import describe, load_settings

EXIT_USAGE = 2


def register(commands: Any) -> None:
    config = commands.add_parser("config", help="check or show the configuration")
    actions = config.add_subparsers(dest="action", required=True)
    validate = actions.add_parser(
        "validate", help="report every configuration problem, exit 2 if any"
    )
    validate.add_argument("--json", action="store_true", help="print the result as JSON")
    validate.set_defaults(handler=run_validate)
    show = actions.add_parser("show", help="print the effective configuration, secrets redacted")
    show.add_argument("--json", action="store_true", help="print as JSON")
    show.set_defaults(handler=run_show)


def run_validate(args: argparse.Namespace) -> int:
    try:
        load_settings()
    except ConfigError as error:
        if not args.json:
            raise
        print(json.dumps({"valid": False, "problems": error.problems}, indent=2))
        return EXIT_USAGE
    print(json.dumps({"valid": True, "problems": []}) if args.json else "configuration is valid")
    return 0


def run_show(args: argparse.Namespace) -> int:
    shown = describe(load_settings())
    if args.json:
        print(json.dumps(shown, indent=2))
        return 0
    for section, entries in shown.items():
        for key, value in entries.items():
            print(f"{section}.{key} = {value}")
    return 0
