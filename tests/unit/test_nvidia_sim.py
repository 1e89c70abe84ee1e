"""The lab's NVIDIA stand-in (scripts/lab/nvidia_sim): simulated GPUs, package metadata, the
signed repositories, and the simulated tools run locally (perl/sh) against a temp root."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from scripts.lab.nvidia_sim import hardware, packages, repo, server

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("dpkg-deb", "gpg", "gpgv", "perl")),
    reason="needs dpkg-deb, gpg, gpgv and perl (Debian's dpkg, gnupg, gpgv, perl-base)",
)


# ------------------------------------------------------------------------------------ hardware


def test_gpus_json_is_deterministic_per_host_and_distinct_across_hosts():
    first = hardware.gpus_json("lab-gpu-1")
    assert first == hardware.gpus_json("lab-gpu-1")
    other = json.loads(hardware.gpus_json("lab-gpu-2"))
    doc = json.loads(first)
    uuids = [g["uuid"] for g in doc["gpus"]]
    assert len(uuids) == 2 and len(set(uuids)) == 2
    assert not set(uuids) & {g["uuid"] for g in other["gpus"]}
    assert "SIMULATOR" in doc["simulator"]


def test_gpus_json_defaults_describe_h100s():
    gpu = json.loads(hardware.gpus_json("h"))["gpus"][0]
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"
    assert gpu["memory_total_mib"] == 81559
    assert gpu["compute_cap"] == "9.0"
    assert gpu["pci_bus_id"] == "00000000:18:00.0"
    import re

    assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                        gpu["uuid"])


def test_gpus_json_count_model_memory():
    doc = json.loads(hardware.gpus_json("h", count=8, model="NVIDIA L40S", memory_mib=46068))
    assert [g["index"] for g in doc["gpus"]] == list(range(8))
    assert len({g["pci_bus_id"] for g in doc["gpus"]}) == 8
    assert {g["memory_total_mib"] for g in doc["gpus"]} == {46068}
    assert doc["gpus"][0]["mig_mode"] == "N/A"  # L40S has no MIG
    assert json.loads(hardware.gpus_json("h", count=0))["gpus"] == []
    with pytest.raises(ValueError):
        hardware.gpus_json("h", count=-1)
    with pytest.raises(ValueError):
        hardware.gpus_json("")


# ------------------------------------------------------------------------------------ metadata


def _by_name(pkg_list):
    result = {}
    for p in pkg_list:
        result.setdefault(p.name, []).append(p)
    return result


def test_cuda_package_set_names_versions_and_depends():
    by_name = _by_name(packages.cuda_packages("amd64"))
    assert set(by_name) == {
        "nvidia-kernel-open-dkms", "nvidia-kernel-dkms", "nvidia-driver-cuda", "nvidia-driver",
        "nvidia-open", "cuda-drivers-580", "cuda-drivers", "nvidia-persistenced",
        "nvidia-fabricmanager", "cuda-drivers-fabricmanager-580", "nvidia-driver-pinning-580",
    }
    assert [p.version for p in by_name["nvidia-driver-cuda"]] == ["580.82.07-1", "580.95.05-1"]
    assert by_name["nvidia-driver-pinning-580"][0].version == "580-1"
    assert by_name["nvidia-driver-pinning-580"][0].architecture == "all"
    new = {name: ps[-1] for name, ps in by_name.items()}
    assert new["nvidia-open"].depends == (
        "nvidia-driver (= 580.95.05-1)", "nvidia-kernel-open-dkms (= 580.95.05-1)")
    assert new["cuda-drivers"].depends == ("cuda-drivers-580 (= 580.95.05-1)",)
    assert new["nvidia-driver-cuda"].depends == (
        "nvidia-kernel-open-dkms (= 580.95.05-1) | nvidia-kernel-dkms (= 580.95.05-1)",)
    assert "nvidia-kernel-dkms" in new["nvidia-kernel-open-dkms"].conflicts
    control = new["nvidia-persistenced"].control()
    assert "Description: SIMULATOR for the gpu-fleet lab, not NVIDIA software" in control


def test_toolkit_package_set_matches_nvidia_control_file():
    by_name = _by_name(packages.toolkit_packages("arm64"))
    assert set(by_name) == {"libnvidia-container1", "libnvidia-container-tools",
                            "nvidia-container-toolkit-base", "nvidia-container-toolkit"}
    toolkit = by_name["nvidia-container-toolkit"][-1]
    assert toolkit.version == "1.19.1-1" and toolkit.architecture == "arm64"
    assert toolkit.depends == ("nvidia-container-toolkit-base (= 1.19.1-1)",
                               "libnvidia-container-tools (= 1.19.1-1)",
                               "libnvidia-container-tools (<< 2.0.0)")
    assert by_name["libnvidia-container-tools"][-1].depends == (
        "libnvidia-container1 (>= 1.19.1-1)",)


def test_pinning_preferences_pin_the_branch():
    text = packages.pinning_preferences()
    assert "Pin: version 580.*" in text and "Pin-Priority: 1000" in text
    assert "nvidia-driver-cuda" in text.split("Package:")[1].split("\n")[0]


def test_release_text_lists_every_index_with_hashes():
    text = repo.release_text({"Packages": b"abc", "Packages.gz": b"x"}, "amd64", "L", 0)
    assert "Architectures: amd64" in text
    assert " ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" in text
    assert text.count("Packages.gz") == 3  # MD5Sum, SHA1, SHA256


# ------------------------------------------------------------------------------------ repository


@pytest.fixture(scope="module")
def built_repo(tmp_path_factory):
    if not all(shutil.which(t) for t in ("dpkg-deb", "gpg", "gpgv")):
        pytest.skip("needs dpkg-deb, gpg and gpgv")
    base = tmp_path_factory.mktemp("nvsim")
    out, home = base / "repo", base / "gnupg"
    result = repo.build_repo(out, home)
    return out, home, result


@needs_tools
def test_build_repo_layout_and_idempotence(built_repo):
    out, home, result = built_repo
    assert result["rebuilt"] is True
    assert result["cuda_repo"] == "compute/cuda/repos/debian12/x86_64/"
    assert result["toolkit_repo"] == "libnvidia-container/stable/deb/amd64/"
    assert result["toolkit_key"] == "libnvidia-container/gpgkey"
    assert len(result["fingerprint"]) == 40 and result["fingerprint"].lower().endswith(
        result["key_id"])
    for key in ("cuda_repo", "cuda_repo_arm64", "toolkit_repo", "toolkit_repo_arm64"):
        for name in ("Packages", "Packages.gz", "Release", "InRelease", "Release.gpg"):
            assert (out / result[key] / name).is_file(), (key, name)
    # the CUDA key sits where NVIDIA's is (3bf863cc.pub) and under the lab key's own id
    assert result["cuda_key"] == "compute/cuda/repos/debian12/x86_64/3bf863cc.pub"
    assert (out / result["cuda_key"]).read_text().startswith("-----BEGIN PGP PUBLIC KEY BLOCK")
    assert (out / result["cuda_key_by_id"]).read_bytes() == (out / result["cuda_key"]).read_bytes()
    assert (out / result["toolkit_key"]).read_bytes() == (out / result["cuda_key"]).read_bytes()
    mtime = (out / result["cuda_repo"] / "InRelease").stat().st_mtime_ns
    again = repo.build_repo(out, home)
    assert again["rebuilt"] is False and again["key_id"] == result["key_id"]
    assert (out / result["cuda_repo"] / "InRelease").stat().st_mtime_ns == mtime


@needs_tools
def test_repository_signatures_verify_with_gpgv(built_repo, tmp_path):
    out, _, result = built_repo
    keyring = tmp_path / "key.gpg"
    subprocess.run(["gpg", "--batch", "--homedir", str(tmp_path), "--dearmor", "-o", str(keyring),
                    str(out / result["toolkit_key"])], check=True, capture_output=True)
    for key in ("cuda_repo", "toolkit_repo"):
        d = out / result[key]
        subprocess.run(["gpgv", "--keyring", str(keyring), str(d / "InRelease")], check=True,
                       capture_output=True)
        subprocess.run(["gpgv", "--keyring", str(keyring), str(d / "Release.gpg"),
                        str(d / "Release")], check=True, capture_output=True)
    # A tampered Release must not verify.
    tampered = tmp_path / "Release"
    tampered.write_bytes((out / result["cuda_repo"] / "Release").read_bytes() + b"X: y\n")
    bad = subprocess.run(["gpgv", "--keyring", str(keyring),
                          str(out / result["cuda_repo"] / "Release.gpg"), str(tampered)],
                         capture_output=True)
    assert bad.returncode != 0


@needs_tools
def test_packages_index_matches_the_debs(built_repo):
    import hashlib

    out, _, result = built_repo
    d = out / result["toolkit_repo"]
    text = (d / "Packages").read_text()
    assert gzip.decompress((d / "Packages.gz").read_bytes()).decode() == text
    stanzas = [s for s in text.split("\n\n") if s.strip()]
    assert len(stanzas) == 8
    for stanza in stanzas:
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line
                      and not line.startswith(" "))
        deb = d / fields["Filename"]
        assert hashlib.sha256(deb.read_bytes()).hexdigest() == fields["SHA256"]
        assert fields["Description"].startswith("SIMULATOR for the gpu-fleet lab")
    release = (d / "Release").read_text()
    assert hashlib.sha256((d / "Packages").read_bytes()).hexdigest() in release


@needs_tools
def test_deb_control_from_dpkg(built_repo):
    out, _, result = built_repo
    deb = out / result["toolkit_repo"] / "nvidia-container-toolkit_1.19.1-1_amd64.deb"
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture",
                             "Depends"], check=True, capture_output=True, text=True).stdout
    assert "Package: nvidia-container-toolkit\n" in fields
    assert "Version: 1.19.1-1\n" in fields
    assert ("Depends: nvidia-container-toolkit-base (= 1.19.1-1), libnvidia-container-tools "
            "(= 1.19.1-1), libnvidia-container-tools (<< 2.0.0)") in fields


# ------------------------------------------------------------------------------------ the tools


@pytest.fixture
def sim_root(built_repo, tmp_path, monkeypatch):
    """A temp root with the 580.95.05 driver and toolkit 1.19.1 unpacked and 2 simulated GPUs."""
    out, _, result = built_repo
    root = tmp_path / "root"
    for rel, name in (
        (result["cuda_repo"], "nvidia-driver-cuda_580.95.05-1_amd64.deb"),
        (result["cuda_repo"], "nvidia-kernel-open-dkms_580.95.05-1_amd64.deb"),
        (result["cuda_repo"], "nvidia-persistenced_580.95.05-1_amd64.deb"),
        (result["toolkit_repo"], "nvidia-container-toolkit-base_1.19.1-1_amd64.deb"),
    ):
        subprocess.run(["dpkg-deb", "-x", str(out / rel / name), str(root)], check=True)
    (root / "etc/gpu-simulator").mkdir(parents=True)
    (root / "etc/gpu-simulator/gpus.json").write_text(hardware.gpus_json("lab-gpu-1"))
    monkeypatch.setenv("GPU_SIMULATOR_ROOT", str(root))
    return root


def run(root, *args, check=False):
    return subprocess.run([str(root / "usr/bin" / args[0]), *args[1:]], capture_output=True,
                          text=True, check=check)


def load_module(root):
    subprocess.run(["sh", str(root / "usr/lib/nvidia-sim/nvidia-sim-kmod"), "load"], check=True,
                   capture_output=True)


@needs_tools
def test_nvidia_smi_fails_until_the_module_is_loaded(sim_root):
    before = run(sim_root, "nvidia-smi", "-L")
    assert before.returncode == 9
    assert before.stdout.startswith(
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
        "Make sure that the latest NVIDIA driver is installed and running.")
    load_module(sim_root)
    assert (sim_root / "run/nvidia-sim/loaded-version").read_text().strip() == "580.95.05"
    after = run(sim_root, "nvidia-smi", "-L")
    assert after.returncode == 0
    uuids = [g["uuid"] for g in hardware.gpus("lab-gpu-1")]
    assert after.stdout == "".join(
        f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: {u})\n" for i, u in enumerate(uuids))


@needs_tools
def test_nvidia_smi_reports_version_mismatch_after_upgrade_without_reboot(sim_root):
    (sim_root / "run/nvidia-sim").mkdir(parents=True)
    (sim_root / "run/nvidia-sim/loaded-version").write_text("580.82.07\n")
    result = run(sim_root, "nvidia-smi", "-L")
    assert result.returncode == 18
    assert result.stdout == ("Failed to initialize NVML: Driver/library version mismatch\n"
                             "NVML library version: 580.95\n")


@needs_tools
def test_nvidia_smi_csv_query(sim_root):
    load_module(sim_root)
    fields = ("index,uuid,name,memory.total,driver_version,pci.bus_id,persistence_mode,"
              "mig.mode.current,compute_cap")
    plain = run(sim_root, "nvidia-smi", f"--query-gpu={fields}",
                "--format=csv,noheader,nounits", check=True).stdout
    rows = [line.split(", ") for line in plain.splitlines()]
    gpu0 = hardware.gpus("lab-gpu-1")[0]
    assert rows[0] == ["0", gpu0["uuid"], "NVIDIA H100 80GB HBM3", "81559", "580.95.05",
                       "00000000:18:00.0", "Disabled", "Disabled", "9.0"]
    assert len(rows) == 2
    with_header = run(sim_root, "nvidia-smi", "--query-gpu=index,memory.total",
                      "--format=csv", check=True).stdout.splitlines()
    assert with_header == ["index, memory.total [MiB]", "0, 81559 MiB", "1, 81559 MiB"]
    one = run(sim_root, "nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader", "-i", "1",
              check=True).stdout
    assert one == hardware.gpus("lab-gpu-1")[1]["uuid"] + "\n"
    bad = run(sim_root, "nvidia-smi", "--query-gpu=index,bogus", "--format=csv")
    assert bad.returncode == 2 and 'Field "bogus" is not a valid field to query.' in bad.stdout


@needs_tools
def test_nvidia_smi_persistence_mode(sim_root):
    load_module(sim_root)
    query = ("--query-gpu=persistence_mode", "--format=csv,noheader")
    assert run(sim_root, "nvidia-smi", *query).stdout == "Disabled\nDisabled\n"
    if os.geteuid() == 0:
        out = run(sim_root, "nvidia-smi", "-pm", "1", "-i", "0", check=True).stdout
        assert out == "Enabled persistence mode for GPU 00000000:18:00.0.\nAll done.\n"
        assert run(sim_root, "nvidia-smi", *query).stdout == "Enabled\nDisabled\n"
        again = run(sim_root, "nvidia-smi", "-pm", "1", check=True).stdout
        assert again == ("Persistence mode is already Enabled for GPU 00000000:18:00.0.\n"
                         "Enabled persistence mode for GPU 00000000:2A:00.0.\nAll done.\n")
    # nvidia-persistenced running = every GPU in persistence mode
    (sim_root / "run/nvidia-sim/persistenced").touch()
    assert run(sim_root, "nvidia-smi", *query).stdout == "Enabled\nEnabled\n"


@needs_tools
def test_nvidia_smi_xml_parses_like_the_real_one(sim_root):
    load_module(sim_root)
    out = run(sim_root, "nvidia-smi", "-q", "-x", check=True).stdout
    assert "SIMULATOR" in out  # as an XML comment only
    tree = ET.fromstring(out.split("\n", 2)[2])  # after the XML declaration and DOCTYPE
    assert tree.tag == "nvidia_smi_log"
    assert tree.findtext("driver_version") == "580.95.05"
    assert tree.findtext("cuda_version") == "13.0"
    assert tree.findtext("attached_gpus") == "2"
    gpus = tree.findall("gpu")
    assert [g.get("id") for g in gpus] == ["00000000:18:00.0", "00000000:2A:00.0"]
    assert gpus[0].findtext("product_name") == "NVIDIA H100 80GB HBM3"
    assert gpus[0].findtext("uuid") == hardware.gpus("lab-gpu-1")[0]["uuid"]
    assert gpus[0].findtext("fb_memory_usage/total") == "81559 MiB"
    assert gpus[0].findtext("persistence_mode") == "Disabled"
    assert gpus[0].findtext("mig_mode/current_mig") == "Disabled"


@needs_tools
def test_human_readable_output_says_simulator(sim_root):
    load_module(sim_root)
    table = run(sim_root, "nvidia-smi", check=True).stdout
    assert "SIMULATOR for the gpu-fleet lab" in table and "Driver Version: 580.95.05" in table
    widths = {len(line) for line in table.splitlines()[1:] if line.startswith(("|", "+"))}
    assert widths == {91}


@needs_tools
def test_module_is_not_loaded_without_simulated_gpus(sim_root):
    (sim_root / "etc/gpu-simulator/gpus.json").unlink()
    load_module(sim_root)
    assert not (sim_root / "run/nvidia-sim/loaded-version").exists()
    assert run(sim_root, "nvidia-smi", "-L").returncode == 9


# ------------------------------------------------------------------------------------ nvidia-ctk


@needs_tools
def test_nvidia_ctk_runtime_configure_docker(sim_root, tmp_path):
    daemon = tmp_path / "daemon.json"
    daemon.write_text('{"log-driver": "json-file", "log-opts": {"max-size": "100m"},'
                      ' "runtimes": {"other": {"path": "/bin/x"}}, "live-restore": true}')
    result = run(sim_root, "nvidia-ctk", "runtime", "configure", "--runtime=docker",
                 f"--config={daemon}", check=True)
    assert "Wrote updated config to" in result.stderr
    text = daemon.read_text()
    cfg = json.loads(text)
    assert cfg["runtimes"]["nvidia"] == {"args": [], "path": "nvidia-container-runtime"}
    assert cfg["runtimes"]["other"] == {"path": "/bin/x"}
    assert cfg["log-opts"] == {"max-size": "100m"} and cfg["live-restore"] is True
    assert "default-runtime" not in cfg
    # Go's json.MarshalIndent(cfg, "", "    "): sorted keys, 4 spaces, no trailing newline
    assert text == json.dumps(cfg, indent=4, sort_keys=True)
    run(sim_root, "nvidia-ctk", "runtime", "configure", "--runtime=docker", "--set-as-default",
        f"--config={daemon}", check=True)
    assert json.loads(daemon.read_text())["default-runtime"] == "nvidia"


@needs_tools
def test_nvidia_ctk_runtime_configure_creates_missing_file(sim_root, tmp_path):
    daemon = tmp_path / "docker" / "daemon.json"
    run(sim_root, "nvidia-ctk", "runtime", "configure", "--runtime=docker",
        f"--config={daemon}", check=True)
    assert json.loads(daemon.read_text()) == {
        "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}}
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = run(sim_root, "nvidia-ctk", "runtime", "configure", f"--config={broken}")
    assert result.returncode == 1 and broken.read_text() == "{not json"


@needs_tools
def test_nvidia_ctk_config_set_in_place(sim_root, tmp_path):
    config = tmp_path / "config.toml"
    run(sim_root, "nvidia-ctk", "--quiet", "config", f"--config-file={config}", "--in-place",
        check=True)
    default = config.read_text()
    assert default == (packages.FILES / "config.toml").read_text()
    run(sim_root, "nvidia-ctk", "config", f"--config-file={config}", "--in-place",
        "--set", "nvidia-container-cli.no-cgroups=true",
        "--set", "nvidia-container-runtime.log-level=debug",
        "--set", "accept-nvidia-visible-devices-as-volume-mounts",
        "--set", "nvidia-container-runtime.runtimes=crun,runc", check=True)
    text = config.read_text()
    assert "\nno-cgroups = true\n" in text and "#no-cgroups" not in text
    assert '\nlog-level = "debug"\n' in text
    assert text.startswith("accept-nvidia-visible-devices-as-volume-mounts = true\n")
    assert 'runtimes = ["crun", "runc"]' in text
    # each key stays in its own table
    cli_table = text.split("[nvidia-container-cli]")[1].split("\n[")[0]
    assert "no-cgroups = true" in cli_table
    bad = run(sim_root, "nvidia-ctk", "config", f"--config-file={config}", "--in-place",
              "--set", "no-such.key=1")
    assert bad.returncode == 1 and "undefined field" in bad.stderr
    assert run(sim_root, "nvidia-ctk", "config", f"--config-file={config}", "--in-place",
               "--set", "disable-require=maybe").returncode == 1


@needs_tools
def test_nvidia_container_runtime_hands_over_to_runc(sim_root, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "runc").write_text('#!/bin/sh\necho "runc $*"\n')
    (fake / "runc").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:/usr/bin:/bin"}
    result = subprocess.run([str(sim_root / "usr/bin/nvidia-container-runtime"), "--root",
                             "/run/x", "create", "--bundle", "/b", "id 1"],
                            capture_output=True, text=True, env=env, check=True)
    assert result.stdout == "runc --root /run/x create --bundle /b id 1\n"


def _bundle(tmp_path, env):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = {"ociVersion": "1.0.2", "process": {"env": env, "args": ["sh"]},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [{"type": "pid"}]}, "root": {"path": "rootfs"}}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def inject(root, bundle):
    return subprocess.run([str(root / "usr/libexec/nvidia-sim/inject-gpus"), str(bundle)],
                          capture_output=True, text=True)


@needs_tools
def test_runtime_injects_the_requested_gpus(sim_root, tmp_path):
    load_module(sim_root)
    gpus = hardware.gpus("lab-gpu-1")
    bundle = _bundle(tmp_path, ["PATH=/bin", f"NVIDIA_VISIBLE_DEVICES={gpus[1]['uuid']}"])
    assert inject(sim_root, bundle).returncode == 0
    spec = json.loads((bundle / "config.json").read_text())
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert mounts["/proc"]["type"] == "proc"  # the rest of the spec is kept
    assert spec["linux"] == {"namespaces": [{"type": "pid"}]}
    assert "ro" in mounts["/usr/bin/nvidia-smi"]["options"]
    visible = json.loads(Path(mounts["/etc/gpu-simulator/gpus.json"]["source"]).read_text())
    assert [(g["index"], g["uuid"]) for g in visible["gpus"]] == [(0, gpus[1]["uuid"])]


@needs_tools
def test_runtime_leaves_containers_without_gpu_request_alone(sim_root, tmp_path):
    bundle = _bundle(tmp_path, ["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=void"])
    before = (bundle / "config.json").read_text()
    assert inject(sim_root, bundle).returncode == 0
    assert (bundle / "config.json").read_text() == before


@needs_tools
def test_runtime_refuses_gpu_containers_without_a_loaded_driver(sim_root, tmp_path):
    bundle = _bundle(tmp_path, ["NVIDIA_VISIBLE_DEVICES=all"])
    result = inject(sim_root, bundle)
    assert result.returncode == 1 and "driver not loaded" in result.stderr


@needs_tools
def test_runtime_honours_swarm_resource(sim_root, tmp_path):
    load_module(sim_root)
    cfg = sim_root / "etc/nvidia-container-runtime/config.toml"
    subprocess.run([str(sim_root / "usr/bin/nvidia-ctk"), "config", f"--config-file={cfg}",
                    "--in-place", "--set", "swarm-resource=DOCKER_RESOURCE_GPU"], check=True)
    gpus = hardware.gpus("lab-gpu-1")
    bundle = _bundle(tmp_path, [f"DOCKER_RESOURCE_GPU={gpus[0]['uuid']}"])
    assert inject(sim_root, bundle).returncode == 0
    mounts = {m["destination"]: m for m in json.loads((bundle / "config.json").read_text())["mounts"]}
    visible = json.loads(Path(mounts["/etc/gpu-simulator/gpus.json"]["source"]).read_text())
    assert [g["uuid"] for g in visible["gpus"]] == [gpus[0]["uuid"]]


# ------------------------------------------------------------------------------ server image


def test_server_image_is_the_shared_base_with_busybox_httpd_serving_srv():
    lines = server.render_dockerfile().splitlines()
    assert "ARG BASE" in lines and "FROM ${BASE}" in lines
    assert " && apt-get install -y --no-install-recommends busybox-static \\" in lines
    assert lines[-1] == 'CMD ["/bin/busybox", "httpd", "-f", "-v", "-p", "80", "-h", "/srv"]'
    assert "SIMULATOR" in server.render_dockerfile()
    # Shared by every lab and purged with the lab's image cache (images.lab_images).
    assert server.IMAGE_NAME == "gpufleet-lab-nvidia-sim-http"
    assert server.container_name("gpulab") == "gpulab-nvidia-sim-repo"


def _health(root):
    """The production GpuHealth fact's command, run against the simulator, parsed."""
    from operations.gpu_health import GpuHealth, parse_gpu_health

    env = {**os.environ, "PATH": f"{root / 'usr/bin'}:{os.environ['PATH']}"}
    out = subprocess.run(["sh", "-c", GpuHealth().command()], capture_output=True, text=True,
                         env=env, check=True).stdout
    return parse_gpu_health(out.splitlines())


