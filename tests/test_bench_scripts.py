"""The main job's scripts still run end to end (tiny settings; timings are not looked at)."""
import datetime
import importlib
import io
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch

from conftest import BENCH, run_bench


def test_run_py_writes_markdown_json_and_chart(tmp_path):
    out = run_bench("run.py", "--shapes", "smoke", "--optimizers", "sgd,adamw", "--dtypes",
                    "float32", "--clip", "on,off,amp", "--steps", "2", "--warmup", "1",
                    out_dir=tmp_path)
    assert "fusedopt against the best torch recipe" in out
    (md,) = tmp_path.glob("cpu-*.md")
    data = json.loads(md.with_suffix(".json").read_text())
    impls = {r["impl"] for r in data["results"]}
    assert {"torch for-loop", "torch foreach", "torch fused", "fusedopt (torch)"} <= impls
    assert len(data["results"]) == 2 * 3 * len(impls)
    assert {r["clip"] for r in data["results"]} == {"on", "off", "amp"}
    assert all(len(r["times_ms"]) == 2 and r["median_ms"] > 0 for r in data["results"])
    assert all(r["row_s"] > 0 for r in data["results"]) and data["meta"]["wall_s"] > 0
    assert data["meta"]["copy_gbs"] > 0
    assert md.with_suffix(".png").stat().st_size > 0
    assert md.name.endswith("-smoke-sgd_adamw-fp32-steps2-warmup1.md")  # not the full run's name


def test_run_py_from_another_directory_never_overwrites(tmp_path):
    """Run from another directory, a relative --out-dir counts from there (the default is
    bench/results/ beside the script: test_default_out_dir_is_beside_the_scripts); the same run
    again takes the next name; progress lines count rows and say the time left."""
    cmd = [sys.executable, str(BENCH / "run.py"), "--shapes", "smoke", "--optimizers", "sgd",
           "--dtypes", "float32", "--clip", "on", "--steps", "1", "--warmup", "1",
           "--device", "cpu", "--out-dir", "rel"]
    for _ in range(2):
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    stem = f"cpu-{datetime.date.today().isoformat()}-smoke-sgd-fp32-clipon-steps1-warmup1"
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == sorted(
        f"{stem}{n}.{ext}" for n in ("", "-2") for ext in ("md", "json", "png"))
    lines = [x for x in done.stderr.splitlines() if x.startswith("[")]
    assert [x.split("]")[0] for x in lines] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert all(x.endswith(" left)") for x in lines[:-1]) and "(done in " in lines[-1]


