#!/usr/bin/env python3
"""Has anything on the fleet moved away from what this repository says? The nightly check.

    python scripts/drift_check.py INVENTORY [--json [FILE]] [--markdown FILE] [-v]

Plans the whole deploy (deploy.py) against every host of INVENTORY without executing anything
(no command that changes a host is sent: only the deploy's read-only facts), and reports per
host and per operation what the deploy would change. Prints a table on stdout and a one-line
summary last; `--json` writes the same as JSON (to FILE, or to stdout, the summary then going to
stderr); `--markdown FILE` writes a report fit for a ticket or a chat message.

Exit status, for a scheduler:
    0  no drift
    2  drift found (an operation would change a host, or would fail it, or the deploy saw
       something it leaves to an operator, such as a Swarm node no inventory host accounts for)
    1  the check itself failed: bad configuration, an unreachable host, an error while planning
       (the other hosts are still checked and reported)

Operations that only run after an earlier change (a restart after a changed daemon.json, a GPU
container check after a driver change) are reported separately and never counted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"


def _in_venv() -> None:
    """The check needs pyinfra and the project's pins: under any other Python, start again
    with the repository's virtual environment (`python3 scripts/lab.py bootstrap` makes it)."""
    try:
        import pyinfra  # noqa: F401
    except ImportError:
        # Told apart by sys.prefix: a venv's python is often a symlink to this very binary.
        if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != VENV_PYTHON.parents[1].resolve():
            os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])
        print("check failed: pyinfra is not installed: run `python3 scripts/lab.py bootstrap`",
              file=sys.stderr)
        sys.exit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="drift_check.py",
        description="Report, per host and per operation, what the deploy would change "
        "(nothing is changed). Exit 0: no drift; 2: drift; 1: the check failed.",
    )
    parser.add_argument("inventory", help="inventory file, e.g. inventories/prod.py")
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="FILE",
        help="write the report as JSON to FILE (no FILE: stdout)",
    )
    parser.add_argument("--markdown", metavar="FILE", help="write a Markdown report to FILE")
    parser.add_argument(
        "--data", action="append", default=[], metavar="KEY=VALUE",
        help="override a data key for every host, as pyinfra's --data (e.g. the path of a key "
        "file a scheduler wrote: --data ssh_key=/run/keys/id_ed25519)",
    )
    parser.add_argument(
        "--limit", action="append", default=[], metavar="HOSTS",
        help="check only these hosts (names, groups or globs, comma-separated), as pyinfra's "
        "--limit: e.g. the fleet outside a node being onboarded",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="pyinfra's progress on stderr")
    return parser.parse_args(argv)


def _write(path: str, text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _in_venv()
    sys.path.insert(0, str(REPO_ROOT))
    from scripts.drift import report as render
    from scripts.drift.plan import check

    try:
        result = check(args.inventory, verbose=args.verbose, data=args.data, limit=args.limit)
    except Exception as error:  # a bug of the check itself: still one line, still exit 1
        if args.verbose:
            raise
        print(f"check failed: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return render.EXIT_CHECK_FAILED
    json_to_stdout = args.json == "-"
    if json_to_stdout:
        sys.stdout.write(render.json_text(result))
    else:
        sys.stdout.write(render.text_report(result))
        if args.json:
            _write(args.json, render.json_text(result))
    if args.markdown:
        _write(args.markdown, render.markdown_report(result))
    print(result.summary, file=sys.stderr if json_to_stdout else sys.stdout, flush=True)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
