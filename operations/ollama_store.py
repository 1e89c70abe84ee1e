"""Ollama's own model store, built on each host from the weights phase's GGUF file.

Ollama serves only its store (`OLLAMA_MODELS`: manifests/<host>/<namespace>/<model>/<tag> and
blobs/sha256-<hex>, ollama v0.12.6 server/modelpath.go), never a Hugging Face snapshot. So for
every served model of engine "ollama" this phase imports the model's `gguf_file` with Ollama's
own `ollama create` (a Modelfile `FROM` the file), run once in the model's engine image, into
<models_dir>/.ollama/<name>/, which the engine service mounts read-only as its OLLAMA_MODELS.

No second copy of the weights: the GGUF file is hard-linked into the staged store as
blobs/sha256-<its sha256> (the weights manifest holds that sum, checked against the Hub's).
`ollama create` hashes the file and POSTs it to /api/blobs/<digest> (api/client.go CreateBlob),
which answers 200 at once, storing nothing, when blobs/<digest> exists (server/routes.go
CreateBlobHandler); the server writes the config, template and parameter layers it derives from the GGUF's metadata
and the manifest (server/create.go). Then the store is checked (the manifest names the GGUF's
digest, every layer's blob is there with its size) and moved into place; the one it replaces is
removed. A store is rebuilt when its GGUF or its engine image changes, and never otherwise.

    ollama_stores(settings)            # in deploy.py, after the weights phase
"""

from __future__ import annotations

import json
import posixpath
import shlex
from typing import Any

from pyinfra import host
from pyinfra.api import FactBase, QuoteString, StringCommand, deploy, operation
from pyinfra.api.exceptions import OperationError

from operations.phase import explain, fails_only_this_host
from operations.weights import models_for_host
from operations.weights_plan import MANIFEST_NAME, STAGING_DIR

STORE_ROOT = ".ollama"
# Written beside the store by this phase: what it was built from (not read by Ollama).
MARKER = ".gpufleet-store.json"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
# Seconds `ollama serve` may take to answer in the import container.
SERVE_WAIT_S = 60


def store_dir(models_dir: str, name: str) -> str:
    return posixpath.join(models_dir, STORE_ROOT, name)


def staging_dir(models_dir: str, name: str) -> str:
    return posixpath.join(models_dir, STAGING_DIR, f"{name}.ollama")


def manifest_relpath(served_name: str) -> str:
    """Where Ollama keeps the manifest of a name, under manifests/ (types/model/name.go: host
    registry.ollama.ai, namespace library and tag latest unless the name says otherwise)."""
    name, _, tag = served_name.partition(":") if ":" in served_name.rsplit("/", 1)[-1] \
        else (served_name, "", "")
    parts = name.split("/")
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    registry = parts[-3] if len(parts) >= 3 else DEFAULT_HOST
    return posixpath.join(registry, namespace, model, tag or DEFAULT_TAG)


def gguf_sha256(weights_manifest: dict[str, Any] | None, gguf_file: str) -> str | None:
    """The GGUF file's sha256 in the weights manifest (verified against the Hub), or None."""
    for entry in (weights_manifest or {}).get("files") or []:
        if entry.get("path") == gguf_file:
            return entry.get("sha256")
    return None


def marker_for(gguf_file: str, served_name: str, image: str, sha256: str) -> dict[str, str]:
    """What a store was built from, kept beside it: a change of any rebuilds it."""
    return {"gguf_file": gguf_file, "gguf_sha256": sha256, "image": image,
            "served_name": served_name}


