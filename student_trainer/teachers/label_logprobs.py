"""Class logits from the top-k next-token log-probabilities an OpenAI-compatible server returns.

A server returns the ``k`` most likely next tokens only (vLLM: at most 20 by default). A class's
logit is the log-sum-exp of its label words' log-probabilities. A label word found among the top
``k`` has its own; the words that are not share what the top ``k`` leave, ``R = 1 - Σ p_topk``,
equally — each gets ``min(R / m, p_k)`` (``m``: the missing words, ``p_k``: the ``k``-th most
likely token, which no token outside the top ``k`` can exceed; a sampled token returned besides
the top ``k`` counts in ``R`` but not here), and never less than
:data:`FLOOR` (a probability of 0 would make the KL loss infinite). So a row whose label words
all fell outside the top ``k`` gets equal class logits: the teacher does not know.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

FLOOR = 1e-9  # the least probability a label word is given (log: -20.7)


def class_logits(top: Mapping[str, float], label_words: Sequence[Sequence[str]], k: int) -> list[float]:
    """One logit per class: ``top`` maps each returned token to its log-probability (the ``k``
    most likely, and maybe the token sampled besides), ``label_words[c]`` are class ``c``'s words
    (each one token, as the server writes it)."""
    if not top:
        raise ValueError("the server returned no log-probabilities for the next token")
    probs = {token: math.exp(logprob) for token, logprob in top.items()}
    missing = {word for words in label_words for word in words if word not in probs}
    rest = max(0.0, 1.0 - sum(probs.values()))
    kth = sorted(probs.values(), reverse=True)[min(k, len(probs)) - 1]  # not the sampled token's
    share = max(FLOOR, min(rest / len(missing), kth)) if missing else 0.0
    return [
        math.log(sum(max(FLOOR, probs[word]) if word in probs else share for word in words))
        for words in label_words
    ]
