"""Pure logic of the NVIDIA driver phase: repository paths, package sets, versions, Fabric
Manager, the reboot decision and the NvidiaHost parser's edge cases."""

import pytest

from operations import nvidia, nvidia_repos


def test_cuda_repo_uri_per_distribution_and_architecture():
    base = "https://developer.download.nvidia.com/compute/cuda/repos/"
    assert nvidia.cuda_repo_uri(base, "ubuntu", "22.04", "amd64") == (
        "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64/"
    )
    assert nvidia.cuda_repo_uri(base, "ubuntu", "24.04", "arm64").endswith("/ubuntu2404/sbsa/")
    assert nvidia.cuda_repo_uri(base, "debian", "12", "amd64").endswith("/repos/debian12/x86_64/")


@pytest.mark.parametrize(
    "distro, version, arch, words",
    [
        ("debian", "11", "amd64", "debian 11"),
        ("rocky", "9", "amd64", "rocky 9"),
        ("ubuntu", "22.04", "ppc64el", "ppc64el"),
        ("", "", "amd64", "(no ID)"),
    ],
)
def test_cuda_repo_uri_refuses_unsupported_hosts(distro, version, arch, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        nvidia.cuda_repo_uri("https://x", distro, version, arch)


def test_debian_packages_open_and_proprietary():
    assert nvidia.driver_package_names("debian", "580", "open", False) == [
        ("nvidia-driver-pinning-580", False),
        ("nvidia-driver-cuda", True),
        ("nvidia-kernel-open-dkms", True),
        ("nvidia-persistenced", True),
    ]
    names = dict(nvidia.driver_package_names("debian", "580", "proprietary", True))
    assert "nvidia-kernel-dkms" in names and "nvidia-kernel-open-dkms" not in names
    assert names["nvidia-fabricmanager"] is True


def test_ubuntu_packages_are_versioned_by_branch():
    assert nvidia.driver_package_names("ubuntu", "580", "open", True) == [
        ("nvidia-headless-580-open", True),
        ("nvidia-utils-580", True),
        ("nvidia-fabricmanager-580", True),
    ]
    assert nvidia.driver_package_names("ubuntu", "570", "proprietary", False)[0] == (
        "nvidia-headless-570",
        True,
    )


@pytest.mark.parametrize(
    "distro, branch, flavour, words",
    [
        ("ubuntu", "590", "open", "unversioned"),
        ("debian", "580", "closed", "nvidia_driver_flavour"),
        ("debian", "r580", "open", "digits"),
        ("fedora", "580", "open", "fedora"),
    ],
)
def test_driver_package_names_refuses(distro, branch, flavour, words):
    with pytest.raises(ValueError, match=words):
        nvidia.driver_package_names(distro, branch, flavour, False)


@pytest.mark.parametrize(
    "apt_version, upstream",
    [
        ("580.95.05-1", "580.95.05"),
        ("580.95.05-0ubuntu1", "580.95.05"),
        ("1:580.95.05-0ubuntu0.24.04.1", "580.95.05"),
        ("580.95.05", "580.95.05"),
        ("", None),
        (None, None),
    ],
)
def test_upstream_version(apt_version, upstream):
    assert nvidia.upstream_version(apt_version) == upstream


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", True),
        ("NVIDIA H200", True),
        ("NVIDIA A100-SXM4-80GB", True),
        ("NVIDIA A100-SXM4-40GB", True),
        ("NVIDIA B200", True),
        ("NVIDIA H100 PCIe", False),
        ("NVIDIA H100 NVL", False),
        ("NVIDIA H200 NVL", False),
        ("NVIDIA A100 80GB PCIe", False),
        ("NVIDIA A100-PCIE-40GB", False),
        ("NVIDIA L40S", False),
        ("Tesla V100-SXM2-32GB", True),
    ],
)
def test_is_nvswitch_class(name, expected):
    assert nvidia.is_nvswitch_class(name) is expected


def _state(gpus=(), nvswitches=0, installed=None, loaded=None, nouveau=False):
    return {
        "pci": {"gpus": len(gpus), "nvswitches": nvswitches},
        "gpus": [{"index": i, "name": name, "uuid": f"GPU-{i}"} for i, name in enumerate(gpus)],
        "driver": {"installed_version": installed, "loaded_version": loaded},
        "nouveau_loaded": nouveau,
    }


def test_fabricmanager_auto_from_pci_nvswitches_without_a_driver():
    assert nvidia.wants_fabricmanager("auto", _state(nvswitches=4)) is True


