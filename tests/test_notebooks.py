"Every notebook runs as a test (nbdev_test, smoke configuration under IN_TEST)."
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p.name for p in (ROOT/'nbs').glob('[0-9]*.ipynb'))


@pytest.mark.parametrize('nb', NBS)
def test_notebook(nb):
    exe = Path(sys.executable).parent/'nbdev_test'
    r = subprocess.run([str(exe), '--path', f'nbs/{nb}', '--n_workers', '0'], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
