"""Model weights: every model a host serves is a verified, plain-file copy at
<models_dir>/<name>/ before any engine starts; never downloaded at container start.

Once per fleet, not once per host: the control machine (where pyinfra runs) downloads a pinned
revision once per run with the real `huggingface_hub` client into its cache
(`weights_cache_dir`), verifies every file against the hub's own hashes (LFS sha256, or the git
blob sha1 of small files), and writes the manifest. Each host then receives over SSH only the
files it lacks, into <models_dir>/.staging/<name>-<rev12>/ (owned by the deploy user, so SFTP
writes there directly: no copy through /tmp), checks them with `sha256sum -c`, and the staging
directory replaces the model directory (the older good copy is moved aside only once the new one
is verified, then removed). Files a host already holds (an older revision, a staging directory
left by an interrupted run) are hard-linked or kept, never sent again.

The HF token (env HF_TOKEN, or the file named by `hf_token_file` on the control machine) is read
in-process on the control machine only, at the moment the hub is asked: it is never an argument
of an operation or a command, never printed, never written anywhere, never sent to a host.

On every host: <models_dir>/<name>/.gpufleet-manifest.json (repo, revision, patterns, files with
sizes, sha256 and hub hashes, time of verification) and .gpufleet-sha256sums (`sha256sum -c`).
A host whose manifest names the wanted repo, revision and patterns, and whose files match it
(sizes, or sha256 with `weights_verify = "sha256"`), is done: no hub request, no transfer.

Remote commands on a run that changes nothing: one `ModelState` read per model and host, once
while planning and once while executing.

This module holds the fact, the operation and the phase; the planning is pure, in
operations/weights_plan.py, and the control machine's download in operations/weights_cache.py.
"""

from __future__ import annotations

import posixpath
from typing import Any

from pyinfra import host, logger
from pyinfra.api import (
    FactBase,
    FileUploadCommand,
    FunctionCommand,
    OperationError,
    QuoteString,
    StringCommand,
    deploy,
    operation,
)
from pyinfra.api.state import BaseStateCallback

from operations import weights_cache, weights_chain, weights_peers
from operations.phase import explain, fails_only_this_host
from operations.weights_cache import cache_layout, fetch_command, record_transfer, remote_listing
from operations.weights_plan import (
    DEFAULT_ENDPOINT, GIB, MANIFEST_NAME, REJECTED_NAME, STAGING_DIR, SUMS_NAME, VERIFY_MODES,
    check_model_spec, disk_refusal, files_to_fetch, human_bytes, installed_problems, old_dir,
    parse_model_state, plan_host, rev12, staging_dir,
)

DISTRIBUTIONS = ("peers", "control")
SOURCES = ("control", "seeder")


# --- Facts ----------------------------------------------------------------------------------

# POSIX sh + GNU find/coreutils; never fails. $1 model dir, $2 its staging dir, $3 verify mode,
# $4 the models directory, $5 the model name (stale staging entries are listed by name).
_STATE_SCRIPT = r"""
d=$1; s=$2; verify=$3; models=$4; name=$5
echo '#@state'
echo "login_user=${SUDO_USER:-$(id -un)}"
echo "primary=$(ip -o -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')"
p=$models; while [ ! -e "$p" ]; do p=$(dirname "$p"); done
df -Pk "$p" 2>/dev/null | awk 'NR==2 {print "avail_kib=" $4}'
if [ -L "$d" ]; then echo dir=symlink
elif [ -d "$d" ]; then echo dir=present
elif [ -e "$d" ]; then echo dir=file
else echo dir=missing; fi
echo '#@addresses'
ip -o -4 addr show 2>/dev/null | awk '{split($4, a, "/"); print $2, a[1]}'
echo '#@manifest'
if [ -d "$d" ] && [ ! -L "$d" ] && [ -f "$d/.gpufleet-manifest.json" ]; then
  cat "$d/.gpufleet-manifest.json"; echo
fi
echo '#@files'
if [ -d "$d" ] && [ ! -L "$d" ]; then find "$d" -printf '%y %s %m %U:%G %P\n'; fi
echo '#@sha256'
if [ "$verify" = sha256 ] && [ -d "$d" ] && [ ! -L "$d" ]; then
  (cd "$d" && find . -type f ! -name '.gpufleet-*' -printf '%P\0' | xargs -0r sha256sum --)
fi
echo '#@staging'
if [ -d "$s" ] && [ ! -L "$s" ]; then find "$s" -mindepth 1 -printf '%y %s %m %U:%G %P\n'; fi
echo '#@rejected'
if [ -f "$s/.gpufleet-rejected" ]; then cat "$s/.gpufleet-rejected"; fi
echo '#@stale'
if [ -d "$models/.staging" ]; then
  for e in "$models/.staging/$name".old "$models/.staging/$name"-????????????; do
    [ -e "$e" ] && [ "$e" != "$s" ] && basename "$e"
  done
fi
exit 0
"""


