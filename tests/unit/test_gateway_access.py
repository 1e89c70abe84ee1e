"""The gateway's credentials (operations/gateway_access.py), its rendered access rules
(operations/gateway.py) and the engine firewall's rules (operations/engine_ports.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from operations import engine_ports, gateway as gw, gateway_access as ga
from operations.config import validate_host_data
from operations.inventory_data import load_group_data
from operations.sizing import GIB, Node
from scripts.lab import tls

MODEL = {"name": "tiny", "repo_id": "org/tiny", "revision": "0" * 40}
NODES = [Node(f"gpu-{i}", 1, "NVIDIA H100", 81559, 64 * GIB, addr=f"10.0.0.{i}") for i in (1, 2)]


def key_file(tmp_path, name, value, mode=0o600):
    path = tmp_path / name
    path.write_text(value + "\n")
    path.chmod(mode)
    return str(path)


def settings(tmp_path, **overrides):
    data = {**load_group_data()["all"], "models": [MODEL],
            "stack_api_key_file": key_file(tmp_path, "operator", "sk-operator-0123456789"),
            "stack_engine_key_file": key_file(tmp_path, "engine", "ek-engine-0123456789"),
            "monitoring_grafana": False,
            **overrides}
    return validate_host_data("gpu-1", data)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    paths = tls.ensure(directory, "gateway.test.lab")
    return paths


def test_good_credentials_have_no_problem(tmp_path, pki):
    s = settings(tmp_path, stack_client_keys={"alice": key_file(tmp_path, "a", "sk-alice-0123456789")},
                 stack_client_rate_limits={"alice": 60},
                 stack_gateway_tls_cert_file=pki["cert"], stack_gateway_tls_key_file=pki["key"],
                 stack_gateway_ca_file=pki["ca"])
    assert ga.access_problems(s) == []
    assert ga.client_keys(s) == {"operator": "sk-operator-0123456789", "alice": "sk-alice-0123456789"}
    assert ga.clients_map(ga.client_keys(s)) == ("sk-operator-0123456789 operator\n"
                                                 "sk-alice-0123456789 alice\n")


def test_a_key_shared_by_two_clients_or_with_the_engines_is_refused(tmp_path):
    s = settings(tmp_path, stack_client_keys={
        "alice": key_file(tmp_path, "a", "sk-operator-0123456789"),
        "bob": key_file(tmp_path, "b", "ek-engine-0123456789")})
    lines = [text for _, text in ga.access_problems(s)]
    assert any("stack_client_keys[alice]" in t and "stack_api_key_file holds the same key" in t
               for t in lines), lines
    assert any("stack_engine_key_file" in t and "stack_client_keys[bob] holds the same key" in t
               for t in lines), lines


def test_world_readable_short_or_missing_key_files_and_bad_names_are_refused(tmp_path):
    s = settings(tmp_path, stack_client_keys={
        "alice": key_file(tmp_path, "a", "sk-alice-0123456789", mode=0o644),
        "bob": key_file(tmp_path, "b", "short"),
        "carol": str(tmp_path / "missing"),
        "Operator": key_file(tmp_path, "o", "sk-other-0123456789")},
        stack_client_rate_limits={"dave": 10})
    lines = " | ".join(text for _, text in ga.access_problems(s))
    assert "stack_client_keys[alice]" in lines and "chmod 600" in lines
    assert "stack_client_keys[bob]" in lines and "16 to 512 characters" in lines
    assert "stack_client_keys[carol]" in lines and "No such file" in lines
    assert "client 'Operator'" in lines
    assert "client 'dave' = 10: expected a client of stack_client_keys" in lines


def test_a_certificate_and_a_key_that_are_not_a_pair_are_refused(tmp_path, pki):
    other = tls.ensure(tmp_path / "other", "other.test.lab")
    problems = ga.tls_problems(pki["cert"], other["key"])
    assert problems[0][0] == "stack_gateway_tls_key_file"
    assert "this key belongs to another" in problems[0][1]


def test_an_expired_or_not_yet_valid_certificate_is_refused(pki):
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400)
    (key, text), = ga.tls_problems(pki["cert"], pki["key"], now=later)
    assert key == "stack_gateway_tls_cert_file" and "expired" in text
    earlier = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)
    (key, text), = ga.tls_problems(pki["cert"], pki["key"], now=earlier)
    assert "valid only from" in text


def test_a_world_readable_tls_key_or_a_cert_that_is_not_pem_is_refused(tmp_path, pki):
    loose = tmp_path / "loose.key"
    loose.write_bytes(open(pki["key"], "rb").read())
    loose.chmod(0o644)
    assert "chmod 600" in ga.tls_problems(pki["cert"], str(loose))[0][1]
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert "PEM certificates" in ga.tls_problems(str(junk), pki["key"])[0][1]


def test_tls_needs_both_files(tmp_path, pki):
    s = settings(tmp_path, stack_gateway_tls_cert_file=pki["cert"])
    assert [key for key, _ in ga.access_problems(s)] == ["stack_gateway_tls_key_file"]


def test_the_tls_bundle_is_the_chain_then_the_key(pki):
    bundle = ga.tls_bundle(pki["cert"], pki["key"])
    assert bundle.index("BEGIN CERTIFICATE") < bundle.index("BEGIN PRIVATE KEY")


def test_the_gateway_speaks_tls_redirects_and_limits_rates_when_told(tmp_path, pki):
    s = settings(tmp_path, stack_gateway_tls_cert_file=pki["cert"], stack_gateway_tls_key_file=pki["key"],
                 stack_gateway_http_redirect_port=8079, stack_publish_mode="host",
                 stack_gateway_port=8443, stack_client_rate_limits={"operator": 120})
    text = gw.render_gateway(list(s.models), NODES, gw.gateway_listen_port(s), access=gw.access_for(s))
    assert "bind :8443 ssl crt /run/secrets/gateway_tls" in text
    assert "bind :8079\n" in text and ":8443%[capture.req.uri] code 308" in text
    assert "sc_http_req_rate(0) gt 120" in text and "status 429" in text
    plain = gw.render_gateway(list(s.models), NODES, 8080)
    assert "ssl crt" not in plain and "http_redirect" not in plain and "http_req_rate" not in plain
    # The key never reaches the configuration: only the secrets' paths.
    assert "sk-operator" not in text and "ek-engine" not in text


def test_metrics_count_each_named_clients_requests_for_the_operator_alone(tmp_path):
    s = settings(tmp_path, stack_client_keys={"bob": key_file(tmp_path, "bob", "sk-bob-0123456789ab"),
                                              "alice": key_file(tmp_path, "a", "sk-alice-0123456789")})
    access = gw.access_for(s)
    assert access.clients == ("operator", "alice", "bob")
    text = gw.render_gateway(list(s.models), NODES, 8080, access=access)
    assert "http-request track-sc1 var(txn.client) table client_requests if authorised" in text
    assert "stick-table type string len 32 size 1k expire 24h store http_req_cnt" in text
    metrics = next(line for line in text.splitlines() if "lf-string" in line)
    assert metrics.endswith(" if metrics !pinned")
    for name in access.clients:  # one counter per client, by name: keys are never in the config
        assert (f'gpufleet_gateway_client_requests_total{{client=\\"{name}\\"}} '
                f"%[str({name}),table_http_req_cnt(client_requests)]\\n") in metrics
    assert "sk-" not in text
    assert "403" in next(line for line in text.splitlines() if "if metrics !pinned !operator" in line)


def test_more_clients_than_metrics_can_answer_in_one_buffer_are_refused(tmp_path):
    many = {f"client-{i:03d}": key_file(tmp_path, f"c{i}", f"sk-client-{i:03d}-0123456789")
            for i in range(160)}
    found = ga.access_problems(settings(tmp_path, stack_client_keys=many))
    assert [key for key, _ in found] == ["stack_client_keys"]
    assert found[0][1].startswith("key 'stack_client_keys' has 160 clients: expected fewer")
    fewer = dict(list(many.items())[:140])
    assert ga.access_problems(settings(tmp_path, stack_client_keys=fewer)) == []


def test_every_engine_task_can_be_pinned_and_gets_the_internal_key(tmp_path):
    s = settings(tmp_path)
    text = gw.render_gateway(list(s.models), NODES, 8080)
    assert "use_backend pin_tiny_0 if pinned { req.hdr(x-gpufleet-pin) -m str tiny@gpu-1 }" in text
    assert "use_backend pin_tiny_1 if pinned { req.hdr(x-gpufleet-pin) -m str tiny@gpu-2 }" in text
    assert text.count('set-header Authorization "Bearer %[str(engine),map(/run/secrets/gateway_engine_auth)]"') == 3


def test_the_engine_firewall_admits_loopback_and_the_sources_then_resets():
    rules = engine_ports.chain_rules([8001, 8000, 8000], ["10.0.0.2", "10.0.0.1/32", "192.168.0.0/24"])
    assert rules == [
        "-A GPUFLEET-ENGINES -i lo -j RETURN",
        "-A GPUFLEET-ENGINES -s 10.0.0.1/32 -j RETURN",
        "-A GPUFLEET-ENGINES -s 10.0.0.2/32 -j RETURN",
        "-A GPUFLEET-ENGINES -s 192.168.0.0/24 -j RETURN",
        "-A GPUFLEET-ENGINES -p tcp -m tcp --dport 8000 -j REJECT --reject-with tcp-reset",
        "-A GPUFLEET-ENGINES -p tcp -m tcp --dport 8001 -j REJECT --reject-with tcp-reset",
    ]
    text = engine_ports.rules_file([8000], ["10.0.0.1"])
    assert text.splitlines()[3:6] == ["*filter", "-F GPUFLEET-ENGINES", "-A GPUFLEET-ENGINES -i lo -j RETURN"]
    assert text.rstrip().endswith("COMMIT")


def test_the_live_chain_is_read_as_iptables_prints_it():
    live = engine_ports.parse_live([
        "@@chain", "-N GPUFLEET-ENGINES", "-A GPUFLEET-ENGINES -i lo -j RETURN",
        "@@input", "-P INPUT ACCEPT", "-A INPUT -p tcp -j GPUFLEET-ENGINES"])
    assert live == {"iptables": True, "jump": True, "enabled": False,
                    "rules": ["-A GPUFLEET-ENGINES -i lo -j RETURN"]}
    assert engine_ports.parse_live(["@@unit", "enabled", "@@chain", "@@input"])["enabled"] is True
    assert engine_ports.parse_live(["@@chain", "@@input", "-P INPUT ACCEPT"])["rules"] is None
    assert engine_ports.parse_live(["@@missing", "none"])["iptables"] is False
