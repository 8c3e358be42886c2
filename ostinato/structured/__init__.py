"""Structured output: a grammar engine (llguidance) turns a JSON schema, regex, choice list
or grammar into a per-request token mask.

    compiler = GrammarCompiler(tokenizer, eos_ids, vocab_size)   # one per engine
    grammar = compiler.compile(params.structured_outputs)        # off the engine thread
    constraint = grammar.new_constraint()                        # one per sequence
    forbidden = constraint.forbidden()  # (vocab,) bool: the tokens masked this step
    constraint.advance(token)           # after sampling

Why llguidance (not xgrammar): a small dependency-free wheel (no torch or transformers
needed) that takes our own token bytes, compiles lazily (about 1 ms for a typical schema, no
per-schema precomputation over the vocabulary) and fills a raw bit mask; its JSON compiler
refuses unimplemented schema keywords instead of ignoring them. Measured on this machine
(2 CPU cores): vocabulary set-up once per model 0.28 s (SmolLM2, 49k), 0.64 s (Qwen2.5,
152k), 1.06 s (Gemma 3, 262k); compile of a 5-property nested schema ~1 ms; mask per step
p50 21 / 48 / 45 us, p99 130 / 285 / 156 us (SmolLM2 / Qwen / Gemma).
"""
from .compiler import Grammar, GrammarCompiler, GrammarError
from .constraint import Constraint, fill_masks

__all__ = ["Constraint", "Grammar", "GrammarCompiler", "GrammarError", "fill_masks"]
