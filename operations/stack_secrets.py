"""The stack's Docker secrets: read on the control machine, named by their content, created
through the Engine API with the value on the SSH channel's stdin.

Swarm secrets are immutable, so a secret is named by a hash of its value
(`<stack>_engine_key_<sha256[:12]>`, stack_render.secret_name): a rotated key is a new secret,
the services that mount it roll onto it, and the stack phase removes the old one once nothing
uses it. The value never reaches a command line, a file or a log: `docker system dial-stdio`
carries the raw POST /secrets/create request, written to its stdin.

    secrets = wanted_secrets(settings)   # kind -> (versioned name, value)
    yield FunctionCommand(create_secret, (stack, kind, name, lambda: value), {})
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Callable

from pyinfra.api import QuoteString, StringCommand
from pyinfra.api.exceptions import OperationError

from operations import gateway_access, rules
from operations.phase import fail_host, host_sudo
from operations.stack_render import LABEL_SECRET, LABEL_STACK, secret_name
from operations.weights_plan import read_token


def read_control_secret(path: str | None, what: str) -> str:
    """A secret from a file on the control machine, refused unless it is private and one line
    (operations.rules.secret_file_problem: the rule the inventory check applies before
    connecting; checked again here, where the value is read)."""
    if not path:
        raise OperationError(f"{what}: no file configured")
    problem = rules.secret_file_problem(path)
    if problem:
        raise OperationError(f"{what} {path}: expected {problem}")
    return Path(path).expanduser().read_text(encoding="utf-8").strip()


def wanted_secrets(settings) -> dict[str, tuple[str, str]]:
    """kind -> (versioned name, value), read on the control machine: the engines' internal key,
    the gateway's client map, internal key map and TLS bundle, the Hub token."""
    read_control_secret(settings.stack_api_key_file, "stack_api_key_file")
    engine_key = read_control_secret(settings.stack_engine_key_file, "stack_engine_key_file")
    values = {
        "engine_key": engine_key,
        "gateway_clients": gateway_access.clients_map(gateway_access.client_keys(settings)),
        "gateway_engine_auth": gateway_access.engine_auth_map(engine_key),
    }
    if settings.stack_gateway_tls_cert_file:
        values["gateway_tls"] = gateway_access.tls_bundle(settings.stack_gateway_tls_cert_file,
                                                          settings.stack_gateway_tls_key_file)
    token = read_token(settings.hf_token_file)
    if token:
        values["hf_token"] = token
    return {kind: (secret_name(settings.stack_name, kind, value), value) for kind, value in values.items()}


def secret_request(name: str, kind: str, stack: str, value: str) -> str:
    """The raw Engine API request creating a secret (POST /secrets/create), fed on stdin."""
    body = json.dumps({
        "Name": name,
        "Labels": {LABEL_STACK: stack, LABEL_SECRET: kind},
        "Data": base64.b64encode(value.encode()).decode(),
    }) + "\n"
    return ("POST /secrets/create HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body.encode())}\r\nConnection: close\r\n\r\n{body}")


_ENGINE_API_SCRIPT = (
    "resp=$(docker system dial-stdio) || exit 1; "
    "code=$(printf '%s\\n' \"$resp\" | head -n1 | cut -d' ' -f2); "
    "if [ \"$code\" = \"$1\" ]; then exit 0; fi; "
    "echo \"engine API answered HTTP $code: $(printf '%s\\n' \"$resp\" | tail -n1)\" >&2; exit 1"
)


def create_secret(state, host, stack: str, kind: str, name: str, value_of: Callable[[], str]) -> bool:
    """Create one secret through the engine API, the request on stdin (see the module doc)."""
    request = secret_request(name, kind, stack, value_of())
    ok, output = host.run_shell_command(
        StringCommand("sh", "-c", QuoteString(_ENGINE_API_SCRIPT), "api", "201"),
        print_output=False, print_input=False, _stdin=[request], _sudo=host_sudo(host),
    )
    del request
    if not ok:
        return fail_host(state, host, f"secret {name}: " + " ".join(output.stderr.split()))
    host.log_styled(f"created secret {name}")
    return True
