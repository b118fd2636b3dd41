"""
bench.py beside other libraries: transformers >= 5 imports the Hugging Face Hub's `kernels` package
by the name of this repo's kernels.py, which a script run from the repo root shadows.
"""
import subprocess
import sys

import pytest
import torch

from conftest import REPO

transformers = pytest.importorskip('transformers')


def test_the_peer_block_loads_beside_our_kernels_and_runs():
    import bench
    import kernels as ours  # this repo's, as the triton backend imports it
    assert ours.__file__ == str(REPO / 'kernels.py')
    torch.manual_seed(0)
    layer = bench.PeerLayer(D=32, E=4, K=2, impl='eager')
    x = torch.randn(6, 32)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert sys.modules['kernels'] is ours  # experts.py's kernels were put back


def test_a_script_in_the_repo_root_imports_mixtral():
    """The failure as a user met it: `python bench.py --peer` from the repo root (sys.path[0] is the root)."""
    code = ("import bench, kernels; bench.import_mixtral(); import kernels as k; "
            "assert k.__file__.endswith('kernels.py') and k is kernels, k.__file__")
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
