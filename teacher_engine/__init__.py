"""The teacher engine: a loaded classifier answering queries, with early exit, packed passes and FLOPs.

Its own package, apart from the HTTP front end (as vLLM's engine and TEI's backends are), because
two callers run it: the service (:mod:`teacher_server`) and the trainer's in-process backend
(:mod:`student_trainer.teachers.local`). ``families`` says where each model family keeps its parts,
``packing`` runs layers on the real tokens only, ``engine`` validates, runs and counts. The
OpenMP wait policy is its callers' choice (:mod:`shared.openmp`).
"""
