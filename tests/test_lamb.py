"""fusedopt.LAMB against NVIDIA Apex's FusedLAMB, written out below in float64 (ApexLAMB).

1. The torch path against ApexLAMB in fp32 and fp64: every option, clipping on and off, two
   param groups (the second without weight decay: no trust ratio unless use_nvlamb), a param of
   zeros (||p|| = 0), one whose grads are all zero (||u|| = 0 without decay), a grad laid out
   unlike its param and a param missing its grad on some steps.
2. bf16 and fp16: off the float64 reference by at most twice what Apex's own arithmetic in that
   dtype (ApexLAMB with fp32 math and storage in the dtype) is off (conftest.low_precision_bound).
3. The clip is clip_grad_norm_'s, not Apex's pre-normalisation (the class docstring says how
   they differ); skips (GradScaler, nonfinite) change nothing; Tensor lr; no host read in step;
   state_dict round trip (and an Apex state_dict); constructor errors; backend='triton' refused.
"""
import io
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedopt
from conftest import DEVICE, assert_close, low_precision_bound
from fusedopt.optim.lamb import LAMB
from recipe import STEPS, make_params
from test_capture import NoHostReads

T = torch.tensor

DEFAULTS = dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                adam_w_mode=True, grad_averaging=True, use_nvlamb=False)


class ApexLAMB:
    """Apex's FusedLAMB, one tensor at a time: FusedLAMB.step (apex/optimizers/fused_lamb.py)
    and multi_tensor_lamb_cuda with LAMBStage1Functor / LAMBStage2Functor
    (csrc/multi_tensor_lamb.cu). Math in ``compute``; p, m, v and the update u are rounded to
    ``store`` where Apex stores them (its T: u goes into the grad's buffer).

    fusedopt's conventions where they differ (the class docstring lists them): the clip is
    clip_grad_norm_'s unless ``apex_clip`` (Apex: g / max(1, norm / max_grad_norm)); the step
    count is per param, so a param without a grad keeps its count; norm_type and max_grad_value
    as ClippedStep applies them.
    """

    def __init__(self, params, groups, max_grad_norm=None, norm_type=2.0, max_grad_value=None,
                 apex_clip=False, compute=torch.float64, store=torch.float64):
        self.round = lambda x: x.to(store).to(compute)
        self.compute = compute
        self.p = [self.round(p.detach().to(compute)).clone().cpu() for p in params]
        self.m = [torch.zeros_like(p) for p in self.p]
        self.v = [torch.zeros_like(p) for p in self.p]
        self.t = [0] * len(self.p)
        self.groups = [(idx, {**DEFAULTS, **opts}) for idx, opts in groups]
        self.max_grad_norm, self.norm_type = max_grad_norm, norm_type
        self.max_grad_value, self.apex_clip = max_grad_value, apex_clip
        self.grad_norm = None

    def load(self, params, opt):
        """Take fusedopt's state (the same state for a one-step comparison)."""
        for i, p in enumerate(params):
            st = opt.state[p]
            self.p[i] = p.detach().cpu().to(self.compute)
            if st:
                self.m[i] = st["exp_avg"].cpu().to(self.compute)
                self.v[i] = st["exp_avg_sq"].cpu().to(self.compute)
                self.t[i] = int(st["step"])

    def step(self, grads, norm=None):
        """``norm``: the total norm to clip by, when given (else taken here, in float64)."""
        g = {i: x.to(self.compute) for i, x in enumerate(grads) if x is not None}
        if self.max_grad_value is not None:
            g = {i: x.clamp(-self.max_grad_value, self.max_grad_value) for i, x in g.items()}
        if self.max_grad_norm is not None:
            if norm is None:
                norms = torch.stack([x.double().norm(self.norm_type) for x in g.values()])
                norm = norms.norm(self.norm_type)
            self.grad_norm = norm
            if self.apex_clip:  # clipped_global_grad_norm, then scaled_grad = g / it
                divisor = norm / self.max_grad_norm if norm > self.max_grad_norm else 1.0
                g = {i: x / divisor for i, x in g.items()}
            else:  # clip_grad_norm_
                coef = min(1.0, self.max_grad_norm / (float(norm) + 1e-6))
                g = {i: x * coef for i, x in g.items()}
        for idx, o in self.groups:
            lr, wd, eps = float(o["lr"]), o["weight_decay"], o["eps"]
            beta1, beta2 = o["betas"]
            beta3 = 1 - beta1 if o["grad_averaging"] else 1.0
            for i in idx:
                if i not in g:
                    continue
                self.t[i] += 1
                t, p, gi = self.t[i], self.p[i], g[i]
                bc1 = 1 - beta1 ** t if o["bias_correction"] else 1.0
                bc2 = 1 - beta2 ** t if o["bias_correction"] else 1.0
                decay_p = wd * p if wd != 0 else torch.zeros_like(p)  # Apex: r_p = 0 if decay == 0
                if not o["adam_w_mode"]:  # MOMENT_MODE_0: L2 on the scaled grad
                    gi = gi + decay_p
                m = self.m[i] * beta1 + beta3 * gi
                v = self.v[i] * beta2 + (1 - beta2) * gi * gi
                u = (m / bc1) / (torch.sqrt(v / bc2) + eps)
                if o["adam_w_mode"]:
                    u = u + decay_p
                u = self.round(u)
                ratio = lr
                if o["use_nvlamb"] or wd != 0:
                    p_norm, u_norm = float(p.double().norm()), float(u.double().norm())
                    if p_norm != 0 and u_norm != 0:
                        ratio = lr * (p_norm / u_norm)
                self.p[i] = self.round(p - ratio * u)
                self.m[i], self.v[i] = self.round(m), self.round(v)


