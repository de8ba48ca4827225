"""Write the py:percent twin of every notebook, nbs/X.ipynb -> scripts/X.py, with the pairing of jupytext.toml.

The notebooks are the source; the scripts exist so that a notebook change reviews as a plain diff.
`python tools/sync_scripts.py` rewrites scripts/ (and removes scripts whose notebook is gone);
`python tools/sync_scripts.py --check` changes nothing and exits 1 naming every stale or missing script.
"""
import sys
from pathlib import Path
import jupytext
from jupytext.config import load_jupytext_config

ROOT = Path(__file__).resolve().parents[1]
NBS, SCRIPTS = ROOT/'nbs', ROOT/'scripts'


def expected() -> dict:
    "{script path: text} that jupytext writes for each notebook under the repository's jupytext.toml."
    out = {}
    for nb in sorted(NBS.glob('*.ipynb')):
        cfg = load_jupytext_config(str(nb))
        if cfg is None: raise SystemExit(f"{ROOT/'jupytext.toml'} not found: it defines the notebook/script pairing")
        out[SCRIPTS/(nb.stem + '.py')] = jupytext.writes(jupytext.read(nb), fmt='py:percent', config=cfg)
    return out


def stale() -> list:
    "Scripts that differ from their notebook, are missing, or have no notebook."
    want = expected()
    bad = [p for p, t in want.items() if not p.exists() or p.read_text(encoding='utf-8') != t]
    return bad + sorted(set(SCRIPTS.glob('*.py')) - set(want))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if '--check' in argv:
        bad = stale()
        for p in bad: print(f"out of sync with its notebook: {p.relative_to(ROOT)}")
        if bad: print("run `make scripts` (tools/sync_scripts.py) and commit scripts/"); sys.exit(1)
        return
    want = expected(); SCRIPTS.mkdir(exist_ok=True)
    for p in sorted(set(SCRIPTS.glob('*.py')) - set(want)): p.unlink(); print(f"removed {p.relative_to(ROOT)}")
    for p, t in want.items():
        if not p.exists() or p.read_text(encoding='utf-8') != t: p.write_text(t, encoding='utf-8'); print(f"wrote {p.relative_to(ROOT)}")


if __name__ == '__main__':
    main()