def _fault(root, kept, index, line):
    where = root / ("etc/gpu-simulator/faults" if kept else "run/nvidia-sim/faults")
    where.mkdir(parents=True, exist_ok=True)
    with open(where / str(index), "a") as faults:
        faults.write(line + "\n")


@needs_tools
def test_simulated_gpu_faults_read_by_the_health_fact(sim_root):
    from operations.gpu_health import unhealthy_gpus

    load_module(sim_root)
    healthy = _health(sim_root)
    assert healthy["available"] and len(healthy["gpus"]) == 2 and unhealthy_gpus(healthy) == []
    _fault(sim_root, False, 0, "ecc_uncorrected=2")
    _fault(sim_root, False, 0, "recovery_action=Reset")
    _fault(sim_root, True, 1, "remap_failed=1")
    found = {g["index"]: g["reasons"] for g in unhealthy_gpus(_health(sim_root))}
    assert found == {0: ["2 uncorrected ECC error(s) since the driver loaded",
                         "the driver asks for recovery: Reset"],
                     1: ["row remapping failed (NVIDIA: the GPU needs service)"]}


@needs_tools
def test_a_lost_simulated_gpu_answers_like_nvidia_smi_and_survives_a_reset(sim_root):
    from operations.gpu_health import unhealthy_gpus
    from operations.nvidia import parse_nvidia_host

    load_module(sim_root)
    _fault(sim_root, False, 1, "lost=1")
    query = run(sim_root, "nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader")
    assert query.returncode == 15
    assert query.stdout.splitlines()[1] == ("Unable to determine the device handle for "
                                            "GPU00000000:2A:00.0: Unknown Error")
    [lost] = unhealthy_gpus(_health(sim_root))
    assert lost["index"] is None and lost["reasons"][0].startswith("lost:")
    if os.geteuid() == 0:
        reset = run(sim_root, "nvidia-smi", "-r", "-i", "1")
        assert reset.returncode == 15 and "Reboot the system" in reset.stdout
        _fault(sim_root, False, 0, "remap_pending=1")
        assert run(sim_root, "nvidia-smi", "-r", "-i", "0").returncode == 0
        assert [g["index"] for g in unhealthy_gpus(_health(sim_root))] == [None]
    # The driver phase's own fact still sees GPU 0: one lost GPU is not a host without GPUs.
    fields = ("index,uuid,name,memory.total,driver_version,pci.bus_id,persistence_mode,"
              "mig.mode.current,compute_cap")
    smi = run(sim_root, "nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits")
    nvidia = parse_nvidia_host(["##smi", *smi.stdout.splitlines(), f"rc={smi.returncode}"])
    assert [g["index"] for g in nvidia["gpus"]] == [0]
    assert nvidia["driver"]["smi_error"].startswith("nvidia-smi exit 15")


@needs_tools
def test_runtime_refuses_a_lost_gpu_and_hands_out_the_others(sim_root, tmp_path):
    load_module(sim_root)
    _fault(sim_root, False, 1, "lost=1")
    gpus = hardware.gpus("lab-gpu-1")
    every = inject(sim_root, _bundle(tmp_path, ["NVIDIA_VISIBLE_DEVICES=all"]))
    assert every.returncode == 1 and "gpu is lost" in every.stderr
    (tmp_path / "bundle").rename(tmp_path / "first")
    healthy = _bundle(tmp_path, [f"NVIDIA_VISIBLE_DEVICES={gpus[0]['uuid']}"])
    assert inject(sim_root, healthy).returncode == 0
