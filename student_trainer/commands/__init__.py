"""Sub-commands of `student-trainer`, one module each (see student_trainer/cli.py)."""
