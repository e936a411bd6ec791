"""Drift job: judge the inference log against the reference stored with the model (Evidently 0.7); and the
accuracy job beside it. Here: the command-line convention both follow."""

from __future__ import annotations

import argparse
import sys
import typing as t

#: Exit status of the drift and accuracy jobs for a wrong command line, apart from the verdicts (0, 1, 2).
EXIT_USAGE = 64


class UsageParser(argparse.ArgumentParser):
    """A wrong command line exits EXIT_USAGE, apart from the verdicts a monitoring job reads."""

    def error(self, message: str) -> t.NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")
