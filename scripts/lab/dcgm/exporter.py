#!/usr/bin/env python3
"""dcgm-exporter, LAB STAND-IN (gpu-fleet lab, not NVIDIA software): NVIDIA dcgm-exporter's
metric names, types and labels, read from the lab's simulated GPUs.

Run as NVIDIA's image runs: a container given every GPU by the NVIDIA runtime
(NVIDIA_VISIBLE_DEVICES=all), listening on DCGM_EXPORTER_LISTEN (":9400"), GET /metrics. The
simulated runtime mounts the simulated nvidia-smi and the GPUs' LAB FAULTS (/run/nvidia-sim)
into the container, so this reads what the real exporter reads from DCGM: utilisation, memory,
temperature, power and uncorrectable ECC errors through nvidia-smi, and the last XID error (which
nvidia-smi does not report, DCGM's event watch does) from the fault the lab injected
(`lab.py gpu-fault NODE INDEX xid[=N]`).

A GPU nvidia-smi cannot read (lost) is left out, as dcgm-exporter leaves out a GPU DCGM lost.
Standard library only.
"""

from __future__ import annotations

import os
import socket
import subprocess
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIELDS = ("index", "uuid", "name", "pci.bus_id", "driver_version", "utilization.gpu",
          "memory.used", "memory.free", "temperature.gpu", "power.draw",
          "ecc.errors.uncorrected.volatile.total")
# (DCGM field, Prometheus type, help as dcgm-exporter's default-counters.csv words it, column)
METRICS = (
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", "utilization.gpu"),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", "memory.used"),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", "memory.free"),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", "temperature.gpu"),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", "power.draw"),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors.",
     "ecc.errors.uncorrected.volatile.total"),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", "xid"),
)
FAULTS_DIR = "/run/nvidia-sim/faults"


def read_gpus(run=subprocess.run) -> list[dict[str, str]]:
    """One dict per GPU nvidia-smi reads (column -> value), with "xid" from the LAB FAULTS."""
    result = run(["nvidia-smi", f"--query-gpu={','.join(FIELDS)}", "--format=csv,noheader,nounits"],
                 capture_output=True, text=True, timeout=20)
    gpus = []
    for line in result.stdout.splitlines():
        values = [value.strip() for value in line.split(",")]
        if len(values) != len(FIELDS):
            continue  # "Unable to determine the device handle ...": a lost GPU
        gpu = dict(zip(FIELDS, values))
        gpu["xid"] = fault(gpu["index"], "xid") or "0"
        gpus.append(gpu)
    return gpus


def fault(index: str, key: str, directory: str | None = None) -> str | None:
    """GPU `index`'s LAB FAULT `key` (scripts/lab/gpu_faults.py), or None."""
    try:
        with open(os.path.join(directory or FAULTS_DIR, index)) as handle:
            for line in handle:
                name, _, value = line.strip().partition("=")
                if name == key:
                    return value
    except OSError:
        return None
    return None


def number(text: str) -> str:
    try:
        return repr(float(text)) if "." in text else str(int(text))
    except ValueError:
        return "0"


def render(gpus: list[dict[str, str]], hostname: str) -> str:
    """The exposition, labelled as dcgm-exporter labels: gpu, UUID, pci_bus_id, device,
    modelName, Hostname, DCGM_FI_DRIVER_VERSION."""
    lines = []
    for name, kind, help_text, column in METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for gpu in gpus:
            labels = (f'gpu="{gpu["index"]}",UUID="{gpu["uuid"]}",pci_bus_id="{gpu["pci.bus_id"]}",'
                      f'device="nvidia{gpu["index"]}",modelName="{gpu["name"]}",'
                      f'Hostname="{hostname}",DCGM_FI_DRIVER_VERSION="{gpu["driver_version"]}"')
            lines.append(f"{name}{{{labels}}} {number(gpu[column])}")
    return "\n".join(lines) + "\n"


class Handler(BaseHTTPRequestHandler):
    server_version = "dcgm-exporter-lab-stand-in"

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        body = render(read_gpus(), socket.gethostname()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main() -> None:
    listen = os.environ.get("DCGM_EXPORTER_LISTEN", ":9400")
    host, _, port = listen.rpartition(":")
    print(f"dcgm-exporter LAB STAND-IN (not NVIDIA software) listening on {listen}", flush=True)
    ThreadingHTTPServer((host, int(port)), Handler).serve_forever()


if __name__ == "__main__":
    main()
