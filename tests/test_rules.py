"""rules.py is torch.optim's math: the float64 reference built from it against torch.optim + clip,
for every torch.optim namesake and every option of each (the config tables of test_parity.py and
test_family.py)."""
import pytest
import torch

from conftest import assert_close
from recipe import CLIPS, SHAPES, STEPS, clone_params, make_grads, make_params, ref_step
from reference import reference_step
from test_family import (ADAGRAD_CONFIGS, ADAMAX_CONFIGS, NADAM_CONFIGS, RADAM_CONFIGS,
                         RMSPROP_CONFIGS)
from test_parity import ADAM_CONFIGS, ADAM_ONLY_CONFIGS, SGD_CONFIGS

# RAdam's configs include a beta2 that rectifies within the STEPS = 7 taken (0.999 from step 6,
# 0.8 from step 7) and one that never does (0.7): test_family.test_radam_configs_cross_as_claimed
FAMILIES = {
    "SGD": SGD_CONFIGS, "Adam": {**ADAM_CONFIGS, **ADAM_ONLY_CONFIGS}, "AdamW": ADAM_CONFIGS,
    "Adagrad": ADAGRAD_CONFIGS, "RMSprop": RMSPROP_CONFIGS, "NAdam": NADAM_CONFIGS,
    "RAdam": RADAM_CONFIGS, "Adamax": ADAMAX_CONFIGS,
}
IGNORED = ("foreach", "fused", "capturable")  # change no result


def float_only(cfg):
    values = [v for v in cfg.values()] + list(cfg.get("betas", ()))
    return not any(isinstance(v, torch.Tensor) for v in values)


CASES = [(name, key) for name, cfgs in FAMILIES.items() for key, cfg in cfgs.items() if float_only(cfg)]


@pytest.mark.parametrize("clip", ["noclip", "l2-active", "inf-active", "value+l2"])
@pytest.mark.parametrize("name,key", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_rules_match_torch_optim(name, key, clip):
    hp = {k: v for k, v in FAMILIES[name][key].items() if k not in IGNORED}
    torch_params = make_params(SHAPES, torch.float64)
    rule_params = clone_params(torch_params)
    opt, state = getattr(torch.optim, name)(torch_params, **hp), {}
    for step in range(STEPS):
        skip = {2} if step in (2, 4) else set()
        for i, (a, b, g) in enumerate(zip(torch_params, rule_params, make_grads(torch_params, step))):
            a.grad = None if i in skip else g.clone()
            b.grad = None if i in skip else g.clone()
        ref_step(opt, torch_params, **CLIPS[clip])
        reference_step(name, rule_params, state, hp, CLIPS[clip])
        for a, b in zip(torch_params, rule_params):
            assert_close(b, a)
