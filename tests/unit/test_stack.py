"""Rendering and planning of the inference stack (operations/stack.py), without a Swarm."""

import json

import pytest
import yaml

from operations import gateway as gw, stack, stack_render, stack_secrets
from operations.config import validate_host_data
from operations.inventory_data import load_group_data
from operations.sizing import GIB, Node

REVISION = "0e9e39f249a16976918f6564b8830bc894c89659"
NODES = [Node(f"gpu-{i:02d}", 8, "NVIDIA H100 80GB HBM3", 81559, 2048 * GIB, addr=f"10.20.0.{10 + i}")
         for i in (1, 2, 3)]
SECRETS = {"engine_key": "gpufleet_engine_key_111111111111",
           "gateway_clients": "gpufleet_gateway_clients_222222222222",
           "gateway_engine_auth": "gpufleet_gateway_engine_auth_444444444444"}


def settings(models, **overrides):
    data = {**load_group_data()["all"], "models": models, "stack_api_key_file": "/etc/k", "stack_engine_key_file": "/etc/ek", "monitoring_grafana_admin_password_file": "/etc/gk", **overrides}
    return validate_host_data("gpu-01", data)


def model(name, **fields):
    return {"name": name, "repo_id": f"org/{name}", "revision": REVISION, **fields}


def render(models, secrets=SECRETS, **overrides):
    s = settings(models, **overrides)
    served = [m for m in s.models if m.serve]
    gateway = gw.render_gateway(served, NODES, gw.gateway_listen_port(s))
    text = stack_render.render_stack(s, NODES, secrets, gateway)
    return yaml.safe_load(text), text, gateway


def test_vllm_service_has_the_engine_arguments_weights_shm_gpus_and_secrets():
    doc, text, _ = render([model("Llama-3.1-8B", tensor_parallel_size=2, max_model_len=8192,
                                 port=8001, engine_args=["--enable-prefix-caching"])])
    assert stack_render.stack_problems(text) == []
    svc = doc["services"]["llama-3-1-8b"]
    assert svc["image"] == "vllm/vllm-openai:v0.11.0"
    assert svc["command"] == ["/models/Llama-3.1-8B", "--served-model-name", "Llama-3.1-8B",
                              "--host", "0.0.0.0", "--port", "8001", "--tensor-parallel-size", "2",
                              "--gpu-memory-utilization", "0.9", "--max-model-len", "8192",
                              "--enable-prefix-caching"]
    # On the node's own network (no overlay: see operations/stack.py), listening on its port.
    assert svc["networks"] == ["hostnet"] and "ports" not in svc
    assert doc["networks"]["hostnet"] == {"external": True, "name": "host"}
    assert "8001/health" in svc["healthcheck"]["test"][-1]
    assert {"type": "bind", "source": "/opt/models/Llama-3.1-8B", "target": "/models/Llama-3.1-8B",
            "read_only": True} in svc["volumes"]
    assert {"type": "tmpfs", "target": "/dev/shm", "tmpfs": {"size": 3 * GIB}} in svc["volumes"]
    reservations = svc["deploy"]["resources"]["reservations"]["generic_resources"]
    assert reservations == [{"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": 2}}]
    # The engines' internal key (no client holds it): operations/gateway_access.py.
    assert svc["secrets"] == [{"source": "engine_key", "target": "engine_key", "uid": "0", "gid": "0", "mode": 0o400}]
    assert svc["healthcheck"]["start_period"] == "1200s"
    assert svc["stop_grace_period"] == "300s"  # time to finish in-flight requests after SIGTERM
    assert svc["deploy"]["update_config"]["failure_action"] == "rollback"
    # The key is read from the secret file inside the container, never from the stack file.
    assert "cat /run/secrets/engine_key" in svc["entrypoint"][2]
    assert "VLLM_API_KEY=" not in json.dumps(svc["environment"])


def test_a_model_sets_how_long_its_replicas_may_drain():
    doc, _, _ = render([model("m", stop_grace_period_s=900)])
    assert doc["services"]["m"]["stop_grace_period"] == "900s"
    with pytest.raises(Exception, match="stop_grace_period_s"):
        render([model("m", stop_grace_period_s=5)])