@pytest.fixture
def bench_modules(monkeypatch):
    """bench/ on sys.path for importing its scripts in-process; their modules dropped after, and
    TRITON_INTERPRET as it was (host.py sets it on import)."""
    monkeypatch.syspath_prepend(str(BENCH))
    if "TRITON_INTERPRET" in os.environ:
        monkeypatch.setenv("TRITON_INTERPRET", os.environ["TRITON_INTERPRET"])
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = set(sys.modules)
    yield importlib.import_module
    for name in set(sys.modules) - before:
        if name in ("run", "measure", "report", "shapes", "train", "muon", "host", "tune",
                    "distributed"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("script,argv", [
    ("run", []), ("run", ["--memory"]), ("train", []), ("train", ["--memory"]), ("muon", []),
    ("host", []), ("distributed", ["--device", "cpu"]), ("tune", ["--smoke", "--device", "cpu"])])
def test_default_out_dir_is_beside_the_scripts(bench_modules, monkeypatch, tmp_path, script,
                                               argv):
    """Every script that writes results defaults to <repo>/bench/results/, whatever the current
    directory (from inside bench/ it once wrote bench/bench/results/); the default full run has
    no tag in its file names."""
    if script == "tune":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # tune.py runs on CPU only interpreted
    module = bench_modules(script)
    for cwd in (BENCH, tmp_path):
        monkeypatch.chdir(cwd)
        args = module.parse_args(argv)
        assert pathlib.Path(args.out_dir) == BENCH / "results"
        assert args.tag == ("smoke" if script == "tune" else "")


def test_run_tags_and_names(bench_modules, tmp_path):
    """One naming scheme for every script (report.result_paths): what kind of run it was, and
    never another run's name."""
    report, run = bench_modules("report"), bench_modules("run")
    tags = {tuple(argv): run.parse_args(argv + ["--device", "cpu"]).tag for argv in (
        [], ["--quick"], ["--quick", "--compile"], ["--optimizers", "family"],
        ["--clip", "amp"], ["--shapes", "smoke", "--optimizers", "sgd", "--dtypes", "float32",
                            "--steps", "3"],
        ["--memory"], ["--memory", "--quick"], ["--memory", "bf16+sr,fp16+master"])}
    assert list(tags.values()) == [
        "", "quick", "quick-compile", "family", "clipamp", "smoke-sgd-fp32-steps3", "", "quick",
        "bf16+sr_fp16+master"]
    # given as the default, an option is no different kind of run
    assert run.parse_args(["--device", "cpu", "--dtypes", "float32,bfloat16"]).tag == ""
    assert report.run_tag("", {"impls": ["torch fused", "fusedopt (torch)"]}) == \
        "torch-fused_fusedopt-torch"
    assert len(report.run_tag("", {"x": ["a" * 50, "b" * 50]})) == report.MAX_TAG
    day = datetime.date.today().isoformat()
    device = "CPU (2 torch threads)"
    full = report.result_paths(tmp_path, "", device, "", ("md", "json", "png"))
    assert full["md"].name == f"cpu-{day}.md"
    full["png"].write_text("")  # any kind taken takes the name
    again = report.result_paths(tmp_path, "", device, "", ("md", "json", "png"))
    assert again["md"].name == f"cpu-{day}-2.md"
    quick = report.result_paths(tmp_path, "", device, "quick", ("md", "json"))
    assert quick["md"].name == f"cpu-{day}-quick.md"
    quick["md"].write_text("")
    assert report.result_paths(tmp_path, "", device, "quick", ("md",))["md"].name == \
        f"cpu-{day}-quick-2.md"
    host = report.result_paths(tmp_path / "new", "host", device, "", ("md", "-profile.txt"))
    assert host["-profile.txt"].name == f"host-cpu-{day}-profile.txt"
    assert (tmp_path / "new").is_dir()


def test_progress_says_the_time_left(bench_modules):
    report = bench_modules("report")
    assert [report.eta_text(s) for s in (0.4, 45, 190, 3600 + 300)] == [
        "0 s", "45 s", "3 min 10 s", "1 h 5 min"]
    out, now = io.StringIO(), [0.0]
    progress = report.Progress(5, stream=out, clock=lambda: now[0])
    progress.skip()  # a row not measured (say too large for the memory) costs nothing
    now[0] = 10.0
    progress.row("a: 1 ms")
    now[0] = 20.0
    progress.row("b: skipped", measured=True)
    now[0] = 30.0
    progress.row("c: 2 ms")
    progress.row("d: 3 ms")
    assert out.getvalue().splitlines() == [
        "[2/5] a: 1 ms (30 s left)", "[3/5] b: skipped (20 s left)", "[4/5] c: 2 ms (10 s left)",
        "[5/5] d: 3 ms (done in 30 s)"]
    # rows weighed by their work: 1 s for 1 unit, 3 units left
    out, now = io.StringIO(), [0.0]
    progress = report.Progress(3, total_work=4.0, stream=out, clock=lambda: now[0])
    now[0] = 1.0
    progress.row("small", work=1.0)
    assert out.getvalue() == "[1/3] small (3 s left)\n"


FAMILY = ("adagrad", "rmsprop", "nadam", "radam", "adamax", "lion", "lamb", "adafactor")
# the torch recipes of each (torch 2.13: fused only for Adagrad; Lion and LAMB: bench/run.py's
# stand-ins)
FAMILY_TORCH = {o: ("torch for-loop", "torch foreach") for o in FAMILY}
FAMILY_TORCH["adagrad"] += ("torch fused",)


def test_run_py_family_rows(tmp_path):
    """--optimizers family: every optimizer beyond SGD and Adam(W), each against the torch recipes
    its torch class offers, clipped and under a GradScaler."""
    out = run_bench("run.py", "--shapes", "smoke", "--optimizers", "family", "--dtypes",
                    "float32", "--clip", "on,amp", "--steps", "1", "--warmup", "1",
                    out_dir=tmp_path)
    data = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())
    rows = data["results"]
    assert [r["optimizer"] for r in rows if r["impl"] == "fusedopt (torch)"] == list(FAMILY) * 2
    for opt in FAMILY:
        mine = [r for r in rows if r["optimizer"] == opt]
        for clip in ("on", "amp"):
            impls = [r["impl"] for r in mine if r["clip"] == clip]
            assert sorted(impls) == sorted(FAMILY_TORCH[opt] + ("fusedopt (torch)",)), (opt, impls)
        for r in mine:
            assert r["median_ms"] > 0 and r["gb_per_s"] > 0 and r["bytes_per_element"] > 0
            assert r["best_torch_impl"] in FAMILY_TORCH[opt]
        assert f"clip amp {opt}, fusedopt (torch): **" in out  # the summary, printed
    assert data["meta"]["hyperparameters"]["rmsprop"] == dict(lr=1e-3, momentum=0.9, centered=True)
    assert data["meta"]["min_warmup"] == {"radam": 5}  # timed steps past RAdam's first 5
    # LAMB's and Adafactor's bytes are counted from their steps, the others' from the tables
    assert {r["optimizer"] for r in rows if r["bytes_counted"]} == {"lamb", "adafactor"}


