"""The knowledge-distillation maths and its bookkeeping: selection, losses, layer alignment, FLOPs ledger."""