class ModelState(FactBase):
    """One model on a host, in one round trip: its directory (every entry with type, size, mode
    and numeric owner), its manifest, sha256 of its files when `verify` is "sha256", the staging
    directory of the wanted revision (resume), files the last verification rejected, stale
    staging entries of this model, the free space of the models filesystem, the login user (who
    owns the staging directory so SFTP and the relay write into it), and the host's addresses
    (where its relay listens when the files come by peers).

    .. code:: python

        {
            "dir": "present",  # or "missing", "symlink", "file"
            "login_user": "ops",
            "primary": "10.20.0.11",  # source of the default route (the relay's address: peers)
            "addresses": {"eth0": "10.20.0.11"},  # IPv4 per interface (an interface-named
                                                  # swarm_advertise_address is looked up here)
            "avail_bytes": 107374182400,
            "manifest": {"repo_id": "...", "revision": "...", "files": [...]},
            "manifest_error": None,
            "files": {"config.json": {"type": "f", "size": 612, "mode": "0644", "owner": "0:0"}},
            "sha256": {"config.json": "3f0c..."},
            "staging": {},
            "rejected": [],
            "stale": ["llama.old"],
        }
    """

    def command(
        self, models_dir: str, model_name: str, revision: str, verify: str = "size"
    ) -> StringCommand:
        return StringCommand(
            "sh", "-c", QuoteString(_STATE_SCRIPT), "weights",
            QuoteString(posixpath.join(models_dir, model_name)),
            QuoteString(staging_dir(models_dir, model_name, revision)),
            QuoteString(verify), QuoteString(models_dir), QuoteString(model_name),
        )

    def process(self, output):
        return parse_model_state(output)


# --- Operations -----------------------------------------------------------------------------


def _finalize_command(models_dir: str, name: str, revision: str, stale: list[str]) -> StringCommand:
    """Verify the staging directory against the manifest's sha256, then make it the model:
    root-owned, 0644/0755, swapped in (the old copy moved aside first, removed after)."""
    stage = staging_dir(models_dir, name, revision)
    target = posixpath.join(models_dir, name)
    old = old_dir(models_dir, name)
    script = (
        'cd "$1" || exit 1; '
        f"if ! out=$(sha256sum -c {SUMS_NAME} 2>/dev/null); then "
        "printf '%s\\n' \"$out\" | sed -n 's/: FAILED.*$//p' > "
        f"{REJECTED_NAME}; "
        f"while IFS= read -r f; do rm -f -- \"$f\"; done < {REJECTED_NAME}; "
        "echo \"sha256 mismatch after transfer (removed from staging, the next run sends them "
        f"again): $(tr '\\n' ' ' < {REJECTED_NAME})\" >&2; exit 1; fi; "
        f"rm -f {REJECTED_NAME}; "
        "chown -R 0:0 . && find . -type d -exec chmod 0755 {} + "
        "&& find . -type f -exec chmod 0644 {} + && cd / "
        '&& rm -rf -- "$3" && if [ -e "$2" ]; then mv -T -- "$2" "$3"; fi '
        '&& mv -T -- "$1" "$2" && rm -rf -- "$3"'
    )
    parts: list[Any] = [
        "sh", "-c", QuoteString(script), "weights",
        QuoteString(stage), QuoteString(target), QuoteString(old),
    ]
    if stale:
        parts += ["&& rm -rf --"] + [
            QuoteString(posixpath.join(models_dir, STAGING_DIR, entry)) for entry in stale
        ]
    return StringCommand(*parts)


