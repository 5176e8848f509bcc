"""The memory-lean options (stochastic_rounding, master_weights, state_dtype, rounding_seed:
fusedopt/_elementwise.py) under everything around the numbers, on both backends (Triton under the
interpreter on CPU). What this file proves:

1. Resume: a checkpoint (torch.save / torch.load(weights_only=True)) of a run with stochastic
   rounding, bf16 remainders and bf16 states resumes bit for bit (params, states, remainders, step
   counters), in an optimizer built with another rounding_seed: the saved one wins (and matters).
   Across backends: bit for bit without a clip, to a tolerance with one (the norms add in other
   orders).
2. torch.optim and back: torch.optim's load casts every state tensor of a bf16 param to bf16, the
   int16 ``master_remainder`` included (by value: it means nothing there) and keeps the saved
   groups' keys; it steps on. The documented way to continue in fp32 with torch.optim (weights
   from ``opt.master_param(p)``, fp32 moments) follows the fusedopt run to fp32 rounding. A
   torch.optim checkpoint of bf16 params loads into fusedopt with master_weights and fp32 states
   (groups take the constructor's options, remainder from 0, states converted at the first step)
   and follows torch.optim in fp32 from the same checkpoint.
3. A skipped step (nonfinite="skip", fusedopt.GradScaler, torch.amp.GradScaler) leaves params,
   remainders, fp32 copies, moments and step counters (SGD's and Lion's stochastic-rounding
   counter included) bit for bit, and the run goes on bit for bit as one that never saw the bad
   step (same random bits). Value and norm clips with the options on: against a float64 oracle
   and between the backends.
4. Bad options are refused with the problem named, in the constructor and in add_param_group.
5. Options per param group and changed between steps (master off drops the remainder, on again
   starts it from the param; state_dtype moves convert the states; the Triton plan is rebuilt):
   both backends bit for bit, and against float64 at the change.
6. With the options on, a Triton step is still one norm pass + one update per (param group,
   dtype), and reads nothing on the host.
7. pickle / deepcopy keep the options and the seed; repr shows them.
8. DTensor params on 2 gloo ranks: master_weights (deterministic) equals the unsharded run;
   with stochastic rounding the bits use the local element index, so the sharded step equals a
   plain step on each rank's shards, replicated params stay identical across ranks, and reruns
   are identical.
9. On a GPU: a step with stochastic rounding and master weights captured in a CUDA graph.
"""
import copy
import io
import math
import pickle
import re

import pytest
import torch

import fusedopt
from fusedopt._elementwise import MEMORY_OPTIONS
from conftest import DEVICE, assert_close, wrap_kernels
from ranks import run_ranks
from recipe import make_grads, make_params, tensors_of_state
from test_capture import NoHostReads, steps_read_nothing

BACKENDS = ["torch", "triton"]
SMALL = [(), (33,), (5, 7), (300,)]  # one kernel block each: cheap under the interpreter
KWARGS = {
    "AdamW": dict(lr=0.01, weight_decay=0.01),
    "SGD": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "Lion": dict(lr=1e-3, weight_decay=0.1),
    "RMSprop": dict(lr=0.01, momentum=0.9, centered=True),  # three state columns
}
LEAN = dict(stochastic_rounding=True, master_weights=True, state_dtype=torch.bfloat16)
SEED = 5
BF16_ULP = 2.0 ** -7  # bf16's relative spacing (8 bits of mantissa) at most


def lean_params(shapes=SMALL, dtype=torch.bfloat16, seed=0):
    return [torch.nn.Parameter(p.to(DEVICE)) for p in make_params(shapes, dtype, seed)]


