"""A smaller model of the same vocabulary as the draft source (SpeculativeConfig "draft").

Each target sequence has a shadow here: the same tokens, its own KV in the draft model's cache.
propose() brings every shadow up to its target's tokens (the whole prompt the first time, in
chunks; afterwards the tokens the last verification kept), then runs the draft model greedily,
one token per shadow per forward, all shadows in one batch. The draft KV of rejected guesses
is simply overwritten later: a shadow's computed count falls back to the tokens it shares
with its target. The draft model only guesses; the target's verification decides every token.
"""
from __future__ import annotations

import time

from ..params import SamplingParams
from .kv_cache import KVCacheManager
from .runner import ModelRunner
from .sequence import ScheduledSeq, SchedulerOutput, Sequence

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 30, ignore_eos=True)


class DraftModel:
    def __init__(self, runner: ModelRunner, kv: KVCacheManager):
        """runner: the draft model's own runner (a prompt's catch-up is chunked to its
        max_tokens) and kv its cache."""
        self.runner, self.kv = runner, kv
        self.shadows: dict[str, Sequence] = {}
        self.guessed: dict[str, int] = {}          # shadow -> guesses after its target's tokens
        self.seconds_per_step = 0.0        # one batched guessing forward, recent mean

    def warm_up(self) -> None:
        self.runner.warm_up()

    def propose(self, seqs: list[Sequence], lengths: list[int],
                live: set[str]) -> list[list[int]]:
        """Up to lengths[i] greedy draft tokens to follow each seqs[i].all_ids. live: the
        target sequences still running (shadows of the others are dropped)."""
        self._drop_dead(live)
        shadows = [self._sync(s) for s in seqs]
        drafts: list[list[int]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        while active:
            plan, taken = self._plan(shadows, active)
            if not taken:                      # the draft cache is full: no more guesses
                break
            t0 = time.perf_counter()
            results = self.runner.execute(plan)
            if plan.num_tokens == len(taken):  # guessing steps only, not a prompt's catch-up
                self._timed(time.perf_counter() - t0)
            for i, s, r in zip(taken, plan.scheduled, results):
                s.seq.num_computed_tokens += s.num_new_tokens
                if r.token_id is not None:
                    drafts[i].append(r.token_id)
                    s.seq.output_ids.append(r.token_id)
            active = [i for i in active if len(drafts[i]) < lengths[i]]
        for s, d in zip(seqs, drafts):
            self.guessed[s.seq_id] = len(d)
        return drafts

    def _timed(self, seconds: float) -> None:
        s = self.seconds_per_step
        self.seconds_per_step = seconds if not s else 0.8 * s + 0.2 * seconds

    def _sync(self, target: Sequence) -> Sequence:
        """target's shadow with target's tokens, its computed count cut to the tokens the
        two share (a new shadow starts from the draft cache's prefix hits). Only the last
        guesses can differ: the shadow held the target's tokens when it guessed them."""
        sh = self.shadows.get(target.seq_id)
        want = target.all_ids
        if sh is None:
            sh = Sequence(target.seq_id, target.request_id, target.index,
                          list(target.prompt_ids), _GREEDY, 1 << 30)
            sh.output_ids = want[len(sh.prompt_ids):]
            sh.num_computed_tokens = self.kv.find_cached_prefix(sh)
            self.shadows[target.seq_id] = sh
            return sh
        have = sh.all_ids
        common = len(have) - self.guessed.get(target.seq_id, 0)
        while common < min(len(have), len(want)) and have[common] == want[common]:
            common += 1
        if common < len(have):             # guesses the target did not keep
            self.kv.roll_back(sh, common)
        sh.output_ids = want[len(sh.prompt_ids):]
        sh.num_computed_tokens = min(sh.num_computed_tokens, common)
        return sh

    def _plan(self, shadows: list[Sequence], active: list[int]
              ) -> tuple[SchedulerOutput, list[int]]:
        """One forward: for each active shadow in turn while the token budget lasts, its
        missing tokens (a chunk, for a prompt) or, once caught up, its last draft."""
        out, taken, budget = [], [], self.runner.max_tokens
        for i in active:
            sh = shadows[i]
            n = min(sh.num_tokens - sh.num_computed_tokens, budget)
            if n <= 0:
                break
            tables = self.kv.allocate(sh, sh.num_computed_tokens + n)
            if tables is None:
                break
            out.append(ScheduledSeq(sh, n, sh.num_computed_tokens, tables))
            taken.append(i)
            budget -= n
        return SchedulerOutput(out, self.kv.block_size), taken

    def _drop_dead(self, live: set[str]) -> None:
        for seq_id in [k for k in self.shadows if k not in live]:
            self.kv.free(self.shadows.pop(seq_id))
            self.guessed.pop(seq_id, None)
