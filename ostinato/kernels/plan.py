"""Derive the static plan from the decoder: run model.decode once on a recording `ops` whose
values are symbols, and hand the recorded op list to the C++ executor (csrc/executor.h),
which replays it in one call per step (no Python between the ops, the GIL released, nothing
allocated). The decoder is written once; the plan is what it calls, in the order it calls
it, on the same kernels, so its output is the same bits (tests/test_plan.py).

Every value is a (T, width) float32 matrix of the step's T tokens. After recording, values
are given buffers by liveness (a value's buffer is reused once its last reader has run), so
the workspace holds a few buffers, not one per op.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import ops
from .backend import EMPTY, CpuKernels, QWeight, StackedPart, expert_mats, qw_of, stacked_of
from .repack import F32

log = logging.getLogger("ostinato.model")


@dataclass(frozen=True)
class Value:
    """A symbolic (T, width) matrix: the step's input (id 0) or an op's output."""
    id: int
    width: int


@dataclass(frozen=True)
class Input:
    """A step input other than the activations: ("cos"|"sin", variant), ("slots"|"tables",
    KV group) or ("meta", 0)."""
    kind: str
    index: int


@dataclass
class Op:
    kind: str                    # linear, concat, norm, add, bias, scale, gated, qkv_rope,
                                 # attention, moe
    args: list[Value]
    out: Value
    heads: list[int] = field(default_factory=list)   # per arg then out: 3-D view heads (0: 2-D)
    weights: list[QWeight] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    ints: list[int] = field(default_factory=list)
    floats: list[float] = field(default_factory=list)
    stage: str = ""


class Recorder:
    """The ops interface of kernels/backend.py, recording instead of computing. Only the
    calls the decoder makes inside `decode` are needed."""

    def __init__(self, names: dict[int, str], quantize_activations: bool):
        self.ops: list[Op] = []
        self.n_values = 0
        self.names = names              # id(weight) -> its name, for stage labels
        self.quant = quantize_activations
        self.input_width = 0

    def value(self, width: int) -> Value:
        self.n_values += 1
        return Value(self.n_values - 1, width)

    def emit(self, kind: str, args: list[Value], width: int, stage: str, **kw) -> Value:
        out = self.value(width)
        self.ops.append(Op(kind, args, out, stage=stage, **kw))
        return out

    def linear(self, x: Value, w) -> Value:
        """As CpuKernels.linear: a list is one stacked matmul where the backend stacked it,
        else a matmul per part and their outputs side by side."""
        stage = self._stage(w[0] if isinstance(w, list) else w)
        if isinstance(w, list):
            stacked = stacked_of(w)
            if stacked is None:
                outs = [self.linear(x, part) for part in w]
                return self.emit("concat", outs, sum(o.width for o in outs), stage)
            w = stacked
        if isinstance(w, StackedPart):
            raise ValueError("a stacked weight's part cannot be multiplied on its own")
        return self.emit("linear", [x], w.N, stage, weights=[w], ints=[int(self.quant)])

    def _stage(self, w) -> str:
        """A profile label from the weight's name: blk.3.attn_q.weight -> "qkv"."""
        name = self.names.get(id(w), "linear.weight").split(".")[-2]
        name = name.removeprefix("attn_").removeprefix("ffn_")
        return {"q": "qkv", "gate": "gate_up", "up": "gate_up", "output": "o"}.get(name, name)

    def rms_norm(self, x: Value, w: torch.Tensor, eps: float) -> Value:
        return self.emit("norm", [x], x.width, "norms+residual", tensors=[w], floats=[eps])

    def add(self, x: Value, h: Value) -> Value:
        return self.emit("add", [x, h], x.width, "norms+residual")

    def bias(self, x: Value, parts: list[torch.Tensor]) -> Value:
        return self.emit("bias", [x], x.width, "bias", tensors=[torch.cat(parts)])

    def scale(self, x: Value, s: float) -> Value:
        return self.emit("scale", [x], x.width, "norms+residual", floats=[s])

    def moe(self, x: Value, router, gate: list, up: list, down: list, k: int, norm: bool,
            act: str) -> Value:
        gate_up, up_ = expert_mats(gate, up)
        return self.emit("moe", [x], x.width, "experts",
                         weights=[router, *gate_up, *up_, *down],
                         ints=[len(down), k, int(norm), int(act != "silu"), int(self.quant),
                               int(bool(up_))])

    def gated_act(self, gate_up: Value, act: str) -> Value:
        return self.emit("gated", [gate_up], gate_up.width // 2, "act", ints=[int(act != "silu")])

    def qkv_rope_cache(self, qkv: Value, q_norm, k_norm, eps, cos: Input | None,
                       sin: Input | None, neox, n_heads, k_cache, v_cache, slots: Input) -> Value:
        """cos/sin None: a layer without rotary (variant -1)."""
        variant = -1 if cos is None else cos.index
        assert (sin is None if cos is None else cos.index == sin.index) and slots.kind == "slots"
        D = v_cache.shape[-1]
        return self.emit("qkv_rope", [qkv], n_heads * D, "rope+cache", heads=[0, n_heads],
                         tensors=[EMPTY if q_norm is None else q_norm,
                                  EMPTY if k_norm is None else k_norm, k_cache, v_cache],
                         floats=[eps], ints=[variant, int(neox), n_heads, slots.index])

    def attention(self, q: Value, k_cache, v_cache, tables: Input, seq_meta: Input, scale,
                  window, softcap: float = 0.0) -> Value:
        H = q.width // v_cache.shape[-1]
        return self.emit("attention", [q], q.width, "attention", heads=[H, H],
                         tensors=[k_cache, v_cache], floats=[scale, softcap],
                         ints=[tables.index, window or 0])


@dataclass
class _Meta:
    """The attention metadata as symbols (the decoder reads these three fields)."""
    slot_mappings: list[Input]
    tables: list[Input]
    seq_meta: Input


# ops whose output may share its first argument's buffer (row by row, each output row
# depends on the same row of the inputs only, read before it is written)
_IN_PLACE = {"norm", "add", "bias", "scale"}


def assign_buffers(rec: Recorder, out: Value) -> tuple[list[int], dict[int, int]]:
    """Buffers by liveness: (their widths, value id -> buffer)."""
    last = {0: -1}
    for i, op in enumerate(rec.ops):
        for a in op.args:
            last[a.id] = i
    last[out.id] = len(rec.ops)
    widths, buf, free = [rec.input_width], {0: 0}, []
    for i, op in enumerate(rec.ops):
        dying = [a for a in op.args if last[a.id] == i]
        first = op.args[0]
        if op.kind in _IN_PLACE and first in dying and first.width == op.out.width:
            buf[op.out.id] = buf[first.id]
            dying.remove(first)
        else:
            fit = next((b for b in free if widths[b] == op.out.width), None)
            if fit is None:
                widths.append(op.out.width)
                fit = len(widths) - 1
            else:
                free.remove(fit)
            buf[op.out.id] = fit
        free.extend(buf[a.id] for a in dying if buf[a.id] not in free
                    and buf[a.id] != buf[op.out.id])
        if last.get(op.out.id, -1) == -1 and op.out.id != out.id:
            raise ValueError(f"the decoder's {op.kind} result is never used")
    return widths, buf


def record(model, kv_caches: list) -> tuple[Recorder, Value]:
    n_groups = len(model.cfg.kv_group_windows())
    names = {id(w): n for n, w in model.w.items()}
    rec = Recorder(names, model.ops.quantize_activations)
    x = rec.value(model.cfg.d_model)                    # value 0: the embedded tokens
    rec.input_width = x.width
    rope = [(Input("cos", v), Input("sin", v)) for v in range(len(model.cfg.ropes))]
    meta = _Meta([Input("slots", g) for g in range(n_groups)],
                 [Input("tables", g) for g in range(n_groups)], Input("meta", 0))
    recording = copy.copy(model)        # the same decoder and weights, calling the recorder
    recording.ops = rec
    return rec, recording.decode(x, rope, meta, kv_caches)


def build_executor(rec: Recorder, out: Value):
    widths, buf = assign_buffers(rec, out)
    ex = ops().Executor(widths)
    for op in rec.ops:
        views = [ex.view(buf[v.id], h) for v, h in
                 zip(op.args + [op.out], op.heads or [0] * (len(op.args) + 1))]
        ex.add_op(op.kind, views, [qw_of(w) for w in op.weights], op.tensors, op.ints, op.floats,
                  op.stage)
    ex.set_output(ex.view(buf[out.id], 0))
    return ex




def packed_bf16_bytes(w) -> int:
    """The bytes of w's bfloat16 copy (QW.pack_bf16: 16-row groups by pairs)."""
    return 2 * ((w.N + 31) // 32 * 32) * w.K


def _check_packable(weights: list) -> None:
    """--dtype bfloat16 converts quantized weights only: float32 ones (a Hugging Face folder
    without --quantize, a type the loader widens) keep the float32 path. None converted is
    refused (the flag would do nothing); some is a warning."""
    kept = sum(w.fmt == F32 for w in weights)
    if kept == len(weights):
        raise ValueError("--dtype bfloat16 converts quantized weights to bfloat16 tiles, and "
                         "this model's decoder weights are float32: load it with --quantize "
                         "q8_0 (or q4_0) to use it")
    if kept:
        log.warning("--dtype bfloat16: %d of the decoder's %d matmuls have float32 weights "
                    "and stay on the float32 path", kept, len(weights))
    log.info("--dtype bfloat16: %.0f MB of bfloat16 weights beside the quantized codes",
             sum(packed_bf16_bytes(w) for w in weights if w.fmt != F32) / 1e6)


def compile_plan(model, kv_caches: list, max_tokens: int, max_context: int,
                 bf16_rows: bool = False, packed_bf16: bool = False) -> Callable | None:
    """A drop-in for model.forward, derived from model.decode; None on a backend without an
    executor (the torch reference runs eagerly by design). Its workspace and the kernels'
    scratch are sized for steps of up to max_tokens tokens whose queries see up to
    max_context keys; `forward.plan.reserve(...)` sizes a new thread's scratch too. The
    hidden states it returns are a view of the workspace: valid until the next call.
    bf16_rows: the rows that meta.bf16_rows marks run every dense matmul on AMX bfloat16
    tiles (csrc/amx_bf16.h; --prompt-bf16); packed_bf16: their weights converted for the tiles
    once, here, rather than in each call (--dtype bfloat16: same bits, twice 8-bit codes'
    memory)."""
    if not isinstance(model.ops, CpuKernels):
        log.info("backend %s runs the decoder eagerly (no static plan)", type(model.ops).__name__)
        return None
    rec, out = record(model, kv_caches)
    plan = build_executor(rec, out)
    if packed_bf16:
        _check_packable([op.weights[0] for op in rec.ops if op.kind == "linear"])

    def inputs(input_ids, positions, meta) -> tuple:
        """plan.forward's arguments: the embedded tokens and the rotary tables (computed in
        torch: a few KB per token), and the slots, block tables and sequence rows."""
        rope = model.rope(positions)
        return (model.embed(input_ids), [c for c, _ in rope], [s for _, s in rope],
                meta.slot_mappings, meta.tables, meta.seq_meta)

    def forward(input_ids, positions, meta, caches=None) -> torch.Tensor:
        if meta.bf16_rows is not None:
            plan.set_bf16_rows(meta.bf16_rows)
        return plan.forward(*inputs(input_ids, positions, meta))
    plan.use_bf16_rows(bf16_rows, packed_bf16)
    plan.reserve(max_tokens, max_context)
    # plan.set_profile(True) / plan.profile(): seconds per stage, for bench
    forward.plan, forward.inputs = plan, inputs
    return forward
