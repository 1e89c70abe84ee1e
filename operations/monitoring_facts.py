"""Facts of the monitoring stack: what its Prometheus answers, asked on the node it runs on (its
port admits only the fleet: the question travels over SSH, never over the network to it).

    results = host.get_fact(PrometheusQueries, port=9090, queries=['up{job="node"}'])
    # {"error": None, "results": [[{"metric": {...}, "value": [1733490000.0, "1"]}]]}
"""

from __future__ import annotations

import json

from pyinfra.api import FactBase, QuoteString, StringCommand

# Runs on the Prometheus node (python3 is on every host: the weights relay needs it): each
# query through the HTTP API on loopback, one JSON line per query, in order.
_QUERY_SCRIPT = """
import json, sys, urllib.parse, urllib.request
port = sys.argv[1]
for query in sys.argv[2:]:
    url = "http://127.0.0.1:%s/api/v1/query?%s" % (port, urllib.parse.urlencode({"query": query}))
    try:
        with urllib.request.urlopen(url, timeout=20) as answer:
            print(json.dumps(json.load(answer)))
    except Exception as error:
        print(json.dumps({"status": "error", "error": str(error)}))
"""


def parse_answers(lines: list[str]) -> dict:
    """{"error": text or None, "results": one list of samples per query}: `error` when no
    query was answered (Prometheus down, not there); a query refused alone reads as no samples."""
    results, errors = [], []
    for line in lines:
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        if answer.get("status") != "success":
            errors.append(answer.get("error") or "Prometheus did not answer")
            results.append([])
        else:
            results.append(answer["data"]["result"])
    if not results:
        return {"error": "no answer from python3 on the Prometheus node", "results": []}
    return {"error": errors[0] if len(errors) == len(results) else None, "results": results}


class PrometheusQueries(FactBase):
    """Instant queries to the Prometheus on this node (127.0.0.1:port); never fails: `error`
    says why when none was answered.

    .. code:: python

        {"error": None, "results": [[{"metric": {"node": "gpu-01"}, "value": [1733490000.0, "1"]}]]}
    """

    def command(self, port: int, queries: list[str]) -> StringCommand:
        return StringCommand("python3", "-c", QuoteString(_QUERY_SCRIPT), str(port),
                             *[QuoteString(query) for query in queries])

    def process(self, output):
        return parse_answers(output)


class FilesState(FactBase):
    """Each path's state, in one round trip (the monitoring phase writes about a dozen files
    and directories: one fact instead of one per file and directory on every run).

    .. code:: python

        {"/etc/gpufleet/monitoring": "dir",
         "/etc/gpufleet/monitoring/prometheus.yml": {"mode": "644", "sha256": "9f86..."},
         "/etc/gpufleet/monitoring/alertmanager.yml": None}
    """

    def command(self, paths: list[str]) -> StringCommand:
        script = ('for p in "$@"; do if [ -f "$p" ]; then '
                  'printf "file %s %s %s\\n" "$(stat -c %a "$p")" '
                  '"$(sha256sum < "$p" | cut -d" " -f1)" "$p"; '
                  'elif [ -d "$p" ]; then printf "dir %s\\n" "$p"; fi; done')
        return StringCommand("sh", "-c", QuoteString(script), "state",
                             *[QuoteString(path) for path in paths])

    def process(self, output):
        return parse_files_state(output)


def parse_files_state(lines: list[str]) -> dict:
    """Path -> "dir", {"mode", "sha256"}; a path not listed does not exist (get() is None)."""
    found: dict = {}
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind == "dir" and rest:
            found[rest] = "dir"
        elif kind == "file":
            parts = rest.split(" ", 2)
            if len(parts) == 3:
                found[parts[2]] = {"mode": parts[0], "sha256": parts[1]}
    return found
