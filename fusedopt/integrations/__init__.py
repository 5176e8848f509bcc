"""Optional glue for the trainers people use, one module per framework, each imported on its own
(``import fusedopt`` imports none of them, and none of the frameworks):

- ``fusedopt.integrations.transformers``: ``FusedTrainer`` / ``FusedTrainerMixin`` for the
  Hugging Face Trainer;
- ``fusedopt.integrations.accelerate``: ``FusedAccelerator`` / ``use_fusedopt`` for accelerate;
- ``fusedopt.integrations.lightning``: ``FusedOptCallback`` and ``SkipAwareScheduling`` for
  PyTorch Lightning.

Each makes the fused recipe the easy one: the clip happens once, inside the fusedopt optimizer's
step; the norm a framework logs is ``opt.grad_norm`` (no extra pass over the gradients); a step
skipped by a GradScaler (or ``nonfinite="skip"``) is reported the way the framework reads it; and
a framework about to clip on top of fusedopt is stopped with the fix named.
"""
