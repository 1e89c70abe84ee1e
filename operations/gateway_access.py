"""Who may use the gateway, and how it proves who it is: TLS, named client keys, and the internal
key between the gateway and the engines. Pure functions over files on the control machine; the
stack phase turns what they return into Docker secrets (operations/stack_secrets.py wanted_secrets), the
inventory check refuses what they find wrong before any host is touched.

- TLS: `stack_gateway_tls_cert_file` (PEM, the server certificate first, then its chain) and
  `stack_gateway_tls_key_file` (its PEM private key, 0600/0400). Checked: both readable, the key
  matches the certificate, the certificate is valid now. HAProxy reads one PEM holding both
  (`bind ... ssl crt`): that bundle is the `gateway_tls` secret.
- Clients: the key in `stack_api_key_file` is the client `operator` (the smoke tests, the load
  test and the benchmarks use it, and only it may pin a request to one engine task); each entry
  of `stack_client_keys` (name -> key file) is a client of its own. The gateway maps a presented
  key to its client's name (`gateway_clients` secret: "<key> <name>" lines, HAProxy's map file
  format); logs and the rate-limit table carry the name, never the key.
- Engines: `stack_engine_key_file` holds the internal key. Engines require it (vLLM, TGI); the
  gateway replaces whatever a client sent with it (`gateway_engine_auth` secret: one map line
  "engine <key>"). No client holds it, and no client key is accepted by an engine.

    problems = access_problems(settings)     # [(key, "key 'k' = 'v': expected ...")]
    keys = client_keys(settings)             # {"operator": "...", "alice": "..."}
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

from operations import rules

OPERATOR_CLIENT = "operator"
CLIENT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# What a key may be: one token HAProxy reads as one word of a map line and clients send as
# "Authorization: Bearer <key>" (RFC 6750's b64token characters), long enough not to be guessed.
KEY_PATTERN = re.compile(r"^[A-Za-z0-9._~+/=-]{16,512}$")
KEY_RULE = "a key of 16 to 512 characters from A-Z a-z 0-9 . _ ~ + / = -"
# The header the operator's tools send to reach one engine task through the gateway.
PIN_HEADER = "X-Gpufleet-Pin"
SERVER_HEADER = "X-Gpufleet-Server"


def read_key(path: str) -> str:
    """A key from its 0600 file (one line; operations.rules.secret_file_problem has checked)."""
    return Path(path).expanduser().read_text(encoding="utf-8").strip()


def key_value_problem(value: str) -> str | None:
    return None if KEY_PATTERN.match(value) else KEY_RULE


def client_name_problem(name: str) -> str | None:
    if not CLIENT_NAME.match(name):
        return "client names of 1-32 characters: a-z first, then a-z 0-9 _ -"
    if name == OPERATOR_CLIENT:
        return (f"a name other than {OPERATOR_CLIENT!r}: that client is stack_api_key_file's "
                "(the deploy's own tools)")
    return None


def client_key_files(settings) -> dict[str, str]:
    """Client name -> key file: the operator's, then stack_client_keys in name order."""
    files = {OPERATOR_CLIENT: settings.stack_api_key_file} if settings.stack_api_key_file else {}
    files.update(sorted(settings.stack_client_keys.items()))
    return files


def client_keys(settings) -> dict[str, str]:
    """Client name -> key, read on the control machine."""
    return {name: read_key(path) for name, path in client_key_files(settings).items()}


def clients_map(keys: dict[str, str]) -> str:
    """The gateway_clients secret: HAProxy map lines "<key> <client name>"."""
    return "".join(f"{key} {name}\n" for name, key in keys.items())


def engine_auth_map(engine_key: str) -> str:
    """The gateway_engine_auth secret: the map line the gateway reads the internal key from."""
    return f"engine {engine_key}\n"


# --- The checks the inventory runs before any host is touched -----------------------------------


def load_certificates(path: str):
    """The PEM certificates of a file, in order; ValueError with what is wrong."""
    from cryptography import x509

    try:
        data = Path(os.path.expanduser(path)).read_bytes()
    except OSError as error:
        raise ValueError(f"a readable file on the control machine ({error.strerror})") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError("a file of PEM certificates (-----BEGIN CERTIFICATE-----)") from None
    return certificates


