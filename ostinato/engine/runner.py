"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, samples.

The only place the engine touches torch. Owns the KV cache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..kernels.plan import compile_plan
from ..model.attention import AttentionMetadata, SeqSlice
from ..model.transformer import Transformer
from ..sampling import (greedy_choices, held_greedy_choices, make_generator, plain_greedy,
                        process_logits, sample, top_logprobs)
from ..structured import Constraint, fill_masks
from .pooling import pool_rows
from .sequence import ScheduledSeq, SchedulerOutput


@dataclass
class SamplerState:
    """A sequence's sampling state (Sequence.sampler_state): its RNG, made on first use, and
    its grammar's state when the output is constrained (params.structured_outputs)."""
    generator: torch.Generator | None = None
    constraint: Constraint | None = None


@dataclass
class SeqResult:
    token_id: int | None = None           # None while the prompt is still being prefilled
    logprob: float | None = None          # of token_id under the raw distribution
    top_logprobs: dict | None = None      # {token_id: Logprob} when params.logprobs is set
    prompt_logprobs: list | None = None   # entries for the prompt positions computed this step
    error: Exception | None = None        # this sequence's sampling or scoring failed
    pooled: torch.Tensor | None = None    # (D,) the pooled prompt, once complete (params.pooling)
    more: list[SeqResult] = field(default_factory=list)   # tokens after token_id: a draft kept


