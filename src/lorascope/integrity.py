"""What an output's stamp records of the files it wrote (size and content digest of each), and
the check that they are all still there, whole. Reuse runs the check on every output it would
reuse, `lorascope verify` on every output of a study.

The digest is xxHash's XXH3-128 (the `xxhash` package, which `datasets` already depends on):
not cryptographic (a study folder guards against truncation, lost files and half-synced
copies, not against an adversary), and fast enough to check everything on every reuse: it
reads several GB/s on one core, where hashlib's blake2b reads under 1 GB/s
(docs/study-directory.md gives the cost on the quick study)."""

from __future__ import annotations

from pathlib import Path

import xxhash

CHUNK = 8 << 20  # bytes read at a time


def digest(path: Path) -> str:
    """XXH3-128 of a file's content."""
    state = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            state.update(chunk)
    return state.hexdigest()


def files_of(target: Path) -> list[Path]:
    """The files an output consists of: itself, or every file under its folder."""
    return [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())


def record(target: Path) -> dict[str, list]:
    """{path relative to the output's folder: [size, digest]} of every file of `target`."""
    base = target.parent
    return {str(p.relative_to(base)): [p.stat().st_size, digest(p)] for p in files_of(target)}


def damage(target: Path, recorded: dict[str, list]) -> str | None:
    """Why `target` no longer holds what was recorded (the first file that is missing, of
    another size or of other content), or None when every recorded file is whole. Sizes are
    compared first, so a truncated file is named without reading it."""
    base = target.parent
    for name, (size, _) in recorded.items():
        path = base / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, {size:,} were written"
    for name, (_, expected) in recorded.items():
        if digest(base / name) != expected:
            return f"{name} has other content than was written (digest differs)"
    return None
