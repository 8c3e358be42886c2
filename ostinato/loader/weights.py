"""A model file's tensors as logical tensors (name, type, shape, raw blocks), checked against
the shapes the model expects. The loader knows files, not kernels: a backend repacks the
blocks for its own kernels (kernels/backend.py), so a second backend needs no loader change."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .dequant import dequantize
from .gguf import TYPE_IDS, GGUFError, GGUFFile

Progress = Callable[[int, int], None]       # (bytes loaded so far, total bytes)
# For callers that cannot pass `progress` down (LLM.__init__ loads the weights): the CLI
# sets it around the load with report_progress(...).
_PROGRESS: ContextVar[Progress | None] = ContextVar("ostinato_weight_progress", default=None)


@contextmanager
def report_progress(callback: Progress) -> Iterator[None]:
    """Within the block, a backend's load_weights calls callback(done, total) after each
    tensor."""
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def convert_each(tensors: dict[str, "LogicalTensor"], matrix: Callable, vector: Callable,
                 progress: Progress | None = None) -> dict:
    """{name: matrix(t) for 2-D and 3-D (stacked experts) tensors, vector(t) for the others}, reporting
    progress(done, total) in file bytes after each (default: the one report_progress set):
    a backend's loop over a file's tensors."""
    progress = progress or _PROGRESS.get()
    total, done, out = sum(t.nbytes for t in tensors.values()), 0, {}
    for name, t in tensors.items():
        out[name] = matrix(t) if len(t.shape) >= 2 else vector(t)
        if t.release is not None and len(t.shape) >= 2:    # vectors may still view the file
            t.release()
        done += t.nbytes
        if progress is not None:
            progress(done, total)
    return out


@dataclass(frozen=True)
class LogicalTensor:
    name: str
    type_name: str                # GGML type: F32, F16, BF16, Q4_0, ..., Q6_K
    shape: tuple[int, ...]        # numpy order: (rows, cols) of a weight
    raw: np.ndarray               # the file's bytes (uint8, memory-mapped)
    # drops the file's pages once converted (GGUFFile.release); None: nothing to drop
    release: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return self.raw.size

    def dequantize(self) -> np.ndarray:
        """float32 values in `shape` (exact for F32/F16/BF16; the reference dequantizer
        otherwise)."""
        return dequantize(self.raw, TYPE_IDS[self.type_name], self.shape)


def logical_tensors(gf: GGUFFile, shapes: dict[str, tuple[int, ...]],
                    optional: dict[str, tuple[int, ...]]) -> dict[str, LogicalTensor]:
    """The tensors named in `shapes` (required) and `optional`, each checked against its
    shape. A tensor of the file that neither names is refused: the model would ignore it,
    and a tensor a file carries changes the arithmetic (a bias, a scale, rotary factors)."""
    extra = sorted(set(gf.tensors) - shapes.keys() - optional.keys())
    if extra:
        named = ", ".join(map(repr, extra[:3])) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise GGUFError(f"{gf.path}: tensor {named} not used by Ostinato's "
                        f"{gf.metadata.get('general.architecture')} decoder; refusing the file "
                        f"rather than ignoring what it asks for")
    out = {}
    for name, shape in (shapes | optional).items():
        info = gf.tensors.get(name)
        if info is None:
            if name in shapes:
                raise GGUFError(f"{gf.path}: tensor {name!r} is missing for a "
                                f"{gf.metadata.get('general.architecture')} model")
            continue
        if info.shape != shape:
            raise GGUFError(f"{gf.path}: tensor {name!r} has shape {info.shape}, "
                            f"expected {shape} from the metadata")
        out[name] = LogicalTensor(name, info.type_name, info.shape, gf.raw(name),
                                  partial(gf.release, name))
    return out
