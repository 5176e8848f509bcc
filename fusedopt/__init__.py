"""fusedopt: drop-in torch.optim SGD, Adam and AdamW with gradient clipping fused into the step.

``fusedopt.AdamW(params, ..., max_grad_norm=1.0).step()`` equals ``clip_grad_norm_(params, 1.0)``
followed by ``torch.optim.AdamW(params, ...).step()``. Importing fusedopt imports no Triton.
"""
from fusedopt.adam import Adam, AdamW
from fusedopt.amp import GradScaler
from fusedopt.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "GradScaler"]
__version__ = "0.1.0"