# shapes: the usual odd sizes, then a param of zeros and one whose grads are all zero
SHAPES = [(), (1,), (127,), (13, 7), (4097,), (3, 5, 2), (5, 4), (6,)]
ZERO_PARAM, ZERO_GRAD, TRANSPOSED, MISSING = 6, 7, 3, 2
MISSING_STEPS = (1, 4)

CONFIGS = {
    "default": dict(lr=0.01),
    "no-bias-correction": dict(lr=0.01, bias_correction=False),
    "l2": dict(lr=0.01, adam_w_mode=False, weight_decay=0.1),
    "no-grad-averaging": dict(lr=0.01, grad_averaging=False),
    "wd0": dict(lr=0.01, weight_decay=0.0),
    "nvlamb-wd0": dict(lr=0.01, weight_decay=0.0, use_nvlamb=True),
    "betas-eps": dict(lr=0.01, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.05),
    "all-off": dict(lr=0.01, bias_correction=False, adam_w_mode=False, grad_averaging=False,
                    use_nvlamb=True, weight_decay=0.1),
    "tensor-lr": dict(lr=T(0.01), weight_decay=0.1),
}
# the second group: other hyperparameters and no weight decay
GROUP1 = dict(lr=0.005, betas=(0.85, 0.99), eps=1e-5, weight_decay=0.0)
# gradients ~N(0, 1) over ~4.6K elements: L2 norm ~68, inf norm ~4
CLIPS = {
    "noclip": {},
    "l2-active": dict(max_grad_norm=0.5),
    "l2-inactive": dict(max_grad_norm=1e4),
    "inf-active": dict(max_grad_norm=0.3, norm_type=math.inf),
    "value+l2": dict(max_grad_value=0.2, max_grad_norm=0.5),
}


def make_set(dtype, seed=0):
    params = make_params(SHAPES, dtype, seed)
    with torch.no_grad():
        params[ZERO_PARAM].zero_()
    return params


def grads_at(params, step, scale=1.0):
    """Step ``step``'s gradients (None where missing), the same for every dtype."""
    g = torch.Generator().manual_seed(1000 + step)
    out = [torch.randn(p.shape, generator=g, dtype=torch.float64).mul(scale).to(p.dtype)
           for p in params]
    out[ZERO_GRAD].zero_()
    out[TRANSPOSED] = out[TRANSPOSED].t().contiguous().t()  # strides unlike its param's
    if step in MISSING_STEPS:
        out[MISSING] = None
    return out


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone().to(p.device)


def groups_of(params, config, group1=GROUP1):
    half = len(params) // 2
    opts = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in config.items()}
    return [dict(params=params[:half], **opts), dict(params=params[half:], **{**opts, **group1})]