def test_fabricmanager_auto_from_eight_sxm_gpus():
    assert nvidia.wants_fabricmanager("auto", _state(["NVIDIA H100 80GB HBM3"] * 8)) is True
    # Four SXM GPUs (an HGX 4-GPU board) talk over direct NVLink: no NVSwitch.
    assert nvidia.wants_fabricmanager("auto", _state(["NVIDIA H100 80GB HBM3"] * 4)) is False
    assert nvidia.wants_fabricmanager("auto", _state(["NVIDIA H100 PCIe"] * 8)) is False


def test_fabricmanager_forced_either_way():
    assert nvidia.wants_fabricmanager(True, _state()) is True
    assert nvidia.wants_fabricmanager(False, _state(nvswitches=4)) is False
    with pytest.raises(ValueError):
        nvidia.wants_fabricmanager("yes", _state())


@pytest.mark.parametrize(
    "installed, loaded, nouveau, reason",
    [
        ("580.95.05", "580.95.05", False, None),
        (None, None, False, None),
        ("580.95.05", None, False, "580.95.05 is installed but not loaded"),
        ("580.95.05", "580.82.07", False, "580.95.05 is installed but 580.82.07 is loaded"),
        ("580.95.05", "580.95.05", True, "nouveau"),
        (None, None, True, "nouveau"),
    ],
)
def test_reboot_reason(installed, loaded, nouveau, reason):
    result = nvidia.reboot_reason(_state(installed=installed, loaded=loaded, nouveau=nouveau))
    if reason is None:
        assert result is None
    else:
        assert reason in result


def test_key_fingerprint_ok():
    fpr = "EB693B3035CD5710E231E123A4B469963BF863CC"
    assert nvidia_repos.key_fingerprint_ok({"present": True, "fingerprints": [fpr]}, fpr.lower())
    assert not nvidia_repos.key_fingerprint_ok({"present": True, "fingerprints": ["A" * 40]}, fpr)
    assert not nvidia_repos.key_fingerprint_ok({"present": False, "fingerprints": []}, fpr)
    # Unreadable (no gpg on the host): trusted, it was checked when installed.
    assert nvidia_repos.key_fingerprint_ok({"present": True, "fingerprints": []}, fpr)


def test_parse_gpus_handles_not_available_fields():
    gpus = nvidia.parse_gpus(
        [
            "0, GPU-aaaa, NVIDIA GH200 480GB, [N/A], 580.95.05, 00000009:01:00.0, Enabled, "
            "[N/A], 9.0",
            "garbage line",
        ]
    )
    assert gpus == [
        {
            "index": 0,
            "uuid": "GPU-aaaa",
            "name": "NVIDIA GH200 480GB",
            "memory_mib": None,
            "driver_version": "580.95.05",
            "pci_bus_id": "00000009:01:00.0",
            "persistence_mode": True,
            "mig_mode": None,
            "compute_cap": "9.0",
        }
    ]


def test_installed_driver_version_prefers_the_kernel_module_package():
    packages = {
        "nvidia-utils-580": {"version": "580.95.05-0ubuntu1", "held": True},
        "nvidia-dkms-580-open": {"version": "580.82.07-0ubuntu1", "held": False},
    }
    assert nvidia.installed_driver_version(packages) == "580.82.07"
    del packages["nvidia-dkms-580-open"]
    assert nvidia.installed_driver_version(packages) == "580.95.05"
    assert nvidia.installed_driver_version({}) is None


def test_parser_survives_empty_output():
    state = nvidia.parse_nvidia_host([])
    assert state["driver"]["loaded"] is False
    assert state["gpus"] == [] and state["nouveau_blacklist"] is None
    assert nvidia.reboot_reason(state) is None


def test_blacklist_without_trailing_newline_does_not_swallow_the_next_section():
    state = nvidia.parse_nvidia_host(
        ["##blacklist", "blacklist nouveau", "", "##keyring", "present"]
    )
    assert state["nouveau_blacklist"] == "blacklist nouveau\n"
    assert state["cuda_keyring"]["present"] is True


def test_loaded_version_falls_back_to_nvidia_smi():
    state = nvidia.parse_nvidia_host(
        [
            "##smi",
            "0, GPU-a, NVIDIA H100 80GB HBM3, 81559, 580.95.05, 00000000:18:00.0, Enabled, "
            "Disabled, 9.0",
            "rc=0",
        ]
    )
    assert state["driver"]["loaded_version"] == "580.95.05"
    assert state["driver"]["loaded"] is True


def test_verify_command_checks_the_exact_version():
    command = nvidia.verify_command("580.95.05", wait_s=10)
    assert '= "580.95.05" ]' in command
    assert "-ge 5" in command


