"""The Triton path under everything a user can do between two steps (issue 9): state replaced by
hand, tensor subclasses, duplicate params and shared grads, old checkpoints, empty params, the
device launches go to, meta params, and .grad left as it was.

Each edit is made to fusedopt (backend="triton"; the interpreter on CPU) and to torch.optim +
clip_grad_norm_ alike, and the two must then agree step by step: the oracle is torch's.
"""
import collections
import contextlib
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedopt
from conftest import DEVICE, assert_close
from recipe import TORCH_CLASSES, ref_step

CLASSES = {"SGD": fusedopt.SGD, "Adam": fusedopt.Adam, "AdamW": fusedopt.AdamW}
KWARGS = {"SGD": dict(lr=0.1, momentum=0.9), "Adam": dict(lr=0.01, amsgrad=True),
          "AdamW": dict(lr=0.01, weight_decay=0.1)}
SHAPES = [(13, 7), (4097,), (), (33,), (3, 5, 2)]
CLIP = dict(max_grad_norm=1.0)


def params_on(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE, dtype)) for s in shapes]


def twin(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(sides, step):
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=g).to(DEVICE, p.dtype) for p in sides[0]]
    for params in sides:
        for p, x in zip(params, grads):
            p.grad = x.clone()


class Sides:
    """torch.optim + clip (ref) and fusedopt on the Triton backend (ours), on equal params."""

    def __init__(self, name, shapes=SHAPES, kwargs=None, groups=None):
        self.name = name
        self.ref_p = params_on(shapes)
        self.our_p = twin(self.ref_p)
        kwargs = KWARGS[name] if kwargs is None else kwargs
        self.ref = TORCH_CLASSES[name](groups(self.ref_p) if groups else self.ref_p, **kwargs)
        self.ours = CLASSES[name](groups(self.our_p) if groups else self.our_p, **kwargs, **CLIP,
                                  backend="triton")

    def pairs(self):
        return zip(self.ref.param_groups, self.ours.param_groups)

    def step(self, step):
        ref_params = [p for g in self.ref.param_groups for p in g["params"]]
        our_params = [p for g in self.ours.param_groups for p in g["params"]]
        set_grads([ref_params, our_params], step)
        ref_step(self.ref, ref_params, **CLIP)
        self.ours.step()
        for r, o in zip(ref_params, our_params):
            assert_close(o, r)

    def edit(self, fn):
        """Apply ``fn(opt, params)`` to both sides (params in group order)."""
        for opt in (self.ref, self.ours):
            fn(opt, [p for g in opt.param_groups for p in g["params"]])


def run(name, edit, steps=5, at=2, **kw):
    sides = Sides(name, **kw)
    for step in range(steps):
        if step == at:
            sides.edit(edit)
        sides.step(step)
    return sides


# -- 1. state replaced by hand: the next step uses exactly the tensors torch.optim would --------

def _reset_moment(opt, params):
    key = "momentum_buffer" if "momentum_buffer" in opt.state[params[0]] else "exp_avg"
    opt.state[params[0]][key] = torch.zeros_like(params[0])


def _clear_one(opt, params):
    opt.state[params[1]] = {}


def _moved_state(opt, params):  # the common "move the optimizer's state" loop
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                state[k] = v.clone()  # v.to(device) on another device; same object on this one


def _swap_data(opt, params):
    for state in opt.state.values():
        for v in state.values():
            v.data = v.data.clone()


def _pop_and_update(opt, params):
    state = opt.state[params[3]]
    key = next(k for k in state if k != "step")
    value = state.pop(key)
    state.update({key: value * 0.5})


def _replace_state_dict(opt, params):
    old = opt.state
    opt.state = collections.defaultdict(dict)
    for p, s in old.items():
        opt.state[p] = {k: v.clone() for k, v in s.items()}


