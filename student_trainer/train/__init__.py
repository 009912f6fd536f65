"""Training: the distill loop and its pieces, the teacher fine-tuning loop, evaluation, checkpoints."""
