"""Distributed training on CPU with gloo: each wrapper against the torch recipe for the same
wrapper, rank by rank (parameters and state on the rank's own shards, grad_norm), on both
backends (Triton under the interpreter), and the clip's collectives counted.

The torch recipe: torch.optim.<same class> + clip_grad_norm_ (FSDP1: its own
``model.clip_grad_norm_``) under the same wrapper, from the same initial weights, on the same
per-rank batches. Tolerance: fp32 (conftest.TOL, rtol 1e-5): the norm is the same sum taken in
another order (per-tensor norms, shares summed in fp64, one all-reduce, against DTensor's
reduction) and the torch path divides by the clip where torch multiplies (conftest docstring).

Every scenario runs in spawned ranks (tests/ranks.py); one spawn checks many settings, since a
spawn costs ~2 s and the interpreter's launches ~0.1 s each.
"""
import copy
import io
import math
import pickle

import pytest
import torch
import torch.distributed as dist

import fusedopt
from conftest import TOL
from ranks import CollectiveCounter, NoHostRead, full, run_ranks

STEPS = 3
BACKENDS = ("torch", "triton")
# small max norms: the grads below have norms ~1-10, so the clip is active on every step
OPTIMIZERS = [
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01)),
]


def _model(seed=0, sizes=(6, 8, 4)):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1]), torch.nn.ReLU(),
                               torch.nn.Linear(sizes[1], sizes[2]))


def _batch(rank, step, width=6):
    g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data
    return torch.randn(5, width, generator=g)


def _assert_close(ours, ref, what):
    torch.testing.assert_close(ours, ref, **TOL[torch.float32], msg=lambda m: f"{what}: {m}")


def _local(t):
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _compare(rank, ref_model, our_model, ref_opt, our_opt, what):
    for (name, r), o in zip(ref_model.named_parameters(), our_model.parameters()):
        _assert_close(_local(o), _local(r), f"rank {rank} {what} param {name}")
        rs, os_ = ref_opt.state[r], our_opt.state[o]
        for key, value in rs.items():
            if key == "step":
                assert float(os_[key]) == float(value), (what, name)
                continue
            assert type(os_[key]) is type(value), (what, name, key, type(os_[key]))
            if hasattr(value, "placements"):
                assert os_[key].placements == value.placements, (what, name, key)
            _assert_close(_local(os_[key]), _local(value), f"rank {rank} {what} {name} {key}")


def _train_pair(rank, wrap, name, kw, backend, clip, steps=STEPS, counts=None, width=6,
                norm_type=2.0, value_clip=None, inputs=_batch, model=_model):
    """The torch recipe and fusedopt under ``wrap`` (model -> wrapped model), step by step;
    checks grad_norm each step and everything at the end, that no step reads a tensor value on
    the host, and that a Triton step reuses its plan. ``counts``: a list collecting each
    fusedopt step's CollectiveCounter."""
    ref_model, our_model = wrap(model()), wrap(model())
    ref_opt = getattr(torch.optim, name)(ref_model.parameters(), **kw)
    our_opt = getattr(fusedopt, name)(our_model.parameters(), **kw, max_grad_norm=clip,
                                      norm_type=norm_type, max_grad_value=value_clip,
                                      backend=backend)
    what = f"{name} {backend} norm {norm_type} value_clip {value_clip}"
    for step in range(steps):
        x = inputs(rank, step, width)
        for m in (ref_model, our_model):
            m(x).square().sum().backward()
        if value_clip is not None:
            torch.nn.utils.clip_grad_value_(ref_model.parameters(), value_clip)
        total = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), clip, norm_type=norm_type)
        ref_opt.step()
        with CollectiveCounter() as counter, NoHostRead():
            our_opt.step()
        if counts is not None:
            counts.append(counter)
        if step == 0:
            plan = None
        elif backend == "triton" and step == steps - 1:  # the plan of step 2 served step 3
            assert our_opt._step_plan is plan and plan is not None, what
        plan = our_opt.__dict__.get("_step_plan")
        expected = full(total)
        assert float(expected) > clip, "the clip must be active"
        assert type(our_opt.grad_norm) is torch.Tensor, type(our_opt.grad_norm)
        _assert_close(our_opt.grad_norm.to(expected.dtype), expected,
                      f"rank {rank} {what} step {step} grad_norm")
        ref_opt.zero_grad()
        our_opt.zero_grad()
    _compare(rank, ref_model, our_model, ref_opt, our_opt, what)
    return our_model, our_opt