def store_problems(state: dict[str, Any], wanted_marker: dict[str, str]) -> list[str]:
    """Why the store on the host is not the one wanted ([] when it is): the manifest must name
    the GGUF's digest as its model layer, and every blob it names must be there, at its size."""
    manifest, blobs = state.get("manifest"), state.get("blobs") or {}
    if manifest is None:
        return ["no Ollama manifest in the store"]
    problems = []
    if state.get("marker") != wanted_marker:
        problems.append("built from another GGUF file or engine image")
    layers = [manifest.get("config") or {}, *(manifest.get("layers") or [])]
    model_digests = [layer.get("digest") for layer in layers
                     if layer.get("mediaType") == MODEL_MEDIA_TYPE]
    if model_digests != [f"sha256:{wanted_marker['gguf_sha256']}"]:
        problems.append(f"its model layer is {', '.join(map(str, model_digests)) or 'missing'}")
    for layer in layers:
        blob = str(layer.get("digest", "")).replace(":", "-")
        if blobs.get(blob) != layer.get("size"):
            problems.append(f"blob {blob} missing or not {layer.get('size')} bytes")
    return problems


def parse_store_state(lines: list[str]) -> dict[str, Any]:
    """Output of OllamaStoreState: sections @@weights, @@manifest, @@marker (JSON or nothing)
    and @@blobs ("<size> <name>" lines)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in lines:
        if line.startswith("@@"):
            current = sections.setdefault(line[2:].strip(), [])
        elif current is not None:
            current.append(line)

    def as_json(name: str):
        text = "\n".join(sections.get(name) or []).strip()
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    blobs = {}
    for line in sections.get("blobs") or []:
        size, _, name = line.strip().partition(" ")
        if size.isdigit() and name:
            blobs[name] = int(size)
    return {"weights": as_json("weights"), "manifest": as_json("manifest"),
            "marker": as_json("marker"), "blobs": blobs}


class OllamaStoreState(FactBase):
    """The weights manifest of a model, and its Ollama store: manifest, marker, blob sizes.

    .. code:: python

        {"weights": {...}, "manifest": {"layers": [...]}, "marker": {...},
         "blobs": {"sha256-4f...": 1048576}}
    """

    def command(self, models_dir: str, model_name: str, served_name: str) -> StringCommand:
        store = store_dir(models_dir, model_name)
        script = ('echo @@weights; cat "$1/$2/' + MANIFEST_NAME + '" 2>/dev/null; echo; '
                  'echo @@manifest; cat "$3/manifests/$4" 2>/dev/null; echo; '
                  'echo @@marker; cat "$3/' + MARKER + '" 2>/dev/null; echo; '
                  'echo @@blobs; for f in "$3"/blobs/*; do [ -f "$f" ] && '
                  'echo "$(stat -c %s "$f") ${f##*/}"; done; true')
        return StringCommand("sh", "-c", QuoteString(script), "ollama-store",
                             QuoteString(models_dir), QuoteString(model_name), QuoteString(store),
                             QuoteString(manifest_relpath(served_name)))

    def process(self, output):
        return parse_store_state(list(output))


def import_script(model_name: str, served_name: str, gguf_file: str, models_dir: str,
                  image: str, sha256: str) -> str:
    """The shell that stages, imports, checks and moves one store into place (run with sudo).
    Nothing is left where Ollama would read it unless it checked out: a failed import leaves
    only the staging folder, removed by the next try."""
    weights = posixpath.join(models_dir, model_name)
    store, staging = store_dir(models_dir, model_name), staging_dir(models_dir, model_name)
    blob = f"sha256-{sha256}"
    relpath = manifest_relpath(served_name)
    marker = json.dumps(marker_for(gguf_file, served_name, image, sha256), sort_keys=True)
    q = shlex.quote
    serve_and_create = (
        f"ollama serve >/store/.serve.log 2>&1 & i=0; "
        f"until ollama list >/dev/null 2>&1; do i=$((i+1)); "
        f"if [ $i -gt {SERVE_WAIT_S * 2} ]; then cat /store/.serve.log >&2; exit 1; fi; "
        f"sleep 0.5; done; "
        f"ollama create {q(served_name)} -f /store/Modelfile")
    return "; ".join([
        "set -e",
        f"rm -rf {q(staging)}",
        f"install -d -m 0755 {q(staging + '/blobs')} {q(posixpath.dirname(store))}",
        # Same filesystem (both under models_dir): a hard link, not a copy.
        f"ln {q(posixpath.join(weights, gguf_file))} {q(staging + '/blobs/' + blob)}",
        f"printf 'FROM /src/%s\\n' {q(gguf_file)} > {q(staging + '/Modelfile')}",
        (f"docker run --rm --network none --user 0:0 --entrypoint /bin/sh "
         f"-e OLLAMA_MODELS=/store -e OLLAMA_HOST=127.0.0.1:11434 -e OLLAMA_NOPRUNE=1 "
         f"-v {q(weights)}:/src:ro -v {q(staging)}:/store {q(image)} -c {q(serve_and_create)}"),
        f"rm -f {q(staging + '/.serve.log')}",
        # Checked before it is used: the manifest names the GGUF's digest.
        f"grep -qF {q('sha256:' + sha256)} {q(staging + '/manifests/' + relpath)}",
        f"printf '%s\\n' {q(marker)} > {q(staging + '/' + MARKER)}",
        f"if [ -e {q(store)} ]; then rm -rf {q(store + '.old')}; mv {q(store)} {q(store + '.old')}; fi",
        f"mv {q(staging)} {q(store)}",
        f"rm -rf {q(store + '.old')}",
    ])


@operation()
@fails_only_this_host
def store(model_name: str, served_name: str, gguf_file: str, models_dir: str, image: str):
    """The Ollama store of one model, imported from its GGUF file when it is not the one wanted.

    + model_name: the model's `name` (its weights are in <models_dir>/<name>)
    + served_name: the name Ollama serves it as (`ollama create <served_name>`)
    + gguf_file: the GGUF file of the weights to import
    + models_dir: where the weights are; the store goes to <models_dir>/.ollama/<name>
    + image: the engine image whose `ollama` imports it

    .. code:: python

        ollama_store.store(model_name="llama-3b", served_name="llama-3b",
                           gguf_file="Llama-3.2-3B-Instruct-Q4_K_M.gguf",
                           models_dir="/opt/models", image="ollama/ollama:0.12.6")
    """
    state = host.get_fact(OllamaStoreState, models_dir=models_dir, model_name=model_name,
                          served_name=served_name)
    sha256 = gguf_sha256(state["weights"], gguf_file)
    if sha256 is None:
        if not host.state.is_executing:
            host.noop(f"{model_name}: the store is built from {gguf_file} once the weights "
                      "phase has placed it")
            return
        raise OperationError(f"model {model_name}: {gguf_file} is not among the verified "
                             f"weights in {models_dir}/{model_name}")
    wanted = marker_for(gguf_file, served_name, image, sha256)
    problems = store_problems(state, wanted)
    if not problems:
        host.noop(f"{model_name}: Ollama store holds {served_name} from {gguf_file}")
        return
    explain(f"ollama store {model_name}: {'; '.join(problems)}: importing {gguf_file} "
            f"with `ollama create` ({image})")
    yield StringCommand("sh", "-c", QuoteString(import_script(
        model_name, served_name, gguf_file, models_dir, image, sha256)))


def ollama_models_for_host(settings, host_groups: list[str]) -> list:
    names = {spec["name"] for spec in models_for_host(settings.models, host_groups)}
    return [spec for spec in settings.models
            if spec.name in names and spec.engine == "ollama" and spec.serve]


@deploy("Ollama stores")
def ollama_stores(settings):
    """Every served Ollama model this host holds weights for, imported into its store."""
    wanted = ollama_models_for_host(settings, list(host.groups))
    if not wanted:
        host.noop("no served model of engine 'ollama' on this host")
        return
    for spec in wanted:
        store(name=f"Ollama store {spec.name}: {spec.served_name} from {spec.gguf_file}",
              model_name=spec.name, served_name=spec.served_name, gguf_file=spec.gguf_file,
              models_dir=settings.models_dir,
              image=spec.image or settings.stack_engine_images["ollama"])
