"""What the command-line scripts share about their ``--help``: one formatter and the help texts of
the flags every script has."""
from __future__ import annotations

import argparse

DEVICE_HELP = "where to run: auto picks cuda, then mps, then cpu"
QUIET_HELP = "no progress bars"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that keeps the description's own line breaks (the scripts' docstrings show
    commands and tables) and shows every flag's default after its help text."""
