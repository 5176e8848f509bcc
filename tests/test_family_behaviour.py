"""Adagrad, RMSprop, NAdam, RAdam, Adamax and Lion under everything fusedopt promises besides
their math (tests/test_family.py has the numeric parity), on both backends (Triton under the
interpreter on CPU): state_dict layout and checkpoints moved both ways between torch.optim and
fusedopt and between the backends; GradScaler and the nonfinite policies; launches per step; no
host read in a step; hyperparameters moved between steps (no recompile, the plan kept);
param groups added later, params without grads, 0-dim params, zero_grad(set_to_none=False).

The oracle is torch.optim.<Name> + clip_grad_value_ / clip_grad_norm_; for Lion, which
torch.optim lacks, LionReference below: lion-pytorch's step, which fusedopt/optim/lion.py cites.
"""
import contextlib
import io
import math

import pytest
import torch

import fusedopt
from fusedopt.optimizer import ClippedStep
from conftest import DEVICE, assert_close, wrap_kernels
from recipe import clone_params, make_grads, make_params, ref_step, tensors_of_state, torch_groups
from test_capture import NoHostReads

NAMES = ["Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax", "Lion"]
BACKENDS = ["torch", "triton"]
# Each config turns on what its rule can branch on (weight decay, centered + momentum, decoupled
# decay) away from the defaults. RAdam rectifies from step 6 (rho_t > 5): 7-step runs cross it.
KWARGS = {
    "Adagrad": dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1),
    "RMSprop": dict(lr=0.01, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.01),
    "NAdam": dict(lr=0.01, weight_decay=0.01, momentum_decay=0.01),
    "RAdam": dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.01, decoupled_weight_decay=True),
    "Adamax": dict(lr=0.01, weight_decay=0.01),
    "Lion": dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
}
# Each tensor one kernel block: cheap under the interpreter. A 0-dim param first.
SMALL = [(), (1,), (127,), (13, 7), (300,), (3, 5, 2)]
GROUP1 = dict(lr_factor=0.5)  # the second param group: half the lr


