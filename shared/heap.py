"""What a long-running process made at start-up, kept out of its garbage collections.

A full collection walks every object the process tracks; in a process that imported torch and
transformers and loaded a model that is about 200 ms with the GIL held. On a server's event loop it
stalls the teacher's thread, which needs the GIL between operators; in a benchmark's client it
stalls whichever server the client is driving. Frozen after start-up (as vLLM's servers do), those
objects are never walked again, and a collection sees only what was made since.
"""

from __future__ import annotations

import gc


def freeze_heap() -> None:
    """Collect what start-up left as garbage, then freeze every object still alive."""
    gc.collect()
    gc.freeze()
