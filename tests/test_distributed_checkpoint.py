"""torch.distributed.checkpoint (DCP) with fusedopt under FSDP2, gloo on CPU: a checkpoint resumes
training bit for bit on both backends, holds what torch.optim's holds (and each loads into the
other), and resumes on another world size (saved on 2 ranks, loaded on 1).

Every run: Linear(8, 16) + ReLU + Linear(16, 3) under per-layer ``fully_shard`` on a 1-D mesh (the
3-row layer shards unevenly, 2 + 1 rows), weights and biases in two param groups, each rank its
own seeded batch, max_grad_norm below every step's pre-clip norm so that the clip scales every
step (asserted). One 2-rank spawn does every 2-rank run and writes what each rank saw; the tests
compare those records, and the 1-rank test resumes from the 2-rank checkpoints. Time goes to
the imports of each spawned process (torch.distributed.tensor's alone ~2 s of CPU) and to the
Triton steps (0.1 to 0.3 s each in the interpreter, 3 launches: the norm pass, 2 param groups).
"""
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map_only

import fusedopt
from conftest import TOL
from ranks import full, run_ranks

K, M = 3, 2  # steps before the checkpoint, steps after it
# Pre-clip norms seen here: 0.83 to 1.28 (AdamW), 0.84 to 1.30 (SGD); the tests assert norm > this
# on every step, so that the clip scales every step.
MAX_GRAD_NORM = 0.1
CONFIGS = {  # kind: fusedopt's class, torch.optim's, options
    "AdamW": (fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "SGD": (fusedopt.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
}
CASES = [f"{kind}-{backend}" for kind in CONFIGS for backend in ("torch", "triton")]
# fusedopt vs torch.optim, and 1 rank vs 2, are the same math in another order: the clip folded
# into the fused op as a division (torch: clip_grad_norm_'s multiply), the norm summed per shard
# in fp64 (torch: per tensor, as DTensors), one matmul over 8 rows (2 ranks: two over 4, averaged
# by FSDP's reduce-scatter). Each tensor to RTOL of each element plus RTOL of its largest
# |element| (assert_same): exp_avg's and momentum_buffer's small entries come out of cancellation
# (m = 0.9 m + 0.1 g), so their error is in ulps of the large ones (5.6e-5 relative seen on an
# exp_avg entry of 1.4e-6), and conftest's fixed atol 1e-6 would pass any exp_avg_sq here (all
# below 5.3e-6). Largest difference seen, in units of 1e-7 * (|x| + max|x|) (about an ulp of
# each): 1.4 (exp_avg_sq, 1 rank vs 2), 1.3 (exp_avg_sq, fusedopt-triton vs torch.optim), 0.5 on
# parameters; the tolerance is 100 of those units, conftest's fp32 rtol.
RTOL = TOL[torch.float32]["rtol"]
FULL = StateDictOptions(full_state_dict=True)  # gathered plain tensors, on every rank
OURS, THEIRS = "fusedopt", "torch.optim"


# -- what the rank bodies share -------------------------------------------------------------------

def make_model(seed, mesh=None):
    """The model under per-layer FSDP2 on ``mesh`` (plain when None), the same initial values on
    every rank (seeded)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    if mesh is None:
        return model
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def make_opt(model, case, who):
    """fusedopt's optimizer (clip inside step, the case's backend) or torch.optim's, two groups."""
    kind, backend = case.split("-")
    ours_cls, torch_cls, options = CONFIGS[kind]
    named = list(model.named_parameters())
    groups = [dict(params=[p for n, p in named if n.endswith("weight")]),
              dict(params=[p for n, p in named if n.endswith("bias")], lr=options["lr"] / 2,
                   weight_decay=0.0)]
    if who == OURS:
        return ours_cls(groups, **options, max_grad_norm=MAX_GRAD_NORM, backend=backend)
    return torch_cls(groups, **options)


def batch(step, data_ranks):
    """Step ``step``'s batch for a process standing for ``data_ranks`` of the 2-rank run: its own
    rank there; on 1 rank both, where FSDP's mean over 2 ranks becomes one mean over 8 rows."""
    xs, ys = [], []
    for r in data_ranks:
        g = torch.Generator().manual_seed(1000 * step + r)
        xs.append(torch.randn(4, 8, generator=g))
        ys.append(torch.randn(4, 3, generator=g))
    return torch.cat(xs), torch.cat(ys)


def train(model, opt, who, steps, data_ranks):
    """Steps ``steps``; each step's pre-clip global norm. torch.optim's recipe: clip_grad_norm_,
    then step."""
    norms = []
    for s in steps:
        x, y = batch(s, data_ranks)
        nn.functional.mse_loss(model(x), y).backward()
        if who == THEIRS:
            norms.append(full(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)))
        opt.step()
        if who == OURS:
            norms.append(opt.grad_norm.clone())
        opt.zero_grad()
    return torch.stack(norms)


