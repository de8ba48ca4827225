"scripts/*.py (py:percent, jupytext) mirror nbs/*.ipynb, so notebook changes review as plain diffs."
import shutil, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import sync_scripts as ss  # noqa: E402


def test_scripts_in_sync():
    assert ss.stale() == [], "run `make scripts` (tools/sync_scripts.py) and commit scripts/"


def test_check_detects_stale_missing_and_orphan_scripts(tmp_path, monkeypatch):
    d = tmp_path/'scripts'; shutil.copytree(ss.SCRIPTS, d); monkeypatch.setattr(ss, 'SCRIPTS', d)
    (d/'06_eval.py').write_text((d/'06_eval.py').read_text() + '\n# %%\nx = 1\n')
    (d/'01_unet.py').unlink(); (d/'99_gone.py').write_text('# %%\n')
    assert sorted(p.name for p in ss.stale()) == ['01_unet.py', '06_eval.py', '99_gone.py']