# -- FSDP2 (1-D mesh) ----------------------------------------------------------------------------

def _fsdp2(mesh):
    from torch.distributed.fsdp import fully_shard

    def wrap(model):
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return wrap


def fsdp2_body(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world_size,))
    for backend in BACKENDS:
        for name, kw in OPTIMIZERS:
            counts = []
            _train_pair(rank, _fsdp2(mesh), name, kw, backend, clip=0.5, counts=counts)
            # exactly one collective per step, the clip's all-reduce: none from DTensor ops
            assert [(c.all_reduce, c.total) for c in counts] == [(1, 1)] * STEPS, (name, backend)
        _train_pair(rank, _fsdp2(mesh), "AdamW", dict(lr=0.01), backend, clip=0.1,
                    norm_type=math.inf)
        _train_pair(rank, _fsdp2(mesh), "SGD", dict(lr=0.1, momentum=0.5), backend, clip=0.3,
                    value_clip=0.4)
        # two identical blocks: FSDP2's grad DTensors report their offset in the block's buffer
        # as data_ptr(), equal for the same param of both (once refused as "one shared .grad")
        _train_pair(rank, _fsdp2(mesh), "AdamW", dict(lr=0.01), backend, clip=0.5, width=8,
                    model=lambda: _model(sizes=(8, 8, 8)))
    # a shard of >= 65536 fp32 elements takes clip.py's large-tensor CPU norm: on the local
    # shard, so still no collective but the clip's (it all-gathered the whole grad before)
    counts = []
    _train_pair(rank, _fsdp2(mesh), "AdamW", dict(lr=0.01), "torch", clip=0.5, counts=counts,
                steps=2, width=512, model=lambda: _model(sizes=(512, 300, 4)))
    assert [(c.all_reduce, c.total) for c in counts] == [(1, 1)] * 2


