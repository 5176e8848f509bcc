"""Triton kernels of fusedopt, installed as ``fusedopt.kernels``.

norm.py    the norm pass: one launch per dtype group, deterministic partials; it also advances
           the step counters (and snapshots NAdam's mu_product) before any update reads them
update.py  the one update pass of every elementwise optimizer: one launch per (param group,
           dtype); the optimizer's rule (fusedopt/rules.py) is a tl.constexpr argument, the clip
           coefficient is formed on the device from the norm partials
_common.py shared pieces: the rules as Triton functions, clip coefficient, rounding, constants

fusedopt imports this package only when the Triton backend first runs (importing fusedopt never
imports triton). The host side of the tables is fusedopt/_multi_tensor.py; the step that drives
the launches is fusedopt/_triton_step.py.
"""