MEMORY = ("bf16", "bf16+sr", "bf16+sr+fp32-states", "bf16+master", "bf16+master+fp32-states",
          "fp16+master", "fp16+master+fp32-states", "fp32+bf16-states")


def test_run_py_memory_rows(tmp_path):
    """--memory: each memory-lean configuration with fusedopt against torch's recipes for its
    param dtype (the fp32 master copy for master weights), each recipe timed once per dtype;
    state bytes from opt.state, fusedopt's torch-path bytes counted."""
    out = run_bench("run.py", "--shapes", "smoke", "--memory", "--optimizers", "adamw",
                    "--steps", "1", "--warmup", "1", out_dir=tmp_path)
    assert "fusedopt against the best torch recipe for the same param dtype" in out
    (md,) = tmp_path.glob("memory-cpu-*.md")
    data = json.loads(md.with_suffix(".json").read_text())
    rows = data["results"]
    assert list(data["meta"]["memory"]) == list(MEMORY)
    ours = [r for r in rows if r["memory"] is not None]
    assert [r["memory"] for r in ours] == list(MEMORY)
    assert all(r["impl"] == "fusedopt (torch)" and r["bytes_counted"] for r in ours)
    by_name = {r["memory"]: r for r in ours}
    # bf16 params, fp32 states, int16 remainders, fp32 copies: opt.state bytes per param (the
    # step counters add 4 bytes per tensor, ~0.003 here)
    state = {"bf16": 4, "bf16+sr": 4, "bf16+sr+fp32-states": 8, "bf16+master": 6,
             "bf16+master+fp32-states": 10, "fp16+master": 8, "fp16+master+fp32-states": 12,
             "fp32+bf16-states": 4}
    for name, expected in state.items():
        assert abs(by_name[name]["state_bytes_per_param"] - expected) < 0.01, name
        assert by_name[name]["held_bytes_per_param"] == 0
    torch_rows = [r for r in rows if r["memory"] is None]
    # torch.optim in bf16 and fp32, the master recipe for bf16 and fp16: three impls each, once
    assert len(torch_rows) == 4 * 3
    for r in torch_rows:
        if r["recipe"] == "fp32 master":  # fp32 states in opt.state, fp32 copy + grads beside
            assert r["impl"].endswith(" + fp32 master") and r["dtype"] in ("bfloat16", "float16")
            assert abs(r["state_bytes_per_param"] - 8) < 0.01
            assert r["held_bytes_per_param"] == 8
        else:
            assert r["held_bytes_per_param"] == 0
    assert by_name["bf16+master"]["best_torch_impl"].endswith(" + fp32 master")
    assert abs(by_name["bf16+master"]["best_torch_state_bytes_per_param"] - 16) < 0.01
    assert not by_name["bf16+sr"]["best_torch_impl"].endswith(" + fp32 master")
    assert all(r["median_ms"] > 0 and r["bytes_per_element"] > 0 for r in rows)
    assert data["meta"]["versions"]["torch"] and data["meta"]["date"]