def save(model, opt, path):
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)


def load(model, opt, path, in_place, partial=False):
    """A training script's resume: the fresh objects' own (sharded) state dicts as the template,
    dcp.load into them, then set_*_state_dict (whose set_optimizer_state_dict first steps a
    stateless optimizer once at lr=0 on zero grads, to create its state: torch's
    _init_optim_state). ``in_place``: the template holds the objects' own tensors, so dcp.load
    alone already writes the state into them (the usual recipe); else a copy, so that the state
    reaches them only through set_*_state_dict (optimizer.load_state_dict). ``partial``: the
    checkpoint lacks keys the template has (torch.optim's, read by a fusedopt optimizer that
    clips: its groups hold max_grad_norm), which dcp.load refuses unless told (the README's
    recipe); the optimizer's own clip then stands (load_state_dict fills DCP's None)."""
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    if not in_place:
        sd = tree_map_only(torch.Tensor, torch.clone, sd)
    dcp.load(sd, checkpoint_id=path,
             planner=DefaultLoadPlanner(allow_partial_load=True) if partial else None)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


def _leaf(t):
    """A state-dict tensor as the records keep it: a copy (Adam's plain ``step`` comes back as the
    optimizer's own tensor, stepped in place later); a DTensor as its layout and this rank's
    shard."""
    if isinstance(t, DTensor):
        return {"layout": (str(t.device_mesh), str(t.placements), tuple(t.shape), t.stride()),
                "shard": t.to_local().clone()}
    return t.clone()


def record(model, opt):
    """The full (gathered) model and optimizer state dicts, and the optimizer's sharded one as
    DCP saves it (collectives: every rank calls this)."""
    return tree_map_only(torch.Tensor, _leaf, {
        "full": {"model": get_model_state_dict(model, options=FULL),
                 "optim": get_optimizer_state_dict(model, opt, options=FULL)},
        "sharded": get_optimizer_state_dict(model, opt)})


def flat(tree, prefix=""):
    """{'/optim/state/0.weight/exp_avg': tensor, ...}: a nested state dict's leaves by path (a
    tuple of plain values, like betas or a layout, is one leaf)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in tree):
        return {k: v for i, sub in enumerate(tree) for k, v in flat(sub, f"{prefix}/{i}").items()}
    return {prefix: tree}


def without_clip_setting(leaves: dict, what) -> dict:
    """``leaves`` less fusedopt's clip setting in the param groups (torch.optim's have none),
    which must be the one the runs use wherever it is present."""
    for k, v in leaves.items():
        if k.endswith("/max_grad_norm"):
            assert v == MAX_GRAD_NORM, f"{what} {k}: {v!r}"
    return {k: v for k, v in leaves.items() if not k.endswith("/max_grad_norm")}


def assert_same(actual, expected, what, rtol=None, torch_side=False):
    """The same paths and leaves: tensors bit for bit, or when ``rtol`` is given to rtol of each
    element plus rtol of the tensor's largest |element| (see RTOL); everything else
    (hyperparameters, param FQNs, DTensor layouts) equal. ``torch_side``: one side is (or was
    loaded by) torch.optim, whose groups lack fusedopt's max_grad_norm."""
    a, e = flat(actual), flat(expected)
    if torch_side:
        a, e = without_clip_setting(a, what), without_clip_setting(e, what)
    assert a.keys() == e.keys(), f"{what}: paths differ: {sorted(a.keys() ^ e.keys())}"
    for k, want in e.items():
        got = a[k]
        if not isinstance(want, torch.Tensor):
            assert got == want, f"{what} {k}: {got!r} vs {want!r}"
        elif rtol is not None:
            atol = rtol * float(want.abs().max()) if want.numel() else 0.0
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol,
                                       msg=lambda m, k=k: f"{what} {k}: {m}")
        else:
            assert isinstance(got, torch.Tensor) and got.dtype == want.dtype \
                and torch.equal(got, want), f"{what} {k}: not bit for bit ({got} vs {want})"


