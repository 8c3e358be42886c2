"""Which replica gets a request: the routing key is the prompt's prefix (for chat, the
messages in order, so the system prompt comes first), hashed at a few depths; a replica that
served a prefix gets it again unless it is much busier than the least loaded one. Pure
Python: no Ray, no engine (the Ray request router in ray_app.py wraps PrefixAffinity)."""
from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict

# prefix depths, in characters of the prompt's text (about 4 characters a token: the first
# ~16, 64, 256 and 1024 blocks of 16 tokens); a prompt shorter than the first has no key
DEPTHS = (256, 1024, 4096, 16384)
POLICIES = ("prefix", "least-loaded", "random")


def prompt_text(path: str, body: bytes) -> str:
    """The text a request's prompt starts with, as far as its JSON says (roles included);
    "" when the body is not a JSON object or the route has no prompt."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError):     # the replica answers such a body with its 400
        return ""
    if not isinstance(req, dict):
        return ""
    if path.endswith("/chat/completions"):
        return _messages(req.get("messages"))
    if path.endswith("/completions") or path.endswith("/embeddings"):
        return _prompt(req.get("prompt", req.get("input")))
    if path.endswith("/responses"):
        return _content(req.get("instructions")) + _messages(req.get("input"))
    if path.endswith("/messages"):
        return _content(req.get("system")) + _messages(req.get("messages"))
    return ""


def _messages(messages) -> str:
    if isinstance(messages, str):
        return messages
    if not isinstance(messages, list):
        return ""
    return "".join(f"<{m.get('role')}>{_content(m.get('content'))}\n"
                   for m in messages if isinstance(m, dict))


def _content(content) -> str:
    """A string, or a list of parts whose text fields count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) and
                       isinstance(p.get("text"), str) else "" for p in content)
    return ""


def _prompt(prompt) -> str:
    """A string, token ids, or a list of either: the first prompt."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        return "".join(f"{t}," for t in prompt)       # token ids: about 4 characters each
    return prompt if isinstance(prompt, str) else ""


def route_keys(path: str, body: bytes) -> list[str]:
    """Hashes of the prompt's prefix at each depth it reaches, shortest first."""
    text = prompt_text(path, body)
    return [hashlib.blake2b(text[:d].encode(), digest_size=8).hexdigest()
            for d in DEPTHS if len(text) >= d]


class PrefixAffinity:
    """The routing policy over replica ids. prefix: the replica that served the longest known
    prefix of the request, unless it has more than `imbalance` requests in flight above the
    least loaded one; otherwise (and for an unknown prefix) the least loaded. least-loaded
    and random ignore prefixes. Callers report routed() and finished() per request."""

    def __init__(self, policy: str = "prefix", imbalance: int = 8, capacity: int = 100_000,
                 rng: random.Random | None = None):
        if policy not in POLICIES:
            raise ValueError(f"routing must be one of {', '.join(POLICIES)}, not {policy!r}")
        if imbalance < 0:
            raise ValueError(f"imbalance must be >= 0, not {imbalance}")
        self.policy, self.imbalance, self.capacity = policy, imbalance, capacity
        self.owner: OrderedDict[str, str] = OrderedDict()     # prefix key -> replica (LRU)
        self.load: dict[str, int] = {}                        # replica -> requests in flight
        self.rng = rng or random.Random()

    def choose(self, replicas: list[str], keys: list[str]) -> str:
        if not replicas:
            raise ValueError("no replica to choose from")
        if self.policy == "random":
            return self.rng.choice(replicas)
        least = min(self.load.get(r, 0) for r in replicas)
        if self.policy == "prefix":
            for key in reversed(keys):                        # the longest prefix first
                r = self.owner.get(key)
                if r in replicas and self.load.get(r, 0) - least <= self.imbalance:
                    return r
        return self.rng.choice([r for r in replicas if self.load.get(r, 0) == least])

    def routed(self, replica: str, keys: list[str]) -> None:
        """The request went to `replica`: it holds these prefixes now."""
        self.load[replica] = self.load.get(replica, 0) + 1
        for key in keys:
            self.owner[key] = replica
            self.owner.move_to_end(key)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)

    def finished(self, replica: str) -> None:
        if self.load.get(replica, 0) > 0:
            self.load[replica] -= 1

    def forget(self, replica: str) -> None:
        """The replica is gone: its prefixes are unowned."""
        self.load.pop(replica, None)
        for key in [k for k, r in self.owner.items() if r == replica]:
            del self.owner[key]


def replica_cores(rank: int, threads: int, available: list[int]) -> list[int]:
    """The cores replica `rank` is pinned to: its own `threads` consecutive ones of the
    node's, wrapping round when there are more replicas than cores allow."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, not {threads}")
    cores = sorted(available)
    start = rank * threads
    return [cores[(start + i) % len(cores)] for i in range(min(threads, len(cores)))]