def test_run_py_memory_arguments_and_file_names(bench_modules, tmp_path):
    run = bench_modules("run")
    report = bench_modules("report")
    args = run.parse_args(["--memory", "--device", "cpu"])
    assert args.memory == list(run.MEMORY) and args.clip == ["on"]
    assert args.optimizers == ["adamw", "sgd"]
    assert run.parse_args(["--memory", "bf16+sr,fp16+master", "--device", "cpu"]).memory == \
        ["bf16+sr", "fp16+master"]
    assert run.parse_args(["--device", "cpu"]).memory is None  # not in the default matrix
    for bad in (["--memory", "bf17"], ["--memory", "--dtypes", "float32"],
                ["--memory", "--clip", "amp"], ["--memory", "--optimizers", "lamb"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad + ["--device", "cpu"])
    first = report.unused_paths(tmp_path, "memory-cpu-2026-01-01", "", ("md", "json"))
    first["json"].write_text("{}")  # any kind taken takes the name
    second = report.unused_paths(tmp_path, "memory-cpu-2026-01-01", "", ("md", "json"))
    assert second["md"].name == "memory-cpu-2026-01-01-2.md"


def test_master_recipe_is_fusedopts_master_weights(bench_modules):
    """run.make_master_step (torch.optim on fp32 masters copied into bf16 params) computes what
    fusedopt.AdamW(master_weights=True, state_dtype=torch.float32) does: the same fp32 masters to
    fp32 rounding, so the two rows of --memory compare like with like. Without the clip: with
    it, fusedopt's CPU torch path rounds each bf16 grad's norm to bf16, as clip_grad_norm_ does on
    bf16 grads (fusedopt/clip.py, for speed), where the recipe takes the norm of fp32 copies; the
    coefficients then differ by up to ~2**-8 and the masters by ~lr / 500 (2e-6 here)."""
    run = bench_modules("run")
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in ((33, 65), (127,))]
    grads = [[torch.randn(t.shape, generator=gen).to(torch.bfloat16) for t in init]
             for _ in range(4)]
    steps, finals = {}, {}
    for impl in ("torch fused + fp32 master", "fusedopt (torch)"):
        params = [t.clone().requires_grad_() for t in init]
        for p in params:
            p.grad = torch.zeros_like(p)
        step = run.make_step("adamw", impl, params, "off", "bf16+master+fp32-states")
        for gs in grads:
            torch._foreach_copy_([p.grad for p in params], gs)
            step()
        steps[impl] = step
        finals[impl] = params
    ours = steps["fusedopt (torch)"].optimizer
    masters = steps["torch fused + fp32 master"].held[:2]
    for p, master in zip(finals["fusedopt (torch)"], masters):
        torch.testing.assert_close(ours.master_param(p), master, rtol=1e-6, atol=1e-7)
    for a, b in zip(*finals.values()):  # bf16 params: the masters rounded (ties may differ)
        torch.testing.assert_close(a, b, rtol=2 ** -8, atol=0)


def test_train_py_loss_curves_coincide(tmp_path):
    out = run_bench("train.py", "--steps", "12", "--warmup", "2", out_dir=tmp_path)
    assert "max |loss a - loss b|" in out
    (result,) = tmp_path.glob("train-*.json")
    assert result.with_suffix(".png").stat().st_size > 0
    data = json.loads(result.read_text())
    assert result.name.startswith("train-cpu-")  # the default, AdamW, keeps its file name
    assert data["config"]["optimizer"] == "adamw"
    assert [r["name"] for r in data["runs"]] == ["torch clip_grad_norm_ + AdamW", "fusedopt.AdamW"]