def test_dollars_are_escaped_for_the_stack_deploy_interpolation():
    doc, _, _ = render([model("m", engine_args=["--chat-template=$HOME/x"])])
    svc = doc["services"]["m"]
    assert '"$$(cat /run/secrets/engine_key)"' in svc["entrypoint"][2]
    assert svc["command"][-1] == "--chat-template=$$HOME/x"


@pytest.mark.parametrize(
    ("engine", "first_args", "health"),
    [
        ("tgi", ["--model-id", "/models/m"], "CMD-SHELL"),
        ("ollama", [], "CMD-SHELL"),
    ],
)
def test_other_engines_render_with_their_own_cli_and_health(engine, first_args, health):
    extra = {"gguf_file": "m-Q4_K_M.gguf"} if engine == "ollama" else {}
    doc, text, _ = render([model("m", engine=engine, **extra)])
    assert stack_render.stack_problems(text) == []
    svc = doc["services"]["m"]
    assert svc["command"][:len(first_args)] == first_args
    assert svc["healthcheck"]["test"][0] == health
    assert svc["image"] == load_group_data()["all"]["stack_engine_images"][engine]
    if engine == "ollama":
        # Ollama's own store, built by the weights phase (operations/ollama_store.py), mounted
        # read-only with pruning off.
        assert svc["environment"]["OLLAMA_MODELS"] == "/models/m"
        assert svc["environment"]["OLLAMA_NOPRUNE"] == "1"
        assert {"type": "bind", "source": "/opt/models/.ollama/m", "target": "/models/m",
                "read_only": True} in svc["volumes"]
        assert "engine_key" not in svc["entrypoint"][2]  # no key of its own: firewall + gateway
    else:
        assert 'API_KEY="$$(cat /run/secrets/engine_key)"' in svc["entrypoint"][2]


def test_several_models_each_get_a_service_and_a_gateway_route():
    doc, text, gateway = render([model("a", port=8001), model("b", port=8002, served_model_name="org/b-chat"),
                                 model("c", port=8003, serve=False)])
    assert set(doc["services"]) == {"a", "b", "gateway"}
    # Routed on the JSON body's top-level "model", read whole (issue 25: not a regex on a part).
    assert "use_backend be_b if { var(txn.model) -m str org/b-chat }" in gateway
    assert "http-request set-var(txn.model) req.body,json_query('$.model')" in gateway
    agent = "agent-check agent-port 18001 agent-inter 1s"
    assert (f"    server gpu-01 10.20.0.11:8001 check {agent}\n"
            f"    server gpu-02 10.20.0.12:8001 check {agent}") in gateway
    assert "server gpu-03 10.20.0.13:8002 check agent-check agent-port 18002 " in gateway
    # An unknown model gets a 404 from a backend (http-request rules would run before routing).
    assert "default_backend unknown_model" in gateway and "backend unknown_model" in gateway
    assert '\\"id\\":\\"org/b-chat\\"' in gateway


def test_gpu_model_becomes_a_placement_constraint():
    doc, _, _ = render([model("m", gpu_model="NVIDIA H100 80GB HBM3")])
    assert "node.labels.gpufleet.gpu.model == NVIDIA H100 80GB HBM3" in \
        doc["services"]["m"]["deploy"]["placement"]["constraints"]


def test_publish_modes():
    doc, _, gateway = render([model("m")], stack_publish_mode="host")
    gw = doc["services"]["gateway"]
    assert gw["networks"] == ["hostnet"] and "ports" not in gw and "bind :8080" in gateway
    # Start-first on the host network too: the new task binds beside the old (SO_REUSEPORT).
    assert gw["deploy"]["endpoint_mode"] == "dnsrr" and gw["deploy"]["update_config"]["order"] == "start-first"
    doc, _, gateway = render([model("m")], stack_publish_mode="ingress", stack_gateway_port=443)
    gw = doc["services"]["gateway"]
    # The API through the routing mesh; the gateway's exporter on each manager's own address.
    assert gw["ports"] == [{"target": 8080, "published": 443, "protocol": "tcp", "mode": "ingress"},
                           {"target": 8405, "published": 8405, "protocol": "tcp", "mode": "host"}]
    assert gw["secrets"][0]["source"] == "gateway_clients" and "gateway_tls" not in doc["secrets"]
    assert gw["deploy"]["endpoint_mode"] == "vip" and "bind :8080" in gateway
    assert doc["networks"]["gateway"] == {"driver": "overlay"}


