"""fusedopt's optimizers, one file each: the class (a torch.optim namesake's constructor, defaults
and errors, plus the declaration of its rule: fusedopt/_elementwise.py) and, for SGD and Adam,
the torch path through torch's own fused ops. The math of each is in fusedopt/rules.py."""
from fusedopt.optim.adagrad import Adagrad
from fusedopt.optim.adam import Adam, AdamW
from fusedopt.optim.adamax import Adamax
from fusedopt.optim.lion import Lion
from fusedopt.optim.nadam import NAdam
from fusedopt.optim.radam import RAdam
from fusedopt.optim.rmsprop import RMSprop
from fusedopt.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax", "Lion"]
