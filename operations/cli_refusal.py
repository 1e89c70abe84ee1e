"""Refused configuration, as pyinfra's CLI stops on it: imported only once pyinfra_cli is (the
deploy's own run, the drift check), since importing pyinfra_cli monkey-patches the process.

pyinfra loads deploy.py for every host in a greenlet and re-raises what it raised: a SystemExit
there escapes as a gevent traceback (issue 19), any other exception as pyinfra's "unexpected
internal error". A CliError is what the CLI itself shows and exits with: this one shows our
lines, one per problem, and exits 2, as the inventory's own refusal does before connecting.
pyinfra disconnects from the hosts on its way out; no operation has run on any.
"""

from __future__ import annotations

import sys

from pyinfra.api.exceptions import PyinfraError
from pyinfra_cli.exceptions import CliError

from operations.config import EXIT_BAD_CONFIG, ConfigError


class Refused(CliError, PyinfraError, ConfigError):
    """A PyinfraError too: pyinfra's exec_file passes those through unwrapped (any other
    exception from deploy.py becomes its "exception occurred in deploy.py" traceback)."""

    exit_code = EXIT_BAD_CONFIG

    def __init__(self, lines: list[str]):
        CliError.__init__(self, "\n".join(lines))
        self.lines = list(lines)  # after: the base classes' own __init__ would not set it

    def show(self, file=None):
        for line in self.lines:
            print(f"configuration error: {line}", file=sys.stderr)
