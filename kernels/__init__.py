"""Triton kernels of fusedopt, installed as ``fusedopt.kernels``.

The multi-tensor norm pass and the fused update passes land here with the kernel work; until then
this package holds no kernel, fusedopt never imports it, and ``backend="triton"`` raises.
"""