def ref_groups(n, config, group1=GROUP1):
    half = n // 2
    return [(range(half), config), (range(half, n), {**config, **group1})]


def ours_and_ref(dtype, config, clip, **ref_kw):
    params = [torch.nn.Parameter(p.to(DEVICE)) for p in make_set(dtype)]
    opt = LAMB(groups_of(params, config), **clip)
    ref_clip = {k: v for k, v in clip.items() if k != "nonfinite"}  # skipped steps: not given
    ref = ApexLAMB(params, ref_groups(len(params), config), **ref_clip, **ref_kw)
    return params, opt, ref


def assert_matches(params, opt, ref, dtype):
    for i, p in enumerate(params):
        st = opt.state[p]
        assert_close(p.detach().cpu(), ref.p[i].to(dtype), dtype)
        assert_close(st["exp_avg"].cpu(), ref.m[i].to(dtype), dtype)
        assert_close(st["exp_avg_sq"].cpu(), ref.v[i].to(dtype), dtype)
        assert st["step"].dtype == torch.float32 and st["step"].device == p.device
        assert float(st["step"]) == ref.t[i]


# fp32: every config with every clip; fp64 (the tight check of the math, and the clip as a
# multiply: fusedopt/clip.ClipScale): every config, without clip and with both clips
MATRIX = [(c, k, "fp32") for c in CONFIGS for k in CLIPS] + \
    [(c, k, "fp64") for c in CONFIGS for k in ("noclip", "value+l2")]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


@pytest.mark.parametrize("config, clip, dtype", MATRIX)
def test_torch_path_matches_apex(config, clip, dtype):
    dtype = DTYPES[dtype]
    params, opt, ref = ours_and_ref(dtype, CONFIGS[config], CLIPS[clip])
    for step in range(STEPS):
        grads = grads_at(params, step)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
        if ref.grad_norm is not None:
            assert_close(opt.grad_norm.cpu(), ref.grad_norm.to(opt.grad_norm.dtype))
    assert_matches(params, opt, ref, dtype)
    assert torch.isfinite(torch.cat([p.detach().reshape(-1) for p in params])).all()
    assert float(params[ZERO_PARAM].detach().abs().max()) > 0  # ratio 1 at ||p|| = 0, then moved


def test_reference_first_step():
    """ApexLAMB's first bias-corrected step by hand: m_hat = g, v_hat = g^2, so
    u = g / (|g| + eps) + wd * p and p -= lr * ||p|| / ||u|| * u."""
    p, g = T([3.0, -4.0], dtype=torch.float64), T([0.5, 2.0], dtype=torch.float64)
    ref = ApexLAMB([p], [([0], dict(lr=0.1, weight_decay=0.1))])
    ref.step([g])
    u = g / (g.abs() + 1e-6) + 0.1 * p
    assert_close(ref.p[0], p - 0.1 * (p.norm() / u.norm()) * u)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("clip", ["noclip", "l2-active"])
@pytest.mark.parametrize("config", ["default", "l2", "nvlamb-wd0"])
def test_low_precision_within_apex_own_error(config, clip, dtype):
    """State in the params' dtype, math in fp32. Each of 7 steps, from the same state: no
    further from the float64 reference than twice Apex's own arithmetic in that dtype (fp32
    math, p, m, v and u stored in it), plus half an ulp. All three clip by fusedopt's norm:
    clip_grad_norm_'s, which rounds a bf16 grad's norm to bf16 (fusedopt/clip.py) where Apex
    sums in fp32; that is the clip's contract, tested with it, not LAMB's arithmetic."""
    params, opt, oracle = ours_and_ref(dtype, CONFIGS[config], CLIPS[clip])
    apex = ApexLAMB(params, ref_groups(len(params), CONFIGS[config]), **CLIPS[clip],
                    compute=torch.float32, store=dtype)
    for step in range(STEPS):
        grads = grads_at(params, step)
        set_grads(params, grads)
        oracle.load(params, opt)
        apex.load(params, opt)
        opt.step()
        norm = None if opt.grad_norm is None else opt.grad_norm.double()
        oracle.step(grads, norm)
        apex.step(grads, norm)
        for i, p in enumerate(params):
            st = opt.state[p]
            for name, ours, in_dtype, exact in (
                    ("p", p.detach(), apex.p[i], oracle.p[i]),
                    ("exp_avg", st["exp_avg"], apex.m[i], oracle.m[i]),
                    ("exp_avg_sq", st["exp_avg_sq"], apex.v[i], oracle.v[i])):
                assert ours.dtype == dtype
                err = float((ours.cpu().double() - exact).abs().max())
                err_apex = float((in_dtype.double() - exact).abs().max())
                assert err <= low_precision_bound(err_apex, exact, dtype), \
                    (step, i, name, err, err_apex)


