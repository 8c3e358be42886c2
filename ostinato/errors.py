"""Errors shared by the layers that read model files (the loader, the model description and
the backends), kept here so that none of them imports another to raise one."""
from __future__ import annotations

_MAX_MESSAGE = 1000  # characters of an error message kept (the middle is elided)


class GGUFError(ValueError):
    """A model file is unreadable or asks for something Ostinato does not implement;
    str(err) is one line naming the file and the problem."""

    def __init__(self, message: str):
        # Keys, names and paths come from untrusted bytes: escape newlines and other
        # unprintable characters so the message stays on one line, and elide the middle
        # of a huge one (a forged key can be megabytes long).
        if len(message) > _MAX_MESSAGE:
            message = f"{message[:_MAX_MESSAGE // 2]} ... {message[-_MAX_MESSAGE // 2:]}"
        super().__init__("".join(c if c.isprintable() else ascii(c)[1:-1] for c in message))


ModelFileError = GGUFError      # the name for files that are not GGUF (safetensors folders)