class _RebootingHost:
    """Connects, and finds the /run marker on the first two connections (still going down)."""

    def __init__(self, marker_seen: int):
        self.marker_seen = marker_seen
        self.connected = False
        self.events = []

    def connect(self, show_errors=True):
        self.connected = True
        self.events.append("connect")

    def disconnect(self):
        self.connected = False
        self.events.append("disconnect")

    def get_fact(self, fact, path):
        assert path == nvidia.REBOOT_MARKER
        self.events.append("marker?")
        if self.marker_seen > 0:
            self.marker_seen -= 1
            return {"size": 0}
        return None


def _wait_function():
    commands = list(nvidia.reboot_commands(reboot_timeout=30, delay=0, interval=0))
    assert commands[1] == f"touch {nvidia.REBOOT_MARKER}"
    assert "systemctl reboot" in commands[2]
    return commands[3].function


def test_reboot_waits_until_the_marker_is_gone(monkeypatch):
    monkeypatch.setattr(nvidia, "clear_askpass_cache", lambda host: None)
    host = _RebootingHost(marker_seen=2)
    _wait_function()(None, host)
    assert host.events.count("marker?") == 3
    assert host.connected


def test_reboot_wait_gives_up_after_the_timeout(monkeypatch):
    monkeypatch.setattr(nvidia, "clear_askpass_cache", lambda host: None)
    clock = iter(range(0, 10_000, 20))
    monkeypatch.setattr(nvidia.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(nvidia.time, "sleep", lambda seconds: None)
    with pytest.raises(Exception, match="did not come back within 30s"):
        _wait_function()(None, _RebootingHost(marker_seen=1_000))


def test_reboot_reason_for_a_flavour_switch():
    state = _state(installed="580.95.05", loaded="580.95.05")
    state["driver"].update(installed_flavour="open", loaded_flavour="proprietary")
    assert "open kernel modules are installed but the proprietary" in nvidia.reboot_reason(state)
    state["driver"]["loaded_flavour"] = None  # unknown (no /proc banner): no guess
    assert nvidia.reboot_reason(state) is None


def test_flavours_from_packages_and_banner():
    assert nvidia.installed_driver_flavour({"nvidia-dkms-580-open": {}}) == "open"
    assert nvidia.installed_driver_flavour({"nvidia-kernel-dkms": {}}) == "proprietary"
    assert nvidia.installed_driver_flavour({"nvidia-utils-580": {}}) is None
    assert nvidia.loaded_driver_flavour(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build"
    ) == "open"
    assert nvidia.loaded_driver_flavour(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024"
    ) == "proprietary"
    assert nvidia.loaded_driver_flavour("") is None


# The keys this phase reads, with their proposed defaults (group_data/all.py).
SETTINGS = dict(
    nvidia_cuda_repo_url="https://developer.download.nvidia.com/compute/cuda/repos",
    nvidia_cuda_key_fingerprint="EB693B3035CD5710E231E123A4B469963BF863CC",
    nvidia_driver_branch="580",
    nvidia_driver_version="580.95.05",
    nvidia_driver_flavour="open",
    nvidia_fabricmanager="auto",
    nvidia_nvlsm="auto",
    nvidia_allow_reboot=False,
    nvidia_reboot_timeout_s=900,
    preflight_require_kernel_headers=True,
)


def test_phase_passes_the_settings_to_its_operations(monkeypatch):
    from types import SimpleNamespace

    calls = []

    def recorder(op_name, changes):
        def record(**kwargs):
            calls.append((op_name, kwargs))
            return SimpleNamespace(did_change=lambda: changes)

        return record

    for op_name in ("cuda_repository", "driver_packages", "nouveau_blacklist",
                    "driver_services", "verify_driver"):
        monkeypatch.setattr(nvidia, op_name, recorder(op_name, False))
    monkeypatch.setattr(nvidia, "reboot_for_driver", recorder("reboot_for_driver", True))

    result = nvidia.nvidia_driver._inner(SimpleNamespace(**SETTINGS))

    by_name = {}
    for op_name, kwargs in calls:
        by_name.setdefault(op_name, []).append(kwargs)
    assert [name for name, _ in calls] == [
        "cuda_repository", "driver_packages", "nouveau_blacklist", "driver_services",
        "reboot_for_driver", "verify_driver", "driver_services",
    ]
    packages = by_name["driver_packages"][0]
    assert packages["version"] == "580.95.05" and packages["kernel_headers"] is True
    assert packages["allow_reboot"] is False
    assert by_name["reboot_for_driver"][0]["reboot_timeout"] == 900
    # Services are enabled before the reboot and started only after it.
    assert [c["running"] for c in by_name["driver_services"]] == [False, True]
    assert result.changed() is True