@pytest.fixture
def train(bench_modules):
    """bench/train.py imported (bench_modules: its modules dropped after)."""
    return bench_modules("train")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", *FAMILY])  # adamw: the default, above
def test_train_py_optimizer(train, optimizer, tmp_path, capsys):
    """--optimizer NAME: fusedopt's class against its torch recipe, a few steps in-process (a
    subprocess each would spend most of its time importing torch)."""
    train.main(["--optimizer", optimizer, "--steps", "4", "--warmup", "1",
                "--out-dir", str(tmp_path)])
    (result,) = tmp_path.glob(f"train-{optimizer}-cpu-*.json")
    data = json.loads(result.read_text())
    assert data["config"]["optimizer"] == optimizer
    torch_name, ours = (r["name"] for r in data["runs"])
    assert ours == f"fusedopt.{train.OPTIMIZERS[optimizer][1].__name__}"
    assert {"lion": "lion-pytorch", "lamb": "Apex FusedLAMB"}.get(
        optimizer, ours.split(".")[1]) in torch_name
    assert data["compare"]["max_rel_loss_diff"] <= train.LOSS_RTOL
    assert "max |loss a - loss b|" in capsys.readouterr().out


def test_train_py_memory_quick(train, tmp_path, capsys):
    """--memory --quick: fp32 and the five bf16 configurations from one state on the same batches,
    a loss curve and every number each; an earlier same-day run is kept."""
    (tmp_path / "train-memory-cpu-2000-01-01-quick.json").write_text("{}")  # another day's
    train.main(["--memory", "--quick", "--warmup", "1", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| run | params | options | final loss | gap to fp32 |" in out
    (result,) = [p for p in tmp_path.glob("train-memory-cpu-*-quick-warmup1.json")
                 if "2000" not in p.name]
    assert result.with_suffix(".png").stat().st_size > 0
    data = json.loads(result.read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert list(runs) == list(train.MEMORY_RUNS)
    assert data["config"]["steps"] == train.MEMORY_QUICK_STEPS
    assert runs["fp32"]["param_dtype"] == "float32" and runs["fp32"]["final_gap_to_fp32"] == 0
    assert all(r["param_dtype"] == "bfloat16" for name, r in runs.items() if name != "fp32")
    # one initial state: the first loss differs by bf16's forward only; the same batches after
    first = runs["fp32"]["losses"][0]
    assert all(abs(r["losses"][0] - first) < 0.01 for r in runs.values())
    assert all(len(r["losses"]) == len(r["ms"]) == train.MEMORY_QUICK_STEPS for r in runs.values())
    state = {"fp32": 8, "bf16": 4, "bf16+sr": 4, "bf16+sr+fp32-states": 8, "bf16+master": 6,
             "bf16+master+fp32-states": 10}  # + 4 B per tensor's step counter, ~0.001 here
    assert {n: round(r["state_bytes_per_param"], 2) for n, r in runs.items()} == state
    assert {n: r["param_bytes_per_param"] for n, r in runs.items()} == {
        n: 4 if n == "fp32" else 2 for n in runs}
    assert data["config"]["hyperparameters"] == dict(lr=1e-3, weight_decay=0.1)
    # another kind of run is named for its options; the same run again takes the next name
    for _ in range(2):
        train.main(["--memory", "--quick", "--steps", "2", "--warmup", "1", "--configs",
                    "bf16+master", "--out-dir", str(tmp_path)])
    second = result.with_name(result.name.replace("-quick-warmup1",
                                                  "-quick-steps2-warmup1-bf16+master"))
    third = second.with_name(second.name.replace(".json", "-2.json"))
    assert third.with_suffix(".png").exists() and len(list(tmp_path.glob("*.json"))) == 4
    data = json.loads(second.read_text())
    assert [r["name"] for r in data["runs"]] == ["fp32", "bf16+master"]  # fp32 always runs


def test_train_py_memory_arguments(train):
    args = train.parse_args(["--memory"])
    assert args.steps == train.MEMORY_STEPS and args.configs == list(train.MEMORY_RUNS)
    for bad in (["--memory", "--configs", "bf17"], ["--memory", "--optimizer", "sgd"],
                ["--lr", "1e-3"], ["--configs", "bf16"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


# -- bench/tune.py ------------------------------------------------------------------------------

def run_tune(*args, tmp_path, device):
    """tune.py --smoke on ``device``: on CPU under the interpreter (the kernels run nowhere
    else)."""
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(BENCH / "tune.py"), "--smoke", "--device", device,
                           *args, "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def tune(bench_modules):
    """bench/tune.py imported (bench_modules: its modules dropped after)."""
    return bench_modules("tune")


def test_tune_py_sweeps_and_writes_best_settings(tmp_path):
    # GPU: AdamW only, to keep the compiles (about 2 a config) few; CPU: AdamW and SGD
    device = "cuda" if torch.cuda.is_available() else "cpu"
    done = run_tune(*(["--optimizers", "adamw"] if device == "cuda" else []), tmp_path=tmp_path,
                    device=device)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## Best settings" in done.stdout and "LaunchConfig(" in done.stdout
    (md,) = tmp_path.glob("tune-*-smoke.md")
    data = json.loads(md.with_suffix(".json").read_text())
    meta, rows = data["meta"], data["results"]
    assert {"torch", "triton", "cuda"} <= set(meta["versions"]) and meta["date"] and meta["device"]
    assert meta["copy_gbs"] > 0 and meta["stopped_early"] is None
    optimizers = ["adamw"] if device == "cuda" else ["adamw", "sgd"]
    assert set(data["best"]) == {f"{o}/float32" for o in optimizers}
    for o in optimizers:
        mine = [r for r in rows if r["optimizer"] == o]
        assert all("error" not in r for r in mine), [r["error"] for r in mine if "error" in r]
        stages = {r["stage"] for r in mine}
        assert {"default", "programs_per_sm", "block_size", "num_warps", "num_partials"} <= stages
        # the bytes formula is run.py's: norm pass 1 + update (AdamW 7, SGD 5) elements of 4 B
        assert all(r["bytes_per_element"] == {"adamw": 32, "sgd": 24}[o] for r in mine)
        for r in mine:
            assert r["median_ms"] > 0 and len(r["times_ms"]) >= 2
            assert abs(r["gb_per_s"] - r["bytes_per_element"] * r["numel"] / r["median_ms"] / 1e6) \
                <= 1e-6 * r["gb_per_s"]
        assert data["best"][f"{o}/float32"]["launch_config"].startswith("LaunchConfig(block_size=")
    if device == "cuda":  # registers read from the compiled kernels, and the grid they allow
        assert all(r["kernels"]["update"]["n_regs"] > 0 for r in rows)
        assert any(r["grid_rule"] == "occupancy" for r in rows)


def test_tune_py_stops_at_its_budget(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the budget logic is device-independent; the CPU run is the cheaper proof")
    done = run_tune("--budget-s", "0.001", tmp_path=tmp_path, device="cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("tune-*-smoke-budget0.001.json")  # the budget in its name
    data = json.loads(result.read_text())
    assert [r["stage"] for r in data["results"]] == ["default"]  # the first config always runs
    assert data["meta"]["stopped_early"] and "sgd float32: all" in data["meta"]["skipped"]
    assert "stopped early" in done.stdout


def test_tune_py_occupancy_arithmetic(tune):
    h100 = dict(regs_per_sm=65536, max_warps_per_sm=64, max_blocks_per_sm=32,
                shared_per_sm=233472, shared_reserved_per_block=1024)
    fit = tune.programs_per_sm_fit
    assert [fit(r, 4, 0, h100) for r in (56, 64, 72, 128)] == [9, 8, 7, 4]
    assert fit(64, 8, 0, h100) == 4 and fit(16, 1, 0, h100) == 32  # then the 32-program limit
    assert fit(32, 4, 100_000, h100) == 2  # shared memory: 233472 // (100000 + 1024)
    assert fit(None, 4, 0, h100) is None and fit(64, 4, 0, {}) is None
    update = dict(n_regs=56, shared=0)
    assert tune.resolve_programs_per_sm("occupancy", update, 4, h100) == (9, "occupancy")
    assert tune.resolve_programs_per_sm("2x occupancy", update, 4, h100) == (18, "2x occupancy")
    assert tune.resolve_programs_per_sm(16, None, 4, {}) == (16, "fixed")
    with pytest.raises(RuntimeError, match="registers are unknown"):
        tune.resolve_programs_per_sm("occupancy", None, 4, h100)


def test_tune_py_reads_registers_from_either_jit_cache_layout(tune):
    class Kernel:  # a CompiledKernel before its first launch: no n_regs until _init_handles
        metadata = types.SimpleNamespace(name="_k", shared=64, num_warps=4)

        def _init_handles(self):
            self.n_regs, self.n_spills = 56, 0

    new, old, legacy = Kernel(), Kernel(), Kernel()
    fns = [types.SimpleNamespace(device_caches={0: ({"a": new}, {}, "target", "backend", "bind")}),
           types.SimpleNamespace(device_caches={0: ({"b": old}, "target", "backend", "binder")}),
           types.SimpleNamespace(cache={0: {"c": legacy}})]
    assert [tune.compiled_kernels(f) for f in fns] == [[new], [old], [legacy]]
    assert tune.kernel_facts(new) == dict(name="_k", n_regs=56, n_spills=0, shared=64, num_warps=4)
    module = types.SimpleNamespace(**{f"f{i}": f for i, f in enumerate(fns)}, other=3)
    assert tune.jit_functions(module) == fns


def test_tune_py_tells_the_norm_kernel_from_the_update(tune, monkeypatch):
    class Kernel:
        def __init__(self, name, n_regs):
            self.name, self.n_regs, self.n_spills = name, n_regs, 0
            self.metadata = types.SimpleNamespace(name=name, shared=0, num_warps=4)

    cache = {}
    jit_fn = types.SimpleNamespace(device_caches={0: (cache, {}, None, None, None)},
                                   module="fusedopt.kernels.somewhere")
    monkeypatch.setitem(sys.modules, "fusedopt.kernels._tune_test", types.SimpleNamespace(k=jit_fn))
    cache["old"] = Kernel("_adam_kernel", 99)
    watch = tune.KernelWatch()  # compiled before the watch: not this step's
    cache.update(a=Kernel("_norm_kernel", 30), b=Kernel("_sgd_kernel", 48))
    new = watch.new()
    assert (new["norm"]["n_regs"], new["update"]["n_regs"]) == (30, 48)
    assert watch.new() == {"norm": None, "update": None}


def test_integrations_py_quick(tmp_path):
    """bench/integrations.py --quick: every framework's arms timed (a 2-layer GPT-2, 1 + 2 steps),
    the fusedopt arms checked against the torch arm (it exits 1 where they differ), the file
    names those of a quick run."""
    out = run_bench("integrations.py", "--quick", "--device", "cpu", out_dir=tmp_path)
    assert "| framework | arm |" in out and "WARNING" not in out
    (md,) = tmp_path.glob("integrations-cpu-*.md")
    assert md.name == f"integrations-cpu-{datetime.date.today().isoformat()}-quick.md"
    data = json.loads(md.with_suffix(".json").read_text())
    assert [(r["framework"], r["arm"]) for r in data["results"]] == [
        ("hf", "torch"), ("hf", "fusedopt"), ("hf", "integration"), ("accelerate", "torch"),
        ("accelerate", "integration"), ("lightning", "torch"), ("lightning", "integration")]
    for r in data["results"]:
        assert len(r["rounds"]) == 1 and r["rounds"][0]["threads"][0] > 0
        assert all(len(r[k]) == 2 for k in ("clip_ms", "update_ms", "opt_ms", "whole_ms"))
        assert all(0 < o <= w for o, w in zip(r["opt_ms"], r["whole_ms"]))
        assert len(r["losses"]) == 3  # warm-up included
        assert r["gaps"] is None if r["arm"] == "torch" else max(r["gaps"].values()) < 1e-3
    assert {"transformers", "accelerate", "lightning"} <= set(data["meta"]["versions"])