# -- the 2-rank runs ----------------------------------------------------------------------------

def _two_rank_runs(rank, world_size, root):
    """Per case, on each rank, written to root/<case>/rank<r>.pt:
    - fusedopt and torch.optim (clip_grad_norm_, then step) side by side for K steps, each saving
      a DCP checkpoint to root/<case>/<who>, then stepping M more (uninterrupted: the same
      objects; saving only reads them);
    - fresh models and optimizers (other initial values, which the load must replace) that load
      a checkpoint through set_*_state_dict (load's in_place=False; the 1-rank resume takes the
      in-place route) and step M more: fusedopt from fusedopt's, torch.optim from fusedopt's,
      fusedopt from torch.optim's.
    """
    mesh = init_device_mesh("cpu", (world_size,))
    for case in CASES:
        runs = {}
        for who in (OURS, THEIRS):
            model = make_model(0, mesh)
            opt = make_opt(model, case, who)
            norms = train(model, opt, who, range(K), (rank,))
            at_k = record(model, opt)
            save(model, opt, f"{root}/{case}/{who}")
            norms = torch.cat([norms, train(model, opt, who, range(K, K + M), (rank,))])
            runs[who] = dict(norms=norms, at_k=at_k, final=record(model, opt))
        for writer, reader in ((OURS, OURS), (OURS, THEIRS), (THEIRS, OURS)):
            model = make_model(1, mesh)
            opt = make_opt(model, case, reader)
            load(model, opt, f"{root}/{case}/{writer}", in_place=False,
                 partial=(writer, reader) == (THEIRS, OURS))
            loaded = record(model, opt)
            norms = train(model, opt, reader, range(K, K + M), (rank,))
            runs[f"{reader} from {writer}'s"] = dict(loaded=loaded, norms=norms,
                                                     final=record(model, opt))
        torch.save(runs, f"{root}/{case}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    run_ranks(_two_rank_runs, 2, str(root))
    return root


def runs_of(root, case, rank):
    return torch.load(root / case / f"rank{rank}.pt")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rank", [0, 1], ids=["rank0", "rank1"])
def test_resume_is_bitwise(two_rank_runs, case, rank):
    """K steps, dcp.save, fresh model and optimizer, dcp.load + set_*_state_dict, M steps: the
    same bits as the run that went on. Bit for bit, not to a tolerance: DCP stores the tensors'
    bytes, and the resumed run then does the same ops on the same values on the same ranks."""
    runs = runs_of(two_rank_runs, case, rank)
    ours, resumed = runs[OURS], runs[f"{OURS} from {OURS}'s"]
    assert (ours["norms"] > MAX_GRAD_NORM).all(), f"clip inactive on some step: {ours['norms']}"
    assert_same(resumed["loaded"], ours["at_k"], "after the load vs as saved")
    assert torch.equal(resumed["norms"], ours["norms"][K:]), (resumed["norms"], ours["norms"])
    assert_same(resumed["final"], ours["final"], "resumed vs went on")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rank", [0, 1], ids=["rank0", "rank1"])
def test_state_dict_is_torch_optims(two_rank_runs, case, rank):
    """get_optimizer_state_dict after K steps, fusedopt (clip inside step) vs torch.optim +
    clip_grad_norm_: the same keys and param groups (fusedopt's add its max_grad_norm), DTensors with FSDP's placements where
    torch.optim has them (exp_avg, exp_avg_sq, momentum_buffer; Adam's step a plain fp32 tensor
    in both), values to fp32 rounding (RTOL)."""
    runs = runs_of(two_rank_runs, case, rank)
    assert (runs[THEIRS]["norms"] > MAX_GRAD_NORM).all(), runs[THEIRS]["norms"]
    torch.testing.assert_close(runs[OURS]["norms"], runs[THEIRS]["norms"], rtol=RTOL, atol=0.0)
    assert_same(runs[OURS]["at_k"], runs[THEIRS]["at_k"], f"{OURS} vs {THEIRS}", RTOL,
                torch_side=True)
    assert flat(runs[OURS]["at_k"]["sharded"])["/param_groups/0/max_grad_norm"] == MAX_GRAD_NORM


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rank", [0, 1], ids=["rank0", "rank1"])
def test_checkpoint_crosses_to_torch_optim(two_rank_runs, case, rank):
    """fusedopt's DCP checkpoint loads into torch.optim, and torch.optim's into fusedopt, bit for
    bit; each then steps on as the writer did, to fp32 rounding (RTOL)."""
    runs = runs_of(two_rank_runs, case, rank)
    for writer, reader in ((OURS, THEIRS), (THEIRS, OURS)):
        crossed = runs[f"{reader} from {writer}'s"]
        assert_same(crossed["loaded"], runs[writer]["at_k"], f"{reader} after loading {writer}'s",
                    torch_side=True)
        torch.testing.assert_close(crossed["norms"], runs[writer]["norms"][K:], rtol=RTOL, atol=0.0)
        assert_same(crossed["final"], runs[writer]["final"],
                    f"{reader} from {writer}'s vs {writer} went on", RTOL, torch_side=True)


# -- another world size: saved on 2 ranks, resumed on 1 -------------------------------------------

def _one_rank_resume(rank, world_size, root):
    """Per case: fusedopt's 2-rank checkpoint loaded into a model under FSDP2 on a 1-rank mesh,
    and into a plain one (DTensor state in, plain tensors out; fusedopt's non-distributed step)."""
    mesh = init_device_mesh("cpu", (world_size,))
    for case in CASES:
        went_on = torch.load(f"{root}/{case}/rank0.pt")[OURS]
        for on in (mesh, None):
            what = f"{case} on 1 rank, {'plain' if on is None else 'FSDP2'}"
            model = make_model(1, on)
            opt = make_opt(model, case, OURS)
            load(model, opt, f"{root}/{case}/{OURS}", in_place=True)
            # resharding only moves bytes: the whole state as the 2 ranks saved it, bit for bit
            assert_same(record(model, opt)["full"], went_on["at_k"]["full"], f"{what}, loaded")
            norms = train(model, opt, OURS, range(K, K + M), (0, 1))  # both ranks' batches
            torch.testing.assert_close(norms, went_on["norms"][K:], rtol=RTOL, atol=0.0)
            assert_same(record(model, opt)["full"], went_on["final"]["full"],
                        f"{what}, resumed vs went on on 2", RTOL)


def test_resume_on_one_rank(two_rank_runs):
    """fusedopt's 2-rank checkpoints loaded on 1 rank, into FSDP2 on a 1-rank mesh (DCP
    reshards: 2 shards -> 1, the 3-row layer's 2 + 1 rows included) and into the plain model,
    bit for bit; then stepped M more on both ranks' batches: the 2-rank run's parameters and
    state to fp32 rounding (RTOL)."""
    run_ranks(_one_rank_resume, 1, str(two_rank_runs))
