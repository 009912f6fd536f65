"""The service's routes: handlers only (dependencies in :mod:`teacher_server.deps`)."""
