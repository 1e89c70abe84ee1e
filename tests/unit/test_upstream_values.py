"""Issue 25: a test per production value that upstream contradicted, each of which the lab never
ran before. The upstream file that decides each rule is cited in operations/engines.py,
operations/ollama_store.py, templates/haproxy.cfg.j2 and the operations named below."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from operations import docker_packages, engines, gateway as gw, nvidia, nvidia_repos, ollama_store, stack_render
from operations.config import ConfigError
from tests.unit.test_stack import NODES, model, settings

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "lab" / "engine"))
from labengine import tgi as tgi_stand_in  # noqa: E402


def served(*models, **overrides):
    s = settings(list(models), **overrides)
    return s, [m for m in s.models if m.serve]


# --- 1. TGI: no --served-model-name; /v1/models lists the model id, outside the key layer ---

def test_tgi_gets_only_flags_its_launcher_has_and_the_stand_in_refuses_any_other():
    s, (spec,) = served(model("m", engine="tgi", max_model_len=4096))
    args = engines.command(spec)
    assert "--served-model-name" not in args
    flags = [a for a in args if a.startswith("-")]
    assert flags == ["--model-id", "--hostname", "--port", "--num-shard", "--cuda-memory-fraction",
                     "--max-total-tokens"]
    # The stand-in takes TGI 3.3.6's clap Args (launcher/src/main.rs): the deploy's command line
    # parses, and the flag the deploy used to pass is refused as clap refuses it.
    given = tgi_stand_in.parse_launcher(args, environ={})
    assert given["model_id"] == "/models/m" and given["max_total_tokens"] == "4096"
    with pytest.raises(tgi_stand_in.UsageError, match="unexpected argument '--served-model-name'"):
        tgi_stand_in.parse_launcher([*args, "--served-model-name", "m"], environ={})


def test_the_smoke_checks_of_a_tgi_task_are_tgis_own():
    _, (spec,) = served(model("m", engine="tgi"))
    assert engines.listed_model_ids(spec) == ("/models/m",)
    assert engines.auth_probe("tgi") == ("POST", "/v1/chat/completions")  # /v1/models is open
    assert engines.auth_probe("vllm") == ("GET", "/v1/models")


# --- 2. Ollama: its own store, imported from a GGUF file, mounted read-only -----------------

def test_a_served_ollama_model_needs_a_gguf_file_and_other_engines_refuse_one():
    with pytest.raises(ConfigError, match="models\\[0\\].gguf_file.*Ollama serves only its own store"):
        settings([model("m", engine="ollama")])
    with pytest.raises(ConfigError, match="no gguf_file for engine 'vllm'"):
        settings([model("m", gguf_file="m.gguf")])
    with pytest.raises(ConfigError, match="allow_patterns that include 'm.gguf'"):
        settings([model("m", engine="ollama", gguf_file="m.gguf", allow_patterns=["*.json"])])


def test_ollama_serves_its_store_read_only_with_pruning_off():
    s, (spec,) = served(model("m", engine="ollama", gguf_file="m-Q4_K_M.gguf", served_model_name="m"))
    env = engines.environment(spec)
    assert env["OLLAMA_MODELS"] == "/models/m" and env["OLLAMA_NOPRUNE"] == "1"
    assert stack_render.served_dir(s, spec) == "/opt/models/.ollama/m"


def test_the_store_is_rebuilt_only_when_its_gguf_or_image_changes():
    _, (spec,) = served(model("m", engine="ollama", gguf_file="m.gguf"))
    sha = "ab" * 32
    marker = ollama_store.marker_for(spec.gguf_file, spec.served_name, "ollama/ollama:0.12.6", sha)
    manifest = {"config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "digest": "sha256:" + "cd" * 32, "size": 300},
                "layers": [{"mediaType": ollama_store.MODEL_MEDIA_TYPE, "digest": "sha256:" + sha,
                            "size": 1000}]}
    good = {"manifest": manifest, "marker": marker,
            "blobs": {"sha256-" + sha: 1000, "sha256-" + "cd" * 32: 300}}
    assert ollama_store.store_problems(good, marker) == []
    other_image = ollama_store.marker_for(spec.gguf_file, spec.served_name, "ollama/ollama:0.13.0",
                                          sha)
    assert ollama_store.store_problems(good, other_image) == [
        "built from another GGUF file or engine image"]
    missing_blob = {**good, "blobs": {"sha256-" + sha: 1000}}
    assert ollama_store.store_problems(missing_blob, marker) == [
        f"blob sha256-{'cd' * 32} missing or not 300 bytes"]
    assert ollama_store.store_problems({"manifest": None}, marker) == [
        "no Ollama manifest in the store"]


def test_manifest_paths_follow_ollamas_name_defaults():
    assert ollama_store.manifest_relpath("tiny") == "registry.ollama.ai/library/tiny/latest"
    assert ollama_store.manifest_relpath("team/tiny:q4") == "registry.ollama.ai/team/tiny/q4"
    assert engines.ollama_name("tiny") == "tiny:latest"
    _, (spec,) = served(model("tiny", engine="ollama", gguf_file="t.gguf"))
    assert engines.request_names(spec) == ("tiny", "tiny:latest")


def test_the_import_hard_links_then_checks_then_moves_into_place():
    _, (spec,) = served(model("m", engine="ollama", gguf_file="sub/m.gguf"))
    script = ollama_store.import_script(spec.name, spec.served_name, spec.gguf_file, "/opt/models",
                                        "ollama/ollama:0.12.6", "ab" * 32)
    steps = script.split("; ")
    link = next(i for i, step in enumerate(steps) if step.startswith("ln "))
    create = next(i for i, step in enumerate(steps) if step.startswith("docker run"))
    check = next(i for i, step in enumerate(steps) if step.startswith("grep -qF"))
    move = next(i for i, step in enumerate(steps) if step.startswith("mv /opt/models/.staging"))
    assert link < create < check < move
    assert steps[link] == ("ln /opt/models/m/sub/m.gguf "
                           f"/opt/models/.staging/m.ollama/blobs/sha256-{'ab' * 32}")
    assert "--network none" in steps[create] and "-v /opt/models/m:/src:ro" in steps[create]


# --- 3. The gateway's health check per engine: Ollama has no /health -----------------------

def test_each_backend_is_checked_on_a_route_its_engine_has():
    _, specs = served(model("a", port=8001), model("b", engine="tgi", port=8002),
                      model("c", engine="ollama", gguf_file="c.gguf", port=8003))
    gateway = gw.render_gateway(specs, NODES, 8080)
    backends = {block.split("\n", 1)[0]: block for block in gateway.split("\nbackend ")[1:]}
    assert "http-check send meth GET uri /health" in backends["be_a"]
    assert "http-check send meth GET uri /health" in backends["be_b"]
    assert ('http-check send meth POST uri /api/show hdr Content-Type application/json body '
            '"{\\"model\\":\\"c:latest\\"}"') in backends["be_c"]
    assert "/health" not in backends["be_c"]


# --- 4. Routing on the whole body, not the first 16 KB ---------------------------------------

def test_several_models_route_on_the_json_model_of_a_body_read_whole():
    _, specs = served(model("a", port=8001), model("b", port=8002))
    gateway = gw.render_gateway(specs, NODES, 8080, max_body_bytes=1024 * 1024)
    assert "tune.bufsize 1065984" in gateway  # 1 MiB + headers room: the whole body fits
    assert "option http-buffer-request" in gateway
    assert "req.body,json_query('$.model')" in gateway
    assert "req.body -m reg" not in gateway  # no regex over a prefix of the body
    assert ("http-request return status 413" in gateway
            and "{ req.body_size gt 1048576 } || { req.body_len gt 1048576 }" in gateway)


def test_one_model_routes_without_reading_the_body():
    _, specs = served(model("a"))
    gateway = gw.render_gateway(specs, NODES, 8080)
    frontend = gateway.split("\nfrontend openai\n", 1)[1].split("\nbackend ", 1)[0]
    assert "http-buffer-request" not in frontend and "json_query" not in gateway
    assert "tune.bufsize" not in gateway and "default_backend be_a" in gateway
    # The engine backend still holds a request (up to one buffer) so a retry can replay it.
    assert "option http-buffer-request" in gateway.split("\nbackend be_a\n", 1)[1]


# --- 5. NVIDIA's own repository files with another Signed-By ------------------------------

def test_nvidias_own_list_files_are_recognised_with_their_arch_placeholder():
    assert nvidia_repos.foreign_source_match(
        "https://nvidia.github.io/libnvidia-container/stable/deb/amd64") == \
        "https://nvidia.github.io/libnvidia-container/stable/deb/"
    cuda = "https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/"
    assert nvidia_repos.foreign_source_match(cuda) == cuda.rstrip("/")


def test_the_foreign_sources_fact_skips_comments_and_our_own_file():
    command = nvidia_repos.ForeignAptSources().command(match="https://x/deb/", own="nvidia-cuda")
    text = str(command.get_raw_value() if hasattr(command, "get_raw_value") else command)
    assert '"$2.sources"' in text and 'grep -v "^[[:space:]]*#"' in text


# --- 6. NVLink-5 boards need nvlsm beside Fabric Manager ----------------------------------

def _state(names, nvswitches=0):
    return {"pci": {"nvswitches": nvswitches}, "gpus": [{"name": n} for n in names]}


def test_nvlsm_comes_with_fabric_manager_on_nvlink5_boards():
    hgx_b200 = _state(["NVIDIA B200"] * 8)
    assert nvidia.wants_nvlsm("auto", "auto", hgx_b200) is True
    assert nvidia.wants_nvlsm("auto", "auto", _state(["NVIDIA H100 80GB HBM3"] * 8)) is False
    assert nvidia.wants_nvlsm("auto", False, hgx_b200) is False  # no FM, no NVLSM
    assert nvidia.wants_nvlsm(True, True, _state([])) is True  # a first run, no driver yet
    names = dict(nvidia.driver_package_names("ubuntu", "580", "open", True, nvlsm=True))
    assert names["nvlsm"] is False and names["nvidia-fabricmanager-580"] is True
    assert "nvlsm" not in dict(nvidia.driver_package_names("debian", "580", "open", True))


# --- 7. containerd.io and the plugins pinned and held; Docker's key checked -----------------

def test_every_docker_package_is_pinned_and_held():
    companions = {"containerd.io": "1.7.28", "docker-buildx-plugin": "0.29.1",
                  "docker-compose-plugin": "2.40.3"}
    wanted = dict(docker_packages.wanted_packages(
        "docker", "28.5.2", {"id": "debian", "version_id": "12", "codename": "bookworm"},
        companions))
    assert all(wanted[name] for name in docker_packages.DOCKER_HELD_PACKAGES)
    assert docker_packages.version_matches("1.7.28-1~debian.12~bookworm", "1.7.28")
    assert not docker_packages.version_matches("1.7.29-1~debian.12~bookworm", "1.7.28")
    floated = {name: {"version": "1.0-1", "held": True} for name in wanted}
    assert {n for n, _ in docker_packages.packages_to_install(list(wanted.items()), floated)} == \
        set(docker_packages.DOCKER_HELD_PACKAGES)


def test_group_data_pins_dockers_key_and_every_companion():
    from operations.inventory_data import load_group_data

    defaults = load_group_data()["all"]
    assert defaults["docker_key_fingerprint"] == "9DC858229FC7DD38854AE2D88D81803C0EBFCD88"
    for key in ("docker_containerd_version", "docker_buildx_version", "docker_compose_version"):
        assert defaults[key].count(".") == 2, key
    command = str(docker_packages.fetch_key_command("https://download.docker.com/linux/debian/gpg",
                                                  defaults["docker_key_fingerprint"]))
    assert "grep -qix 9DC858229FC7DD38854AE2D88D81803C0EBFCD88" in command
    assert command.index("grep -qix") < command.index("mv -f")