def test_secrets_are_named_by_content_and_rotation_changes_the_specs_that_use_them():
    assert stack_render.secret_name("gpufleet", "api_key", "k1") == stack_render.secret_name("gpufleet", "api_key", "k1")
    assert stack_render.secret_name("gpufleet", "api_key", "k1") != stack_render.secret_name("gpufleet", "api_key", "k2")
    assert "k1" not in stack_render.secret_name("gpufleet", "api_key", "k1")
    doc1, _, _ = render([model("m")])
    doc2, _, _ = render([model("m")], secrets={**SECRETS, "engine_key": "gpufleet_engine_key_333333333333",
                                               "gateway_engine_auth": "gpufleet_gateway_engine_auth_5"})
    assert doc2["secrets"]["engine_key"]["name"] == "gpufleet_engine_key_333333333333"

    def spec(doc, key):
        return doc["services"][key]["deploy"]["labels"]["gpufleet.spec"]

    # The internal key rotated: engines and gateway both roll onto it.
    assert spec(doc1, "m") != spec(doc2, "m") and spec(doc1, "gateway") != spec(doc2, "gateway")
    # A client's key rotated (the gateway's client map): the gateway alone.
    doc3, _, _ = render([model("m")], secrets={**SECRETS, "gateway_clients": "gpufleet_gateway_clients_9"})
    assert spec(doc1, "m") == spec(doc3, "m") and spec(doc1, "gateway") != spec(doc3, "gateway")


def test_rendering_is_stable():
    assert render([model("m")])[1] == render([model("m")])[1]


def test_stack_problems_catch_what_a_deploy_would_trip_over():
    _, text, _ = render([model("m")])
    doc = yaml.safe_load(text)
    doc["services"]["m"]["shm_size"] = "8g"
    doc["services"]["m"]["secrets"].append({"source": "nope", "target": "x"})
    doc["services"]["m"]["volumes"][1]["tmpfs"]["size"] = 0
    doc["services"]["gateway"]["ports"] = [{"target": 1, "published": 9000, "mode": "ingress"}]
    doc["services"]["m"]["ports"] = [{"target": 1, "published": 9000, "mode": "host"}]
    problems = stack_render.stack_problems(yaml.safe_dump(doc))
    assert any("shm_size" in p for p in problems)
    assert any("secret nope is not declared" in p for p in problems)
    assert any("tmpfs /dev/shm has no size" in p for p in problems)
    assert any("also published" in p for p in problems)


def test_service_drift_names_what_changed():
    want = {"spec": "s1", "replicas": 3, "image": "reg/vllm:1", "secrets": ["k_1"]}
    running = {"labels": {"gpufleet.spec": "s1"}, "replicas": 3, "image": "reg/vllm:1@sha256:ab",
               "secrets": ["k_1"]}
    assert stack.service_drift("svc", running, want) is None
    assert stack.service_drift("svc", None, want) == "svc is not running"
    assert "scaled to 0" in stack.service_drift("svc", {**running, "replicas": 0}, want)
    assert "runs image reg/vllm:2" in stack.service_drift("svc", {**running, "image": "reg/vllm:2"}, want)
    assert "secrets" in stack.service_drift("svc", {**running, "secrets": ["k_0"]}, want)
    assert "another spec" in stack.service_drift("svc", {**running, "labels": {"gpufleet.spec": "s0"}}, want)


