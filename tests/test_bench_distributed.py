"""bench/distributed.py (clip + AdamW under FSDP2 on 2 gloo ranks) runs end to end: its files
carry the machine, the versions and every raw number, the recipes agree after one step, and the
collectives per step are as counted. Timings are not looked at beyond being positive."""
import json
import math

from conftest import run_bench


def test_distributed_py_quick_writes_results(tmp_path):
    out = run_bench("distributed.py", "--quick", out_dir=tmp_path, timeout=120)
    assert "| model (tensors, params) |" in out  # the Markdown table, printed
    (md,) = tmp_path.glob("distributed-*-quick.md")
    assert md.read_text().startswith("# fusedopt distributed step")
    data = json.loads(md.with_suffix(".json").read_text())
    meta = data["meta"]
    assert meta["world_size"] == 2 and meta["process_group"] == "gloo"
    assert meta["threads_per_rank"] >= 1 and meta["device"] and meta["date"]
    assert {"torch", "triton", "python"} <= set(meta["versions"])
    (model,) = data["models"]
    assert model["model"] == "tiny" and len(model["local_numel_per_rank"]) == 2
    assert sum(model["local_numel_per_rank"]) == model["numel"]  # Shard(0): every element once

    results = data["results"]
    assert {r["impl"] for r in results} == {"torch for-loop", "torch foreach", "torch fused",
                                             "fusedopt (torch)"}
    norms = {r["grad_norm"] for r in results}
    for r in results:
        assert len(r["times_ms_per_rank"]) == 2
        assert all(len(ts) == meta["steps"] for ts in r["times_ms_per_rank"])
        assert r["max_over_ranks_ms"] == [max(ts) for ts in zip(*r["times_ms_per_rank"])]
        assert all(math.isfinite(t) and t > 0 for t in r["max_over_ranks_ms"])
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["speedup_vs_best_torch"] > 0 and r["paired_speedup_vs_best_torch"] > 0
        assert r["first_step_close"], r  # same params as torch's for-loop AdamW after one step
        assert math.isclose(r["grad_norm"], min(norms), rel_tol=1e-5)
        assert r["counts_same_on_every_rank"]
        if r["impl"] == "fusedopt (torch)":  # one 3-value all-reduce gives the global norm
            assert r["all_reduce_calls"] == 1 and sum(r["comm_counts"].values()) == 1, r
        else:  # torch's clip: DTensor norms, reduced by DTensor's own collectives
            assert r["all_reduce_calls"] == 0 and sum(r["comm_counts"].values()) >= 1, r
