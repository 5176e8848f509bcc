"""The Triton kernels against fusedopt's torch path (itself proven against torch.optim).

On a GPU they run on CUDA; without one, under TRITON_INTERPRET=1 on CPU tensors (conftest.py),
at sizes the interpreter gets through in CI time. Every run: fresh grads each step (new storage,
as after zero_grad(set_to_none=True)), 7 steps, two param groups, one param missing its grad on
steps 2 and 4 and one never having a grad.
"""
import copy
import math

import pytest
import torch
import triton
import triton.language as tl

import fusedopt
from fusedopt._elementwise import ln
from fusedopt.kernels._common import FP_FUSION, RULES
from conftest import DEVICE, assert_close, low_precision_bound
from recipe import CLIPS, STEPS
from recipe import OUR_CLASSES as CLASSES

T = torch.tensor
SMALL = [(), (1,), (127,), (4097,), (3, 5, 2), (9,)]
ODD = [(), (1,), (127,), (4097,), (65537,)]
CONFIGS = {
    ("SGD", "plain"): dict(lr=0.1),
    ("SGD", "momentum"): dict(lr=0.1, momentum=0.9),
    ("SGD", "ema"): dict(lr=0.1, momentum=0.9, dampening=0.9),
    ("SGD", "nesterov-wd-max"): dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05,
                                     maximize=True),
    ("SGD", "tensor-lr"): dict(lr=T(0.1), momentum=0.5, dampening=0.3),
    ("Adam", "default"): dict(lr=0.01),
    ("Adam", "amsgrad-wd-max"): dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True),
    ("Adam", "tensor-lr-decoupled"): dict(lr=T(0.01), weight_decay=0.1, decoupled_weight_decay=True,
                                          betas=(0.8, 0.99), eps=1e-6),
    ("AdamW", "default"): dict(lr=0.01),
    ("AdamW", "amsgrad-max"): dict(lr=0.01, amsgrad=True, maximize=True, weight_decay=0.1),
}
GROUP1 = {"SGD": dict(lr=0.03, weight_decay=0.01), "Adam": dict(lr=0.003, weight_decay=0.02,
                                                                 betas=(0.85, 0.98)),
          "AdamW": dict(lr=0.003, weight_decay=0.02, betas=(0.85, 0.98))}


def params_on(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE, dtype)) for s in shapes]


