"""OpenMP's wait policy, chosen before torch loads libgomp.

libgomp reads ``OMP_WAIT_POLICY`` once, when torch is imported. By default, while a process's
threads fit the cores, an idle worker spins (up to 300k iterations) instead of sleeping. Beside
any other busy process on the same cores (the trainer beside the service, an experiment beside
both) a spinning worker holds a core while the master of its team waits for one, and a teacher's
forward pass takes 10-40x longer; sleeping workers cost nothing measurable on a quiet machine
(``python benchmarks/bench_wait_policy.py``). So both commands default to ``PASSIVE``; a policy
the user set is kept.
"""

from __future__ import annotations

import os


def prefer_passive_wait() -> None:
    """Make OpenMP workers sleep when idle, unless the environment says otherwise."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