class LionReference(torch.optim.Optimizer):
    """Lion as lion-pytorch computes it (lion_pytorch.py, ``update_fn``), one tensor at a time:
    decoupled decay, the sign of the interpolation, then the EMA. State: ``exp_avg`` only."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd, (beta1, beta2) = group["lr"], group["weight_decay"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - lr * wd)
                update = exp_avg.clone().mul_(beta1).add(p.grad, alpha=1 - beta1).sign_()
                p.add_(update * -lr)
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)


def reference(name, groups, **kw):
    return (LionReference if name == "Lion" else getattr(torch.optim, name))(groups, **kw)


def ours(name, groups, backend, **kw):
    return getattr(fusedopt, name)(groups, backend=backend, **kw)


def params_on(shapes=SMALL, seed=0, dtype=torch.float32):
    return [torch.nn.Parameter(p.detach().to(DEVICE)) for p in make_params(shapes, dtype, seed)]


def two_groups(name, params):
    """The first half with the defaults, the rest with half the lr."""
    half = len(params) // 2
    return [dict(params=params[:half]),
            dict(params=params[half:], lr=KWARGS[name]["lr"] * GROUP1["lr_factor"])]


def set_grads(sides, step, bad=None, skip=()):
    """The same fresh grads on every side; ``bad``: (param index, flat index, value); params at
    ``skip`` get none."""
    grads = [g.to(DEVICE) for g in make_grads(sides[0], step)]
    if bad is not None:
        grads[bad[0]].view(-1)[bad[1]] = bad[2]
    for params in sides:
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if i in skip else g.to(p.dtype).clone()


def snapshot(opt):
    return {(i, k): v.clone() for i, s in enumerate(opt.state.values()) for k, v in s.items()}


def assert_unchanged(params, before_params, opt, before_state):
    """Params and every state tensor (step counters and NAdam's mu_product included) as before."""
    for p, b in zip(params, before_params):
        assert torch.equal(p, b)
    after = snapshot(opt)
    assert after.keys() == before_state.keys()
    for k, v in before_state.items():
        assert torch.equal(after[k], v), k


def assert_params_close(ref_p, our_p):
    for r, o in zip(ref_p, our_p):
        assert_close(o.detach().cpu(), r.detach().cpu())


def assert_same_state(ours_opt, ref_opt, exact=False):
    """Same state entries (param index, key), shapes and dtypes; values close, or bit for bit."""
    got, want = tensors_of_state(ours_opt), tensors_of_state(ref_opt)
    assert got.keys() == want.keys()
    for k, w in want.items():
        g = got[k]
        assert (g.shape, g.dtype) == (w.shape, w.dtype), k
        if exact:
            assert torch.equal(g.cpu(), w.cpu()), k
        else:
            assert_close(g.cpu(), w.cpu(), torch.float32)


# -- 1. state_dict ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_layout_is_torch_optims(name, backend):
    """After 3 clipped steps (one param never has a grad): torch.optim's param_groups, the same
    state entries (Adagrad's for the grad-less param too: torch makes them at construction) with
    the same shapes and dtypes; every tensor on the param's device (torch keeps 'step' and NAdam's
    'mu_product' on the CPU unless fused or capturable; they load either way)."""
    ref_p = params_on()
    our_p = clone_params(ref_p)
    ref = reference(name, two_groups(name, ref_p), **KWARGS[name])
    opt = ours(name, two_groups(name, our_p), backend, **KWARGS[name], max_grad_norm=1.0)
    for step in range(3):
        set_grads([ref_p, our_p], step, skip=(4,))
        ref_step(ref, ref_p, max_grad_norm=1.0)
        opt.step()
    r, o = ref.state_dict(), opt.state_dict()
    o["param_groups"] = torch_groups(o["param_groups"], max_grad_norm=1.0)
    if name == "Lion":  # lion-pytorch's options, and fusedopt's maximize, differentiable
        assert [{k: g[k] for k in rg} for g, rg in zip(o["param_groups"], r["param_groups"])] \
            == r["param_groups"]
        assert all(not g["maximize"] and not g["differentiable"] for g in o["param_groups"])
    else:
        assert o["param_groups"] == r["param_groups"]
    assert o["state"].keys() == r["state"].keys()
    flat = [p for g in opt.param_groups for p in g["params"]]
    for i, rs in r["state"].items():
        assert o["state"][i].keys() == rs.keys(), (i, name)
        for key, rv in rs.items():
            ov = o["state"][i][key]
            assert (ov.shape, ov.dtype, ov.device) == (rv.shape, rv.dtype, flat[i].device), (i, key)
            assert_close(ov.cpu(), rv.cpu())
    assert_params_close(ref_p, our_p)


SIDES = ["torch.optim", "torch", "triton"]  # "torch.optim": LionReference for Lion


def build(name, side, params):
    groups = two_groups(name, params)
    if side == "torch.optim":
        return reference(name, groups, **KWARGS[name])
    return ours(name, groups, side, **KWARGS[name], max_grad_norm=1.0)


def train(opt, params, steps, seed=0):
    for s in range(seed, seed + steps):
        set_grads([params], s)
        if isinstance(opt, ClippedStep):
            opt.step()
        else:
            ref_step(opt, params, max_grad_norm=1.0)


def checkpoint(opt) -> bytes:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


def load(blob):
    return torch.load(io.BytesIO(blob))


@pytest.mark.parametrize("first", SIDES)
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_moves_between_torch_optim_and_both_backends(name, first):
    """3 clipped steps on ``first``, its checkpoint (torch.save / torch.load) loaded by each of
    torch.optim, the torch backend and the Triton backend, 4 more steps on all (RAdam rectifies
    on the 6th): each resumed run follows ``first``'s uninterrupted one.

    Loaded state is the checkpoint bit for bit. The resumed run is bit for bit the uninterrupted
    one when both sides are the same implementation (each backend is deterministic: a fixed
    reduction order, no atomics), and to fp32 rounding (conftest.TOL) across implementations:
    the torch path divides the grads by the clip's reciprocal where the kernels multiply by the
    coefficient, the norms add in other orders, and torch.optim runs its own op order."""
    params = params_on()
    a = build(name, first, params)
    train(a, params, 3)
    blob = checkpoint(a)
    resumed = []
    for second in SIDES:
        params_b = clone_params(params)
        b = build(name, second, params_b)
        b.load_state_dict(load(blob))
        saved = load(blob)["state"]
        loaded = tensors_of_state(b)
        assert loaded.keys() == {(i, k) for i, st in saved.items() for k in st}
        for (i, k), v in loaded.items():
            assert v.dtype == saved[i][k].dtype and torch.equal(v.cpu(), saved[i][k].cpu()), (i, k)
        resumed.append((second, b, params_b))
    train(a, params, 4, seed=3)
    for second, b, params_b in resumed:
        train(b, params_b, 4, seed=3)
        if second == first:
            for x, y in zip(params, params_b):
                assert torch.equal(y, x), second
            assert_same_state(b, a, exact=True)
        else:
            assert_params_close(params, params_b)
            assert_same_state(b, a)
        if second != "torch.optim":
            for p in params_b:  # fp32 counters back on the param's device
                for key in ("step", "mu_product"):
                    if key in b.state[p]:
                        t = b.state[p][key]
                        assert (t.dtype, t.device) == (torch.float32, p.device), key


# -- 2. GradScaler ---------------------------------------------------------------------------------

SCALERS = {"torch": torch.amp.GradScaler, "fusedopt": fusedopt.GradScaler}
BAD_STEPS = {1: math.inf, 3: math.nan}  # step -> what one element of one gradient becomes


def coefficients(params, step):
    coefs = [c.to(DEVICE) for c in make_grads(params, step)]
    if step in BAD_STEPS:
        coefs[4].view(-1)[17] = BAD_STEPS[step]  # one element of the (300,) tensor
    return coefs


def loss_of(params, coefs):
    return sum((p * c).sum() for p, c in zip(params, coefs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaler", list(SCALERS))
@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_skips_overflow_and_matches_the_recipe(name, scaler, backend):
    """fp16-style overflow (inf, then NaN) in one scaled grad: the step is skipped entirely
    (params, every state tensor: step counters, NAdam's mu_product), and every step after it
    equals scaler.unscale_ + clip_grad_norm_ + scaler.step(torch.optim) + update, scale included."""
    ref_p = params_on()
    our_p = clone_params(ref_p)
    ref = reference(name, ref_p, **KWARGS[name])
    opt = ours(name, our_p, backend, **KWARGS[name], max_grad_norm=1.0)
    ref_scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 12, growth_interval=2)
    our_scaler = SCALERS[scaler](DEVICE, init_scale=2.0 ** 12, growth_interval=2)
    for step in range(5):
        coefs = coefficients(ref_p, step)
        ref.zero_grad()
        ref_scaler.scale(loss_of(ref_p, coefs)).backward()
        ref_scaler.unscale_(ref)
        torch.nn.utils.clip_grad_norm_(ref_p, 1.0)
        ref_scaler.step(ref)
        ref_scaler.update()

        opt.zero_grad()
        our_scaler.scale(loss_of(our_p, coefs)).backward()
        before, before_state = [p.detach().clone() for p in our_p], snapshot(opt)
        our_scaler.step(opt)
        our_scaler.update()

        assert our_scaler.get_scale() == ref_scaler.get_scale(), step
        assert float(opt.step_skipped) == float(step in BAD_STEPS)
        if step in BAD_STEPS:
            assert_unchanged(our_p, before, opt, before_state)
        assert_params_close(ref_p, our_p)
    assert_same_state(opt, ref)
    if name != "Lion":
        assert all(float(s["step"]) == 3.0 for s in opt.state.values())


# -- 3. nonfinite="skip" / "raise" with value clip and the inf norm --------------------------------

CLIP = dict(max_grad_value=0.5, max_grad_norm=0.3, norm_type=math.inf)


def ref_clipped_step(ref, params):
    ref_step(ref, params, **CLIP)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_skip(name, backend):
    """An inf grad on the very first step and on step 2: nothing changes (a first step leaves
    fresh state: counters 0, mu_product 1), and the run equals torch.optim + clip_grad_value_ +
    clip_grad_norm_(inf) that never saw those steps."""
    ref_p = params_on()
    our_p = clone_params(ref_p)
    ref = reference(name, ref_p, **KWARGS[name])
    opt = ours(name, our_p, backend, **KWARGS[name], **CLIP, nonfinite="skip")
    for step in range(4):
        bad = (4, 17, math.inf) if step in (0, 2) else None
        set_grads([ref_p, our_p], step, bad=bad)
        before, before_state = [p.detach().clone() for p in our_p], snapshot(opt)
        opt.step()
        assert float(opt.step_skipped) == float(bad is not None)
        if bad is None:
            ref_clipped_step(ref, ref_p)
        elif step == 0:
            assert all(torch.equal(p, b) for p, b in zip(our_p, before))
            for s in opt.state.values():
                assert float(s.get("step", 0.0)) == 0.0 and float(s.get("mu_product", 1.0)) == 1.0
        else:
            assert_unchanged(our_p, before, opt, before_state)
        assert_params_close(ref_p, our_p)
    assert_same_state(opt, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_raise(name, backend):
    """FloatingPointError naming the tensor, nothing changed, then training goes on as the
    recipe that saw only the good steps."""
    ref_p = params_on()
    our_p = clone_params(ref_p)
    ref = reference(name, ref_p, **KWARGS[name])
    opt = ours(name, our_p, backend, **KWARGS[name], **CLIP, nonfinite="raise")
    set_grads([ref_p, our_p], 0)
    ref_clipped_step(ref, ref_p)
    opt.step()
    set_grads([ref_p, our_p], 1, bad=(3, 15, math.inf))  # param 3 is (13, 7): [2, 1]
    before, before_state = [p.detach().clone() for p in our_p], snapshot(opt)
    with pytest.raises(FloatingPointError, match=r"inf in group 0, parameter 3, shape \(13, 7\)"):
        opt.step()
    assert float(opt.step_skipped) == 1.0
    assert_unchanged(our_p, before, opt, before_state)
    for p in ref_p + our_p:
        if p.shape == (13, 7):
            p.grad[2, 1] = 0.0
    ref_clipped_step(ref, ref_p)
    opt.step()
    assert float(opt.step_skipped) == 0.0
    assert_params_close(ref_p, our_p)
    assert_same_state(opt, ref)


# -- 4. launches per step --------------------------------------------------------------------------

MANY = [(33,)] * 5 + [(), (300,)]  # many tensors, still one launch of each kind


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("name", NAMES)
def test_launches_per_step(name, clip, launches):
    """Per step, one param group, one dtype: 1 norm pass + 1 update, whatever the tensor count.
    Without a clip the norm pass still runs where there is a step counter (it advances them):
    Lion, with none, launches only its update. Two dtypes: each launch once per dtype. Two
    param groups: one norm pass per dtype, one update per (group, dtype)."""
    kw = dict(KWARGS[name], max_grad_norm=1.0) if clip else KWARGS[name]
    norms = int(clip or name != "Lion")
    cases = {
        "fp32": ([params_on(MANY)], 1),
        "fp32+bf16": ([params_on(MANY) + params_on(MANY, seed=1, dtype=torch.bfloat16)], 2),
        "two groups": ([params_on(MANY[:4]), params_on(MANY[4:], seed=1)], 1),
    }
    for case, (groups, dtypes) in cases.items():
        params = [p for g in groups for p in g]
        opt = ours(name, [dict(params=g) for g in groups], "triton", **kw)
        for step in range(3):  # state made, plan made, plan reused
            set_grads([params], step)
            launches.clear()
            opt.step()
            expected = {"_update_kernel": dtypes * len(groups)}
            if norms:
                expected["_norm_kernel"] = dtypes * norms
            assert launches == expected, (case, step)


# -- 5. no host read in a step ---------------------------------------------------------------------

@pytest.mark.parametrize("case", ["skip", "fusedopt-scaler"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_step_reads_nothing_on_the_host(name, backend, case, monkeypatch):
    """After a first step, steps with a Tensor lr moved by a scheduler, value + norm clipping and
    an inf grad that nonfinite='skip' or fusedopt.GradScaler skips read no tensor value on the
    host (test_capture.NoHostReads; kernel launches exempt, as there). 'skip' also runs the torch
    recipe with a float lr under the same scheduler: equal results."""
    mode = NoHostReads()
    wrap_kernels(monkeypatch, {}, around=mode.allow)
    ref_p = params_on()
    our_p = clone_params(ref_p)
    kw = dict(KWARGS[name], lr=torch.tensor(KWARGS[name]["lr"], device=DEVICE))
    policy = dict(nonfinite="skip") if case == "skip" else {}
    opt = ours(name, our_p, backend, **kw, max_grad_norm=1.0, max_grad_value=0.5, **policy)
    ref = reference(name, ref_p, **KWARGS[name]) if case == "skip" else None
    scheds = [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=4)
              for o in (opt, ref) if o is not None]
    scaler = fusedopt.GradScaler(DEVICE, init_scale=1024.0) if case != "skip" else None
    for step in range(4):
        coefs = [c.to(DEVICE) for c in make_grads(ref_p, step)]
        if step == 1:
            coefs[4].view(-1)[17] = math.inf
        opt.zero_grad()
        loss = loss_of(our_p, coefs)
        (scaler.scale(loss) if scaler else loss).backward()
        before = [p.detach().clone() for p in our_p]
        with mode if step else contextlib.nullcontext():
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        assert float(opt.step_skipped) == float(step == 1)
        if step == 1:
            assert all(torch.equal(p, b) for p, b in zip(our_p, before))
        elif case == "skip":
            ref.zero_grad()
            loss_of(ref_p, coefs).backward()
            ref_step(ref, ref_p, max_grad_norm=1.0, max_grad_value=0.5)
            assert_params_close(ref_p, our_p)
        for s in scheds:
            s.step()
    assert all(torch.isfinite(p).all() for p in our_p)



# -- 6. hyperparameters moved between steps --------------------------------------------------------

# What a scheduler may move, per class: the first change goes to group 0 on step 2, the second to
# group 1 on step 4. Momentum stays non-zero and centered stays on: switching those changes the
# state a group keeps (a flag), which is a different kernel by design.
CHANGES = {
    "Adagrad": [dict(lr_decay=0.05, eps=1e-3), dict(weight_decay=0.1, lr=0.05)],
    "RMSprop": [dict(alpha=0.8, eps=1e-3), dict(weight_decay=0.1, momentum=0.5)],
    "NAdam": [dict(betas=(0.8, 0.99), eps=1e-3), dict(weight_decay=0.1, momentum_decay=0.02)],
    "RAdam": [dict(betas=(0.8, 0.95), eps=1e-3), dict(weight_decay=0.1, lr=0.002)],
    "Adamax": [dict(betas=(0.8, 0.99), eps=1e-3), dict(weight_decay=0.1)],
    "Lion": [dict(betas=(0.8, 0.9)), dict(weight_decay=0.5, lr=5e-4)],
}
CHANGE_AT = {2: 0, 4: 1}  # step -> which change (and which param group it goes to)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


class UpdateLaunches:
    """Wraps kernels/update.py's ``_update_kernel``: records, per launch, what selects a compiled
    variant (its tl.constexpr arguments, all UPPER_CASE, and the launch options) and a copy of the
    float64 hyperparameter buffer it reads (``hyper_ptr``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []
        self.hyper_arg = kernel.arg_names.index("hyper_ptr")

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            compiled_as = {k: v for k, v in kwargs.items() if k.isupper() or k in LAUNCH_OPTIONS}
            self.launches.append((compiled_as, args[self.hyper_arg].clone()))
            return launch(*args, **kwargs)
        return run


def compiled_variants(kernel):
    """How many variants the kernel has compiled (a GPU's cache), None under the interpreter,
    which compiles nothing."""
    caches = getattr(kernel, "device_caches", None)
    return None if caches is None else sum(len(c[0]) for c in caches.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_moved_between_steps(name, backend, monkeypatch):
    """Changing betas / eps / weight_decay / alpha / momentum / lr_decay / momentum_decay in a
    param group between steps, as a scheduler does, gives torch.optim's results with the same
    change. On the Triton backend it reaches the kernel through the group's float64 buffer (the
    buffer each launch reads is the group's ``_hyper`` after the change, and changes exactly at
    the change), no tl.constexpr or launch option moves (so nothing recompiles: on a GPU the
    compiled-variant count is checked too), and the step plan is kept."""
    import fusedopt.kernels.update as update
    from fusedopt._elementwise import N_HYPER
    kernel = update._update_kernel
    recorder = UpdateLaunches(kernel)
    monkeypatch.setattr(update, "_update_kernel", recorder)
    ref_p = params_on()
    our_p = clone_params(ref_p)
    ref = reference(name, two_groups(name, ref_p), **KWARGS[name])
    opt = ours(name, two_groups(name, our_p), backend, **KWARGS[name], max_grad_norm=1.0)
    previous = plan = variants = first = None
    for step in range(7):
        changed = CHANGE_AT.get(step)
        if changed is not None:
            for o in (ref, opt):
                o.param_groups[changed].update(CHANGES[name][changed])
        set_grads([ref_p, our_p], step)
        recorder.launches.clear()
        ref_step(ref, ref_p, max_grad_norm=1.0)
        opt.step()
        assert_params_close(ref_p, our_p)
        if backend == "torch":
            continue
        assert len(recorder.launches) == 2  # one per param group
        compiled_as, hypers = zip(*recorder.launches)
        first = first or compiled_as
        assert compiled_as == first, step
        for gi, (group, hyper) in enumerate(zip(opt.param_groups, hypers)):
            host = [float(v) for v in opt._hyper(group)]
            assert hyper.dtype == torch.float64
            assert hyper.tolist() == host + [0.0] * (N_HYPER - len(host)), (step, gi)
            if previous is not None:
                assert torch.equal(hyper, previous[gi]) == (gi != changed), (step, gi)
        previous = hypers
        if step == 1:  # step 0 made the state (a plan for that step only); step 1's plan lasts
            plan, variants = opt._step_plan, compiled_variants(kernel)
            assert plan is not None
        elif step > 1:
            assert opt._step_plan is plan, step
    if backend == "triton":
        assert compiled_variants(kernel) == variants
    assert_same_state(opt, ref)


# -- 7. param groups, missing grads, 0-dim params, zero_grad(set_to_none=False) --------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_param_groups_missing_grads_and_zero_grad_as_torch(name, backend):
    """A 0-dim param; param 2 without a grad on steps 1-2 and param 5 never with one; a group added
    by add_param_group on step 3 (its own lr and weight_decay, a 0-dim param in it); on step 4
    zero_grad(set_to_none=False) and a step on the zeroed grads (weight decay and momentum still
    move params; grad_norm 0). Params equal torch.optim's every step, state at the end (no state
    for param 5, except Adagrad's, which torch makes at construction)."""
    ref_p = params_on()
    our_p = clone_params(ref_p)
    ref = reference(name, ref_p, **KWARGS[name])
    opt = ours(name, our_p, backend, **KWARGS[name], max_grad_norm=1.0)
    extra = params_on([(9,), ()], seed=5)
    added = dict(lr=KWARGS[name]["lr"] * 2, weight_decay=0.05)
    for step in range(6):
        if step == 3:
            ref.add_param_group(dict(params=extra, **added))
            opt.add_param_group(dict(params=clone_params(extra), **added))
            ref_p = ref_p + extra
            our_p = our_p + opt.param_groups[1]["params"]
        if step == 4:
            for o in (ref, opt):
                o.zero_grad(set_to_none=False)
            assert all(p.grad is not None and not p.grad.any() for p in our_p if p is not our_p[5])
        else:
            set_grads([ref_p, our_p], step, skip={5} | ({2} if step in (1, 2) else set()))
        ref_step(ref, ref_p, max_grad_norm=1.0)
        opt.step()
        assert_params_close(ref_p, our_p)
        if step == 4:
            assert float(opt.grad_norm) == 0.0
    assert our_p[5].grad is None
    assert (our_p[5] in opt.state) == (name == "Adagrad")
    assert_same_state(opt, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adagrad_group_added_later_starts_its_sum_as_torch(backend):
    """torch.optim.Adagrad makes every state at construction from the constructor's
    initial_accumulator_value (a group's own value is ignored there), and a param added later on
    its first step from ``self.defaults`` (torch/optim/adagrad.py, ``_init_group``), again not
    the group's. A drop-in starts it the same way."""
    params = params_on([(5,), (7,), (3,)])
    ref_p, our_p = clone_params(params), clone_params(params)
    ref = torch.optim.Adagrad([dict(params=ref_p[:1]),
                               dict(params=ref_p[1:2], initial_accumulator_value=0.5)],
                              lr=0.1, initial_accumulator_value=0.1)
    opt = fusedopt.Adagrad([dict(params=our_p[:1]),
                            dict(params=our_p[1:2], initial_accumulator_value=0.5)],
                           lr=0.1, initial_accumulator_value=0.1, backend=backend)
    ref.add_param_group(dict(params=ref_p[2:], initial_accumulator_value=0.5))
    opt.add_param_group(dict(params=our_p[2:], initial_accumulator_value=0.5))
    for step in range(2):
        set_grads([ref_p, our_p], step)
        ref.step()
        opt.step()
        assert_params_close(ref_p, our_p)
    assert_same_state(opt, ref)