@pytest.mark.parametrize("edit", [_reset_moment, _clear_one, _moved_state, _swap_data,
                                  _pop_and_update, _replace_state_dict],
                         ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("name", list(CLASSES))
def test_state_edited_by_hand_is_used(name, edit):
    run(name, edit)


@pytest.mark.parametrize("copy_opt", [False, True], ids=["same", "deepcopy"])
def test_replaced_state_is_freed_at_once(copy_opt):
    """The plan holds the tensors in its tables; a change to opt.state drops it there and then,
    so state moved off the device (to free its memory) is freed before the next step."""
    import copy
    import gc
    import weakref
    params = params_on(SHAPES)
    opt = fusedopt.AdamW(params, lr=0.01, backend="triton")
    for step in range(2):
        set_grads([params], step)
        opt.step()
    if copy_opt:
        opt = copy.deepcopy(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        set_grads([params], 2)
        opt.step()
        opt.step()
    assert opt._step_plan is not None
    old = weakref.ref(opt.state[params[0]]["exp_avg"])
    opt.state[params[0]]["exp_avg"] = torch.zeros_like(params[0])
    gc.collect()
    assert old() is None and "_step_plan" not in opt.__dict__


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_plain_state_dict_the_user_keeps_changing(name):
    """A user's own dict stored as a param's state: later changes to it count, as in torch."""
    sides = Sides(name)
    mine = {}
    for step in range(5):
        if step == 1:
            def store(opt, params, mine=mine):
                state = dict(opt.state[params[0]])
                mine[id(opt)] = state
                opt.state[params[0]] = state
            sides.edit(store)
        if step == 3:
            def change(opt, params, mine=mine):
                state = mine[id(opt)]
                key = "momentum_buffer" if "momentum_buffer" in state else "exp_avg_sq"
                state[key] = torch.ones_like(params[0])
            sides.edit(change)
        sides.step(step)


def test_param_groups_edited_by_hand():
    """A param appended to a group, one replaced, one group's params swapped for a new list."""
    extra = params_on([(9,), (4, 4)], seed=5)
    extra_ours = twin(extra)
    sides = Sides("AdamW")
    for step in range(6):
        if step == 2:
            sides.ref.param_groups[0]["params"].append(extra[0])
            sides.ours.param_groups[0]["params"].append(extra_ours[0])
        if step == 4:
            sides.ref.param_groups[0]["params"][1] = extra[1]
            sides.ours.param_groups[0]["params"][1] = extra_ours[1]
        sides.step(step)


# -- 2. tensor subclasses never reach a kernel --------------------------------------------------

def test_subclasses_never_fit_a_kernel():
    from fusedopt._multi_tensor import unfit_reason

    class Marked(torch.Tensor):
        pass

    plain = torch.zeros(64, device=DEVICE)
    marked = plain.clone().as_subclass(Marked)
    dtypes = (torch.float32,)
    assert unfit_reason([plain, torch.zeros_like(plain)], dtypes, plain.device) is None
    assert unfit_reason([marked, plain], dtypes, plain.device) == "a Marked, not a plain tensor"
    assert unfit_reason([plain, marked], dtypes, plain.device) == "a Marked, not a plain tensor"
    assert unfit_reason([torch.zeros(0, device=DEVICE)] * 2, dtypes, plain.device) == "empty"


def test_dtensor_params_step_on_local_shards_on_both_backends():
    """FSDP2-style DTensor params (one gloo rank, CPU): both backends step their local shards,
    equal to torch.optim + clip_grad_norm_, and keep DTensor state. Before issue 10 the kernels
    read address 0 (a segfault under the interpreter): a child process. The multi-rank cases
    are tests/test_distributed.py's."""
    script = textwrap.dedent("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import torch, torch.distributed as dist
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        from torch.distributed.tensor import distribute_tensor, Shard
        from torch.distributed.device_mesh import init_device_mesh
        import fusedopt
        mesh = init_device_mesh("cpu", (1,))
        def make():
            g = torch.Generator().manual_seed(0)
            return [torch.nn.Parameter(distribute_tensor(torch.randn(n, generator=g), mesh, [Shard(0)]))
                    for n in (64, 17, 1)]
        for name in ("SGD", "Adam", "AdamW"):
            for backend in ("torch", "triton"):
                ref_p, our_p = make(), make()
                kw = dict(momentum=0.9) if name == "SGD" else {}
                ref = getattr(torch.optim, name)(ref_p, lr=0.1, foreach=False, **kw)
                ours = getattr(fusedopt, name)(our_p, lr=0.1, max_grad_norm=0.5, backend=backend, **kw)
                for step in range(3):
                    g = torch.Generator().manual_seed(step)
                    for r, o in zip(ref_p, our_p):
                        x = distribute_tensor(torch.randn(r.shape, generator=g), mesh, [Shard(0)])
                        r.grad, o.grad = x.clone(), x.clone()
                    torch.nn.utils.clip_grad_norm_(ref_p, 0.5)
                    ref.step()
                    ours.step()
                    for r, o in zip(ref_p, our_p):
                        torch.testing.assert_close(o.full_tensor(), r.full_tensor())
                key = "momentum_buffer" if name == "SGD" else "exp_avg"
                assert type(ours.state[our_p[0]][key]).__name__ == "DTensor", (name, backend)
        dist.destroy_process_group()
        print("ok")
    """)
    run_ = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run_.returncode == 0 and run_.stdout.strip().endswith("ok"), run_.stderr[-3000:]


# -- 3. duplicate params and shared grads: refused, nothing written ------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_duplicate_param_refused(backend):
    params = params_on(SHAPES)
    with pytest.raises(ValueError, match=r"lists one parameter twice \(positions 0 and 2"):
        fusedopt.AdamW([params[0], params[1], params[0]], backend=backend)
    opt = fusedopt.AdamW(params, backend=backend, max_grad_norm=1.0)
    opt.param_groups[0]["params"].append(params[1])  # after construction: refused at step()
    set_grads([params], 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="lists one parameter twice"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_shared_grad_refused(name, backend):
    params = params_on([(33,), (33,), (5,)])
    opt = CLASSES[name](params, **KWARGS[name], max_grad_norm=1.0, backend=backend)
    for step in range(3):  # the first steps build the Triton plan; then a grad is shared
        set_grads([params], step)
        if step == 2:
            params[1].grad = params[0].grad
        before = [p.detach().clone() for p in params]
        grad = params[0].grad.clone()
        if step < 2:
            opt.step()
            continue
        with pytest.raises(ValueError, match="parameter 0 of group 0 and parameter 1 of group 0 share"):
            opt.step()
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        assert torch.equal(params[0].grad, grad)


@pytest.mark.parametrize("how", ["dict", "tensor"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_state_shared_by_two_params_refused(name, how):
    """One state dict, or one state tensor, stored for two params: one launch would update that
    memory from two programs at once (a race on a GPU). Refused before anything launches."""
    params = params_on([(33,), (33,), (5,)])
    opt = CLASSES[name](params, **KWARGS[name], backend="triton")
    for step in range(3):
        set_grads([params], step)
        if step == 2:
            if how == "dict":
                opt.state[params[1]] = opt.state[params[0]]
            else:
                key = "momentum_buffer" if name == "SGD" else "exp_avg"
                opt.state[params[1]][key] = opt.state[params[0]][key]
            before = [p.detach().clone() for p in params]
            with pytest.raises(ValueError, match="parameter 0 of group 0 and parameter 1 of group 0"):
                opt.step()
            assert all(torch.equal(p, b) for p, b in zip(params, before))
        else:
            opt.step()


# -- 4. an old checkpoint's momentum_buffer of None ----------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_momentum_buffer_none_is_no_buffer_yet(backend):
    """torch <= 2.0 saved SGD's state as {"momentum_buffer": None} before a param's first step."""
    ref_p = params_on(SHAPES)
    our_p = twin(ref_p)
    ref = torch.optim.SGD(ref_p, lr=0.1, momentum=0.9)
    ours = fusedopt.SGD(our_p, lr=0.1, momentum=0.9, backend=backend)
    saved = {"state": {i: {"momentum_buffer": None} for i in range(len(SHAPES))},
             "param_groups": ref.state_dict()["param_groups"]}
    ref.load_state_dict(saved)
    ours.load_state_dict(saved)
    for step in range(3):
        set_grads([ref_p, our_p], step)
        ref.step()
        ours.step()
        for r, o in zip(ref_p, our_p):
            assert_close(o, r)


# -- 5. empty params advance Adam's counter -------------------------------------------------------

@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_empty_params_step_as_torch(name):
    sides = Sides(name, shapes=[(0,), (33,), (0, 4), ()])
    for step in range(3):
        sides.step(step)
    ref_state = sides.ref.state_dict()["state"]
    our_state = sides.ours.state_dict()["state"]
    assert ref_state.keys() == our_state.keys()
    for i in ref_state:
        for k, v in ref_state[i].items():
            assert_close(our_state[i][k].to(v.dtype), v)


# -- 6. the params' device: launches and copies run under it --------------------------------------

def test_device_guard_makes_the_params_device_current():
    from fusedopt._multi_tensor import device_guard
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_and_table_copy_runs_under_the_device_guard(monkeypatch):
    """Triton launches on the current device's current stream, and table copies go on the
    destination's current stream: both must happen inside the params' device guard."""
    import fusedopt._multi_tensor as mt
    import fusedopt._triton_step as ts
    from conftest import wrap_kernels
    entered = []

    @contextlib.contextmanager
    def recording_guard(device):
        entered.append(device)
        yield
        entered.pop()

    outside = []
    real_to_device = mt.to_device
    monkeypatch.setattr(ts, "device_guard", recording_guard)
    monkeypatch.setattr(mt, "to_device", lambda *a: (outside.append(not entered), real_to_device(*a))[1])
    counts = {}
    wrap_kernels(monkeypatch, counts, around=lambda: _assert_entered(entered))
    sides = Sides("AdamW", groups=lambda ps: [dict(params=ps[:2]), dict(params=ps[2:], lr=0.02)])
    for step in range(3):
        sides.step(step)
    assert counts["_update_kernel"] == 6 and counts["_norm_kernel"] == 3
    assert outside and not any(outside)


@contextlib.contextmanager
def _assert_entered(entered):
    assert entered and entered[-1].type == DEVICE
    yield


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs: params on cuda:1 "
                    "while cuda:0 is current")
def test_params_on_the_second_gpu():
    ref_p = [torch.nn.Parameter(p.detach().to("cuda:1")) for p in params_on(SHAPES)]
    our_p = twin(ref_p)
    torch.cuda.set_device(0)
    ref = fusedopt.AdamW(ref_p, lr=0.01, max_grad_norm=1.0, backend="torch")
    ours = fusedopt.AdamW(our_p, lr=0.01, max_grad_norm=1.0, backend="triton")
    side = torch.cuda.Stream(device="cuda:1")
    for step in range(3):
        set_grads([ref_p, our_p], step)
        with torch.cuda.stream(side):  # a non-default stream on the params' device
            ours.step()
            ref.step()
        side.synchronize()
        for r, o in zip(ref_p, our_p):
            torch.testing.assert_close(o, r)
    assert ours.grad_norm.device == torch.device("cuda:1")


# -- 7. meta params: accepted at construction, decided at step() ---------------------------------

@pytest.mark.parametrize("backend", [None, "triton"])
def test_deferred_initialisation(backend):
    """Built on meta, optimizer made, then materialized (module.to_empty) and stepped: as torch."""
    def model():
        with torch.device("meta"):
            return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    ref_m, our_m = model(), model()
    ref = torch.optim.AdamW(ref_m.parameters(), lr=0.01)
    ours = fusedopt.AdamW(our_m.parameters(), lr=0.01, max_grad_norm=1.0, backend=backend)
    for m in (ref_m, our_m):
        m.to_empty(device=DEVICE)
        torch.manual_seed(0)
        for p in m.parameters():
            torch.nn.init.normal_(p)
    x = torch.randn(4, 7, device=DEVICE)
    for _ in range(3):
        for m in (ref_m, our_m):
            m.zero_grad()
            m(x).square().sum().backward()
        torch.nn.utils.clip_grad_norm_(ref_m.parameters(), 1.0)
        ref.step()
        ours.step()
        for r, o in zip(ref_m.parameters(), our_m.parameters()):
            assert_close(o, r)


def test_meta_params_step_on_the_torch_path_and_triton_says_why(monkeypatch):
    for name in CLASSES:
        params = [torch.nn.Parameter(torch.zeros(4, 3, device="meta"))]
        opt = CLASSES[name](params, **KWARGS[name], max_grad_norm=1.0)
        params[0].grad = torch.zeros(4, 3, device="meta")
        opt.step()  # shapes only, as torch.optim does on meta
        assert opt.grad_norm.device.type == "meta"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    opt = fusedopt.SGD(params, lr=0.1, backend="triton")
    with pytest.raises(RuntimeError, match="meta device.*materialize"):
        opt.step()


# -- 13. the Triton path never writes .grad, and names the first non-finite grad -----------------

def _fallback_mix():
    """Kernel tensors, then ones the kernels cannot take: fp64, non-contiguous, misaligned."""
    base = torch.randn(10, 7, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    return params_on([(33,), (5,)]) + [
        torch.nn.Parameter(base.double().clone()),
        torch.nn.Parameter(base.clone().t()),
        torch.nn.Parameter(torch.cat([torch.zeros(1, device=DEVICE), base.view(-1)])[1:])]


@pytest.mark.parametrize("name", list(CLASSES))
def test_fallback_grads_are_not_written(name):
    params = _fallback_mix()
    assert params[3].grad is None and not params[3].is_contiguous() and params[4].data_ptr() % 16
    ref_p = twin(params)
    kw = dict(KWARGS[name], max_grad_norm=0.5, max_grad_value=0.3)
    ours = CLASSES[name](params, **kw, backend="triton")
    ref = CLASSES[name](ref_p, **kw, backend="torch")
    scaler = fusedopt.GradScaler("cpu" if DEVICE == "cpu" else "cuda", init_scale=64.0)
    ref_scaler = fusedopt.GradScaler("cpu" if DEVICE == "cpu" else "cuda", init_scale=64.0)
    for step in range(3):
        set_grads([params, ref_p], step)
        for p, r in zip(params, ref_p):
            p.grad.mul_(64.0)
            r.grad.mul_(64.0)
        grads = [p.grad.clone() for p in params]
        for sc in (scaler, ref_scaler):
            sc.scale(torch.ones((), device=DEVICE))  # what scale(loss) sets up
        scaler.step(ours)
        ref_scaler.step(ref)
        scaler.update()
        ref_scaler.update()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads)), "the Triton path wrote .grad"
        for p, r in zip(params, ref_p):
            assert_close(p, r, torch.float32)


@pytest.mark.parametrize("bad", ["inf", "nan"])
@pytest.mark.parametrize("where", [2, 3, 1])  # fp64 and non-contiguous (torch path), fp32 (kernel)
def test_raise_names_the_first_nonfinite_grad_as_the_torch_path(where, bad):
    messages = []
    for backend in ("torch", "triton"):
        params = _fallback_mix()
        opt = fusedopt.SGD(params, lr=0.1, max_grad_value=0.5, nonfinite="raise", backend=backend)
        set_grads([params], 0)
        params[where].grad.view(-1)[3] = float(bad)
        before = [p.detach().clone() for p in params]
        with pytest.raises(FloatingPointError) as info:
            opt.step()
        messages.append(str(info.value))
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    kind = "inf" if bad == "inf" else "NaN"
    assert f"({kind} in group 0, parameter {where}," in messages[0]
    assert messages[0] == messages[1]


# -- the plan is reused, and rebuilt on what it rests on -----------------------------------------

def test_steady_state_reuses_the_plan_and_copies_only_grad_addresses(monkeypatch):
    import fusedopt._multi_tensor as mt
    copies = []
    real = mt.to_device
    monkeypatch.setattr(mt, "to_device", lambda values, device: (copies.append(len(values)), real(values, device))[1])
    params = params_on([(33,)] * 7)
    opt = fusedopt.AdamW(params, lr=0.01, max_grad_norm=1.0, backend="triton")
    for step in range(2):  # step 1 makes the state, step 2 the plan that lasts
        set_grads([params], step)
        opt.step()
    plan = opt._step_plan
    copies.clear()
    for step in range(2, 5):
        set_grads([params], step)  # new grad tensors: their addresses are copied, nothing else
        opt.step()
        assert opt._step_plan is plan
    assert copies == [7, 7, 7] or copies == [], copies  # an address may repeat: then no copy
    copies.clear()
    grads = [p.grad for p in params]
    for _ in range(3):  # persistent grads: nothing is copied at all
        opt.step()
        assert [p.grad for p in params] == grads
    assert copies == []
    opt.state[params[0]]["exp_avg"] = torch.zeros_like(params[0])
    set_grads([params], 9)
    opt.step()
    assert opt._step_plan is not plan
