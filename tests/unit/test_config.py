"""The configuration model: defaults are valid, and bad values are refused in one clear line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from operations import config, inventory_check, inventory_data

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def defaults():
    return inventory_data.load_group_data()["all"]


def problems_for(defaults, **overrides):
    try:
        config.validate_host_data("gpu-01", {**defaults, **overrides})
    except config.ConfigError as error:
        return error.lines
    return []


def test_the_shipped_defaults_are_valid(defaults):
    settings = config.validate_host_data("gpu-01", defaults)
    assert settings.models_dir == "/opt/models"
    assert settings.docker_engine_source == "docker"


def test_every_model_key_has_a_default_with_a_comment():
    source = (REPO / "group_data" / "all.py").read_text().splitlines()
    for key in config.Settings.model_fields:
        line_no = next(i for i, line in enumerate(source) if line.startswith(f"{key} ="))
        assert source[line_no - 1].lstrip().startswith("#"), f"{key} has no comment above it"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("docker_log_max_file", "five", "expected a whole number"),
        ("docker_log_max_file", 0, "expected a number >= 1"),
        ("docker_engine_source", "snap", "expected 'docker' or 'distro'"),
        ("models_dir", "opt/models", "expected an absolute path"),
        ("models_dir", "/", "not / itself"),
        ("preflight_min_free_gb_models", -5, "expected a number >= 0"),
        ("preflight_require_time_sync", "yes", "expected True or False"),
        ("docker_log_max_size", "10X", "expected a size such as '100m'"),
        ("docker_version", "latest", "expected a version such as '28.5.2'"),
        ("docker_apt_url", "download.docker.com", "expected an http(s) URL"),
        ("docker_daemon_config", {"labels": {1, 2}}, "JSON-serialisable"),
        ("nvidia_driver_flavour", "closed", "expected 'open' or 'proprietary'"),
        ("nvidia_fabricmanager", "yes", "expected 'auto' or True or False"),
        ("nvidia_driver_version", "570.86.15", "expected a version on nvidia_driver_branch 580"),
        ("nvidia_driver_version", "latest", "expected a driver version such as '580.95.05'"),
        ("nvidia_container_toolkit_version", "1.18.0-1", "1.19.0-1 or later"),
        ("nvidia_container_toolkit_version", "1.19", "expected an apt version such as '1.19.1-1'"),
        ("nvidia_cuda_key_fingerprint", "3bf863cc", "expected a 40-hex-digit key fingerprint"),
        ("nvidia_reboot_timeout_s", 10, "expected a number >= 60"),
        ("nvidia_container_verify_image", "ubuntu 24.04", "expected an image reference such as"),
    ],
)
def test_a_bad_value_names_host_key_value_and_what_is_accepted(defaults, key, value, expected):
    lines = problems_for(defaults, **{key: value})
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"host gpu-01: key '{key}' = {value!r}: ")
    assert expected in lines[0]


def test_an_unknown_key_is_refused_with_a_suggestion(defaults):
    lines = problems_for(defaults, docker_versoin="28.5.2")
    assert lines == ["host gpu-01: unknown key 'docker_versoin' = '28.5.2': did you mean 'docker_version'?"]


def test_pyinfra_connection_keys_and_lab_metadata_are_not_ours_to_refuse(defaults):
    assert problems_for(defaults, ssh_user="ubuntu", ssh_port=2222, _sudo=True, lab_container="x") == []


def test_a_removed_default_is_reported_as_missing(defaults):
    data = dict(defaults)
    del data["docker_version"]
    with pytest.raises(config.ConfigError) as caught:
        config.validate_host_data("gpu-01", data)
    assert "key 'docker_version' = '<missing>': this key is required" in caught.value.lines[0]


def test_host_data_overrides_group_data_which_overrides_all():
    inventory = {
        "__file__": "/x/inventories/prod.py",
        "gpu_nodes": [("gpu-01", {"models_dir": "/host"}), "gpu-02"],
        "swarm_managers": ["gpu-02"],
    }
    group_data = {
        "all": {"models_dir": "/all", "docker_log_max_file": 1},
        "prod": {"docker_log_max_file": 2},
        "swarm_managers": {"models_dir": "/managers"},
    }
    merged = inventory_data.merged_hosts(inventory, group_data)
    assert merged["gpu-01"].data == {"models_dir": "/host", "docker_log_max_file": 2}
    assert merged["gpu-02"].data == {"models_dir": "/managers", "docker_log_max_file": 2}
    assert merged["gpu-01"].sources == {"models_dir": "inventory host data",
                                        "docker_log_max_file": "group_data/prod.py"}
    with_data = inventory_data.merged_hosts(inventory, group_data, {"models_dir": "/cli"})
    assert with_data["gpu-01"].data["models_dir"] == "/cli"
    assert with_data["gpu-01"].sources["models_dir"] == "--data"


def write_inventory(tmp_path, hosts_literal):
    inventory = tmp_path / "inventories" / "bad.py"
    inventory.parent.mkdir()
    inventory.write_text(
        "from operations.config import validate_inventory\n"
        f"gpu_nodes = {hosts_literal}\n"
        "validate_inventory(globals())\n"
    )
    return inventory


@pytest.mark.parametrize(
    ("host_data", "expected"),
    [
        ('{"docker_engine_source": "apt"}', "key 'docker_engine_source' = 'apt': expected 'docker' or 'distro'"),
        ('{"preflight_min_free_gb_docker": "50"}', "key 'preflight_min_free_gb_docker' = '50': expected a whole number"),
        ('{"modls_dir": "/opt/models"}', "unknown key 'modls_dir'"),
    ],
)
def test_pyinfra_refuses_bad_data_before_connecting(tmp_path, host_data, expected):
    # The host points at a closed loopback port: if validation did not stop the run first,
    # pyinfra would try to connect and the output would say so.
    inventory = write_inventory(
        tmp_path, f'[("gpu-01", {{"ssh_hostname": "127.0.0.1", "ssh_port": 9, **{host_data}}})]'
    )
    result = subprocess.run(
        [str(Path(sys.executable).parent / "pyinfra"), str(inventory), "deploy.py", "--dry"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == config.EXIT_BAD_CONFIG, output
    assert f"configuration error: host gpu-01: {expected}" in output
    assert "Connecting to hosts" not in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("docker_log_max_file = 0", "key 'docker_log_max_file' = 0: expected a number >= 1"),
        ('models_dir = "relative/models"', "key 'models_dir' = 'relative/models': expected an absolute path"),
        ("preflight_require_time_sync = 1", "key 'preflight_require_time_sync' = 1: expected True or False"),
        ('docker_daemon_confg = {"debug": True}', "unknown key 'docker_daemon_confg'"),
    ],
)
def test_pyinfra_refuses_bad_group_data_before_connecting(tmp_path, line, expected):
    # A fleet of its own: the repository's group data plus one bad line, run from its directory
    # the way users run pyinfra (group_data/ is found in the working directory).
    (tmp_path / "group_data").mkdir()
    defaults = (REPO / "group_data" / "all.py").read_text()
    (tmp_path / "group_data" / "all.py").write_text(defaults + "\n" + line + "\n")
    inventory = write_inventory(tmp_path, '[("gpu-01", {"ssh_hostname": "127.0.0.1", "ssh_port": 9}), "gpu-02"]')
    result = subprocess.run(
        [str(Path(sys.executable).parent / "pyinfra"), str(inventory), str(REPO / "deploy.py"), "--dry"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    output = result.stdout + result.stderr
    assert result.returncode == config.EXIT_BAD_CONFIG, output
    # The same problem on every host, from the file they share: said once, naming the file.
    assert f"configuration error: group_data/all.py (every host): {expected}" in output
    assert output.count("configuration error:") == 1, output
    assert "Connecting to hosts" not in output and "Traceback" not in output


GOOD_MODEL = {"name": "llama", "repo_id": "meta-llama/Llama-3.1-8B-Instruct",
              "revision": "0e9e39f249a16976918f6564b8830bc894c89659"}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({**GOOD_MODEL, "revision": "main"},
         "key 'models[0].revision' = 'main': expected a pinned 40-hex commit (not a branch or tag)"),
        ({**GOOD_MODEL, "repo_id": "llama"},
         "key 'models[0].repo_id' = 'llama': expected a Hub repo id"),
        ({**GOOD_MODEL, "name": "../etc"},
         "key 'models[0].name' = '../etc': expected a directory name"),
        ({**GOOD_MODEL, "revison": "x"}, "unknown key 'models[0].revison' = 'x'"),
    ],
)
def test_a_bad_model_entry_is_named_by_its_path(defaults, entry, expected):
    lines = problems_for(defaults, models=[entry])
    assert lines == [f"host gpu-01: {expected}"] or lines[0].startswith(f"host gpu-01: {expected}")


API_KEY_FILE = "/etc/gpufleet/api-key"
ENGINE_KEY_FILE = "/etc/gpufleet/engine-key"


def test_models_are_accepted_and_names_must_be_unique(defaults):
    assert problems_for(defaults, models=[GOOD_MODEL], stack_api_key_file=API_KEY_FILE, stack_engine_key_file=ENGINE_KEY_FILE, monitoring_grafana=False) == []
    lines = problems_for(defaults, models=[GOOD_MODEL, GOOD_MODEL], stack_api_key_file=API_KEY_FILE, stack_engine_key_file=ENGINE_KEY_FILE, monitoring_grafana=False)
    assert lines == ["host gpu-01: key 'models' = " + repr([GOOD_MODEL, GOOD_MODEL])
                     + ": expected one entry per model name; llama appear more than once"]


def test_swarm_labels_of_our_own_namespace_are_refused(defaults):
    assert problems_for(defaults, swarm_node_labels={"rack": "r12"}) == []
    lines = problems_for(defaults, swarm_node_labels={"gpufleet.gpu.count": "9"})
    assert len(lines) == 1 and "not under gpufleet." in lines[0]


def test_an_even_manager_group_is_refused_before_connecting(defaults):
    inventory = {
        "__file__": str(REPO / "inventories" / "x.py"),
        "gpu_nodes": ["gpu-01", "gpu-02", "gpu-03"],
        "swarm_managers": ["gpu-01", "gpu-02"],
    }
    problems = inventory_check.check_inventory(inventory, data_items=[])
    assert len(problems) == 1 and problems[0].startswith(f"{inventory['__file__']}: ")
    assert "swarm_managers" in problems[0]


def test_a_served_model_needs_an_api_key_file(defaults):
    assert problems_for(defaults, models=[GOOD_MODEL], monitoring_grafana=False) == [
        "host gpu-01: key 'stack_api_key_file' = None: expected a file on the control machine "
        "holding the API key, since models are served"]
    assert problems_for(defaults, models=[{**GOOD_MODEL, "serve": False}]) == []


@pytest.mark.parametrize(
    ("second", "extra", "expected"),
    [
        ({"name": "other"}, {}, "expected a different port for each served model; 8000 used more than once"),
        ({"name": "other", "port": 8001, "served_model_name": "llama"}, {},
         "expected a different served_model_name for each served model; llama used more than once"),
        ({"name": "other", "port": 8080}, {},
         None),
        ({"name": "other", "port": 8001, "engine": "tgi"}, {"stack_engine_images": {"vllm": "v:1"}},
         "expected an image for engine(s) tgi (or models[].image)"),
    ],
)
def test_served_models_must_not_clash(defaults, second, extra, expected):
    models = [GOOD_MODEL, {**GOOD_MODEL, **second}]
    lines = problems_for(defaults, models=models, stack_api_key_file=API_KEY_FILE, stack_engine_key_file=ENGINE_KEY_FILE, monitoring_grafana=False, **extra)
    if expected is None:  # the gateway's own port
        assert lines == ["host gpu-01: key 'stack_gateway_port' = 8080: expected a port that no "
                         "served model uses (models[].port)"]
    else:
        assert len(lines) == 1 and lines[0].endswith(expected), lines


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("tensor_parallel_size", 0, "a number >= 1"),
        ("gpu_memory_utilization", 1.5, "a number <= 1.0"),
        ("engine", "sglang", "'vllm', 'tgi' or 'ollama'"),
        ("port", 80, "a number >= 1024"),
    ],
)
def test_bad_serving_fields_are_named_by_their_path(defaults, field, value, expected):
    lines = problems_for(defaults, models=[{**GOOD_MODEL, field: value}], stack_api_key_file=API_KEY_FILE, stack_engine_key_file=ENGINE_KEY_FILE, monitoring_grafana=False)
    assert len(lines) == 1 and lines[0].startswith(f"host gpu-01: key 'models[0].{field}' = {value!r}:"), lines
    assert expected in lines[0], lines


def test_keys_the_stack_reads_fleet_wide_must_agree_between_hosts(tmp_path):
    per_host = {"gpu-01": {"models_dir": "/opt/models"}, "gpu-02": {"models_dir": "/data/models"},
                "gpu-03": {"models_dir": "/opt/models"}}
    def hosts(data):
        return {name: inventory_data.HostData(name, values) for name, values in data.items()}

    assert inventory_check.fleet_wide_problems(hosts(per_host)) == [
        "host gpu-02: key 'models_dir' = '/data/models': expected the same value on every host "
        "(gpu-01 has '/opt/models'): one stack serves the fleet"]
    assert inventory_check.fleet_wide_problems(
        hosts({"gpu-01": {"models_dir": "/x"}, "gpu-02": {"models_dir": "/x"}})) == []
