"""Packaging: kernels/ installs as fusedopt.kernels, and importing fusedopt imports no Triton."""
import subprocess
import sys


def test_kernels_package_is_fusedopt_kernels():
    import fusedopt.kernels
    assert fusedopt.kernels.__name__ == "fusedopt.kernels"
    assert fusedopt.kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")


def test_import_does_not_import_triton():
    code = "import sys, fusedopt; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