def test_convergence_reports_progress_and_rollbacks():
    ok = {"name": "s", "running": 3, "desired": 3, "update_state": "completed", "update_message": None}
    assert stack.convergence([ok]) == (True, ["s 3/3 (completed)"], [])
    done, _, failures = stack.convergence([{**ok, "running": 2}])
    assert not done and failures == []
    rolled = {**ok, "update_state": "rollback_completed", "update_message": "update rolled back due to failure"}
    done, _, failures = stack.convergence([rolled])
    assert not done and failures == ["s: update rollback_completed: update rolled back due to failure"]
    # A rollback an earlier run saw is not this run's failure (its service was not updated now).
    assert stack.convergence([rolled], watched=set())[0] is True
    # A paused rollback is never converged: the next run forces the service's update.
    paused = {**ok, "update_state": "rollback_paused", "update_message": "update paused"}
    done, _, failures = stack.convergence([paused], watched=set())
    assert not done and failures == []


def test_parse_stack_state():
    inspect = [{"Spec": {"Name": "gpufleet_m", "Labels": {"gpufleet.spec": "x"},
                         "Mode": {"Replicated": {"Replicas": 3}},
                         "TaskTemplate": {"ContainerSpec": {"Image": "i@sha256:1",
                                                            "Secrets": [{"SecretName": "k_1"}]}}},
                "UpdateStatus": {"State": "updating", "Message": "update in progress"}}]
    lines = ["@@ls", json.dumps({"Name": "gpufleet_m", "Replicas": "2/3"}), "@@inspect",
             *json.dumps(inspect, indent=1).splitlines(), "@@secrets", "k_1", "k_0", "@@configs", "c_1"]
    state = stack.parse_stack_state(lines)
    assert state["secrets"] == ["k_0", "k_1"] and state["configs"] == ["c_1"]
    assert state["services"] == [{"name": "gpufleet_m", "labels": {"gpufleet.spec": "x"}, "replicas": 3,
                                  "image": "i@sha256:1", "secrets": ["k_1"], "running": 2, "desired": 3,
                                  "update_state": "updating", "update_message": "update in progress"}]
    assert stack.parse_stack_state(["@@error", "This node is not a swarm manager."])["error"] == \
        "This node is not a swarm manager."


def test_control_secrets_must_be_private_files(tmp_path):
    from pyinfra.api.exceptions import OperationError

    key = tmp_path / "api-key"
    key.write_text("sk-test\n")
    key.chmod(0o644)
    with pytest.raises(OperationError, match="private file .* this one is 0644.*chmod 600"):
        stack_secrets.read_control_secret(str(key), "stack_api_key_file")
    key.chmod(0o600)
    assert stack_secrets.read_control_secret(str(key), "stack_api_key_file") == "sk-test"


def test_secret_request_carries_the_value_only_in_the_body():
    request = stack_secrets.secret_request("gpufleet_api_key_1", "api_key", "gpufleet", "sk-secret")
    head, body = request.split("\r\n\r\n", 1)
    assert "sk-secret" not in head and "sk-secret" not in body  # base64 in the body
    assert json.loads(body)["Labels"] == {"gpufleet.stack": "gpufleet", "gpufleet.secret": "api_key"}
    assert f"Content-Length: {len(body.encode())}" in head


# --- The drain agent (operations/drain_agent.py) -------------------------------------------


def test_a_vllm_task_runs_under_the_drain_agent_shipped_as_a_config_of_its_own():
    doc, text, gateway = render([model("m", port=8001, stop_grace_period_s=120)])
    assert stack_render.stack_problems(text) == []
    svc = doc["services"]["m"]
    # The agent is PID 1 (exec), the engine its child, with the deadline under the grace period.
    assert svc["entrypoint"][2].endswith(
        "exec python3 /usr/local/lib/gpufleet/drain_agent.py --agent-port 18001 --engine-port "
        '8001 --notice 3 --deadline 115 -- vllm serve "$$@"')
    assert svc["configs"] == [{"source": "drain_agent", "mode": 0o444,
                               "target": "/usr/local/lib/gpufleet/drain_agent.py"}]
    source = (stack_render.Path(stack_render.__file__).parent / "drain_agent.py").read_text()
    name = f"gpufleet_drain_agent_{stack_render.content_hash(source)}"
    assert doc["configs"]["drain_agent"] == {"name": name,
                                            "file": "/etc/gpufleet/stack/gpufleet.drain_agent.py"}
    # The gateway asks each task's agent every second, beside the health check.
    assert "server gpu-01 10.20.0.11:8001 check agent-check agent-port 18001 agent-inter 1s" in gateway
    # A task its checks mark down is hung or gone (a stopping one is drained first): the
    # requests still on it are ended at once, not after `timeout server` (15 minutes).
    assert "default-server inter 2s fall 2 rise 1 on-marked-down shutdown-sessions\n" in gateway
    # The request is held whole, so a retry can replay it when its engine dies before answering.
    backend = gateway.split("\nbackend be_m\n", 1)[1].split("\nbackend ", 1)[0]
    assert "    option http-buffer-request\n" in backend
    pinned = gateway.split("\nbackend pin_m_0\n", 1)[1].split("\nbackend ", 1)[0]
    assert "    retries 0\n    " in pinned and "    option http-server-close\n" in pinned