def tls_problems(cert_path: str, key_path: str, now: dt.datetime | None = None) -> list[tuple[str, str]]:
    """(key, what is expected) for a certificate and key HAProxy could not serve or a client
    would refuse: unreadable, not PEM, key not private, not a pair, not valid now."""
    from cryptography.hazmat.primitives import serialization

    problem = rules.private_file_problem(key_path)
    if problem is None:
        try:
            Path(os.path.expanduser(key_path)).read_bytes()
        except OSError as error:
            problem = f"a file this user can read on the control machine ({error.strerror})"
    if problem:
        return [("stack_gateway_tls_key_file", problem)]
    try:
        certificates = load_certificates(cert_path)
    except ValueError as error:
        return [("stack_gateway_tls_cert_file", str(error))]
    try:
        key = serialization.load_pem_private_key(
            Path(os.path.expanduser(key_path)).read_bytes(), password=None)
    except (ValueError, TypeError):
        return [("stack_gateway_tls_key_file",
                 "an unencrypted PEM private key (HAProxy cannot ask for a passphrase)")]
    leaf = certificates[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, public):
        return [("stack_gateway_tls_key_file",
                 f"the private key of the certificate in {cert_path} (its first certificate, "
                 f"{leaf.subject.rfc4514_string()}); this key belongs to another")]
    now = now or dt.datetime.now(dt.timezone.utc)
    if now >= leaf.not_valid_after_utc:
        return [("stack_gateway_tls_cert_file",
                 f"a certificate valid now; {leaf.subject.rfc4514_string()} expired "
                 f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")]
    if now < leaf.not_valid_before_utc:
        return [("stack_gateway_tls_cert_file",
                 f"a certificate valid now; {leaf.subject.rfc4514_string()} is valid only from "
                 f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")]
    return []


def tls_bundle(cert_path: str, key_path: str) -> str:
    """The gateway_tls secret: the certificate chain, then the key (what `crt` reads)."""
    cert = Path(os.path.expanduser(cert_path)).read_text(encoding="utf-8").strip()
    key = Path(os.path.expanduser(key_path)).read_text(encoding="utf-8").strip()
    return f"{cert}\n{key}\n"


# The gateway's /metrics: one request counter per client, answered from one HAProxy buffer
# (16 KiB by default, a part of it for headers and HAProxy's reserve: 300 clients answered 500 in
# the lab). A client's line is at most its name plus this much, with a 20-digit count.
METRIC_CLIENT_REQUESTS = "gpufleet_gateway_client_requests_total"
METRICS_BODY_MAX_BYTES = 12 * 1024
METRICS_HEAD_BYTES = 256  # the HELP and TYPE lines
_METRIC_LINE_BYTES = len(METRIC_CLIENT_REQUESTS + '{client=""} \n') + 20


def metrics_body_bytes(clients) -> int:
    """The most bytes the gateway's /metrics answer takes for these client names."""
    return METRICS_HEAD_BYTES + sum(_METRIC_LINE_BYTES + len(name) for name in clients)


def access_problems(settings) -> list[tuple[str, str]]:
    """Every problem with the gateway's credentials in one host's settings, as (key, line)."""
    found: list[tuple[str, str]] = []
    for name, path in sorted(settings.stack_client_keys.items()):
        problem = client_name_problem(name)
        if problem:
            found.append(("stack_client_keys", f"key 'stack_client_keys' has client {name!r}: expected {problem}"))
    for name, limit in sorted(settings.stack_client_rate_limits.items()):
        if name != OPERATOR_CLIENT and name not in settings.stack_client_keys:
            found.append(("stack_client_rate_limits",
                          f"key 'stack_client_rate_limits' has client {name!r} = {limit}: expected "
                          f"a client of stack_client_keys (or {OPERATOR_CLIENT!r})"))
    found += _key_file_problems(settings)
    clients = list(client_key_files(settings))
    if metrics_body_bytes(clients) > METRICS_BODY_MAX_BYTES:
        found.append(("stack_client_keys",
                      f"key 'stack_client_keys' has {len(clients) - 1} clients: expected fewer, so "
                      "that the gateway's /metrics (a line per client) fits in "
                      f"{METRICS_BODY_MAX_BYTES // 1024} KiB, one HAProxy buffer (about "
                      f"{(METRICS_BODY_MAX_BYTES - METRICS_HEAD_BYTES) // (_METRIC_LINE_BYTES + 10)} clients "
                      "of 10-character names)"))
    if settings.stack_gateway_tls_cert_file or settings.stack_gateway_tls_key_file:
        if not (settings.stack_gateway_tls_cert_file and settings.stack_gateway_tls_key_file):
            missing = ("stack_gateway_tls_key_file" if settings.stack_gateway_tls_cert_file
                       else "stack_gateway_tls_cert_file")
            found.append((missing, f"key '{missing}' = None: expected a file as well: TLS needs "
                                   "both the certificate and its key"))
        else:
            for key, problem in tls_problems(settings.stack_gateway_tls_cert_file,
                                             settings.stack_gateway_tls_key_file):
                found.append((key, f"key '{key}' = {getattr(settings, key)!r}: expected {problem}"))
    if settings.stack_gateway_ca_file:
        try:
            load_certificates(settings.stack_gateway_ca_file)
        except ValueError as error:
            found.append(("stack_gateway_ca_file",
                          f"key 'stack_gateway_ca_file' = {settings.stack_gateway_ca_file!r}: expected {error}"))
    return found


def _key_file_problems(settings) -> list[tuple[str, str]]:
    """Each key file private and well formed; no key used twice (two clients, or a client and
    the engines: a client could then reach an engine directly)."""
    files = {f"stack_client_keys[{name}]" if name != OPERATOR_CLIENT else "stack_api_key_file": path
             for name, path in client_key_files(settings).items()}
    if settings.stack_engine_key_file:
        files["stack_engine_key_file"] = settings.stack_engine_key_file
    found, seen = [], {}
    for label, path in files.items():
        key = label.split("[", 1)[0]
        problem = rules.secret_file_problem(path)
        value = None if problem else read_key(path)
        if value is not None:
            problem = key_value_problem(value)
        if problem:
            found.append((key, f"key '{label}' = {path!r}: expected {problem}"))
            continue
        if value in seen:
            found.append((key, f"key '{label}' = {path!r}: expected a key of its own; "
                               f"{seen[value]} holds the same key"))
        seen.setdefault(value, label)
    return found
