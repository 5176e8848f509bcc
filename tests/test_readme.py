"""Every ```python block of README.md runs as written (each in a fresh namespace); a block whose
first line is ``# needs CUDA`` runs where there is a GPU and is skipped, saying so, elsewhere."""
import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    if BLOCKS[index].startswith("# needs CUDA") and not torch.cuda.is_available():
        pytest.skip("README block marked '# needs CUDA' and this machine has no CUDA GPU")
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