def no_clip_body(rank, world_size):
    """Without a clip and without inf/NaN detection a step needs no collective; plain params
    beside DTensors count as replicated over the mesh (once in the norm)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world_size,))
    for backend in BACKENDS:
        model = _fsdp2(mesh)(_model())
        opt = fusedopt.AdamW(model.parameters(), lr=0.01, backend=backend)
        model(_batch(rank, 0)).sum().backward()
        with CollectiveCounter() as counter:
            opt.step()
        assert (counter.all_reduce, counter.total) == (0, 0)
        # mixed: a Shard(0) DTensor (global grad 1..12) and a plain param (grad 3s, the same on
        # every rank); SGD lr 1: p -= coef * g with clip_grad_norm_'s coef from the float64 norm
        full_grad = torch.arange(1.0, 13.0)
        sharded = torch.nn.Parameter(distribute_tensor(torch.zeros(12), mesh, [Shard(0)]))
        sharded.grad = distribute_tensor(full_grad, mesh, [Shard(0)])
        plain = torch.nn.Parameter(torch.zeros(5))
        plain.grad = torch.full((5,), 3.0)
        opt = fusedopt.SGD([sharded, plain], lr=1.0, max_grad_norm=1.0, backend=backend)
        opt.step()
        norm = math.sqrt(float(full_grad.double().square().sum()) + 5 * 9.0)
        coef = 1.0 / (norm + 1e-6)
        _assert_close(opt.grad_norm, torch.tensor(norm, dtype=torch.float32), "mixed grad_norm")
        _assert_close(full(sharded.detach()), -coef * full_grad, "mixed sharded param")
        _assert_close(plain.detach(), torch.full((5,), -3.0 * coef), "mixed plain param")


def test_no_clip_no_collective_and_plain_params_beside_dtensors():
    run_ranks(no_clip_body, 2)


def test_fsdp2_matches_torch_recipe_with_one_all_reduce():
    run_ranks(fsdp2_body, 2)


# -- tensor parallel: Shard(0), Shard(1) and a Replicate bias ------------------------------------

def _tp(mesh):
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    def wrap(model):
        return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return wrap


def tp_body(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world_size,))
    placements = {n: p.placements for n, p in _tp(mesh)(_model()).named_parameters()}
    assert {str(pl) for pl in placements.values()} >= {"(Shard(dim=0),)", "(Shard(dim=1),)",
                                                       "(Replicate(),)"}, placements
    for backend in BACKENDS:
        for name, kw in OPTIMIZERS:
            counts = []
            # the replicated bias is counted once: a wrong count shows in grad_norm
            _train_pair(rank, _tp(mesh), name, kw, backend, clip=0.5, counts=counts)
            assert [(c.all_reduce, c.total) for c in counts] == [(1, 1)] * STEPS
        _train_pair(rank, _tp(mesh), "Adam", dict(lr=0.01), backend, clip=0.1, norm_type=math.inf)


def test_tensor_parallel_matches_torch_recipe():
    run_ranks(tp_body, 2)


def replicated_body(rank, world_size):
    """Every parameter replicated (a pure-Replicate DTensor model): nothing to reduce, so no
    collective at all, and the norm is still the whole one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_module, distribute_tensor
    mesh = init_device_mesh("cpu", (world_size,))

    def wrap(model):
        def replicate(_, module, __):
            for n, p in list(module.named_parameters(recurse=False)):
                module.register_parameter(n, torch.nn.Parameter(
                    distribute_tensor(p.data, mesh, [Replicate()])))
        def inputs(_, args, __):
            return tuple(distribute_tensor(x, mesh, [Replicate()]) for x in args)
        return distribute_module(model, mesh, replicate, input_fn=inputs)
    same = lambda rank, step, width: _batch(0, step, width)  # noqa: E731  replicas see the same data
    for backend in BACKENDS:
        counts = []
        _train_pair(rank, wrap, "AdamW", dict(lr=0.01), backend, clip=0.5, counts=counts,
                    inputs=same)
        assert [(c.all_reduce, c.total) for c in counts] == [(0, 0)] * STEPS


def test_all_replicated_needs_no_collective():
    run_ranks(replicated_body, 2)


# -- HSDP (2-D mesh: replicate x shard) and FSDP + TP, 4 ranks -----------------------------------

