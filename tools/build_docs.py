"""Build the documentation site, offline, into _docs/ (mkdocs + mkdocs-jupyter + material).

1. Every notebook of nbs/ is executed with the smoke profile (IN_TEST=1, the switch `nbdev_test` uses; cells
   that `nbdev_test` skips are skipped) into build/docs/executed/, cached by the content of the notebook and of
   sapl/, so the pages show the figures, tables and printed numbers under the code.
2. `#| hide` cells are dropped after execution and `#|` directive lines are removed from the code shown.
3. The landing page (docs/index.md: Table IV, Fig. 7, a link to every notebook) and the Results page are written
   from reports/ at build time, so they always show the current reports; the seed figure is drawn from
   reports/per_seed.csv with `sapl.eval.seed_figure`.
4. MathJax 3 is copied into the site from the npm package `mathjax` (fetched once with `npm pack` into
   build/docs/), so equations are typeset with no network.
"""
import argparse, fnmatch, hashlib, json, os, re, shutil, subprocess, sys, tarfile, tempfile, time
from concurrent.futures import ProcessPoolExecutor
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS, REPORTS, DOCS = ROOT/'nbs', ROOT/'reports', ROOT/'docs'
BUILD, SRC = ROOT/'build'/'docs', ROOT/'_docs_src'
MATHJAX = '3.2.2'
SMOKE_NOTE = ('<p class="smoke-note">Outputs on this page: the notebook as executed by <code>make docs</code> with the '
              '<b>smoke</b> profile (tiny phantom, one or two iterations). They show what each cell computes and draws, '
              'not results; the measured results are on <a href="../results/">Results</a>.</p>')


def _src(c) -> str: return ''.join(c['source']) if isinstance(c['source'], list) else c['source']


def directives(src: str) -> dict:
    "nbdev `#| name: value` directives at the top of a cell: {'eval:': 'false', 'hide': '', ...}."
    d = {}
    for line in src.splitlines():
        if not line.strip(): continue
        if not line.startswith('#|'): break
        k, _, v = line[2:].strip().partition(' ')
        if k: d[k] = v.strip()
    return d


def skip_flags() -> set:
    cfg = ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini', encoding='utf-8')
    return set(cfg['DEFAULT'].get('tst_flags', '').split())


def run_notebook(p: Path, log: Path, timeout: int = 1800) -> dict:
    "Execute notebook `p` in a kernel like `nbdev_test` does (IN_TEST=1, cwd nbs/, same skipped cells); outputs kept."
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(p, as_version=4); flags = skip_flags(); added = []
    for c in nb.cells:
        if c.cell_type != 'code': continue
        d = directives(c.source)
        if d.get('eval:', '').lower() == 'false' or flags & d.keys():
            tags = c.metadata.setdefault('tags', [])
            if 'skip-execution' not in tags: tags.append('skip-execution'); added.append(c)
    env = {**os.environ, 'IN_TEST': '1'}
    env.pop('MPLBACKEND', None)  # the kernel's inline backend puts the figures into the notebook
    client = NotebookClient(nb, timeout=timeout, startup_timeout=600, kernel_name='python3',  # slow starts on a busy machine
                            resources={'metadata': {'path': str(p.parent)}})
    try:
        with open(log, 'w') as err: client.execute(env=env, stderr=err)  # the kernel's own log lines go to `log`
    except Exception as e: raise SystemExit(f"docs: executing {p.relative_to(ROOT)} failed (kernel log: {log}):\n{str(e)[-3000:]}")
    for c in added: c.metadata['tags'].remove('skip-execution')
    nb.metadata.pop('widgets', None)  # widget state would make the page load a widget manager from a CDN
    return nb


def code_hash() -> str:
    h = hashlib.sha256()
    for f in sorted((ROOT/'sapl').glob('*.py')): h.update(f.name.encode()); h.update(f.read_bytes())
    return h.hexdigest()


def executed(p: Path, lib: str, force: bool = False) -> tuple:
    "(executed notebook dict, seconds spent); cached under build/docs/executed/ by notebook and library content."
    key = hashlib.sha256(p.read_bytes() + lib.encode()).hexdigest()[:16]
    out = BUILD/'executed'/f'{p.stem}.{key}.ipynb'
    if out.exists() and not force: return json.loads(out.read_text()), 0.
    t0 = time.time(); print(f"docs: executing {p.name} (smoke profile) ...", flush=True)
    import nbformat
    out.parent.mkdir(parents=True, exist_ok=True); nb = run_notebook(p, out.parent/f'{p.stem}.log')
    for old in out.parent.glob(f'{p.stem}.*.ipynb'): old.unlink()
    tmp = out.with_suffix('.tmp'); nbformat.write(nb, tmp); os.replace(tmp, out)
    print(f"docs: {p.name} executed in {time.time() - t0:.0f}s", flush=True)
    return json.loads(out.read_text()), time.time() - t0