log = logging.getLogger("ostinato.engine")
LOGITS_ROWS_KEPT = 128          # the most rows of batched logits kept in one buffer
BF16_POSITIONS = (None, "prompt", "all")     # ModelRunner(bf16=...)


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: list[int], block_size: int,
                 eos_ids: set[int], max_tokens: int, max_context: int,
                 bf16: str | None = None, max_seqs: int = 64):
        """num_blocks: per KV-cache group (see ModelConfig.kv_group_windows); max_tokens: the
        most tokens a step carries; max_context: the longest sequence. bf16: which positions
        take the decoder's dense matmuls on AMX bfloat16 tiles, the rest on the int16 path:
        "prompt" (weights converted in each call), "all" (weights converted once, now), None.
        Chosen by position, so a token's bits do not depend on the batch, the chunking or the
        cache (kernels backend with AMX-BF16 only). max_seqs: the most sequences a step
        samples (the kept logits buffer's rows, up to LOGITS_ROWS_KEPT)."""
        if bf16 not in BF16_POSITIONS:
            raise ValueError(f"bf16: one of {BF16_POSITIONS}, not {bf16!r}")
        cfg = model.cfg
        self.model, self.block_size, self.eos_ids = model, block_size, eos_ids
        self.num_groups = len(num_blocks)
        # in the layout and dtype the model's ops read (kernels/backend.py)
        self.kv_caches = [model.ops.new_kv_cache(num_blocks[cfg.layer_kv_group(i)], block_size,
                                                 cfg.n_kv_heads, cfg.head_dim)
                          for i in range(cfg.n_layers)]

        # the layers as one C++ call per step where the model allows it (same bits), its
        # buffers and the kernels' scratch sized now for the largest step
        self.max_tokens, self.max_context = max_tokens, max_context
        self.quick_greedy = True        # plain greedy rows in one call (off: each on its own)
        self._logits = self._kept_logits(model, max_seqs)
        self.bf16 = bf16
        self._ones = torch.ones(max_tokens, dtype=torch.uint8) if bf16 == "all" else None
        plan = compile_plan(model, self.kv_caches, max_tokens, max_context, bf16 is not None,
                            packed_bf16=bf16 == "all")
        if bf16 and plan is None:
            raise ValueError("bfloat16 tiles need the kernels backend (its static plan)")
        if bf16 == "all" and not model.ops.pack_bf16(model.lm_head):
            log.warning("--dtype bfloat16: the LM head stays on its own path (its weight is "
                        "float32, which the bfloat16 tiles do not take)")
        self.forward = plan or model.forward

    # -- KV blocks as bytes (the prefix cache's disk tier) ------------------------------------
    def _group_tensors(self, g: int) -> list[torch.Tensor]:
        """Group g's cache tensors, each (num_blocks, ...): K then V of each of its layers."""
        cfg = self.model.cfg
        return [t for i in range(cfg.n_layers) if cfg.layer_kv_group(i) == g
                for t in self.kv_caches[i]]

    def block_bytes(self, g: int) -> int:
        return sum(t[0].numel() * t.element_size() for t in self._group_tensors(g))

    def block_layout(self) -> str:
        """What a block's bytes mean: each group's tensors' shapes and dtypes."""
        return ";".join(",".join(f"{tuple(t.shape[1:])}:{t.dtype}" for t in self._group_tensors(g))
                        for g in range(self.num_groups))

    def block_payload(self, g: int, block: int) -> bytes:
        """A copy of one block's KV in group g, every layer's K and V in turn."""
        return b"".join(t[block].contiguous().view(torch.uint8).numpy().tobytes()
                        for t in self._group_tensors(g))

    def load_block(self, g: int, block: int, payload: bytes) -> None:
        """Write block_payload's bytes back into a block (same layout, checked by length)."""
        dsts = [t[block].view(torch.uint8) for t in self._group_tensors(g)]
        size = sum(d.numel() for d in dsts)
        if len(payload) != size:
            raise ValueError(f"a group-{g} block has {size} bytes, not {len(payload)}")
        src, at = torch.frombuffer(bytearray(payload), dtype=torch.uint8), 0
        for dst in dsts:
            dst.copy_(src[at:at + dst.numel()].view(dst.shape))
            at += dst.numel()

    @staticmethod
    def set_threads(n: int) -> None:
        """The calling thread's kernels run on n threads from now on (same bits on any n)."""
        torch.set_num_threads(n)

    def warm_up(self) -> None:
        """Before a server's first step, on the thread that will run the steps: size the
        kernels' per-thread scratch, so that no step allocates any, and touch every page of
        the KV cache (zeros: attention reads only the slots a step has written, so the values
        change nothing). The backends allocate the cache untouched, so that an offline run
        pays resident memory only for the blocks it uses; a server's RSS stays flat under
        load (before, a fresh server took a new block a request until all were used, and a
        soak read the climb of RSS to the pool's size, +262 MB in 120 s, as a leak), and no
        step takes the page faults of a block's first use."""
        plan = getattr(self.forward, "plan", None)
        if plan is not None:
            plan.reserve(self.max_tokens, self.max_context)
        for layer in self.kv_caches:
            for t in layer:
                t.zero_()

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> list[SeqResult]:
        input_ids, positions, meta = self._prepare(plan)
        hidden = self.forward(input_ids, positions, meta, self.kv_caches)
        # one LM-head matmul for every row that samples this step: a sequence's last real
        # token and each of its draft tokens (each row's logits are the same bits as alone:
        # the kernels are batch-invariant)
        spans, rows = [], []
        for s, sl in zip(plan.scheduled, meta.seqs):
            m = len(s.draft) + 1 if s.samples else 0
            spans.append(range(len(rows), len(rows) + m))
            rows.extend(range(sl.q_start + sl.q_len - m, sl.q_start + sl.q_len))
        try:
            logits = self.model.compute_logits(hidden[rows], self._logits_out(len(rows))
                                               ) if rows else None
        except Exception:           # each sequence then computes (and fails) on its own
            logits = None
        quick = self._quick_greedy(plan, spans, logits)
        fill_masks([c for s in plan.scheduled if s.samples and (c := _constraint(s))])
        quick.update(self._held_greedy(plan, spans, logits))
        out = []
        for i, (s, sl) in enumerate(zip(plan.scheduled, meta.seqs)):
            if quick.get(i) is not None:
                out.append(_chain([SeqResult(token_id=t, logprob=lp) for t, lp in quick[i]]))
                continue
            out.append(self._isolated(s, hidden[sl.q_start: sl.q_start + sl.q_len],
                                      None if logits is None or not spans[i]
                                      else logits[spans[i].start: spans[i].stop]))
        return out

    @staticmethod
    def _kept_logits(model: Transformer, max_seqs: int) -> torch.Tensor | None:
        """The batched LM head's output buffer, kept across steps and touched now (the RSS
        does not climb with the first wide steps): a fresh tensor each step is mapped and
        faulted in by the allocator (Gemma 3, 64 rows: 67 MB, ~19 ms of a ~140 ms step).
        None where the backend's linear cannot write into a given tensor."""
        head = model.lm_head
        if not getattr(model.ops, "native_out", False) or not hasattr(head, "N"):
            return None
        return torch.zeros(min(max(max_seqs, 1), LOGITS_ROWS_KEPT), head.N)

    def _logits_out(self, n: int) -> torch.Tensor | None:
        """The step's batched logits' place: the kept buffer (valid until the next step, as
        the hidden states are), or None (a new tensor) for a step of more rows (drafts)."""
        if self._logits is None or n > len(self._logits):
            return None
        return self._logits[:n]

    def _quick_greedy(self, plan: SchedulerOutput, spans: list[range],
                      logits) -> dict[int, list[tuple[int, float]] | None]:
        """Sequence -> the (token, logprob) pairs it emits, for the sequences whose tokens are
        the raw argmax (greedy, no logits processing, no logprobs or prompt logprobs due):
        all their rows in one call, the same values the per-sequence way gives
        (tests/test_engine_features.py). With a draft: the argmax of each row while the one
        before agreed with the draft."""
        if logits is None or not self.quick_greedy:
            return {}
        seqs = [i for i, s in enumerate(plan.scheduled)
                if s.samples and not _needs_rows(s)
                and plain_greedy(s.seq.params, len(s.seq.output_ids))]
        if not seqs:
            return {}
        rows = [r for i in seqs for r in spans[i]]
        picked = logits if len(rows) == len(logits) else logits[rows]
        choices = iter(greedy_choices(picked))
        out = {}
        for i in seqs:
            mine = [next(choices) for _ in spans[i]]
            out[i] = None if None in mine else _verified(mine, plan.scheduled[i].draft)
        return out

    def _held_greedy(self, plan: SchedulerOutput, spans: list[range],
                     logits) -> dict[int, list[tuple[int, float]] | None]:
        """Sequence -> [(token, logprob)] for greedy sequences held by a grammar and nothing
        else (plain_greedy held), without a draft: their masks applied and argmaxes taken
        for all rows at once, the same tokens and values as one at a time
        (tests/test_structured.py); each grammar then advances by its token. A sequence the
        batch cannot take (None) goes the per-row way, which recomputes its mask."""
        if logits is None or not self.quick_greedy:
            return {}
        seqs = [i for i, s in enumerate(plan.scheduled)
                if s.samples and not s.draft and _constraint(s) is not None
                and not _needs_rows(s)
                and plain_greedy(s.seq.params, len(s.seq.output_ids), held=True)]
        if not seqs:
            return {}
        held = [_constraint(plan.scheduled[i]) for i in seqs]
        try:
            allowed = Constraint.allowed_rows(held)
        except RuntimeError:            # a failed grammar: each row fails on its own
            return {}
        rows = [spans[i].start for i in seqs]
        picked = logits if len(rows) == len(logits) else logits[rows]
        out = {}
        for i, c, choice in zip(seqs, held, held_greedy_choices(picked, allowed)):
            out[i] = None if choice is None else [choice]
            if choice is not None:
                try:
                    c.advance(choice[0])
                except RuntimeError:    # the per-row way fails this sequence alone
                    out[i] = None
        return out

    def _isolated(self, s: ScheduledSeq, hidden: torch.Tensor, logits) -> SeqResult:
        """A failure in one sequence's own processing fails that sequence only."""
        try:
            return self._seq_result(s, hidden, logits)
        except Exception as e:
            return SeqResult(error=e)

    def _prepare(self, plan: SchedulerOutput):
        ids, pos, seqs, q_start, bf16 = [], [], [], 0, []
        slots: list[list[int]] = [[] for _ in range(self.num_groups)]
        bs = self.block_size
        for s in plan.scheduled:
            p = range(s.start, s.start + s.num_new_tokens)
            ids.extend(s.token_ids)
            pos.extend(p)
            if self.bf16 == "prompt":   # prompt positions (a recomputation keeps its paths)
                k = min(max(len(s.seq.prompt_ids) - p.start, 0), len(p))
                bf16 += [1] * k + [0] * (len(p) - k)
            for g, table in enumerate(s.block_tables):
                slots[g].extend(table[i // bs] * bs + i % bs for i in p)
            seqs.append(SeqSlice(q_start, s.num_new_tokens, p.stop,
                                 s.block_tables))
            q_start += s.num_new_tokens
        meta = AttentionMetadata.build([torch.tensor(g, dtype=torch.long) for g in slots], seqs)
        if self.bf16 == "prompt":
            meta.bf16_rows = torch.tensor(bf16, dtype=torch.uint8)
        elif self.bf16 == "all":
            meta.bf16_rows = self._ones[:len(ids)]
        return torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long), meta

    def _seq_result(self, s: ScheduledSeq, hidden: torch.Tensor, logits) -> SeqResult:
        """hidden: (n_new, D) rows of this sequence; logits: (len(draft) + 1, vocab) at its
        sampling rows, if it samples (computed here when the batched LM head failed)."""
        seq, res = s.seq, SeqResult()
        if _scores_prompt(s):
            res.prompt_logprobs = self._prompt_logprobs(s, hidden)
        if seq.params.pooling is not None:
            res.pooled = pool_rows(seq, s.start, hidden)
        if not s.samples:
            return res
        if logits is None:
            logits = self.model.compute_logits(hidden[len(hidden) - len(s.draft) - 1:])
        st = seq.sampler_state = seq.sampler_state or SamplerState()
        if st.generator is None:
            st.generator = make_generator(seq.params.seed)
        # position by position, as plain decoding would, while the draft agrees (a row after
        # the first sees the kept draft tokens as output, for penalties and min_tokens)
        chain = []
        for j, row in enumerate(logits):
            one = res if j == 0 else SeqResult()
            output_ids = seq.output_ids + s.draft[:j] if j else seq.output_ids
            self._sample_into(one, seq, st, row, output_ids)
            chain.append(one)
            if j == len(s.draft) or one.token_id != s.draft[j]:
                break
        res.more = chain[1:]
        return res

    def _sample_into(self, res: SeqResult, seq, st: SamplerState, logits, output_ids) -> None:
        masked = None if st.constraint is None else torch.from_numpy(st.constraint.forbidden())
        processed = process_logits(logits, seq.params, seq.prompt_ids, output_ids,
                                   eos_ids=self.eos_ids, forbidden=masked)
        token = sample(processed, seq.params, st.generator)
        if st.constraint is not None:
            st.constraint.advance(token)
        k = seq.params.logprobs or 0
        lp = top_logprobs(logits, k, token)
        res.token_id, res.logprob = token, lp[token].logprob
        res.top_logprobs = lp if seq.params.logprobs is not None else None

    def _prompt_logprobs(self, s: ScheduledSeq, hidden: torch.Tensor) -> list:
        """Entry for prompt token t+1 comes from the logits at position t."""
        prompt, k, out = s.seq.prompt_ids, s.seq.params.prompt_logprobs, []
        last = min(s.start + s.num_new_tokens, len(prompt) - 1)   # positions with a next token
        for off in range(0, max(0, last - s.start), 128):          # bound the (rows, vocab) tensor
            rows = range(s.start + off, min(last, s.start + off + 128))
            logits = self.model.compute_logits(hidden[rows.start - s.start: rows.stop - s.start])
            out.extend(top_logprobs(logits[i], k, prompt[p + 1]) for i, p in enumerate(rows))
        return out


def _verified(choices: list[tuple[int, float]], draft: list[int]) -> list[tuple[int, float]]:
    """The tokens emitted from a sequence's rows: each row's while the row before agreed
    with the draft."""
    n = 1
    while n < len(choices) and choices[n - 1][0] == draft[n - 1]:
        n += 1
    return choices[:n]


def _chain(results: list[SeqResult]) -> SeqResult:
    first = results[0]
    first.more = results[1:]
    return first


def _scores_prompt(s: ScheduledSeq) -> bool:
    """Whether this step computes prompt log-probabilities for s (prompt tokens are in it)."""
    return s.seq.params.prompt_logprobs is not None and s.start < len(s.seq.prompt_ids)


def _constraint(s: ScheduledSeq):
    st = s.seq.sampler_state
    return None if st is None else st.constraint


def _needs_rows(s: ScheduledSeq) -> bool:
    """Whether s needs its own hidden rows this step (prompt logprobs or pooling)."""
    return _scores_prompt(s) or s.seq.params.pooling is not None