def test_clip_is_clip_grad_norm_not_apex():
    """The clip multiplies by min(1, n / (norm + 1e-6)) (clip_grad_norm_, left in .grad), not
    Apex's 1 / max(1, norm / n). Told apart where 1e-6 is not small against the norm (grads
    ~1e-7, norm ~7e-6, n = 1e-6: 0.127 against 0.147); at ordinary norms they agree to 1e-6."""
    dtype = torch.float64
    params = [torch.nn.Parameter(p) for p in make_set(dtype)]
    opt = LAMB(params, lr=0.01, max_grad_norm=1e-6)
    ours_ref = ApexLAMB(params, [(range(len(params)), dict(lr=0.01))], max_grad_norm=1e-6)
    apex_ref = ApexLAMB(params, [(range(len(params)), dict(lr=0.01))], max_grad_norm=1e-6,
                        apex_clip=True)
    for step in range(3):
        grads = grads_at(params, step, scale=1e-7)
        set_grads(params, grads)
        opt.step()
        ours_ref.step(grads)
        apex_ref.step(grads)
        norm = float(opt.grad_norm)
        for p, g in zip(params, grads):
            if g is not None:
                assert_close(p.grad, g * (1e-6 / (norm + 1e-6)))
    for i, p in enumerate(params):
        assert_close(p.detach(), ours_ref.p[i])
    assert max(float((ours_ref.m[i] - apex_ref.m[i]).abs().max()) for i in range(len(params))) \
        > 1e-9  # the two clips really differ here
    # ordinary norms (~68 against 0.5): Apex's clip gives the same step to 1e-6 relative
    params, opt, apex = ours_and_ref(dtype, CONFIGS["default"], CLIPS["l2-active"],
                                     apex_clip=True)
    for step in range(STEPS):
        grads = grads_at(params, step)
        set_grads(params, grads)
        opt.step()
        apex.step(grads)
    for i, p in enumerate(params):
        assert_close(p.detach(), apex.p[i], rtol=1e-6, atol=1e-9)


def snapshot(params, opt):
    return [p.detach().clone() for p in params], \
        {(i, k): v.clone() for i, p in enumerate(params) for k, v in opt.state[p].items()}


def assert_unchanged(params, opt, before):
    assert all(torch.equal(p.detach(), old) for p, old in zip(params, before[0]))
    now = {(i, k): v for i, p in enumerate(params) for k, v in opt.state[p].items()}
    assert now.keys() == before[1].keys()
    assert all(torch.equal(now[k], v) for k, v in before[1].items())


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fusedopt.GradScaler],
                         ids=["torch-scaler", "fusedopt-scaler"])
def test_grad_scaler_skip_changes_nothing(scaler_cls):
    """Under a GradScaler the step divides by the scale; an overflow step leaves params, state
    and counters as they were; the run equals the reference without that step."""
    params, opt, ref = ours_and_ref(torch.float32, CONFIGS["default"], CLIPS["l2-active"])
    scaler = scaler_cls(DEVICE, init_scale=2.0 ** 10)
    for step in range(5):
        grads = grads_at(params, step)
        coefs = [None if g is None else g.to(DEVICE) for g in grads]
        if step == 2:
            coefs[4] = coefs[4].clone()
            coefs[4][7] = math.inf
        opt.zero_grad()
        loss = sum((p * c).sum() for p, c in zip(params, coefs) if c is not None)
        scaler.scale(loss).backward()
        before = snapshot(params, opt)
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert float(opt.step_skipped) == 1.0
            assert_unchanged(params, opt, before)
        else:
            ref.step(grads)
    assert_matches(params, opt, ref, torch.float32)