@operation()
@fails_only_this_host
def model(
    model_name: str,
    repo_id: str,
    revision: str,
    models_dir: str,
    cache_dir: str,
    endpoint: str = DEFAULT_ENDPOINT,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    token_file: str | None = None,
    verify: str = "size",
    free_margin_gb: int = 1,
    listing: list[dict] | None = None,
    distribution: str = "control",
    source: str = "control",
    relay_port: int = weights_peers.DEFAULT_PORT,
    advertise: str | None = None,
):
    """
    Provision one model's weights at ``<models_dir>/<name>/``: plain files, root-owned,
    0644/0755 (any engine container can read them through a read-only mount), with a manifest
    and a sha256sums file beside them.

    A host whose manifest names this repo, revision and patterns, and whose files match it (by
    size, or by sha256 with ``verify="sha256"``), gets no command and the hub is not asked.
    Otherwise: the control machine fetches the revision once per run into ``cache_dir`` and
    verifies it against the hub's hashes; the host gets only the files it lacks into its staging
    directory, verifies all of them with ``sha256sum -c``, and the staging directory replaces the
    model directory. A host without room for the files it needs is refused before anything is
    written.

    + model_name: directory name under models_dir
    + repo_id: Hugging Face repository, e.g. "meta-llama/Llama-3.1-8B-Instruct"
    + revision: the pinned 40-hex commit id
    + models_dir: the models directory on the host
    + cache_dir: the control machine's weights cache
    + endpoint: hub base URL
    + allow_patterns, ignore_patterns: huggingface_hub patterns selecting files
    + token_file: control-machine file holding the HF token (None: env HF_TOKEN, or no token)
    + verify: "size" (cheap, every run) or "sha256" (re-reads every byte on the host)
    + free_margin_gb: GiB that must stay free on the host (and on the cache) after the transfer
    + listing: the revision's files (``listing_entry`` dicts); None: asked of the control cache
      or the hub, only when this host needs work
    + distribution: "peers" (the files come through a chain of hosts, operations/weights_peers.py:
      one copy from the control machine, or none when a host holds the revision) or "control"
      (the control machine sends each host its files over pyinfra's SFTP)
    + source: where a chain's bytes first come from: "control" (the control machine's cache)
      or "seeder" (the chain's first host downloads the LFS files from the hub itself; the
      control machine reads only the listing and the small files)
    + relay_port: TCP port of this host's relay while a chain runs ("peers")
    + advertise: the host's cluster address for the relay (None: the address pyinfra connects
      to when it is an IP address, else the source of the default route)

    **Example:**

    .. code:: python

        model(
            name="Model tiny-llama",
            model_name="tiny-llama",
            repo_id="gpufleet-lab/tiny-llama",
            revision="4eab0cd005a1f7148f5d417d86428a174a186129",
            models_dir="/opt/models",
            cache_dir="~/.cache/gpufleet/weights",
        )
    """
    name = model_name
    check_model_spec(name, repo_id, revision)
    if verify not in VERIFY_MODES:
        raise OperationError(f"verify {verify!r}: expected one of {', '.join(VERIFY_MODES)}")
    allow = list(allow_patterns or [])
    ignore = list(ignore_patterns or [])
    label = f"{name} ({repo_id}@{rev12(revision)})"
    if distribution not in DISTRIBUTIONS:
        raise OperationError(f"distribution {distribution!r}: expected one of {', '.join(DISTRIBUTIONS)}")
    if source not in SOURCES or (source == "seeder" and distribution != "peers"):
        raise OperationError(f"source {source!r}: expected \"control\", or \"seeder\" with "
                             "distribution \"peers\"")
    key = weights_peers.chain_key(repo_id, revision, allow, ignore, models_dir, name)

    state = host.get_fact(
        ModelState, models_dir=models_dir, model_name=name, revision=revision, verify=verify
    )
    target = posixpath.join(models_dir, name)
    stale = list(state["stale"])
    problems, perms = installed_problems(state, repo_id, revision, allow, ignore, verify)
    address = weights_peers.cluster_address(advertise, host.data.get("ssh_hostname"),
                                            state.get("primary"), state.get("addresses") or {})

    if not problems:
        if distribution == "peers":
            weights_peers.register_holder(key, weights_peers.Registration(
                host.name, weights_peers.ssh_data(host.data), address, relay_port, target))
        manifest = state["manifest"]
        if perms:
            explain(f"model {label}: ownership or mode: {'; '.join(perms[:5])}")
            yield StringCommand(
                "chown -R 0:0", QuoteString(target),
                "&& find", QuoteString(target), "-type d -exec chmod 0755 {} +",
                "&& find", QuoteString(target), "-type f -exec chmod 0644 {} +",
            )
        if stale:
            yield StringCommand(
                "rm -rf --",
                *[QuoteString(posixpath.join(models_dir, STAGING_DIR, e)) for e in stale],
            )
        if not perms and not stale:
            checked = "sha256" if verify == "sha256" else "sizes"
            host.noop(
                f"model {label} is in place: {len(manifest['files'])} files, "
                f"{human_bytes(manifest.get('total_size', 0))}, {checked} match the manifest"
            )
        return

    explain(f"model {label}: {'; '.join(problems)}")
    if state["dir"] not in ("present", "missing"):
        raise OperationError(
            f"{target} is a {state['dir']}, not a directory: move it away by hand (the deploy "
            "replaces only directories it can verify)"
        )
    if listing is None:
        listing = remote_listing(endpoint, repo_id, revision, token_file, cache_dir)
    wanted = files_to_fetch(listing, allow, ignore, f"model {label}")

    plan = plan_host(state, wanted, verify)
    margin = free_margin_gb * GIB
    refusal = disk_refusal(
        f"{models_dir} on this host", state["avail_bytes"], plan.send_bytes, margin
    )
    if refusal:
        raise OperationError(f"model {label}: {refusal}")

    layout = cache_layout(cache_dir, repo_id, revision, allow, ignore)
    request = {
        "name": name,
        "repo_id": repo_id,
        "revision": revision,
        "endpoint": endpoint,
        "cache_dir": cache_dir,
        "allow_patterns": allow,
        "ignore_patterns": ignore,
        "token_file": token_file,
        "margin_bytes": margin,
    }
    if source == "seeder":
        request["lfs_on_hosts"] = True  # the chain's first host reads them from the hub
    stage = staging_dir(models_dir, name, revision)
    user = state["login_user"] or "root"
    by_peers = distribution == "peers" and bool(plan.send)
    if by_peers:
        weights_peers.register_need(key, weights_peers.Registration(
            host.name, weights_peers.ssh_data(host.data), address, relay_port, stage,
            {e["path"] for e in plan.send}))

    # 1. The control cache holds the verified files (downloaded at most once per run).
    yield FunctionCommand(fetch_command, (request,), {})
    # 2. The staging directory, owned by the login user: uploads go there directly.
    dirs = [posixpath.join(stage, d) for d in plan.subdirs]
    yield StringCommand(
        "install -d -m 0755", QuoteString(models_dir), QuoteString(posixpath.dirname(stage)),
        "&& install -d -m 0700", QuoteString(stage), *[QuoteString(d) for d in dirs],
        # Directories only: a file kept from an earlier run may be a hard link to the live copy.
        "&& chown", QuoteString(user), QuoteString(stage), *[QuoteString(d) for d in dirs],
    )
    # Unwanted leftovers, and files about to be sent again (SFTP cannot overwrite a root-owned
    # file: a rejected or cut-off one may be).
    resend = [e["path"] for e in plan.send if e["path"] in state["staging"]]
    doomed = plan.remove + [p for p in resend if p not in plan.remove]
    if doomed:
        yield StringCommand("rm -rf --", *[QuoteString(posixpath.join(stage, p)) for p in doomed])
    # 3. Files the host already holds: hard links (a copy across filesystems).
    for held, dest in plan.link:
        src = QuoteString(posixpath.join(target, held))
        dst = QuoteString(posixpath.join(stage, dest))
        yield StringCommand("ln -f --", src, dst, "2>/dev/null || cp -p --", src, dst)
    # 4. The files it lacks: through the chain of hosts, or straight into staging over SFTP.
    if by_peers:
        chain_request = {
            "name": name, "listing": wanted, "files_dir": str(layout.files),
            "sums_path": str(layout.sums),
        }
        if source == "seeder":
            chain_request["hub"] = {"base": f"{endpoint}/{repo_id}/resolve/{revision}/",
                                    "token_file": token_file}
        yield FunctionCommand(weights_chain.receive, (list(key), chain_request), {})
    else:
        for entry in plan.send:
            yield FileUploadCommand(
                str(layout.files / entry["path"]), posixpath.join(stage, entry["path"]), _sudo=False
            )
    # The manifest and sums (a few KiB) over SFTP.
    yield FileUploadCommand(str(layout.manifest), posixpath.join(stage, MANIFEST_NAME), _sudo=False)
    yield FileUploadCommand(str(layout.sums), posixpath.join(stage, SUMS_NAME), _sudo=False)
    if not by_peers:
        yield FunctionCommand(record_transfer, (name, plan.send_bytes, len(plan.send)), {})
    # 5. Verify every byte, then swap into place.
    yield _finalize_command(models_dir, name, revision, stale)


