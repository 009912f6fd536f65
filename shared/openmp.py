"""OpenMP's wait policy, chosen before torch loads libgomp.

libgomp reads ``OMP_WAIT_POLICY`` once, when torch is imported. By default, while a process's
threads fit the cores, an idle worker spins (up to 300k iterations) instead of sleeping. Beside
any other busy process on the same cores (the trainer beside the service, an experiment beside
both) a spinning worker holds a core while the master of its team waits for one, and a teacher's
forward pass takes 10-40x longer. Sleeping workers wake for every parallel region, which costs a
packed pass 17-28 % on a quiet machine (its many short regions), against 22x saved beside a busy
neighbour; a bounded spin (``GOMP_SPINCOUNT=10000``) loses 2x there, and one of 1,000 shows no
consistent gain alone (``python benchmarks/bench_wait_policy.py --policies PASSIVE,spin:1000,spin:10000``).
So both commands default to ``PASSIVE``; a policy the user set is kept.
"""

from __future__ import annotations

import os


def prefer_passive_wait() -> None:
    """Make OpenMP workers sleep when idle, unless the environment says otherwise."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
