"""bench/host.py (host overhead with the kernels stubbed) runs end to end and counts launches; its
timings are not looked at beyond being positive numbers."""
import json
import math

from conftest import run_bench


def test_host_py_quick_writes_results_and_constant_launches(tmp_path):
    out = run_bench("host.py", "--quick", out_dir=tmp_path)
    assert "| set (tensors) |" in out  # the Markdown table, printed
    (md,) = tmp_path.glob("host-*-quick.md")
    assert md.read_text().startswith("# fusedopt host overhead")
    assert md.with_name(md.stem + "-profile.txt").read_text().count("top 15 by") == 4
    data = json.loads(md.with_suffix(".json").read_text())
    results = data["results"]
    assert {r["tensors"] for r in results} == {148, 2000}
    assert {(r["optimizer"], r["grads"]) for r in results} >= {
        (o, g) for o in ("adamw", "sgd") for g in ("fresh", "persistent")}

    ours = [r for r in results if r["impl"].startswith("fusedopt")]
    assert ours
    for r in ours:  # one norm pass + one update per dtype group, whatever the tensor count
        assert r["launches"] == {"_norm_kernel": 1, "_update_kernel": 1}, r
    for r in results:
        assert len(r["times_us"]) == data["meta"]["steps"]
        for key in ("median_us", "p20_us", "p80_us", "us_per_tensor"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["p20_us"] <= r["median_us"] <= r["p80_us"]
        if r["grads"] == "fresh":  # every step saw new grad addresses
            changed, steps = r["grad_addresses_changed"].split()[0].split("/")
            assert changed == steps, r
