"""Every ```python block of README.md runs as written. A block runs in-process, in a fresh namespace,
unless its first line says otherwise:

- ``# needs CUDA``: runs where there is a GPU and is skipped, saying so, elsewhere;
- ``# torchrun --nproc_per_node N``: runs as a script on N ranks, as a user would run it with that
  line (``python -m torch.distributed.run --standalone``, in a subprocess; the environment is
  inherited, TRITON_INTERPRET included). The blocks take gloo on CPU where there is not a GPU per
  rank.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
TORCHRUN = re.compile(r"# torchrun --nproc_per_node (\d+)\n")
TORCHRUN_TIMEOUT_S = 120  # each block takes ~4 s on the 2-core CI machine


def test_readme_has_examples():
    assert len(BLOCKS) >= 4
    assert any(TORCHRUN.match(block) for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    block = BLOCKS[index]
    if block.startswith("# needs CUDA") and not torch.cuda.is_available():
        pytest.skip("README block marked '# needs CUDA' and this machine has no CUDA GPU")
    launch = TORCHRUN.match(block)
    if launch:
        run_on_ranks(block, int(launch.group(1)), index, tmp_path)
    else:
        exec(compile(block, f"README.md block {index}", "exec"), {"__name__": "readme"})


def run_on_ranks(block: str, nproc: int, index: int, tmp_path: pathlib.Path) -> None:
    """The block as a script under torch.distributed.run; fails with its output unless it exits 0."""
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(block)
    env = dict(os.environ)  # this checkout's fusedopt, whatever else is installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", str(script)]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own and stops them on SIGTERM
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = "", "(none read: the ranks did not stop within 30 s of SIGTERM)"
        pytest.fail(f"README block {index} ({nproc} ranks) did not finish in {TORCHRUN_TIMEOUT_S} s"
                    f"\n--- stdout\n{out}\n--- stderr\n{err}")
    print(out)
    assert proc.returncode == 0, (
        f"README block {index} ({nproc} ranks) exited with {proc.returncode}"
        f"\n--- stdout\n{out}\n--- stderr\n{err}")
