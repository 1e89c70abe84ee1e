"""`vllm serve MODEL ...` in the lab CPU engine image (/usr/local/bin/vllm runs this).

The model is loaded before the port opens: until then /health cannot answer (connection
refused), as the stack's healthcheck expects of an engine that is starting.
"""

from __future__ import annotations

import logging
import sys

from . import STAND_IN_NOTICE, VERSION
from .cli import USAGE, UsageError, parse_command


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(levelname)s %(asctime)s [labengine] %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    log = logging.getLogger("labengine")
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(f"{USAGE}\n(the gpu-fleet lab CPU engine, a LAB STAND-IN for vLLM)")
        return 0
    try:
        command, value = parse_command(argv)
    except UsageError as error:
        print(f"vllm: {error}", file=sys.stderr)
        return 2
    if command == "version":
        print(value)
        return 0
    config = value
    log.warning(STAND_IN_NOTICE)
    log.info("lab CPU engine %s (vLLM API 0.11.0 shapes)", VERSION)
    for level, line in config.log_lines():
        getattr(log, level)(line)

    from .app import EngineApp
    from .engine import Engine

    try:
        engine = Engine(config)
    except Exception as error:  # a bad model directory or setting: say why, exit non-zero
        log.error("cannot load %s: %s", config.model, error)
        return 1
    import uvicorn

    app = EngineApp(config, engine)
    log.info("Starting vLLM-compatible API server (lab stand-in) on http://%s:%d",
             config.host, config.port)
    # At SIGTERM the requests in flight are aborted at once, as vLLM 0.11's API server does
    # (vllm-project/vllm#34730): what the deploy's drain agent (operations/drain_agent.py) is
    # for. A graceful wait here would hide a rolling update that cuts streams on real vLLM.
    class AbortingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                app.abort_in_flight(f"signal {sig}")
            super().handle_exit(sig, frame)

    AbortingServer(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.uvicorn_log_level,
        lifespan="on", timeout_keep_alive=5, timeout_graceful_shutdown=0)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
