"""teacher_server package."""