# --- Phase ----------------------------------------------------------------------------------


class _ReportAtPhaseEnd(BaseStateCallback):
    """Prints the run's hub and LAN bytes once, when the phase's last operation has ended on
    every host (pyinfra calls operation_end once per operation, not per host)."""

    def __init__(self, op_name: str):
        self.op_name = op_name
        self.done = False

    def operation_end(self, state, op_hash):
        if self.done or not any(self.op_name in n for n in state.get_op_meta(op_hash).names):
            return
        self.done = True
        logger.info(weights_cache.LEDGER.summary([h.name for h in state.inventory.iter_activated_hosts()]))


REPORT_OP_NAME = "Report hub and LAN bytes"


@operation()
@fails_only_this_host
def transfer_report():
    """
    Nothing to change: the run's hub and LAN bytes are printed once this operation has ended on
    every host (a pyinfra callback); each host's own transfer is logged as it happens.
    """
    host.noop("hub and LAN bytes of this run are printed when the phase ends")
    return
    yield  # pragma: no cover - a generator that yields nothing


def _spec(entry: Any) -> dict[str, Any]:
    if hasattr(entry, "model_dump"):
        return entry.model_dump()
    return dict(entry)


def models_for_host(models: list[Any], host_groups: list[str]) -> list[dict[str, Any]]:
    """The model entries whose `groups` include one of the host's groups."""
    groups = set(host_groups)
    return [
        spec for spec in map(_spec, models) if groups & set(spec.get("groups") or ["gpu_nodes"])
    ]


