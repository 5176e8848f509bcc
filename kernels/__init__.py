"""Triton kernels of fusedopt, installed as ``fusedopt.kernels``.

norm.py  the norm pass: one launch per dtype group, deterministic partials, Adam's step counters
sgd.py   the SGD update pass        } one launch per (param group, dtype); each reads the norm
adam.py  the Adam/AdamW update pass } partials and forms the clip coefficient on the device
_common.py  shared pieces: rules as Triton functions, clip coefficient, constants

fusedopt imports this package only when the Triton backend first runs (importing fusedopt never
imports triton). The host side of the tables is fusedopt/_multi_tensor.py; the step that drives
the launches is fusedopt/_triton_step.py.
"""
