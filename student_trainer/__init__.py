"""student_trainer package."""

from shared.openmp import prefer_passive_wait

prefer_passive_wait()  # before anything imports torch (see shared/openmp.py)
