"""Ostinato: a deterministic LLM inference engine and OpenAI-compatible server."""
from .params import Logprob, SamplingParams

__all__ = ["LLM", "SamplingParams", "Logprob"]
__version__ = "0.1.0"


def __getattr__(name):   # `import ostinato` stays light: torch loads with the engine
    if name == "LLM":
        from .llm import LLM
        return LLM
    raise AttributeError(name)