def clone(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def grads_for(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(DEVICE) for p in params]


def fresh(kwargs):
    return {k: v.clone().to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def make(name, params, kwargs, clip, backend, group1=None):
    half = len(params) // 2
    groups = [dict(params=params[:half]), dict(params=params[half:], **(group1 or GROUP1[name]))]
    return CLASSES[name](groups, **fresh(kwargs), **clip, backend=backend)


def set_grads(params_lists, step, dtype=None):
    n = len(params_lists[0])
    for i, g in enumerate(grads_for(params_lists[0], step)):
        for params in params_lists:
            skip = i == n - 1 or (i == 2 and step in (2, 4))
            params[i].grad = None if skip else g.to(dtype or params[i].dtype).clone()


def run_triton_vs_torch(name, kwargs, clip, shapes, dtype=torch.float32, steps=STEPS, group1=None):
    ref_p = params_on(shapes, dtype)
    tri_p = clone(ref_p)
    ref = make(name, ref_p, kwargs, clip, "torch", group1)
    tri = make(name, tri_p, kwargs, clip, "triton", group1)
    for step in range(steps):
        set_grads([ref_p, tri_p], step)
        grads = [None if p.grad is None else p.grad.clone() for p in tri_p]
        tri.step()
        ref.step()
        for r, t, g in zip(ref_p, tri_p, grads):
            assert_close(t, r)
            if g is not None:
                assert torch.equal(t.grad, g), "the Triton path must not write .grad"
        if "max_grad_norm" in clip:
            assert tri.grad_norm.shape == () and tri.grad_norm.device == tri_p[0].device
            assert_close(tri.grad_norm, ref.grad_norm)
        else:
            assert tri.grad_norm is None
    for (i, rs), ts in zip(ref.state_dict()["state"].items(), tri.state_dict()["state"].values()):
        assert rs.keys() == ts.keys(), i
        for k in rs:
            assert (ts[k].shape, ts[k].dtype, ts[k].device) == (rs[k].shape, rs[k].dtype, rs[k].device)
            assert_close(ts[k], rs[k])
    return tri


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("name,key", list(CONFIGS), ids=[f"{n}-{k}" for n, k in CONFIGS])
def test_triton_matches_torch_path(name, key, clip):
    run_triton_vs_torch(name, CONFIGS[(name, key)], CLIPS[clip], SMALL)


@pytest.mark.parametrize("name", list(CLASSES))
def test_odd_sizes(name):
    """0-dim, 1, 127, 4097 and 65537 elements: tails of every length, one full-block run."""
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    run_triton_vs_torch(name, kwargs, dict(max_grad_norm=1.0), ODD, steps=3)


@pytest.mark.parametrize("name,clip", [("SGD", "l2-active"), ("Adam", "inf-active"),
                                       ("AdamW", "value+l2")])
def test_300_tensor_model(name, clip):
    """300 tensors of mixed sizes (0-dim to 1500 elements) in two param groups. 3 steps: the
    interpreter takes ~15 ms per block of the Adam update, ~4 s per step here."""
    g = torch.Generator().manual_seed(7)
    shapes = [() if i % 37 == 0 else (int(torch.randint(1, 1500, (1,), generator=g)),)
              for i in range(300)]
    kwargs = dict(lr=0.1, momentum=0.9, nesterov=True) if name == "SGD" else dict(lr=0.01)
    run_triton_vs_torch(name, kwargs, CLIPS[clip], shapes, steps=3)


def copy_state(src, src_params, dst, dst_params, dtype):
    for p, q in zip(src_params, dst_params):
        dst.state[q] = {k: v.detach().clone().to(dtype) if k != "step" else v.detach().clone()
                        for k, v in src.state[p].items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_low_precision_error_bound(name, dtype):
    """Each step, from the Triton run's current state: the kernel in ``dtype`` against the fp32
    torch path, bounded by torch's own fused op in ``dtype`` (conftest.low_precision_bound), for
    the params and every state tensor."""
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.01, weight_decay=0.1)
    clip = dict(max_grad_norm=0.5, max_grad_value=2.0)
    tri_p = params_on(SMALL, dtype)
    tri = make(name, tri_p, kwargs, clip, "triton")
    for step in range(STEPS):
        ref_p, low_p = clone(tri_p, torch.float32), clone(tri_p)
        ref, low = make(name, ref_p, kwargs, clip, "torch"), make(name, low_p, kwargs, clip, "torch")
        copy_state(tri, tri_p, ref, ref_p, torch.float32)
        copy_state(tri, tri_p, low, low_p, dtype)
        set_grads([tri_p, low_p], step, dtype)
        for p, q in zip(ref_p, tri_p):
            p.grad = None if q.grad is None else q.grad.float()
        for opt in (tri, ref, low):
            opt.step()
        pairs = list(zip(tri_p, ref_p, low_p)) + [
            (tri.state[t][k], ref.state[r][k], low.state[q][k])
            for t, r, q in zip(tri_p, ref_p, low_p) for k in tri.state[t] if k != "step"]
        for t, r, q in pairs:
            assert t.dtype == dtype
            err_triton = float((t.detach().float() - r.detach()).abs().max()) if t.numel() else 0.0
            err_torch = float((q.detach().float() - r.detach()).abs().max()) if t.numel() else 0.0
            assert err_triton <= low_precision_bound(err_torch, r, dtype), (step, err_triton, err_torch)


@pytest.mark.parametrize("name", list(CLASSES))
def test_tensors_the_kernels_cannot_take_use_the_torch_path(name):
    """fp64, non-contiguous and misaligned params step on the torch path, the rest in the kernels,
    all clipped by one total norm; .grad of kernel tensors stays as it was."""
    def special(params):
        base = torch.randn(10, 7, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        return params + [torch.nn.Parameter(base.clone().t()),                        # non-contiguous
                         torch.nn.Parameter(base.view(-1).clone()[1:]),               # misaligned
                         torch.nn.Parameter(base.double().clone())]                    # fp64
    ref_p = special(params_on(SMALL[:4], torch.float32))
    tri_p = clone(ref_p)
    tri_p[-3] = torch.nn.Parameter(ref_p[-3].detach().clone().t().contiguous().t())
    tri_p[-2] = torch.nn.Parameter(torch.cat([torch.zeros(1, device=DEVICE), ref_p[-2].detach()])[1:])
    assert not tri_p[-3].is_contiguous() and tri_p[-2].data_ptr() % 16 != 0
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    ref = CLASSES[name](ref_p, **kwargs, max_grad_norm=0.5, backend="torch")
    tri = CLASSES[name](tri_p, **kwargs, max_grad_norm=0.5, backend="triton")
    for step in range(4):
        for r, t, g in zip(ref_p, tri_p, grads_for(ref_p, step)):
            r.grad = g.to(r.dtype).reshape(r.shape)
            t.grad = r.grad.clone()
        kernel_grads = [p.grad.clone() for p in tri_p[:4]]
        ref.step()
        tri.step()
        for r, t in zip(ref_p, tri_p):
            assert_close(t, r, torch.float32)
        assert_close(tri.grad_norm, ref.grad_norm.float())
        for p, g in zip(tri_p[:4], kernel_grads):
            assert torch.equal(p.grad, g)


@pytest.mark.parametrize("n_tensors", [3, 300])
@pytest.mark.parametrize("name,clip,expected", [
    ("SGD", {}, {"_update_kernel": 1}),
    ("SGD", dict(max_grad_norm=1.0), {"_norm_kernel": 1, "_update_kernel": 1}),
    ("Adam", {}, {"_norm_kernel": 1, "_update_kernel": 1}),  # the norm pass advances the steps
    ("AdamW", dict(max_grad_norm=1.0, max_grad_value=0.1), {"_norm_kernel": 1, "_update_kernel": 1}),
])
def test_launches_per_step_do_not_grow_with_tensor_count(launches, name, clip, expected, n_tensors):
    params = params_on([(17,)] * n_tensors, torch.float32)
    opt = CLASSES[name](params, lr=0.01, **clip, backend="triton")
    for step in range(2):
        launches.clear()
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
        assert launches == expected


def test_two_dtype_groups_take_two_launches_each_and_share_one_norm(launches):
    fp32 = params_on([(33,)] * 5, torch.float32)
    bf16 = params_on([(33,)] * 5, torch.bfloat16, seed=1)
    ref_p = clone(fp32 + bf16)
    opt = fusedopt.AdamW(fp32 + bf16, lr=0.01, max_grad_norm=0.5, backend="triton")
    ref = fusedopt.AdamW(ref_p, lr=0.01, max_grad_norm=0.5, backend="torch")
    for p, q, g in zip(fp32 + bf16, ref_p, grads_for(fp32 + bf16, 0)):
        p.grad, q.grad = g.to(p.dtype), g.to(p.dtype)
    opt.step()
    ref.step()
    assert launches == {"_norm_kernel": 2, "_update_kernel": 2}
    # the torch path on CPU takes bf16 norms as clip_grad_norm_ does, rounded to bf16 (2**-9)
    assert_close(opt.grad_norm, ref.grad_norm, rtol=2.0 ** -8 if DEVICE == "cpu" else 1e-5)


def test_deterministic_run_to_run():
    """Same inputs, same bits: the norm and every parameter (no atomics, fixed reduction order)."""
    results = []
    for _ in range(2):
        params = params_on([(4097,), (300,), ()] * 5, torch.float32)
        opt = fusedopt.AdamW(params, lr=0.01, max_grad_norm=0.5, backend="triton")
        for step in range(2):
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g
            opt.step()
        results.append((opt.grad_norm.clone(), [p.detach().clone() for p in params]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_static_grads_with_zero_grad_set_to_none_false():
    """Grads that keep their storage (zero_grad(set_to_none=False)) reuse the cached tables."""
    ref_p = params_on(SMALL, torch.float32)
    tri_p = clone(ref_p)
    ref = fusedopt.SGD(ref_p, lr=0.1, momentum=0.9, max_grad_norm=1.0, backend="torch")
    tri = fusedopt.SGD(tri_p, lr=0.1, momentum=0.9, max_grad_norm=1.0, backend="triton")
    for p, q in zip(ref_p, tri_p):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    for step in range(4):
        for opt in (ref, tri):
            opt.zero_grad(set_to_none=False)
        for p, q, g in zip(ref_p, tri_p, grads_for(ref_p, step)):
            p.grad.copy_(g)
            q.grad.copy_(g)
        ref.step()
        tri.step()
        for r, t in zip(ref_p, tri_p):
            assert_close(t, r)


def test_hyperparameters_are_runtime_values_not_constexpr():
    """Changing lr, betas, eps, weight decay or the clip bounds must never recompile: none of
    them, and no size, is a tl.constexpr, and sizes are not specialized on; the update kernel's
    constexprs are the rule, its flags and the shared switches only."""
    from fusedopt.kernels.norm import _norm_kernel
    from fusedopt.kernels.update import _update_kernel
    allowed = {"DTYPE", "NORM", "VALUE_CLIP", "LR_FROM_PTR", "BLOCK", "NUM_PARTIALS", "ROW",
               "HAS_STEP", "UNSCALE", "FOUND_IN", "DETECT", "RULE", "STEP_RULE", "STATES",
               "STEP_SCALARS", "SCALAR_STATE", "SNAPSHOT", "F0", "F1", "F2", "STATE_DTYPE",
               "MASTER", "SR"}  # the memory-lean layout: dtypes and columns, not values
    for kernel in (_norm_kernel, _update_kernel):
        fn = getattr(kernel, "fn", kernel)
        names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
        constexprs = {n for n in names if fn.__annotations__.get(n) is not None
                      and "constexpr" in str(fn.__annotations__[n])}
        assert constexprs <= allowed, constexprs - allowed
        runtime = set(names) - constexprs
        assert {"n_blocks"} <= runtime
        assert not {"lr", "hyper_ptr", "max_norm", "max_value"} & constexprs


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU: host syncs exist only there")
def test_step_makes_no_host_sync_on_cuda():
    params = params_on(SMALL, torch.float32)
    opt = fusedopt.AdamW(params, lr=torch.tensor(0.01, device="cuda"), max_grad_norm=0.5)
    for step in range(3):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", list(CLASSES))
def test_cached_tables_follow_every_change(name):
    """The Triton path caches its tables per param group; each change below must reach them:
    new param storage, a new param group, load_state_dict, a cleared state, a grad that is not
    contiguous for one step (that param takes the torch path then)."""
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.01, amsgrad=True)
    shapes = [(13, 7), (4097,), (), (33,)]
    ref_p = params_on(shapes, torch.float32)
    tri_p = clone(ref_p)
    ref = CLASSES[name](ref_p, **kwargs, max_grad_norm=1.0, backend="torch")
    tri = CLASSES[name](tri_p, **kwargs, max_grad_norm=1.0, backend="triton")
    extra_ref = params_on([(65,), (5, 5)], torch.float32, seed=9)
    extra_tri = clone(extra_ref)
    for step in range(8):
        if step == 2:
            for p in ref_p + tri_p:
                p.data = p.data.clone()
        if step == 3:
            ref.add_param_group(dict(params=extra_ref, lr=0.02))
            tri.add_param_group(dict(params=extra_tri, lr=0.02))
        if step == 4:
            saved = ref.state_dict()  # its tensors are ref's own: each side loads a copy
            ref.load_state_dict(copy.deepcopy(saved))
            tri.load_state_dict(copy.deepcopy(saved))
        if step == 5:
            ref.state.clear()
            tri.state.clear()
        params_r = ref_p + (extra_ref if step >= 3 else [])
        params_t = tri_p + (extra_tri if step >= 3 else [])
        for r, t, g in zip(params_r, params_t, grads_for(params_r, step)):
            r.grad = g.clone()
            t.grad = g.t().contiguous().t() if step == 6 and g.dim() == 2 else g.clone()
        assert step != 6 or not tri_p[0].grad.is_contiguous()
        ref.step()
        tri.step()
        for r, t in zip(params_r, params_t):
            assert_close(t, r)
        assert_close(tri.grad_norm, ref.grad_norm)


_adam_step = RULES["adam_step"]  # a global JITFunction: what a compiled kernel may call


@triton.jit
def _adam_step_probe(steps_ptr, out_ptr, ln_beta1, ln_beta2, N: tl.constexpr):
    offs = tl.arange(0, N)
    t = tl.load(steps_ptr + offs).to(tl.float64)
    step_size, bc2_sqrt, _, _ = _adam_step(t, 0.0, 1.0, 0.0, 0.0, 0.0, ln_beta1, ln_beta2, 0.0, 0.0,
                                           0.0)
    tl.store(out_ptr + offs, step_size)
    tl.store(out_ptr + N + offs, bc2_sqrt)


def test_adam_step_scalars_match_float64():
    """Adam's step scalars (lr / (1 - beta1 ** t), sqrt(1 - beta2 ** t)) as the kernel forms them
    (in float64, from the fp32 step count) against torch's host float64, across the betas people
    use (0 included) and steps from 1 to 10**6: within 1e-12 relative, where 1 - exp2(step *
    log2(beta)) in fp32 was 6e-5 off at beta 0.999, step 1."""
    steps = torch.tensor([1, 2, 3, 7, 10, 100, 500, 693, 1000, 4000, 10 ** 4, 10 ** 6, 1, 1, 1, 1],
                         dtype=torch.float32, device=DEVICE)
    for beta1, beta2 in ((0.9, 0.999), (0.5, 0.9999), (0.0, 0.95), (0.99, 0.98)):
        out = torch.empty(2 * len(steps), dtype=torch.float64, device=DEVICE)
        _adam_step_probe[(1,)](steps, out, ln(beta1), ln(beta2), N=len(steps),
                               enable_fp_fusion=FP_FUSION)
        ts = [float(t) for t in steps.tolist()]
        for i, exact in enumerate(([1 / (1 - beta1 ** t) for t in ts],
                                   [math.sqrt(1 - beta2 ** t) for t in ts])):
            exact = torch.tensor(exact, dtype=torch.float64)
            got = out[i * len(steps):(i + 1) * len(steps)].cpu()
            assert torch.allclose(got, exact, rtol=1e-12, atol=0), (beta1, beta2, got, exact)
