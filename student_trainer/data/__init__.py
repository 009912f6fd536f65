"""Data: the task registry, file readers, the CLI's data options, tokenization, synthetic tasks,
augmentation."""