@pytest.mark.parametrize("config, dtype", [
    ("l2", torch.float32), ("no-grad-averaging", torch.float32), ("all-off", torch.float64),
    ("default", torch.bfloat16)], ids=["l2-fp32", "no-averaging-fp32", "all-off-fp64",
                                        "default-bf16"])
def test_nonfinite_skip_is_exact_and_raise(config, dtype):
    """A skipped step leaves params, state and counters bit for bit (the gradient zeroed, the
    moment weights and step size times 0: fusedopt/optim/lamb.py); the run equals the
    reference without it. 'raise' skips and names the culprit."""
    params, opt, ref = ours_and_ref(dtype, CONFIGS[config], dict(max_grad_norm=0.5,
                                                                 nonfinite="skip"))
    for step in range(4):
        grads = grads_at(params, step)
        if step == 2:
            grads[0] = T(math.nan, dtype=dtype)
            grads[5] = grads[5].clone()
            grads[5][1, 2, 0] = -math.inf
        set_grads(params, grads)
        before = snapshot(params, opt)
        opt.step()
        assert float(opt.step_skipped) == float(step == 2)
        if step == 2:
            assert_unchanged(params, opt, before)
        else:
            ref.step(grads)
    if dtype != torch.bfloat16:
        assert_matches(params, opt, ref, dtype)
    opt.nonfinite = "raise"
    grads = grads_at(params, 5)
    grads[4][0] = math.inf
    set_grads(params, grads)
    before = snapshot(params, opt)
    with pytest.raises(FloatingPointError, match="group 1, parameter 0"):
        opt.step()
    assert_unchanged(params, opt, before)


@pytest.mark.parametrize("scaler_cls", [None, torch.amp.GradScaler, fusedopt.GradScaler],
                         ids=["no-scaler", "torch-scaler", "fusedopt-scaler"])
def test_step_reads_nothing_on_the_host(scaler_cls):
    """Tensor lr moved by a scheduler, clip, an inf grad skipped, fresh grads every step: no
    step reads a value on the host, the first (which makes the state) included; the results
    follow the scheduler's lr."""
    config = dict(lr=T(0.01, device=DEVICE), weight_decay=0.1)
    params, opt, ref = ours_and_ref(torch.float32, config, dict(max_grad_norm=0.5,
                                                                nonfinite="skip"))
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
    scaler = scaler_cls(DEVICE, init_scale=1024.0) if scaler_cls else None
    for step in range(5):
        grads = grads_at(params, step)
        coefs = [None if g is None else g.clone().to(DEVICE) for g in grads]
        if step == 2:
            coefs[1][0] = math.inf
        opt.zero_grad()
        loss = sum((p * c).sum() for p, c in zip(params, coefs) if c is not None)
        (scaler.scale(loss) if scaler else loss).backward()
        lrs = [float(g["lr"]) for g in opt.param_groups]
        with NoHostReads():
            scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        if step != 2:
            for (_, o), lr in zip(ref.groups, lrs):
                o["lr"] = lr
            ref.step(grads)
        sched.step()
    assert_matches(params, opt, ref, torch.float32)


def test_state_dict_round_trip():
    """torch.save/load(weights_only=True) of state_dict() into a fresh LAMB continues the run
    exactly; keys, dtypes and devices as documented."""
    params, opt, _ = ours_and_ref(torch.float32, CONFIGS["tensor-lr"], CLIPS["l2-active"])
    for step in range(3):
        set_grads(params, grads_at(params, step))
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    for i, p in enumerate(params):
        st = sd["state"][i]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
        assert st["step"].shape == () and st["step"].dtype == torch.float32
        assert st["exp_avg"].dtype == p.dtype and st["exp_avg"].shape == p.shape
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = LAMB(groups_of(twins, CONFIGS["tensor-lr"]), **CLIPS["l2-active"])
    other.load_state_dict(sd)
    for step in range(3, STEPS):
        grads = grads_at(params, step)
        set_grads(params, grads)
        set_grads(twins, grads)
        opt.step()
        other.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], other.state[q][k])