def for_page(nb: dict) -> dict:
    "Drop `#| hide` and `#| default_exp` cells, remove directive lines from the code shown, add the smoke note."
    keep = []
    for c in nb['cells']:
        if c['cell_type'] == 'code':
            d = directives(_src(c))
            if 'hide' in d or 'export_hide' in d or 'default_exp' in d: continue
            lines = _src(c).splitlines(keepends=True)
            while lines and lines[0].startswith('#|'): lines.pop(0)
            c['source'] = ''.join(lines)
        keep.append(c)
    at = 1 if keep and keep[0]['cell_type'] == 'markdown' else 0
    keep.insert(at, {'cell_type': 'markdown', 'metadata': {}, 'source': SMOKE_NOTE})
    nb['cells'] = keep
    return nb


def title_and_summary(p: Path) -> tuple:
    "The notebook's `# title` and its `> summary` (first markdown cell)."
    nb = json.loads(p.read_text())
    md = next((_src(c) for c in nb['cells'] if c['cell_type'] == 'markdown'), '')
    title = next((l[2:].strip() for l in md.splitlines() if l.startswith('# ')), p.stem)
    summary = ' '.join(l.lstrip('> ').strip() for l in md.splitlines() if l.startswith('>'))
    return title, summary


def vendor_mathjax(dest: Path):
    "Copy MathJax (es5 build) from the npm package into the site; fetched once with `npm pack` into build/docs/."
    cache = BUILD/f'mathjax-{MATHJAX}'
    if not (cache/'tex-mml-chtml.js').exists():
        npm = shutil.which('npm')
        if not npm: raise SystemExit("docs: npm (Node.js) is needed once to fetch MathJax from the npm registry "
                                     "(Debian: apt-get install -y npm)")
        BUILD.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
            subprocess.run([npm, 'pack', f'mathjax@{MATHJAX}', '--silent'], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
            with tarfile.open(next(Path(tmp).glob('mathjax-*.tgz'))) as tar:
                tar.extractall(tmp, members=[m for m in tar.getmembers() if m.name.startswith('package/es5/')], filter='data')
            shutil.rmtree(cache, ignore_errors=True); os.replace(Path(tmp)/'package'/'es5', cache)
    shutil.copytree(cache, dest, ignore=shutil.ignore_patterns('*-svg*.js', 'tex-chtml*.js', 'mml-chtml.js', 'node-main.js'))


def demote(md: str, by: int = 1) -> str:
    "Markdown headings one level down (a report's `# Title` becomes a section of the page)."
    out, fence = [], False
    for l in md.splitlines():
        if l.startswith('```'): fence = not fence
        out.append('#'*by + l if not fence and re.match(r'#+ ', l) else l)
    return '\n'.join(out)


def report_captions() -> dict:
    "{file pattern: description} from the table of reports/README.md."
    cap = {}
    readme = REPORTS/'README.md'
    for l in (readme.read_text(encoding='utf-8').splitlines() if readme.exists() else []):
        m = re.match(r'\|\s*`([^`]+)`\s*\|\s*(.+?)\s*\|\s*$', l)
        if m:
            for pat in m.group(1).replace('.md/.csv', '.md').split(): cap[pat.strip(',')] = m.group(2)
    return cap


def caption_for(rel: str, cap: dict) -> str:
    return next((v for k, v in cap.items() if fnmatch.fnmatch(rel, k) or fnmatch.fnmatch(Path(rel).name, k)), rel)


def copy_figure(p: Path) -> str:
    "Copy a report figure into the site; returns its path relative to the site root."
    rel = 'reports/' + p.relative_to(REPORTS).as_posix()
    (SRC/rel).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(p, SRC/rel)
    return rel


def seed_figures() -> list:
    "Seed spread + paired differences (seaborn) per labeled ratio from reports/per_seed.csv; [(path, ratio)]."
    csv = REPORTS/'per_seed.csv'
    if not csv.exists(): return []
    import pandas as pd
    from sapl.eval import seed_figure
    from sapl.reproduce import BY_VARIANT
    ps, out = pd.read_csv(csv), []
    labels = {k: v.label for k, v in BY_VARIANT.items()}
    for r in sorted(ps.ratio.unique()):
        p = seed_figure(ps, SRC/'reports'/f'seeds_r{r:g}.png', labels, ratio=r)
        if p: out.append((p.relative_to(SRC).as_posix(), r))
    return out


ORDER = ['table_IV.md', 'table_V.md', 'table_II.md', 'table_III.md']


def results_page() -> str:
    cap = report_captions()
    mds = [REPORTS/n for n in ORDER if (REPORTS/n).exists()]
    mds += sorted(p for p in REPORTS.glob('*.md') if p.name not in ORDER and p.name != 'README.md')
    s = ['# Results', '',
         'Everything below is read from `reports/` when the site is built (`make demo` / `make reproduce` write it). '
         'Each table names the profile, seeds, git SHA and data hash it was made from.', '']
    if not mds: s += ['*No reports yet: run `make demo`.*', '']
    for p in mds: s += [demote(p.read_text(encoding='utf-8')), '']
    seeds = seed_figures()
    if seeds:
        s += ['## Seeds and paired differences', '',
              'Every seed of every method (points, colour = seed), the mean with its 95 % Student-t interval, and the '
              'per-seed difference to Baseline on the same split and seed (`sapl.eval.seed_figure`, seaborn).', '']
        s += [f'![seeds at {r:.0%} labeled]({p})\n' for p, r in seeds]
    figs = sorted(p for p in REPORTS.rglob('*.png') if 'runs' not in p.relative_to(REPORTS).parts)
    if figs: s += ['## Figures', '']
    for p in figs:
        rel = copy_figure(p); name = p.relative_to(REPORTS).as_posix()
        s += [f'### {name}', '', caption_for(name, cap), '', f'![{name}]({rel})', '']
    runs = sorted((REPORTS/'baseline_full').glob('*.md'))
    if runs:
        s += ['## Baseline and Full Supervision, run by run', '']
        for p in runs:
            body = demote(p.read_text(encoding='utf-8'), 2)
            first = body.splitlines()[0].lstrip('# ') if body else p.stem
            s += [f'??? note "{first} ({p.stem.split("_")[-1]})"', ''] + ['    ' + l for l in body.splitlines()[1:]] + ['']
    return '\n'.join(s) + '\n'


def landing_page(pages: list) -> str:
    t = (DOCS/'index.md').read_text(encoding='utf-8')
    tab = REPORTS/'table_IV.md'
    tab = demote(tab.read_text(encoding='utf-8'), 2) if tab.exists() else '*Not generated yet: run `make demo`.*'
    f7 = sorted(REPORTS.glob('fig7_r*.png'))
    fig = (f'![Fig. 7]({copy_figure(f7[0])})\n\n{caption_for(f7[0].name, report_captions())} '
           f'(`reports/{f7[0].name}`)') if f7 else '*Not generated yet: run `make demo`.*'
    nbl = '\n'.join(f'- [{t_}]({n}) — {s_}' if s_ else f'- [{t_}]({n})' for n, t_, s_ in pages)
    nbl += '\n- [Results](results.md) — every table and figure of `reports/`'
    return t.replace('<!-- TABLE_IV -->', tab).replace('<!-- FIG_7 -->', fig).replace('<!-- NOTEBOOKS -->', nbl)


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument('--force', action='store_true', help='re-execute every notebook (ignore build/docs/executed)')
    a.add_argument('--jobs', type=int, default=int(os.environ.get('SAPL_DOCS_JOBS', max(1, min(4, (os.cpu_count() or 2)//2)))))
    a = a.parse_args(argv)
    t0 = time.time()
    shutil.rmtree(SRC, ignore_errors=True); SRC.mkdir()
    shutil.copytree(DOCS, SRC, dirs_exist_ok=True)
    vendor_mathjax(SRC/'javascripts'/'mathjax')
    nbs = [p for p in sorted(NBS.glob('*.ipynb')) if p.name != 'index.ipynb']
    lib = code_hash()
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs) as ex: done = list(ex.map(executed, nbs, [lib]*len(nbs), [a.force]*len(nbs)))
    else: done = [executed(p, lib, a.force) for p in nbs]
    pages = []
    for p, (nb, _) in zip(nbs, done):
        (SRC/p.name).write_text(json.dumps(for_page(nb)))
        pages.append((p.name, *title_and_summary(p)))
    (SRC/'index.md').write_text(landing_page(pages), encoding='utf-8')
    (SRC/'results.md').write_text(results_page(), encoding='utf-8')
    nav = ['  - Home: index.md', '  - Results: results.md', '  - Notebooks:']
    nav += [f'    - {json.dumps(t)}: {n}' for n, t, _ in pages]
    cfg = (ROOT/'mkdocs.yml').read_text().replace('docs_dir: _docs_src', f'docs_dir: {SRC}') + '\nnav:\n' + '\n'.join(nav) + '\n'
    yml = ROOT/'_docs_src.yml'; yml.write_text(cfg)
    t1 = time.time()
    try:
        env = {**os.environ, 'NO_MKDOCS_2_WARNING': '1'}
        subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '-q', '-f', str(yml)], cwd=ROOT, check=True, env=env)
    finally: yml.unlink(missing_ok=True)
    ex_s = sum(s for _, s in done)
    print(f"docs site written to {ROOT/'_docs'}/index.html in {time.time() - t0:.0f}s "
          f"(notebook execution {ex_s:.0f}s, {sum(s == 0 for _, s in done)} of {len(done)} from cache; mkdocs {time.time() - t1:.0f}s)")


if __name__ == '__main__':
    main()