@deploy("Model weights")
def model_weights(settings):
    """Every model of `settings.models` this host's groups need, verified in place."""
    from pyinfra import state

    wanted = models_for_host(settings.models, list(host.groups))
    if not wanted:
        host.noop("no model in group data names one of this host's groups")  # pragma: no cover
        return
    if not any(isinstance(h, _ReportAtPhaseEnd) for h in state.callback_handlers):
        state.add_callback_handler(_ReportAtPhaseEnd(REPORT_OP_NAME))
    if settings.weights_distribution == "peers":
        weights_peers.relay_program(name="Weights relay program")
    for spec in wanted:
        kwargs = _model_kwargs(spec, settings)
        if settings.weights_distribution == "peers":
            weights_peers.register_outside_holders(spec, kwargs)
        model(
            name=f"Model {spec['name']}: {spec['repo_id']}@{rev12(spec['revision'])}",
            model_name=spec["name"],
            **kwargs,
        )
    transfer_report(name=REPORT_OP_NAME)


def _model_kwargs(spec: dict[str, Any], settings) -> dict[str, Any]:
    return {
        "repo_id": spec["repo_id"],
        "revision": spec["revision"],
        "models_dir": settings.models_dir,
        "cache_dir": settings.weights_cache_dir,
        "endpoint": settings.hf_endpoint.rstrip("/"),
        # An Ollama model fetches only its GGUF file unless allow_patterns selects more.
        "allow_patterns": list(spec.get("allow_patterns") or
                               ([spec["gguf_file"]] if spec.get("gguf_file") else [])),
        "ignore_patterns": list(spec.get("ignore_patterns") or []),
        "token_file": settings.hf_token_file,
        "verify": settings.weights_verify,
        "free_margin_gb": settings.weights_free_margin_gb,
        "distribution": settings.weights_distribution,
        "source": settings.weights_source,
        "relay_port": settings.weights_relay_port,
        "advertise": settings.swarm_advertise_address,
    }
