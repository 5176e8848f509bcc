"""Packaging: kernels/ installs as fusedopt.kernels, and importing fusedopt imports no Triton and
none of the frameworks fusedopt.integrations serves, not even after a first step."""
import subprocess
import sys


def test_kernels_package_is_fusedopt_kernels():
    import fusedopt.kernels
    assert fusedopt.kernels.__name__ == "fusedopt.kernels"
    assert fusedopt.kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")


def test_import_does_not_import_triton():
    code = "import sys, fusedopt; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_and_a_step_import_no_framework():
    """A clipping optimizer's first step looks for a framework clipping on top of it
    (fusedopt/integrations/_on_top.py) through sys.modules only."""
    code = ("import sys, torch, fusedopt\n"
            "w = torch.nn.Parameter(torch.ones(3)); w.grad = torch.ones(3)\n"
            "fusedopt.AdamW([w], lr=0.1, max_grad_norm=1.0).step()\n"
            "loaded = {'transformers', 'accelerate', 'lightning', 'pytorch_lightning'} & set(sys.modules)\n"
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