def hsdp_body(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    shard_group = mesh.get_group("shard")
    replica = mesh.get_coordinate()[0]
    # HSDP all-reduces grads over the replica dim: both replicas then hold the same grads
    for backend in BACKENDS:
        counts = []
        _train_pair(rank, _fsdp2(mesh), "AdamW", dict(lr=0.01), backend, clip=0.5, counts=counts)
        assert [c.all_reduce for c in counts] == [1] * STEPS
        assert replica in (0, 1)
    # all params on one flattened mesh (as torchtitan's dp_shard_cp): that mesh is the one
    flat = mesh["replicate", "shard"]._flatten("flat")
    counts = []
    _train_pair(rank, _fsdp2(flat), "AdamW", dict(lr=0.01), "torch", clip=0.5, counts=counts)
    assert [c.all_reduce for c in counts] == [1] * STEPS
    # the clip's collective spans the shard dim only: 2 ranks, not 4
    from fusedopt._distributed import NormReduce
    model = _fsdp2(mesh)(_model())
    model(_batch(rank, 0)).sum().backward()
    reduce = NormReduce.build("AdamW", list(model.parameters()), None)
    assert reduce.group is shard_group and dist.get_world_size(reduce.group) == 2


def test_hsdp_reduces_over_the_shard_dim_only():
    run_ranks(hsdp_body, 4)


def fsdp_tp_body(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    def wrap(model):
        model = _tp(mesh["tp"])(model)
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh["dp"])
        return fully_shard(model, mesh=mesh["dp"])
    # tp ranks of one dp rank see the same batch, as tensor parallelism requires
    same_in_tp = lambda rank, step, width: _batch(rank // 2, step, width)  # noqa: E731
    for backend in BACKENDS:
        counts = []
        _train_pair(rank, wrap, "AdamW", dict(lr=0.01), backend, clip=0.5, counts=counts,
                    inputs=same_in_tp)
        assert [c.all_reduce for c in counts] == [1] * STEPS


def test_fsdp_plus_tensor_parallel_2d():
    run_ranks(fsdp_tp_body, 4)


# -- DDP, ZeRO and FSDP1: plain tensors ----------------------------------------------------------

def ddp_body(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP
    for backend in BACKENDS:
        for name, kw in OPTIMIZERS:
            counts = []
            _train_pair(rank, DDP, name, kw, backend, clip=0.5, counts=counts)
            assert [c.all_reduce for c in counts] == [0] * STEPS  # grads already all-reduced


def test_ddp_adds_no_collective():
    run_ranks(ddp_body, 2)


def zero_body(rank, world_size):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    for backend in BACKENDS:
        for name, kw in OPTIMIZERS:
            ref_model, our_model = DDP(_model()), DDP(_model())
            ref_opt = getattr(torch.optim, name)(ref_model.parameters(), **kw)
            # "world" (picklable) for one optimizer, the ProcessGroup itself for the others
            group = "world" if name == "SGD" else dist.group.WORLD
            our_opt = ZeroRedundancyOptimizer(
                our_model.parameters(), optimizer_class=getattr(fusedopt, name), **kw,
                max_grad_norm=0.5, norm_group=group, backend=backend)
            local_opt = our_opt.optim
            assert local_opt.norm_group is group
            held = {id(p) for g in local_opt.param_groups for p in g["params"]}
            assert 0 < len(held) < len(list(our_model.parameters()))  # partitioned
            for step in range(STEPS):
                x = _batch(rank, step)
                for m in (ref_model, our_model):
                    m(x).square().sum().backward()
                total = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
                ref_opt.step()
                with CollectiveCounter() as counter:
                    our_opt.step()
                assert counter.all_reduce == 1
                _assert_close(local_opt.grad_norm, total, f"ZeRO {name} {backend} grad_norm")
                ref_opt.zero_grad()
                our_opt.zero_grad()
            for (n, r), o in zip(ref_model.named_parameters(), our_model.parameters()):
                _assert_close(o, r, f"rank {rank} ZeRO {name} {backend} {n}")
            # ZeRO's checkpoint: consolidate pickles each rank's state_dict (the group that ZeRO
            # copied into every param group is left out); ZeRO's own state_dict keeps its
            # keywords, so it pickles only with norm_group="world"
            our_opt.consolidate_state_dict(to=0)
            if rank == 0:
                full_state = our_opt.state_dict()
                if group == "world":
                    torch.save(full_state, io.BytesIO())
                    assert full_state["param_groups"][0]["norm_group"] == "world"
            torch.save(local_opt.state_dict(), io.BytesIO())
            twin = copy.deepcopy(local_opt)  # shares the group, copies the state
            assert twin.norm_group is group and twin.state is not local_opt.state
            if group is not dist.group.WORLD:
                pickle.dumps(local_opt)
            else:
                with pytest.raises(TypeError, match="cannot be pickled .* norm_group=\"world\""):
                    pickle.dumps(local_opt)


def test_zero_with_norm_group_clips_by_the_global_norm():
    run_ranks(zero_body, 2)


def fsdp1_body(rank, world_size):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def wrap(model):
        return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    for backend in BACKENDS:
        ref_model, our_model = wrap(_model()), wrap(_model())
        ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.01)
        our_opt = fusedopt.AdamW(our_model.parameters(), lr=0.01, max_grad_norm=0.5,
                                 norm_group=dist.group.WORLD, backend=backend)
        for step in range(STEPS):
            x = _batch(rank, step)
            for m in (ref_model, our_model):
                m(x).square().sum().backward()
            total = ref_model.clip_grad_norm_(0.5)  # FSDP1's own clip
            ref_opt.step()
            our_opt.step()
            _assert_close(our_opt.grad_norm, total, f"FSDP1 {backend} grad_norm")
            ref_opt.zero_grad()
            our_opt.zero_grad()
        for (n, r), o in zip(ref_model.named_parameters(), our_model.parameters()):
            _assert_close(o, r, f"rank {rank} FSDP1 {backend} {n}")


def test_fsdp1_with_norm_group_matches_its_own_clip():
    run_ranks(fsdp1_body, 2)


def idle_rank_body(rank, world_size):
    """A rank whose params have no grad this step still joins the all-reduce (no hang), and
    every rank clips by the norm of the grads that exist."""
    for backend in BACKENDS:
        params = [torch.nn.Parameter(torch.ones(12) * (rank + 1)) for _ in range(2)]
        opt = fusedopt.SGD(params, lr=0.1, max_grad_norm=1.0, norm_group=dist.group.WORLD,
                           backend=backend)
        if rank == 0:
            for p in params:
                p.grad = torch.full_like(p, 2.0)
        opt.step()
        expected = math.sqrt(2 * 12 * 4.0)  # rank 0's two grads; rank 1 has none
        assert abs(float(opt.grad_norm) - expected) < 1e-5 * expected, float(opt.grad_norm)


def test_rank_without_grads_still_joins_the_collective():
    run_ranks(idle_rank_body, 2)


# -- the contract: non-finite policies, GradScaler, Tensor lr, schedulers ------------------------

def nonfinite_body(rank, world_size):
    """An inf on one rank's shard only: every rank skips (the flag rides in the collective)."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world_size,))
    for backend in BACKENDS:
        for policy in ("skip", "raise"):
            model = _fsdp2(mesh)(_model())
            opt = fusedopt.Adam(model.parameters(), lr=0.1, max_grad_norm=0.5, nonfinite=policy,
                                backend=backend)
            model(_batch(rank, 0)).sum().backward()
            before = [_local(p).clone() for p in model.parameters()]
            if rank == 1:
                _local(next(model.parameters()).grad)[0, 0] = float("inf")
            with CollectiveCounter() as counter:
                if policy == "raise":
                    where = r"\(inf in group 0, parameter 0" if rank == 1 else "on another rank"
                    with pytest.raises(FloatingPointError, match=where):
                        opt.step()
                else:
                    opt.step()
            assert counter.all_reduce == 1
            assert float(opt.step_skipped) == 1.0, (rank, backend, policy)
            assert all(torch.equal(_local(p), b) for p, b in zip(model.parameters(), before))
            assert all(float(s["step"]) == 0 for s in opt.state.values())
        # no clip, skip policy alone: the flag still needs (and gets) the one collective
        model = _fsdp2(mesh)(_model())
        opt = fusedopt.SGD(model.parameters(), lr=0.1, nonfinite="skip", backend=backend)
        model(_batch(rank, 0)).sum().backward()
        if rank == 0:
            _local(next(model.parameters()).grad)[0, 0] = float("nan")
        with CollectiveCounter() as counter:
            opt.step()
        assert counter.all_reduce == 1 and float(opt.step_skipped) == 1.0


def test_nonfinite_on_one_rank_skips_every_rank():
    run_ranks(nonfinite_body, 2)


def amp_body(rank, world_size):
    """GradScaler (torch's and fusedopt's) under FSDP2 against torch's recipe
    (scaler.unscale_, clip_grad_norm_, scaler.step), overflow on one rank included."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world_size,))
    for backend in BACKENDS:
        for scaler_type in (torch.amp.GradScaler, fusedopt.GradScaler):
            ref_model, our_model = _fsdp2(mesh)(_model()), _fsdp2(mesh)(_model())
            ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.01)
            our_opt = fusedopt.AdamW(our_model.parameters(), lr=0.01, max_grad_norm=0.5,
                                     backend=backend)
            ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
            our_scaler = scaler_type("cpu", init_scale=2.0 ** 10)
            for step in range(STEPS):
                x = _batch(rank, step)
                for m, s in ((ref_model, ref_scaler), (our_model, our_scaler)):
                    s.scale(m(x).square().sum()).backward()
                if step == 1 and rank == 1:  # an overflow on one rank: both skip
                    for m in (ref_model, our_model):
                        _local(next(m.parameters()).grad)[0, 0] = float("inf")
                ref_scaler.unscale_(ref_opt)
                torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
                ref_scaler.step(ref_opt)
                our_scaler.step(our_opt)
                ref_scaler.update()
                our_scaler.update()
                assert ref_scaler.get_scale() == our_scaler.get_scale(), (step, scaler_type)
                ref_opt.zero_grad()
                our_opt.zero_grad()
            _compare(rank, ref_model, our_model, ref_opt, our_opt, f"AMP {scaler_type} {backend}")


def test_grad_scalers_under_fsdp2():
    run_ranks(amp_body, 2)


def scheduler_body(rank, world_size):
    """A Tensor lr moved by a scheduler, under FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world_size,))
    for backend in BACKENDS:
        ref_model, our_model = _fsdp2(mesh)(_model()), _fsdp2(mesh)(_model())
        ref_opt = torch.optim.Adam(ref_model.parameters(), lr=torch.tensor(0.01))
        our_opt = fusedopt.Adam(our_model.parameters(), lr=torch.tensor(0.01), max_grad_norm=0.5,
                                backend=backend)
        scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
                  for o in (ref_opt, our_opt)]
        for step in range(STEPS):
            x = _batch(rank, step)
            for m in (ref_model, our_model):
                m(x).square().sum().backward()
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
            ref_opt.step()
            our_opt.step()
            for s in scheds:
                s.step()
            ref_opt.zero_grad()
            our_opt.zero_grad()
        _compare(rank, ref_model, our_model, ref_opt, our_opt, f"scheduler {backend}")


def test_tensor_lr_and_scheduler_under_fsdp2():
    run_ranks(scheduler_body, 2)


# -- errors --------------------------------------------------------------------------------------

def errors_body(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world_size,))
    model = _fsdp2(mesh)(_model())
    model(_batch(rank, 0)).sum().backward()
    opt = fusedopt.AdamW(model.parameters(), max_grad_norm=1.0, norm_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="norm_group= declares plain-tensor shards"):
        opt.step()
    p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]).redistribute(
        placements=[Shard(1)])
    with pytest.raises(ValueError, match=r"placements \(Shard\(dim=0\),\) but its gradient"):
        fusedopt.SGD([p], max_grad_norm=1.0).step()
    p.grad = torch.distributed.tensor.DTensor.from_local(torch.ones(4, 2), mesh, [Partial()])
    with pytest.raises(ValueError, match="Partial placement"):
        fusedopt.SGD([p], max_grad_norm=1.0).step()
    for backend in BACKENDS:  # without a clip too: the update on local shards needs the sum
        with pytest.raises(ValueError, match="Partial placement"):
            fusedopt.SGD([p], backend=backend).step()
    # nothing was written by the refused steps
    assert torch.equal(_local(p), torch.ones(2, 2))
    # DTensors on two unrelated meshes (two root meshes): no one group for the norm
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate
    other = DeviceMesh("cpu", [[0], [1]], mesh_dim_names=("a", "b"))
    r = torch.nn.Parameter(distribute_tensor(torch.ones(4), other, [Shard(0), Replicate()]))
    r.grad = distribute_tensor(torch.ones(4), other, [Shard(0), Replicate()])
    s = torch.nn.Parameter(distribute_tensor(torch.ones(4), mesh, [Shard(0)]))
    s.grad = distribute_tensor(torch.ones(4), mesh, [Shard(0)])
    with pytest.raises(ValueError, match="DTensors on unrelated device meshes"):
        fusedopt.SGD([s, r], max_grad_norm=1.0).step()
    # a Triton plan cached over Shard(0) grads meets a grad of the same local size with other
    # placements: the fast path must not take it (the slow path refuses it)
    q = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
    opt = fusedopt.SGD([q], lr=0.1, max_grad_norm=1.0, backend="triton")
    for _ in range(2):
        q.grad = distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)])
        opt.step()
    assert opt._step_plan is not None
    q.grad = distribute_tensor(torch.ones(4, 4), mesh, [Shard(1)])  # local 4x2: also 8 elements
    with pytest.raises(ValueError, match="but its gradient"):
        opt.step()


def test_distributed_errors_name_the_problem():
    run_ranks(errors_body, 2)


def test_norm_group_must_be_a_process_group():
    with pytest.raises(TypeError, match="norm_group must be a torch.distributed ProcessGroup, "
                                        "\"world\" \\(the default group\\) or None, got 'WORLD'"):
        fusedopt.AdamW([torch.nn.Parameter(torch.ones(2))], norm_group="WORLD")


def test_other_tensor_subclasses_still_refused_by_triton():
    class Marked(torch.Tensor):
        pass
    p = torch.ones(4).as_subclass(Marked).requires_grad_()
    with pytest.raises(RuntimeError, match="is a Marked; the kernels take plain tensors and "
                                           "DTensors only"):
        fusedopt.AdamW([p], backend="triton")


def swap_body(rank, world_size):
    """A DTensor's local tensor replaced between two Triton steps (what .data = or a reshard
    does): the cached plan's addresses are stale, so the step rebuilds it and updates the new
    memory, as the torch path does."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world_size,))
    models = [_fsdp2(mesh)(_model()) for _ in range(2)]
    opts = [fusedopt.AdamW(m.parameters(), lr=0.1, max_grad_norm=0.5, backend=b)
            for m, b in zip(models, BACKENDS)]
    for step in range(3):
        if step == 2:
            for m in models:
                p = next(m.parameters())
                p._local_tensor = p._local_tensor.clone()
        for m, opt in zip(models, opts):
            m(_batch(rank, step)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(*(m.parameters() for m in models)):
        _assert_close(_local(b), _local(a), f"rank {rank} after the swap")


def test_swapped_local_tensor_rebuilds_the_plan():
    run_ranks(swap_body, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: NCCL and host "
                    "syncs exist only there")
def test_fsdp2_step_makes_no_host_sync_on_cuda():
    """One NCCL rank, FSDP2 on CUDA, clip + nonfinite='skip': the step's all-reduce and the
    update run with torch's sync debug mode set to error."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        model = fully_shard(torch.nn.Linear(64, 32).cuda(), mesh=mesh)
        opt = fusedopt.AdamW(model.parameters(), max_grad_norm=0.1, nonfinite="skip")
        for _ in range(3):
            model(torch.randn(8, 64, device="cuda")).sum().backward()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            opt.zero_grad()
        assert float(opt.step_skipped) == 0.0 and float(opt.grad_norm) > 0.1
    finally:
        dist.destroy_process_group()
