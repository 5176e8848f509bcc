"""fusedopt's optimizers, one file each: the class (a torch.optim namesake's constructor, defaults
and errors, plus the declaration of its rule: fusedopt/_elementwise.py) and, for SGD and Adam,
the torch path through torch's own fused ops. The math of each elementwise one is in
fusedopt/rules.py; LAMB, Adafactor (per-tensor reductions) and Muon (matmuls), which have no
Triton kernel, keep theirs in their files."""
from fusedopt.optim.adafactor import Adafactor
from fusedopt.optim.adagrad import Adagrad
from fusedopt.optim.adam import Adam, AdamW
from fusedopt.optim.adamax import Adamax
from fusedopt.optim.lamb import LAMB
from fusedopt.optim.lion import Lion
from fusedopt.optim.muon import Muon
from fusedopt.optim.nadam import NAdam
from fusedopt.optim.radam import RAdam
from fusedopt.optim.rmsprop import RMSprop
from fusedopt.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax", "Lion",
           "LAMB", "Adafactor", "Muon"]