def clone(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def grads_for(params, step, bad=None):
    """Step ``step``'s gradients, rounded to the params' dtype (bf16 values, exact in fp32)."""
    grads = [g.to(DEVICE) for g in make_grads(params, step)]
    if bad is not None:
        grads[bad[0]].view(-1)[bad[1]] = bad[2]
    return [g.to(p.dtype) for g, p in zip(grads, params)]


def set_grads(params, step, bad=None, like=None):
    """``like``: the values of the grads params of that dtype get (bf16 grads for fp32 twins)."""
    for p, g in zip(params, grads_for(params if like is None else clone(params, like), step, bad)):
        p.grad = g.to(p.dtype)


def build(name, params, backend, seed=SEED, **kw):
    return getattr(fusedopt, name)(params, backend=backend,
                                   **{**KWARGS[name], **LEAN, "rounding_seed": seed, **kw})


def train(opt, params, steps, start=0, clip=None, like=None):
    """``clip``: None, or a torch recipe's clip keywords for a torch.optim ``opt``."""
    for s in range(start, start + steps):
        set_grads(params, s, like=like)
        if clip is not None:
            if clip.get("max_grad_value") is not None:
                torch.nn.utils.clip_grad_value_(params, clip["max_grad_value"])
            if clip.get("max_grad_norm") is not None:
                torch.nn.utils.clip_grad_norm_(params, clip["max_grad_norm"],
                                               clip.get("norm_type", 2.0))
        opt.step()


def checkpoint(opt) -> bytes:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


def load(blob: bytes) -> dict:
    """A fresh copy each time: torch's load_state_dict keeps the dict's own tensors where no cast
    is needed (step counters), so two optimizers loaded from one dict would share them."""
    return torch.load(io.BytesIO(blob), weights_only=True)


def snapshot(opt):
    """Every state tensor (step counters, remainders, fp32 copies, moments), by (param, key)."""
    return {k: v.detach().clone() for k, v in tensors_of_state(opt).items()}


def assert_identical(params_a, opt_a, params_b, opt_b, what=""):
    """Params and every state tensor bit for bit, same keys and dtypes."""
    for i, (x, y) in enumerate(zip(params_a, params_b)):
        assert x.dtype == y.dtype and torch.equal(x.detach(), y.detach()), (what, "param", i)
    a, b = snapshot(opt_a), snapshot(opt_b)
    assert a.keys() == b.keys(), what
    for k, v in a.items():
        assert b[k].dtype == v.dtype and torch.equal(b[k], v), (what, k)


def masters(opt, params):
    return [opt.master_param(p) for p in params]


def assert_masters_close(params_a, opt_a, params_b, opt_b, lr):
    """Two runs whose clips differ in the last bits (the norms add in another order): the
    fp32 masters within lr * 2**-5 (an update that a state moved by a bf16 ulp or two moves by
    lr * 2**-7 or so), and a param without one (stochastically rounded) within that and two bf16
    ulps of its largest magnitude."""
    for p, q in zip(params_a, params_b):
        x, y = opt_a.master_param(p), opt_b.master_param(q)
        atol = lr * 2.0 ** -5
        if "master_remainder" not in opt_a.state[p] and x.numel():
            atol += 2 * BF16_ULP * float(x.abs().max())
        assert_close(y, x, torch.float32, atol=atol)


def assert_states_close(got, want, ulps=2):
    """Two snapshots: step counters equal; each other state within ``ulps`` bf16 ulps of the
    largest magnitude that state key holds over all params (stochastic rounding moved across a
    bf16 step by a few fp32 ulps upstream, carried on by a momentum; a 0-dim moment that
    cancelled to a small value is measured against its kind's scale, not its own)."""
    assert got.keys() == want.keys()
    scale = {}
    for (i, key), w in want.items():
        if w.numel():
            scale[key] = max(scale.get(key, 0.0), float(w.double().abs().max()))
    for (i, key), w in want.items():
        g = got[i, key]
        assert g.dtype == w.dtype, (i, key)
        if key == "step":
            assert torch.equal(g, w), (i, key)
        elif key != "master_remainder" and w.numel():
            err = float((g.double() - w.double()).abs().max())
            assert err <= ulps * BF16_ULP * scale[key], (i, key, err, scale[key])


# -- 1. resume exactly ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion", "RMSprop"])
def test_resume_is_bit_identical_and_keeps_the_saved_seed(name, backend):
    """2 clipped steps with SR + master + bf16 states, torch.save / torch.load(weights_only=True),
    a fresh optimizer built with another rounding_seed loads it, 3 more steps: bit for bit the
    uninterrupted run. The loaded state is the checkpoint in its saved dtypes (int16 remainders,
    bf16 states, fp32 step: torch's own load would cast them to the param's dtype). The seed
    matters: the same resume under the other seed rounds differently."""
    params = lean_params()
    a = build(name, params, backend, max_grad_norm=1.0)
    train(a, params, 2)
    blob = checkpoint(a)
    assert [g["rounding_seed"] for g in load(blob)["param_groups"]] == [SEED]
    resumed = {}
    for seed in (SEED + 1, SEED + 2):
        params_b = clone(params)
        b = build(name, params_b, backend, seed=seed, max_grad_norm=1.0)
        b.load_state_dict(load(blob))
        if seed == SEED + 2:  # the other seed, after the load
            b.param_groups[0]["rounding_seed"] = seed
        resumed[seed] = (params_b, b)
    params_b, b = resumed[SEED + 1]
    assert b.param_groups[0]["rounding_seed"] == SEED
    saved = load(blob)["state"]
    assert {k: v.dtype for k, v in snapshot(b).items()} == \
        {(i, k): v.dtype for i, st in saved.items() for k, v in st.items()}
    for (i, k), v in snapshot(b).items():
        assert torch.equal(v, saved[i][k]), (i, k)
    kinds = {k for _, k in snapshot(b)}
    assert {"master_remainder", "step"} <= kinds and "master_param" not in kinds
    assert all(snapshot(b)[i, "master_remainder"].dtype == torch.int16 for i in range(len(params)))
    state_keys = kinds - {"step", "master_remainder"}
    assert all(snapshot(b)[i, k].dtype == torch.bfloat16 for i in range(len(params))
               for k in state_keys)
    train(a, params, 3, start=2)
    for params_b, b in resumed.values():
        train(b, params_b, 3, start=2)
    assert_identical(params, a, *resumed[SEED + 1], what=name)
    assert all(float(st["step"]) == 5.0 for st in a.state.values())  # SGD, Lion: SR's counter
    other_params, other = resumed[SEED + 2]  # Lion's params move by +-lr: its states differ
    assert any(not torch.equal(x, y) for x, y in zip(params, other_params)) or any(
        not torch.equal(v, snapshot(other)[k]) for k, v in snapshot(a).items())


@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("first", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_resume_across_backends(name, first, clip):
    """Saved on one backend, resumed on the other (and the uninterrupted run on the first): bit
    for bit without a clip (the same rule, the same bits, the same rounding); with a clip the
    norm adds in another order, so to fp32 rounding in the master and a bf16 ulp or two in
    what stochastic rounding stored (a few fp32 ulps can move a rounding across a bf16 step)."""
    second = BACKENDS[1 - BACKENDS.index(first)]
    params = lean_params()
    a = build(name, params, first, max_grad_norm=clip)
    train(a, params, 2)
    params_b = clone(params)
    b = build(name, params_b, second, seed=SEED + 1, max_grad_norm=clip)
    b.load_state_dict(load(checkpoint(a)))
    train(a, params, 3, start=2)
    train(b, params_b, 3, start=2)
    if clip is None:
        assert_identical(params, a, params_b, b, what=(first, second))
        return
    assert_masters_close(params, a, params_b, b, KWARGS[name]["lr"])
    assert_states_close(snapshot(b), snapshot(a))


# -- 2. into torch.optim and back ----------------------------------------------------------------

TORCH_OPTIM = {"AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}


def torch_optim(name, params):
    return TORCH_OPTIM[name](params, **KWARGS[name])


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_fusedopt_checkpoint_loads_into_torch_optim(name, state_dtype):
    """A fusedopt checkpoint of bf16 params (SR, master, fp32 or bf16 states) in torch.optim on
    bf16 params: torch keeps the saved groups whole (the memory options travel along, unread);
    'step' stays the saved fp32 tensor; every other state tensor becomes the param's dtype,
    ``master_remainder`` too: torch casts it by value (-26149 -> -26112.0), so it is no
    remainder there, only a key torch.optim carries and never reads. torch.optim steps on."""
    params = lean_params()
    ours = build(name, params, "torch", state_dtype=state_dtype)
    train(ours, params, 3)
    saved = load(checkpoint(ours))
    theirs_p = clone(params)
    theirs = torch_optim(name, theirs_p)
    theirs.load_state_dict(saved)
    group = theirs.param_groups[0]
    assert (group.get("stochastic_rounding", False), group.get("master_weights", False), group.get("state_dtype"),
            group["rounding_seed"]) == (True, True, state_dtype, SEED)
    for i, p in enumerate(theirs_p):
        st = theirs.state[p]
        assert st.keys() == saved["state"][i].keys()
        for key, value in st.items():
            old = saved["state"][i][key]
            if key == "step":
                assert value.dtype == torch.float32 and torch.equal(value, old)
            else:
                assert value.dtype == torch.bfloat16, key
                assert torch.equal(value, old.to(torch.bfloat16)), key
        assert saved["state"][i]["master_remainder"].dtype == torch.int16
    remainders = [theirs.state[p]["master_remainder"].clone() for p in theirs_p]
    train(theirs, theirs_p, 2, start=3)
    for p, r in zip(theirs_p, remainders):
        assert torch.isfinite(p).all()
        assert torch.equal(theirs.state[p]["master_remainder"], r)  # never read nor written
        assert all(v.dtype == (torch.float32 if k == "step" else torch.bfloat16)
                   for k, v in theirs.state[p].items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_torch_optim_in_fp32_continues_from_master_param(name, backend):
    """The documented conversion for fp32 training in torch.optim: weights
    ``p32.copy_(opt.master_param(p))``, the fp32 states from the checkpoint (torch casts them
    to fp32 params' dtype: exact). 3 more steps on both sides from the same (bf16-valued)
    grads: torch.optim's fp32 params follow fusedopt's master, and its states fusedopt's, to
    fp32 rounding."""
    params = lean_params()
    ours = build(name, params, backend, state_dtype=torch.float32)
    train(ours, params, 3)
    p32 = clone(params, torch.float32)
    with torch.no_grad():
        for q, m in zip(p32, masters(ours, params)):
            q.copy_(m)
    assert any(not torch.equal(q, p.float()) for q, p in zip(p32, params))  # the master's bits
    theirs = torch_optim(name, p32)
    theirs.load_state_dict(load(checkpoint(ours)))
    train(ours, params, 3, start=3)
    train(theirs, p32, 3, start=3, like=torch.bfloat16)
    for q, m in zip(p32, masters(ours, params)):
        assert_close(m, q.detach())
    for p, q in zip(params, p32):
        for key, value in theirs.state[q].items():
            if key not in ("step", "master_remainder"):
                assert ours.state[p][key].dtype == torch.float32
                assert_close(ours.state[p][key], value, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_torch_optim_checkpoint_loads_with_master_and_fp32_states(name, backend):
    """torch.optim on bf16 params, 3 steps; its checkpoint into fusedopt with master_weights,
    state_dtype=fp32 and SR: the groups take the constructor's options (rounding_seed
    included), the loaded states are the checkpoint's bf16 tensors bit for bit, no remainder;
    the first step converts the states to fp32 (exactly) and makes the remainder from the param
    (0). From there fusedopt's master follows torch.optim on fp32 params loaded with the same
    checkpoint, to fp32 rounding, and so do the states."""
    params = lean_params()
    first = torch_optim(name, params)
    train(first, params, 3)
    blob = checkpoint(first)
    saved = load(blob)
    ours_p, ref_p = clone(params), clone(params, torch.float32)
    ours = build(name, ours_p, backend, state_dtype=torch.float32)
    ours.load_state_dict(load(blob))
    group = ours.param_groups[0]
    assert (group.get("stochastic_rounding", False), group.get("master_weights", False), group.get("state_dtype"),
            group["rounding_seed"]) == (True, True, torch.float32, SEED)
    for (i, key), value in snapshot(ours).items():
        assert value.dtype == saved["state"][i][key].dtype and torch.equal(
            value, saved["state"][i][key]), (i, key)
        assert key != "master_remainder"
    ref = torch_optim(name, ref_p)
    ref.load_state_dict(load(blob))
    for s in range(3, 6):
        train(ours, ours_p, 1, start=s)
        train(ref, ref_p, 1, start=s, like=torch.bfloat16)
        for p, q in zip(ours_p, ref_p):
            st = ours.state[p]
            assert st["master_remainder"].dtype == torch.int16
            assert_close(ours.master_param(p), q.detach())
            for key, value in ref.state[q].items():
                if key != "step":
                    assert st[key].dtype == torch.float32, key
                    assert_close(st[key], value)
                else:
                    assert float(st[key]) == float(value)
    if name == "SGD":  # stochastic rounding's counter, from 0 at the load
        assert all(float(ours.state[p]["step"]) == 3.0 for p in ours_p)


def round_trip_through_torch_optim(dtype, backend):
    """fusedopt (master_weights) -> torch.optim (one step there) -> fusedopt (master_weights):
    the run resumed from torch.optim's checkpoint and the one resumed from it less the master
    keys (remainder from 0, copy from the param) step once more: the same step, bit for bit."""
    params = lean_params(dtype=dtype)
    ours = build("AdamW", params, backend)
    train(ours, params, 2)
    theirs_p = clone(params)
    theirs = torch_optim("AdamW", theirs_p)
    theirs.load_state_dict(load(checkpoint(ours)))
    train(theirs, theirs_p, 1, start=2)
    blob = checkpoint(theirs)
    without = load(blob)
    for st in without["state"].values():
        st.pop("master_remainder", None)
        st.pop("master_param", None)
    runs = []
    for saved in (load(blob), without):
        ps = clone(theirs_p)
        back = build("AdamW", ps, backend)
        back.load_state_dict(saved)
        train(back, ps, 1, start=3)
        runs.append((ps, back))
    for p in runs[0][0]:
        assert float(p.detach().abs().max()) < 10.0  # the params are ~N(0, 1)
    assert_identical(*runs[0], *runs[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_round_trip_through_torch_optim_restarts_the_master(dtype, backend):
    """fusedopt -> torch.optim (16-bit params, one step there) -> fusedopt with master_weights:
    the master column torch.optim carried (cast to the param's dtype, and stale: torch.optim
    moved the params without it) is no master; the step equals the one from the same
    checkpoint without it, whose master starts from the param. (fusedopt once stepped that cast
    column as the master: bf16 params jumped to ~2e4 on the torch path, and on Triton fp32 values
    went into the fp16 copy's buffer, a heap overrun.)"""
    round_trip_through_torch_optim(dtype, backend)


# -- 3. skipped steps, GradScaler, clips -----------------------------------------------------------

SKIPPERS = ["skip", "fusedopt.GradScaler", "torch.amp.GradScaler"]


def scaler_for(how):
    if how == "skip":
        return None
    cls = fusedopt.GradScaler if how == "fusedopt.GradScaler" else torch.amp.GradScaler
    return cls(DEVICE, init_scale=2.0 ** 10, growth_interval=100)


def scaled_step(opt, params, coefs, scaler):
    """loss = sum(p * c) (bf16: the grads are c times the scale, exactly), scaled, backward,
    step, update."""
    opt.zero_grad()
    loss = sum((p * c).sum() for p, c in zip(params, coefs))
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", SKIPPERS)
@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_skipped_step_leaves_everything_and_the_random_bits(name, how, backend):
    """bf16 params with SR, master and bf16 states; an inf in one gradient at steps 0 (the first:
    nothing is made but empty state) and 2, skipped by ``how``: params, remainders, moments and
    every step counter (SGD's and Lion's SR counter included) are bit for bit as before, and
    after 5 steps the run is bit for bit one that never saw the bad steps: the counter that feeds
    the random bits did not move."""
    params = lean_params()
    twin = clone(params)
    kw = dict(nonfinite="skip") if how == "skip" else {}
    opt = build(name, params, backend, max_grad_norm=1.0, **kw)
    ref = build(name, twin, backend, max_grad_norm=1.0)
    scaler, ref_scaler = scaler_for(how), scaler_for(how)
    for step in range(5):
        bad = step in (0, 2)
        coefs = grads_for(params, step, bad=(2, 3, math.inf) if bad else None)
        before, state_before = clone(params), snapshot(opt)
        scaled_step(opt, params, coefs, scaler)
        assert float(opt.step_skipped) == float(bad), step
        if bad:
            for x, y in zip(before, params):
                assert torch.equal(x, y), step
            after = snapshot(opt)
            assert after.keys() == state_before.keys() or step == 0
            for k, v in state_before.items():
                assert torch.equal(after[k], v), (step, k)
            if step == 0:
                assert all(float(v) == 0.0 for (_, key), v in after.items() if key == "step")
                assert all(not v.any() for (_, key), v in after.items() if key in (
                    "master_remainder", "exp_avg", "exp_avg_sq", "momentum_buffer"))
        else:
            scaled_step(ref, twin, coefs, ref_scaler)
    assert_identical(twin, ref, params, opt, what=(name, how))
    assert all(float(st["step"]) == 3.0 for st in opt.state.values())


@pytest.mark.parametrize("fp16_name", ["AdamW", "SGD"])
def test_skipped_step_keeps_fp16_master_copies(fp16_name):
    """fp16 params keep an fp32 master copy: an inf step under fusedopt.GradScaler leaves the
    copies, params and states bit for bit, on both backends, and the backends agree bit for bit
    without a clip."""
    runs = []
    for backend in BACKENDS:
        params = lean_params(dtype=torch.float16)
        opt = build(fp16_name, params, backend, state_dtype=torch.float32)
        scaler = scaler_for("fusedopt.GradScaler")
        for step in range(3):
            bad = step == 1
            coefs = grads_for(params, step, bad=(1, 0, math.inf) if bad else None)
            before, state_before = clone(params), snapshot(opt)
            scaled_step(opt, params, coefs, scaler)
            assert float(opt.step_skipped) == float(bad)
            if bad:
                assert all(torch.equal(x, y) for x, y in zip(before, params))
                assert all(torch.equal(snapshot(opt)[k], v) for k, v in state_before.items())
        assert all(st["master_param"].dtype == torch.float32 for st in opt.state.values())
        runs.append((params, opt))
    assert_identical(*runs[0], *runs[1])


CLIPS = {
    "l2+value": dict(max_grad_norm=1.0, max_grad_value=0.5),
    "inf+value": dict(max_grad_norm=0.3, norm_type=math.inf, max_grad_value=0.5),
}


def oracle_clip_(params, max_grad_norm, max_grad_value, norm_type=2.0, bf16_norms=False):
    """clip_grad_value_ + clip_grad_norm_ on float64 grads (of bf16 values), returning the
    norm; ``bf16_norms``: each tensor's L2 norm rounded to bf16 first, as clip_grad_norm_ (and
    so fusedopt's CPU torch path) takes the norms of bf16 grads (fusedopt/clip.py), where the
    Triton kernels add fp32 squares."""
    grads = [p.grad for p in params]
    for g in grads:
        g.clamp_(-max_grad_value, max_grad_value)
    norms = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads])
    if bf16_norms:
        norms = norms.float().bfloat16().double()
    total = torch.linalg.vector_norm(norms, norm_type)
    coef = torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_clipped_steps_with_the_options(name, clip):
    """max_grad_value + max_grad_norm (L2 and inf) with the options on, bf16 params, 4 steps.
    With master_weights and fp32 states, on each backend, the master and the states follow
    torch.optim in float64 after clip_grad_value_ + clip_grad_norm_ on the same (bf16-valued)
    grads to fp32 rounding, and grad_norm is the oracle's (the CPU torch path's L2 oracle
    rounds each tensor's norm to bf16, as clip_grad_norm_ does for bf16 grads). With SR and bf16
    states too, the backends follow each other: a bf16 norm against an fp32 one, so the states
    to a bf16 ulp or two, the master to a fraction of the lr."""
    kw = CLIPS[clip]
    params = lean_params()
    fp32_runs, lean_runs = [], []
    for backend in BACKENDS:
        exact_p = clone(params, torch.float64)
        exact = (exact_p, torch_optim(name, exact_p), backend == "torch" and clip == "l2+value")
        ps = clone(params)
        fp32_runs.append((ps, build(name, ps, backend, state_dtype=torch.float32, **kw), exact))
        ps = clone(params)
        lean_runs.append((ps, build(name, ps, backend, **kw)))
    for step in range(4):
        for ps, opt, (exact_p, exact, bf16_norms) in fp32_runs:
            set_grads(exact_p, step, like=torch.bfloat16)
            norm = oracle_clip_(exact_p, **kw, bf16_norms=bf16_norms)
            exact.step()
            train(opt, ps, 1, start=step)
            assert_close(opt.grad_norm.double(), norm, torch.float32)
        for ps, opt in lean_runs:
            train(opt, ps, 1, start=step)
    for ps, opt, (exact_p, exact, _) in fp32_runs:
        for p, x in zip(ps, exact_p):
            assert_close(opt.master_param(p).double(), x.detach(), torch.float32)
            for key, value in exact.state[x].items():
                if key != "step":
                    assert_close(opt.state[p][key].double(), value, torch.float32)
    assert_masters_close(*lean_runs[0], *lean_runs[1], KWARGS[name]["lr"])
    assert_states_close(snapshot(lean_runs[1][1]), snapshot(lean_runs[0][1]))


# -- 4. errors that name the problem ---------------------------------------------------------------

ALL_NAMES = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax", "Lion"]
BAD = [
    ("state_dtype", torch.float64, "state_dtype must be None"),
    ("state_dtype", "bf16", "state_dtype must be None"),
    ("state_dtype", torch.int8, "state_dtype must be None"),
    ("stochastic_rounding", 1, "stochastic_rounding must be True or False"),
    ("stochastic_rounding", "yes", "stochastic_rounding must be True or False"),
    ("master_weights", None, "master_weights must be True or False"),
    ("master_weights", 1.0, "master_weights must be True or False"),
    ("rounding_seed", -1, r"rounding_seed must be an int in \[0, 2\*\*63\)"),
    ("rounding_seed", 1.5, r"rounding_seed must be an int in \[0, 2\*\*63\)"),
    ("rounding_seed", True, r"rounding_seed must be an int in \[0, 2\*\*63\)"),
    ("rounding_seed", 2 ** 63, r"rounding_seed must be an int in \[0, 2\*\*63\)"),
    ("rounding_seed", 2 ** 64, r"rounding_seed must be an int in \[0, 2\*\*63\)"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_options_are_refused_with_the_problem_named(key, value, message):
    """Every class with the options: TypeError naming the class, the option, what it takes and
    the value given, from the constructor and from add_param_group's per-group dict (the group
    is not added; the optimizer still steps)."""
    for name in ALL_NAMES:
        named = rf"fusedopt\.{name}: {message}.*got {re.escape(repr(value))}"
        with pytest.raises(TypeError, match=named):
            getattr(fusedopt, name)(lean_params([(4,)]), **{key: value})
        params = lean_params([(4,)])
        opt = getattr(fusedopt, name)(params, backend="torch")
        extra = lean_params([(3,)], seed=1)
        with pytest.raises(TypeError, match=named):
            opt.add_param_group({"params": extra, key: value})
        assert len(opt.param_groups) == 1 and extra[0] not in opt.state
        set_grads(params, 0)
        opt.step()


@pytest.mark.parametrize("key,value", [("state_dtype", torch.float16), ("rounding_seed", 0),
                                       ("rounding_seed", 2 ** 63 - 1), ("master_weights", False)])
def test_edge_options_are_taken(key, value):
    """The edges of what is accepted: fp16 states for bf16 params, seeds 0 and 2**63 - 1."""
    params = lean_params()
    for backend in BACKENDS:
        ps = clone(params)
        opt = build("AdamW", ps, backend, **{key: value})
        train(opt, ps, 2)
        assert opt.param_groups[0].get(key, False) == value  # only options set are in a group
        assert all(torch.isfinite(p).all() for p in ps)


# -- 5. options per param group, and changed between steps -----------------------------------------

GROUPS = (dict(stochastic_rounding=True),  # SR only: SGD keeps a counter here and not there
          dict(master_weights=True, state_dtype=torch.float32))


def per_group(params):
    return [dict(params=params[:2], **GROUPS[0]), dict(params=params[2:], **GROUPS[1])]


@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_options_per_param_group(name, clip):
    """Two param groups of bf16 params, SR only in one, master + fp32 states only in the other,
    the constructor's options off: each group keeps what its options say (SGD: a step counter
    in the SR group only, so the Triton norm pass advances some rows' counters and a scratch slot
    for the others, in one launch), the options are in state_dict's groups, and the backends
    agree bit for bit without a clip, to a bf16 ulp of the states with one."""
    params = lean_params()
    runs = []
    for backend in BACKENDS:
        ps = clone(params)
        opt = getattr(fusedopt, name)(per_group(ps), **KWARGS[name], backend=backend,
                                      rounding_seed=SEED, max_grad_norm=clip)
        train(opt, ps, 4)
        runs.append((ps, opt))
        groups = opt.state_dict()["param_groups"]
        assert [(g.get("stochastic_rounding", False), g.get("master_weights", False), g.get("state_dtype"),
                 g["rounding_seed"]) for g in groups] == \
            [(True, False, None, SEED), (False, True, torch.float32, SEED)]
        columns = {"SGD": ["momentum_buffer"], "AdamW": ["exp_avg", "exp_avg_sq"]}[name]
        for i, p in enumerate(ps):
            st = opt.state[p]
            sr_group = i < 2
            assert ("step" in st) == (sr_group or name == "AdamW"), (backend, i)
            assert ("master_remainder" in st) == (not sr_group), (backend, i)
            assert all(st[k].dtype == (torch.bfloat16 if sr_group else torch.float32)
                       for k in columns)
            if "step" in st:
                assert float(st["step"]) == 4.0
    if clip is None:
        assert_identical(*runs[0], *runs[1])
    else:
        assert_masters_close(*runs[0], *runs[1], KWARGS[name]["lr"])
        assert_states_close(snapshot(runs[1][1]), snapshot(runs[0][1]))


# step -> (group, change): master off, fp32 states, master on again, SR off with bf16 states
CHANGES = {2: (1, dict(master_weights=False)), 5: (0, dict(state_dtype=torch.float32)),
           8: (1, dict(master_weights=True)), 11: (0, dict(stochastic_rounding=False,
                                                           state_dtype=None))}
STEPS_CHANGED = 14


def test_options_changed_between_steps():
    """AdamW, two groups (SR + master + bf16 states; master + fp32 states), the options moved
    between steps as CHANGES says, 14 steps on both backends in lockstep, bit for bit after every
    step (each group keeps some option throughout: a bf16 group with none steps through torch's
    fused op on the torch path, a few bits off the kernel).
    Master off drops the remainder; on again starts it from the param as it is (the master
    after that step is one float64 AdamW step from the bf16 param, to fp32 rounding); a
    state_dtype move converts the states; on Triton every change rebuilds the step plan (new
    tables: no stale address of a dropped or converted tensor), which then lasts again."""
    params = lean_params()
    runs = []
    for backend in BACKENDS:
        ps = clone(params)
        runs.append((ps, fusedopt.AdamW([dict(params=ps[:2], **LEAN),
                                         dict(params=ps[2:], master_weights=True,
                                              state_dtype=torch.float32)],
                                        **KWARGS["AdamW"], rounding_seed=SEED, backend=backend)))
    plans = []
    for step in range(STEPS_CHANGED):
        gi, change = CHANGES.get(step, (None, {}))
        for _, opt in runs:
            opt.param_groups[gi or 0].update(change)
        if step == 8:  # the master starts from the bf16 param: one float64 step from it
            ps, opt = runs[0]
            exact_p = clone(ps[2:], torch.float64)
            exact = torch.optim.AdamW(exact_p, **KWARGS["AdamW"])
            for p, x in zip(ps[2:], exact_p):
                assert "master_remainder" not in opt.state[p]
                exact.state[x] = {k: v.clone() if k == "step" else v.double()
                                  for k, v in opt.state[p].items()}
            for x, g in zip(exact_p, grads_for(ps, step)[2:]):
                x.grad = g.double()
            exact.step()
        for ps, opt in runs:
            train(opt, ps, 1, start=step)
        assert_identical(*runs[0], *runs[1], what=step)
        ps, opt = runs[1]
        plans.append(opt._step_plan)
        if change:
            assert plans[-1] is not plans[-2], step
        if step - 2 in CHANGES:  # the plan of the step after a change lasts (the change step
            assert plans[-1] is plans[-2], step  # made or dropped state: a plan for itself)
        g0, g1 = ([opt.state[p] for p in ps[:2]], [opt.state[p] for p in ps[2:]])
        assert all(("master_remainder" in st) == (step < 2 or step >= 8) for st in g1), step
        assert all(st["master_remainder"].dtype == torch.int16 for st in g0)
        assert all(st["exp_avg"].dtype == (torch.float32 if 5 <= step < 11 else torch.bfloat16)
                   for st in g0), step
        if step == 8:
            for p, x in zip(runs[0][0][2:], exact_p):
                assert_close(runs[0][1].master_param(p).double(), x.detach(), torch.float32)
    assert plans[-1] is plans[-2]  # settled after the last change


# -- 6. launches and host reads ------------------------------------------------------------------

MANY = [(33,)] * 5 + [(), (300,)]  # many tensors, still one launch of each kind


def launch_cases():
    """name -> (optimizer on fresh params, expected launches per step)."""
    def bf16(seed=0):
        return lean_params(MANY, seed=seed)

    def fp32(seed=1):
        return lean_params(MANY, dtype=torch.float32, seed=seed)
    return {
        # clip: the norm pass, one update
        "AdamW lean clip": (lambda: build("AdamW", bf16(), "triton", max_grad_norm=1.0),
                            dict(_norm_kernel=1, _update_kernel=1)),
        # two dtypes, no clip: AdamW's counters advance in one norm pass per dtype
        "AdamW lean bf16+fp32": (lambda: build("AdamW", bf16() + fp32(), "triton"),
                                 dict(_norm_kernel=2, _update_kernel=2)),
        # SGD, SR in one group only: one norm pass (counters + scratch), one update per group
        "SGD per group": (lambda: fusedopt.SGD(per_group(bf16()), **KWARGS["SGD"],
                                               backend="triton"),
                          dict(_norm_kernel=1, _update_kernel=2)),
        # SGD, master only, no clip: no counter, so no norm pass
        "SGD master": (lambda: fusedopt.SGD(bf16(), **KWARGS["SGD"], master_weights=True,
                                            state_dtype=torch.float32, backend="triton"),
                       dict(_update_kernel=1)),
        # Lion with SR: the counter it keeps for the bits is advanced in a norm pass
        "Lion SR": (lambda: build("Lion", bf16(), "triton"),
                    dict(_norm_kernel=1, _update_kernel=1)),
        "Lion master": (lambda: build("Lion", bf16(), "triton", stochastic_rounding=False),
                        dict(_update_kernel=1)),
    }


def test_launches_per_step_with_the_options(launches):
    """With the options on, a Triton step is still one norm pass per dtype (when something
    needs it: a clip, or a step counter, SR's included) and one update per (param group,
    dtype), whatever the tensor count; SR's counter in one group of two still one norm pass."""
    for case, (make, expected) in launch_cases().items():
        opt = make()
        params = [p for g in opt.param_groups for p in g["params"]]
        for step in range(3):  # state made, plan made, plan reused
            set_grads(params, step)
            launches.clear()
            opt.step()
            assert launches == expected, (case, step)


@pytest.mark.parametrize("case", ["skip", "fusedopt-scaler"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_step_reads_nothing_on_the_host(name, backend, case, monkeypatch):
    """SR + master + bf16 states, value and norm clips, a Tensor lr moved by a scheduler, an inf
    grad skipped by nonfinite='skip' or fusedopt.GradScaler: after the first step (which makes
    the state), no step reads a tensor value on the host (test_capture.NoHostReads; kernel
    launches exempt): the random bits come from the counters on the device."""
    mode = NoHostReads()
    wrap_kernels(monkeypatch, {}, around=mode.allow)
    params = lean_params()
    kw = dict(nonfinite="skip") if case == "skip" else {}
    opt = build(name, params, backend, lr=torch.tensor(KWARGS[name]["lr"], device=DEVICE),
                max_grad_norm=1.0, max_grad_value=0.5, **kw)
    scaler = fusedopt.GradScaler(DEVICE, init_scale=1024.0) if case != "skip" else None
    steps_read_nothing(opt, params, lambda step: [c.to(DEVICE) for c in make_grads(params, step)],
                       scaler, mode, inf_at=(1, 0))
    assert all(float(st["step"]) == 3.0 for st in opt.state.values())


# -- 7. pickle, deepcopy, repr -------------------------------------------------------------------

@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_keep_the_options_and_seed(how):
    """A copy of an optimizer (with its params) keeps each group's options and the
    constructor's (a group added later takes the same seed), and continues bit for bit as the
    original; repr shows the options; a seed left None is drawn from torch's default generator
    (torch.manual_seed fixes it) and kept by the copy."""
    torch.manual_seed(7)
    drawn = fusedopt.AdamW(lean_params(), stochastic_rounding=True).param_groups[0]["rounding_seed"]
    torch.manual_seed(7)
    params = lean_params()
    opt = fusedopt.AdamW(per_group(params), **KWARGS["AdamW"], **LEAN, backend="torch")
    assert isinstance(drawn, int) and [g["rounding_seed"] for g in opt.param_groups] == [drawn] * 2
    train(opt, params, 2)
    twin_params, twin = (pickle.loads(pickle.dumps((params, opt))) if how == "pickle"
                         else copy.deepcopy((params, opt)))
    assert twin.param_groups[0]["params"][0] is twin_params[0]
    assert [{k: g[k] for k in MEMORY_OPTIONS} for g in twin.param_groups] == \
        [{k: g[k] for k in MEMORY_OPTIONS} for g in opt.param_groups]
    extras = []
    for o in (opt, twin):
        extra = lean_params([(6,)], seed=3)
        o.add_param_group(dict(params=extra))
        extras.append(extra)
    assert twin.param_groups[2]["rounding_seed"] == opt.param_groups[2]["rounding_seed"] == drawn
    assert twin.param_groups[2].get("master_weights", False) and twin.param_groups[2].get("stochastic_rounding", False)
    train(opt, params + extras[0], 2, start=2)
    train(twin, twin_params + extras[1], 2, start=2)
    assert_identical(params + extras[0], opt, twin_params + extras[1], twin)
    text = repr(twin)
    for line in ("stochastic_rounding: True", "master_weights: True",
                 "state_dtype: torch.bfloat16", "state_dtype: torch.float32",
                 f"rounding_seed: {drawn}"):
        assert line in text, line


# -- 8. DTensor params on 2 gloo ranks -------------------------------------------------------------

# full shapes and placements: FSDP2's Shard(0) (even splits), and replicated params beside them
DIST_PARAMS = [((8, 6), "shard"), ((8,), "shard"), ((6,), "replicate"), ((4, 4), "replicate")]
DIST_NAMES = ["AdamW", "SGD"]
DIST_STEPS = 3


def _part(t, placement, rank, world_size):
    """This rank's part of a full tensor: its Shard(0) chunk, or all of it when replicated."""
    return t.chunk(world_size, dim=0)[rank] if placement == "shard" else t


def _dtensors(values, mesh, rank, world_size):
    from torch.distributed.tensor import DTensor, Replicate, Shard
    out = []
    for t, (_, placement) in zip(values, DIST_PARAMS):
        spec = [Shard(0)] if placement == "shard" else [Replicate()]
        out.append(DTensor.from_local(_part(t, placement, rank, world_size).clone(), mesh, spec,
                                      run_check=False))
    return out


def _dist_run(name, backend, kind, step_grads, mesh, rank, world_size, **options):
    """DIST_STEPS steps of ``name`` with LEAN + ``options`` on bf16 params of DIST_PARAMS as
    ``kind``: "dtensor" (this rank's shards and replicas), "plain" (plain tensors holding the
    same local values) or "full" (plain, unsharded). Returns (params, opt)."""
    values = make_params([s for s, _ in DIST_PARAMS], torch.bfloat16, seed=0)
    if kind == "dtensor":
        params = [torch.nn.Parameter(t) for t in _dtensors(values, mesh, rank, world_size)]
    elif kind == "plain":
        params = [torch.nn.Parameter(_part(t, pl, rank, world_size).detach().clone())
                  for t, (_, pl) in zip(values, DIST_PARAMS)]
    else:
        params = [torch.nn.Parameter(t.detach().clone()) for t in values]
    opt = build(name, params, backend, **options)
    for step in range(DIST_STEPS):
        grads = step_grads[step]
        if kind == "dtensor":
            grads = _dtensors(grads, mesh, rank, world_size)
        elif kind == "plain":
            grads = [_part(g, pl, rank, world_size).clone()
                     for g, (_, pl) in zip(grads, DIST_PARAMS)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _local_values(params, opt, full_run=False, rank=0, world_size=1):
    """Each param's tensors (param, master, every state) as this rank holds them (of a "full"
    run: the part this rank would hold), plain, by (param index, what)."""
    from fusedopt._distributed import local
    out = {}
    for i, p in enumerate(params):
        cut = (lambda t: _part(t, DIST_PARAMS[i][1], rank, world_size)) if full_run else local
        out[i, "param"] = cut(p.detach())
        out[i, "master"] = cut(opt.master_param(p))
        for key, value in opt.state[p].items():
            out[i, key] = value if key == "step" else cut(value)
    return out


def _assert_same(got, want, what):
    assert got.keys() == want.keys(), what
    for k, w in want.items():
        assert got[k].dtype == w.dtype and torch.equal(got[k], w), (what, k)


def _assert_replicas_agree(values, world_size, what):
    """Replicated params (and their masters, states) hold the same bits on every rank."""
    import torch.distributed as dist
    for (i, key), value in values.items():
        if DIST_PARAMS[i][1] == "replicate":
            mine = value.view(torch.int16).int() if value.element_size() == 2 \
                else value.view(torch.int32)
            gathered = [torch.empty_like(mine) for _ in range(world_size)]
            dist.all_gather(gathered, mine)
            assert all(torch.equal(g, gathered[0]) for g in gathered), (what, i, key)


def dtensor_body(rank, world_size):
    """Torch backend: each check against plain single-process runs; Triton (3 runs, the
    interpreter is slow): each against the torch backend's DTensor run, bit for bit where no
    clip (the backends agree bit for bit: test_resume_across_backends)."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world_size,))
    full_shapes = [s for s, _ in DIST_PARAMS]
    step_grads = [[g.to(torch.bfloat16) for g in make_grads(make_params(full_shapes,
                                                                        torch.bfloat16), s)]
                  for s in range(DIST_STEPS)]
    exact = dict(stochastic_rounding=False)  # master weights, bf16 states rounded to nearest
    clipped = dict(exact, max_grad_norm=1.0)
    for name in DIST_NAMES:
        def run(backend, kind, **kw):
            params, opt = _dist_run(name, backend, kind, step_grads, mesh, rank, world_size,
                                    **kw)
            return _local_values(params, opt, kind == "full", rank, world_size)

        what = (rank, name)
        # master weights, states rounded to nearest: elementwise and deterministic, so the
        # shards are the unsharded run's parts bit for bit (no clip), or close (a clip: the
        # torch path takes bf16 norms per shard)
        want = run("torch", "full", **exact)
        _assert_same(run("torch", "dtensor", **exact), want, what)
        _assert_same(run("triton", "dtensor", **exact), want, what + ("triton",))
        want = run("torch", "full", **clipped)
        for backend in BACKENDS:
            got = run(backend, "dtensor", **clipped)
            for i in range(len(DIST_PARAMS)):
                assert_close(got[i, "master"], want[i, "master"], torch.float32,
                             atol=KWARGS[name]["lr"] * 2.0 ** -5)
            _assert_replicas_agree(got, world_size, what + (backend, "clip"))
        # stochastic rounding: the bits hash the local element index, so a sharded step is a
        # plain step on the rank's local values, bit for bit; rank 0's shards start at element
        # 0, so there it is the unsharded run too, elsewhere not; a rerun is the same run, and
        # so is the other backend's
        sharded = run("torch", "dtensor")
        _assert_same(sharded, run("torch", "plain"), what)
        _assert_same(sharded, run("torch", "dtensor"), what)
        _assert_same(run("triton", "dtensor"), sharded, what + ("triton",))
        unsharded = run("torch", "full")
        if rank == 0:
            _assert_same(sharded, unsharded, what)
        else:
            assert any(not torch.equal(sharded[k], unsharded[k]) for k in sharded
                       if DIST_PARAMS[k[0]][1] == "shard"), what
        _assert_replicas_agree(sharded, world_size, what)


def test_dtensor_params_with_the_options_on_two_ranks():
    """FSDP2-style DTensor params (Shard(0), and Replicate beside them) of bf16, AdamW and SGD
    with master_weights, bf16 states and stochastic rounding, both backends, on 2 gloo ranks
    (tests/ranks.py): module docstring, point 8. One spawn for everything."""
    run_ranks(dtensor_body, 2)


# -- 9. CUDA graphs ------------------------------------------------------------------------------

def _graph_step(model, opt, x, y):
    opt.zero_grad(set_to_none=False)  # the grads keep their storage: the graph's tables stay valid
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU: CUDA graphs exist only there")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_cuda_graph_replay_with_stochastic_rounding_and_master(name, backend):
    """A bf16 training step with SR, master weights and bf16 states (a Tensor lr, a clip,
    nonfinite='skip') captured once and replayed 8 times, a scheduler moving the lr between
    replays and one inf step skipped on the device, against the same steps run eagerly: the same
    step counters (the random bits' input: a replay reads and advances them on the device), the
    masters and states to the tolerance of a bf16 ulp (the captured forward may pick other
    kernels), and the skip left the counters one behind the step count."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                                  torch.nn.Linear(256, 64)).cuda().bfloat16() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build(name, list(m.parameters()), backend, max_grad_norm=1.0, nonfinite="skip",
                  lr=torch.tensor(KWARGS[name]["lr"], device="cuda")) for m in models]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10) for o in opts]
    data = [(torch.randn(32, 64, device="cuda", dtype=torch.bfloat16),
             torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)) for _ in range(11)]
    data[6][0][0, 0] = math.inf  # skipped on the device: no counter moves
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            for m, o in zip(models, opts):
                _graph_step(m, o, *data[i])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _graph_step(models[0], opts[0], static_x, static_y)
    for i in range(3, 11):
        static_x.copy_(data[i][0])
        static_y.copy_(data[i][1])
        graph.replay()
        _graph_step(models[1], opts[1], *data[i])
        for s in scheds:
            s.step()
    torch.cuda.synchronize()
    params = [list(m.parameters()) for m in models]
    for p in params[0]:
        assert float(opts[0].state[p]["step"]) == 10.0  # 3 + 8 steps, one skipped
        assert opts[0].state[p]["master_remainder"].dtype == torch.int16
    assert_masters_close(params[1], opts[1], params[0], opts[0], KWARGS[name]["lr"])
    assert_states_close(snapshot(opts[0]), snapshot(opts[1]))


def test_master_param_refuses_a_tensor_it_does_not_own():
    """``master_param(p.detach())`` has no master to give: its own value would pass for one (the
    param's master after a step below half a bf16 ulp is not the param's value)."""
    p = torch.nn.Parameter(torch.tensor([1.5], dtype=torch.bfloat16))
    opt = fusedopt.SGD([p], lr=2 ** -6, master_weights=True)
    p.grad = torch.full_like(p, 2 ** -7)
    opt.step()
    assert opt.master_param(p).item() == 1.5 - 2 ** -13  # exact in fp32; p itself stays 1.5
    assert p.item() == 1.5
    with pytest.raises(ValueError, match="not one of this optimizer's parameters"):
        opt.master_param(p.detach())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process
def test_torch_optim_dcp_checkpoint_loads_with_partial_load(tmp_path):
    """torch.distributed.checkpoint (one process): a torch.optim.AdamW checkpoint of bf16 params
    into fusedopt.AdamW with master_weights and fp32 states. A strict dcp.load refuses it (the
    checkpoint lacks the options' keys); allow_partial_load=True loads it, the constructor's
    options stand (DCP hands back None for the missing state_dtype), and the run continues with
    torch.optim's moments and step count, its states in fp32 from then on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
    theirs.step()
    dcp.save({"optim": get_optimizer_state_dict(model, theirs)}, checkpoint_id=str(tmp_path))
    ours = fusedopt.AdamW(model.parameters(), lr=1e-3, master_weights=True,
                          state_dtype=torch.float32)
    model.zero_grad(set_to_none=True)  # DCP makes the state to load into with a zero-grad step
    sd = {"optim": get_optimizer_state_dict(model, ours)}
    with pytest.raises(dcp.api.CheckpointException) as refused:
        dcp.load(sd, checkpoint_id=str(tmp_path))
    assert "Missing key" in "".join(map(str, refused.value.failures.values()))
    sd = {"optim": get_optimizer_state_dict(model, ours)}
    dcp.load(sd, checkpoint_id=str(tmp_path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(model, ours, sd["optim"])
    group = ours.param_groups[0]
    assert group["master_weights"] and group["state_dtype"] == torch.float32
    expected = {k: v.float() for k, v in theirs.state[model.weight].items() if k != "step"}
    model(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
    ours.step()
    state = ours.state[model.weight]
    assert float(state["step"]) == 2.0
    assert state["exp_avg"].dtype == torch.float32 and state["master_remainder"].dtype == torch.int16
    # the moments went on from torch.optim's: beta1 * m + (1 - beta1) * g, g from the new batch
    assert not torch.equal(state["exp_avg"], torch.zeros_like(state["exp_avg"]))
    assert torch.allclose(state["exp_avg"] - 0.1 * model.weight.grad.float(), 0.9 * expected["exp_avg"],
                          rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_zero_dim_params_take_every_option(name):
    """0-dim params (a learned scale, say) with master_weights, stochastic rounding and bf16
    states, beside a 1-D one: the torch path's bit views need a dimension (a 0-dim fp32 cannot be
    viewed as int16 halves; the CPU memory benchmark met that), and both backends agree bit for
    bit; the master is the fp32 run's."""
    runs = []
    for backend in BACKENDS:
        params = [torch.nn.Parameter(torch.tensor(1.5, dtype=torch.bfloat16)),
                  torch.nn.Parameter(torch.linspace(-1, 1, 37).to(torch.bfloat16))]
        opt = getattr(fusedopt, name)(params, **KWARGS[name], backend=backend,
                                      master_weights=True, stochastic_rounding=True,
                                      state_dtype=torch.float32, rounding_seed=SEED)
        fp32 = [torch.nn.Parameter(p.detach().float()) for p in params]
        ref = getattr(fusedopt, name)(fp32, **KWARGS[name], backend=backend,
                                      stochastic_rounding=True)  # fp32 on the rule path too
        for step in range(3):
            for p, q in zip(params, fp32):
                g = torch.full(p.shape, 0.3 - 0.1 * step).to(torch.bfloat16)
                p.grad, q.grad = g, g.float()
            opt.step()
            ref.step()
        for p, q in zip(params, fp32):
            assert torch.equal(opt.master_param(p), q.detach()), backend
        runs.append([opt.master_param(p) for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
