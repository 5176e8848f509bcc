"""fusedopt: drop-in torch.optim optimizers with gradient clipping fused into the step.

``fusedopt.AdamW(params, ..., max_grad_norm=1.0).step()`` equals ``clip_grad_norm_(params, 1.0)``
followed by ``torch.optim.AdamW(params, ...).step()``. Importing fusedopt imports no Triton.
"""
from fusedopt.amp import GradScaler
from fusedopt.optim import (LAMB, SGD, Adafactor, Adagrad, Adam, Adamax, AdamW, Lion, Muon,
                            NAdam, RAdam, RMSprop)

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax", "Lion",
           "LAMB", "Adafactor", "Muon", "GradScaler"]
__version__ = "0.1.0"