def test_apex_state_dict_loads():
    """Apex's layout (no per-param step, an int step per group) loads: each param counts on
    from its group's step."""
    config = dict(lr=0.01)
    params, opt, ref = ours_and_ref(torch.float64, config, {})
    for step in range(2):  # no missing grads here: Apex's group step is every param's
        grads = [g for g in grads_at(params, step + 10)]
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
    sd = opt.state_dict()
    for st in sd["state"].values():
        del st["step"]
    for g in sd["param_groups"]:
        g["step"] = 2
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = LAMB(groups_of(twins, config))
    other.load_state_dict(sd)
    grads = grads_at(params, 20)
    set_grads(twins, grads)
    other.step()
    ref.step(grads)
    assert_matches(twins, other, ref, torch.float64)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    (dict(lr=T([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
    (dict(eps=-1e-6), ValueError, "Invalid epsilon value: -1e-06"),
    (dict(betas=(1.0, 0.999)), ValueError, "beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), ValueError, "beta parameter at index 1: -0.1"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
    (dict(amsgrad=True), NotImplementedError, "amsgrad=True"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be > 0"),
    (dict(norm_type=1.0), ValueError, "norm_type=1.0"),
    (dict(nonfinite="zero"), ValueError, "nonfinite='zero'"),
    (dict(backend="cuda"), ValueError, "backend='cuda'"),
], ids=lambda x: None)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        LAMB([torch.nn.Parameter(torch.ones(3))], **kwargs)
    assert issubclass(NotImplementedError, RuntimeError)  # Apex raises RuntimeError for amsgrad


def test_defaults_are_apex():
    opt = LAMB([torch.nn.Parameter(torch.ones(3))])
    assert {k: opt.defaults[k] for k in DEFAULTS} == DEFAULTS
    assert opt.max_grad_norm is None  # Apex: 1.0; fusedopt's classes clip only when asked


def test_triton_backend_refused_with_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # on CPU: so that the device is no obstacle
    params = [torch.nn.Parameter(torch.ones(3, device=DEVICE))]
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: LAMB's per-tensor "
                                           "trust ratios"):
        LAMB(params, backend="triton")
    opt = LAMB(params, lr=0.1)  # backend None: the torch path, on a GPU too
    params[0].grad = torch.ones(3, device=DEVICE)
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 1.0


def test_sharded_dtensor_refused_replicated_steps():
    """One gloo rank, CPU, in a child process (as tests/test_safety.py): a Replicate DTensor
    steps like the plain tensor; a Shard one is refused, at construction and, when a param
    became one later, at step() before any grad is touched: the trust ratio needs whole norms."""
    script = textwrap.dedent("""
        import torch, torch.distributed as dist
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        from torch.distributed.device_mesh import init_device_mesh
        from fusedopt.optim.lamb import LAMB
        mesh = init_device_mesh("cpu", (1,))
        x, g = torch.randn(4, 3), torch.randn(4, 3)
        plain = torch.nn.Parameter(x.clone())
        rep = torch.nn.Parameter(distribute_tensor(x.clone(), mesh, [Replicate()]))
        opts = [LAMB([q], lr=0.1, max_grad_norm=1.0) for q in (plain, rep)]
        plain.grad, rep.grad = g.clone(), distribute_tensor(g.clone(), mesh, [Replicate()])
        for o in opts:
            o.step()
        assert torch.equal(rep.to_local(), plain.detach()), "replicated"
        shard = lambda t: torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)]))
        try:
            LAMB([shard(x.clone())])
            raise SystemExit("constructor took a Shard DTensor")
        except NotImplementedError as e:
            assert "parameter 0 of the new group" in str(e) and "whole norm" in str(e), e
        opt = LAMB([plain], max_grad_norm=1e-3)
        opt.param_groups[0]["params"][0] = p = shard(x.clone())
        p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        try:
            opt.step()
            raise SystemExit("step took a Shard DTensor")
        except NotImplementedError as e:
            assert "parameter 0 of group 0" in str(e), e
        assert torch.equal(p.grad.to_local(), g), "grad touched"
        dist.destroy_process_group()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
