#!/usr/bin/env python3
"""RegStation entry point.

    python main.py                               open the workstation on the bundled demo pair
    python main.py FIXED MOVING [--fixed-labels F] [--moving-labels F]   open these files
    python main.py register|evaluate|train|info|convert ...              command line (see --help)
"""
import sys

CLI_COMMANDS = {"register", "evaluate", "train", "info", "convert", "-h", "--help"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in CLI_COMMANDS:
        from app.cli import main as cli_main
        return cli_main(argv)
    from app.gui import run
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
