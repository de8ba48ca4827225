"""Build the documentation site from the notebooks, offline (mkdocs + mkdocs-jupyter).

Copies nbs/ into _docs_src/ without the cells marked `#| hide`, writes a navigation, and runs `mkdocs build`.
The site lands in _docs/.
"""
import json, os, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC, OUT = ROOT/'nbs', ROOT/'_docs_src'


def strip_hidden(nb: dict) -> dict:
    keep = []
    for c in nb['cells']:
        src = ''.join(c['source']) if isinstance(c['source'], list) else c['source']
        first = src.lstrip().splitlines()[:3]
        if c['cell_type'] == 'code' and any(l.strip().replace(' ', '') in ('#|hide', '#|export_hide') for l in first): continue
        keep.append(c)
    nb['cells'] = keep
    return nb


def main():
    shutil.rmtree(OUT, ignore_errors=True); OUT.mkdir()
    nav = []
    for p in sorted(SRC.glob('*.ipynb')):
        nb = strip_hidden(json.loads(p.read_text()))
        (OUT/p.name).write_text(json.dumps(nb))
        nav.append(p.name)
    if (OUT/'index.ipynb').exists(): nav.remove('index.ipynb'); nav.insert(0, 'index.ipynb')
    cfg = (ROOT/'mkdocs.yml').read_text() + '\nnav:\n' + ''.join(f'  - {n}\n' for n in nav)
    (ROOT/'_docs_src.yml').write_text(cfg.replace('docs_dir: _docs_src', f'docs_dir: {OUT}'))
    try:
        env = {**os.environ, 'NO_MKDOCS_2_WARNING': '1'}
        subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '-q', '-f', str(ROOT/'_docs_src.yml')], cwd=ROOT, check=True, env=env)
    finally:
        (ROOT/'_docs_src.yml').unlink(missing_ok=True)
    print(f"docs site written to {ROOT/'_docs'}/index.html")


if __name__ == '__main__':
    main()
