"""The main job's scripts still run end to end (tiny settings; timings are not looked at)."""
import json
import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


def run(script, *args, tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_run_py_writes_markdown_json_and_chart(tmp_path):
    out = run("run.py", "--shapes", "smoke", "--optimizers", "sgd,adamw", "--dtypes", "float32",
              "--clip", "on,off,amp", "--steps", "2", "--warmup", "1", tmp_path=tmp_path)
    assert "fusedopt against the best torch recipe" in out
    (md,) = tmp_path.glob("cpu-*.md")
    data = json.loads(md.with_suffix(".json").read_text())
    impls = {r["impl"] for r in data["results"]}
    assert {"torch for-loop", "torch foreach", "torch fused", "fusedopt (torch)"} <= impls
    assert len(data["results"]) == 2 * 3 * len(impls)
    assert {r["clip"] for r in data["results"]} == {"on", "off", "amp"}
    assert all(len(r["times_ms"]) == 2 and r["median_ms"] > 0 for r in data["results"])
    assert data["meta"]["copy_gbs"] > 0
    assert md.with_suffix(".png").stat().st_size > 0


def test_train_py_loss_curves_coincide(tmp_path):
    out = run("train.py", "--steps", "12", "--warmup", "2", tmp_path=tmp_path)
    assert "max |loss a - loss b|" in out
    (result,) = tmp_path.glob("train-*.json")
    assert result.with_suffix(".png").stat().st_size > 0