def test_a_changed_drain_agent_is_a_new_config_and_rolls_the_engines(monkeypatch):
    before, _, _ = render([model("m")])
    real = stack_render.Path.read_text
    monkeypatch.setattr(stack_render.Path, "read_text",
                        lambda self, *a, **k: real(self, *a, **k) + ("\n# v2" if self.name == "drain_agent.py" else ""))
    after, _, _ = render([model("m")])
    assert after["configs"]["drain_agent"]["name"] != before["configs"]["drain_agent"]["name"]
    label = stack_render.LABEL_SPEC
    assert after["services"]["m"]["labels"][label] != before["services"]["m"]["labels"][label]
    assert after["services"]["gateway"]["labels"][label] == before["services"]["gateway"]["labels"][label]


def test_tgi_and_ollama_tasks_have_no_drain_agent_and_without_vllm_no_config():
    doc, _, gateway = render([model("t", engine="tgi", port=8001),
                              model("o", engine="ollama", port=8002, gguf_file="o.gguf")])
    assert "drain_agent" not in json.dumps(doc)
    assert "configs" not in doc["services"]["t"] and "configs" not in doc["services"]["o"]
    assert "agent-check" not in gateway
    # Without an agent a stopping task closes its port while it finishes its requests: the
    # checks mark it down then, and its sessions must be left to end on their own.
    assert "shutdown-sessions" not in gateway
    assert gateway.count("default-server inter 2s fall 2 rise 1\n") == 2


def test_drain_port_is_the_models_port_plus_10000_unless_given_and_never_clashes():
    s = settings([model("a", port=8001), model("b", port=8002, drain_port=9101)])
    assert [m.agent_port for m in s.models] == [18001, 9101]
    with pytest.raises(Exception, match="monitoring_node_exporter_port.*9100 is also models\\[b\\] drain port"):
        settings([model("a", port=8001), model("b", port=8002, drain_port=9100)])
    assert settings([model("t", engine="tgi")]).models[0].agent_port is None
    with pytest.raises(Exception, match="drain_port for a: its default, port \\+ 10000 = 18001"):
        settings([model("a", port=8001), model("b", port=18001)])
    with pytest.raises(Exception, match="above 65535"):
        settings([model("a", port=60000)])
    with pytest.raises(Exception, match="drain_port for a that no other port"):
        settings([model("a", port=8001, drain_port=8002), model("b", port=8002)])
    with pytest.raises(Exception, match="no drain_port for engine 'tgi'"):
        settings([model("t", engine="tgi", drain_port=9101)])


def test_the_engine_firewall_guards_the_drain_agents_ports_too():
    from operations import engine_ports
    s = settings([model("a", port=8001), model("t", engine="tgi", port=8002),
                  model("off", port=8003, serve=False)])
    # Then the monitoring listeners without a login of their own (Grafana has one: not here).
    assert engine_ports.guarded_ports(s) == [8001, 18001, 8002, 9090, 8405, 9093, 9100, 9400]
    off = settings([model("a", port=8001)], monitoring_enabled=False)
    assert engine_ports.guarded_ports(off) == [8001, 18001]
    assert engine_ports.guarded_ports(settings([model("a", serve=False)])) == []
