# %% [markdown]
# # Reproduction driver
#
# > `make reproduce` and `make demo`: run every method notebook under papermill for the chosen profile, ratios and
# > seeds, then collect Tables II-IV and Figs. 5, 6 and 8 into `reports/`.

# %%
#| default_exp reproduce

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail

# %%
#| export
from __future__ import annotations
import os, sys, json, time, math, argparse, subprocess
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import pandas as pd


# %% [markdown]
# ## The experiments
#
# Each experiment is a named variant and the notebook that runs it. Stages order the work so that every run finds
# what it depends on: the supervised runs first; then the synthesizer of each split (its fidelity check reuses the
# split's Baseline run, so it must not run beside it), the single-stage methods and self-training (whose baseline
# teacher now exists); then SA-ST with the SA-CPS teacher. A method that needs the synthesizer while it is being
# trained waits for it (`split_synthesizer` holds a lock on its folder).

# %%
#| export
@dataclass(frozen=True)
class Experiment:
    variant: str     # run tag (sapl.train.VARIANTS), or 'sean' for the synthesizer + Fig. 7
    notebook: str
    stage: int
    label: str       # name in the tables

EXPERIMENTS = [
    Experiment('sean', '03_style_pool', 1, 'SEAN synthesizer'),   # after the Baseline run its fidelity check reuses
    Experiment('baseline', '01_unet', 0, 'Baseline'),
    Experiment('full', '01_unet', 0, 'Full Supervision'),
    Experiment('cps', '04_sacps', 1, 'CPS'),
    Experiment('sacps-synth', '04_sacps', 1, 'SA-CPS (synthetic only)'),
    Experiment('sacps', '04_sacps', 1, 'SA-CPS'),
    Experiment('sacps-self', '04_sacps', 1, 'SA-CPS, Self Style'),
    Experiment('sacps-pooln', '04_sacps', 1, 'SA-CPS, Pool (N)'),
    Experiment('sacps-whole', '04_sacps', 1, 'SA-CPS, whole image decoded (Eq. 3)'),
    Experiment('sacps-b2000', '04_sacps', 1, 'SA-CPS, synthesizer stopped at 2000 iterations'),
    Experiment('sacps-spade', '04_sacps', 1, 'SA-CPS, first synthesizer (quick-spade, Eq. 3)'),
    Experiment('sacps-spade-lungs', '04_sacps', 1, 'SA-CPS, first synthesizer, lungs + noise (Eq. 3c)'),
    Experiment('st', '05_sast', 1, 'Self-Training'),
    Experiment('sast-synth', '05_sast', 1, 'SA-ST (real + synthetic)'),
    Experiment('sast', '05_sast', 1, 'SA-ST'),
    Experiment('sast-spade', '05_sast', 1, 'SA-ST, first synthesizer'),
    Experiment('mt', '07_baselines', 1, 'Mean Teacher'),
    Experiment('uamt', '07_baselines', 1, 'UA-MT'),
    Experiment('cct', '07_baselines', 1, 'CCT'),
    Experiment('udc', '07_baselines', 1, 'UDC'),
    Experiment('selfens', '07_baselines', 1, 'Self-Ensembling'),
    Experiment('semiinfnet', '07_baselines', 1, 'SemiInfNet'),
    Experiment('sast+sacps', '05_sast', 2, 'SA-ST(+SA-CPS)'),
    Experiment('sast+sacps-spade', '05_sast', 2, 'SA-ST(+SA-CPS), first synthesizer'),
    Experiment('bcp', '07_baselines', 1, 'BCP'),
    Experiment('unimatch', '07_baselines', 1, 'UniMatch'),
    Experiment('sa-mt', '07_baselines', 1, 'SA-MT'),
    Experiment('sa-bcp', '07_baselines', 1, 'SA-BCP'),
    Experiment('sa-unimatch', '07_baselines', 1, 'SA-UniMatch'),
]
BY_VARIANT = {e.variant: e for e in EXPERIMENTS}
TABLE_V_RATIO = 0.05  # nominal: the MosMedData-like split fixes 6 labeled of 126 training studies
DEMO = ('sean', 'baseline', 'full', 'cps', 'sacps')  # make demo: the paper's central comparison, SA-CPS against CPS
DEMO_DATA = dict(data_dir='data/phantom-demo', n_volumes=80, report_dir='reports/demo', out_dir='runs/demo', epochs=12,  # a smaller phantom, 600 iterations
                 sean='quick-b2000')  # and the synthesizer at half the benchmark's training budget
CORE = DEMO + ('st', 'sast', 'sast+sacps', 'mt', 'sacps-synth', 'sast-synth', 'sacps-self', 'sacps-pooln')

# %%
test_eq(BY_VARIANT['sast+sacps'].stage, 2); assert set(DEMO) <= set(CORE) <= set(BY_VARIANT)
test_eq(BY_VARIANT['sean'].stage, BY_VARIANT['baseline'].stage + 1)   # never beside the Baseline run it reuses


# %% [markdown]
# ## Running one experiment
#
# A run is `papermill nbs/<notebook>.ipynb reports/runs/<variant>_<profile>_r<ratio>_s<seed>.ipynb` with its parameters.
# A run whose `test.csv` already exists (and whose executed notebook is there) is not redone. The supervised notebook
# trains Baseline and Full Supervision together; full supervision does not depend on the ratio, so it is trained once
# (run folder `r1`) and reused for every ratio.

# %%
#| export
def register_all():
    "Import every method module, so that all variants are registered."
    import sapl.sacps, sapl.sast, sapl.baselines

def run_dir(out_dir, dataset, profile, ratio, seed, variant) -> Path:
    from sapl.train import RunConfig
    register_all()
    return RunConfig(dataset=dataset, profile=profile, ratio=ratio, seed=seed, out_dir=str(out_dir)).variant(variant).run_dir

def params_for(e: Experiment, common: dict, ratio: float, seed: int, report_dir='reports') -> dict:
    p = {**common, 'ratio': ratio, 'seed': seed}
    if e.notebook == '01_unet': p['report_dir'] = str(Path(report_dir)/'baseline_full')
    if e.notebook == '03_style_pool': p['report_dir'] = str(report_dir)
    if e.notebook == '03_style_pool': p['unet_epochs'] = p.pop('epochs', None); p['seed'] = 0  # the synthesizer's own schedule and seed;
        # the segmentation epochs name the Baseline run whose U-Net the fidelity check reuses
    if e.notebook in ('04_sacps', '05_sast'): p['variant'] = e.variant
    if e.notebook == '04_sacps': p['benchmark'] = False
    if e.notebook not in ('03_style_pool', '04_sacps'): p.pop('sean', None)   # a synthesizer override reaches SEAN and SA-CPS runs only
    if e.notebook == '07_baselines': p['methods'] = e.variant
    if e.notebook == '01_unet': p['methods'] = 'baseline,full'  # full supervision is trained once (run folder r1) and reused
    return p

def done(e: Experiment, common: dict, ratio: float, seed: int) -> bool:
    if e.variant == 'sean':
        from sapl.style_pool import sean_dir
        from sapl.sean import SEAN_PROFILES
        import torch
        cfg = SEAN_PROFILES[common.get('sean') or common['profile']]
        ck = sean_dir(common['out_dir'], common['dataset'], common['profile'], ratio, 0, cfg)/'last.pt'
        return ck.exists() and torch.load(ck, weights_only=True)['epoch'] >= cfg.epochs
    return (run_dir(common['out_dir'], common['dataset'], common['profile'], ratio, seed, e.variant)/'test.csv').exists()

def run_one(e: Experiment, common: dict, ratio: float, seed: int, report_dir='reports', root=None) -> Path:
    "Execute one experiment's notebook under papermill (skipped when finished); returns the executed notebook."
    import papermill as pm
    from sapl.data import resolve
    root = Path(root) if root else Path(__file__).resolve().parents[1]  # the repository holding nbs/
    p = params_for(e, common, ratio, seed, resolve(report_dir))
    out = resolve(report_dir)/'runs'/f"{e.variant}_{common['dataset']}_{common['profile']}_r{p['ratio']:g}_s{seed}.ipynb"
    if done(e, common, p['ratio'], seed) and out.exists(): return out
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time(); print(f"[run] {e.variant} ratio {p['ratio']:g} seed {seed} ({e.notebook}) ...", flush=True)
    pm.execute_notebook(str(Path(root)/'nbs'/f'{e.notebook}.ipynb'), str(out), parameters=p, cwd=str(root),
                        progress_bar=False, log_output=False, kernel_name='python3')
    print(f"[done] {e.variant} ratio {p['ratio']:g} seed {seed} in {time.time() - t0:.0f}s", flush=True)
    return out


# %%
_p = params_for(BY_VARIANT['sean'], dict(dataset='phantom', profile='quick', epochs=12, out_dir='runs'), 0.1, 3)
test_eq((_p['unet_epochs'], _p['seed'], 'epochs' in _p), (12, 0, False))   # SEAN keeps its own schedule; the U-Net check finds the 12-epoch Baseline


# %% [markdown]
# Runs of one stage are independent of each other, so `run_stages` executes them `n_jobs` at a time (each kernel then
# single-threaded, which is also what keeps two jobs on two cores from slowing each other down); stages run in order.
# The first failure stops the driver with the path of the executed notebook that shows the error.

# %%
#| export
def run_stages(jobs: list, common: dict, report_dir, n_jobs: int = 1, t0: float|None = None):
    "Run (experiment, ratio, seed) jobs stage by stage, `n_jobs` at a time."
    from concurrent.futures import ThreadPoolExecutor
    t0 = t0 or time.time()
    if n_jobs > 1: os.environ['OMP_NUM_THREADS'] = '1'
    for stage in sorted({e.stage for e, _, _ in jobs}):
        todo = [j for j in jobs if j[0].stage == stage]
        print(f"stage {stage}: {len(todo)} runs ({time.time() - t0:.0f}s elapsed)", flush=True)
        with ThreadPoolExecutor(max(1, n_jobs)) as ex:
            for f in [ex.submit(run_one, e, common, r, s, report_dir) for e, r, s in todo]: f.result()


# %% [markdown]
# ## Aggregating over seeds
#
# For each variant and ratio, the test mean DSC and NSD of every seed $k = 1..n$ are averaged, and reported with the
# half-width of the 95 % confidence interval of that mean (`sapl.stats.mean_ci`, Eq. S1),
#
# $$\bar{m} \pm t_{0.975,\,n-1} \frac{s}{\sqrt{n}}, \qquad s^2 = \frac{1}{n-1}\sum_k (m_k - \bar{m})^2$$
#
# ($m_k$ the mean over test volumes of seed $k$; volumes whose metric is undefined, i.e. NaN because both masks are
# empty, are left out of $m_k$ and counted in the table).

# %%
#| export
def collect_volumes(common: dict, ratios, seeds, variants) -> pd.DataFrame:
    "One row per (variant, ratio, seed, test volume) of every finished run, with its DSC and NSD."
    frames = []
    for v in variants:
        if v == 'sean': continue
        for r in ratios:
            for s in seeds:
                p = run_dir(common['out_dir'], common['dataset'], common['profile'], r, s, v)/'test.csv'
                if not p.exists(): continue
                df = pd.read_csv(p)
                frames.append(pd.DataFrame(dict(variant=v, ratio=r, seed=s, volume=df['id'], dsc=df['dsc'], nsd=df['nsd'])))
    cols = ['variant', 'ratio', 'seed', 'volume', 'dsc', 'nsd']
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)

def per_seed(per_volume: pd.DataFrame) -> pd.DataFrame:
    "Mean test DSC/NSD over volumes for each (variant, ratio, seed); NaN volumes left out and counted."
    g = per_volume.groupby(['variant', 'ratio', 'seed'], sort=False)
    out = g[['dsc', 'nsd']].mean().reset_index()
    out['n_vol'] = g['dsc'].size().to_numpy(); out['nan'] = g['dsc'].apply(lambda x: int(x.isna().sum())).to_numpy()
    return out[['variant', 'ratio', 'seed', 'dsc', 'nsd', 'n_vol', 'nan']]

def collect(common: dict, ratios, seeds, variants) -> pd.DataFrame:
    "One row per (variant, ratio, seed) with the mean test DSC/NSD over volumes."
    return per_seed(collect_volumes(common, ratios, seeds, variants))

def fmt(m, h) -> str:
    if m != m: return '–'
    return f"{100*m:.2f} ± {100*h:.2f}" if h == h else f"{100*m:.2f}"

def summary_table(per_seed: pd.DataFrame, variants, ratio) -> pd.DataFrame:
    "Rows = variants at one ratio: NSD/DSC mean ± 95 % CI over seeds (Eq. S1), per-seed SD of DSC, number of seeds."
    from sapl.stats import mean_ci
    out = []
    for v in variants:
        d = per_seed[(per_seed.variant == v) & ((per_seed.ratio == ratio) | (v == 'full'))]
        if v == 'full': d = d.drop_duplicates('seed')
        (mn, hn), (md, hd) = mean_ci(d.nsd), mean_ci(d.dsc)
        out.append(dict(variant=v, method=BY_VARIANT[v].label if v in BY_VARIANT else v, nsd=mn, nsd_ci=hn, dsc=md, dsc_ci=hd,
                        dsc_sd=float(d.dsc.std(ddof=1)) if len(d) > 1 else float('nan'),
                        seeds=len(d), nan_volumes=int(d.nan.sum()) if len(d) else 0))
    return pd.DataFrame(out)


# %%
_pv = pd.DataFrame([dict(variant='cps', ratio=.1, seed=s, volume=f'v{k}', dsc=.5 + .1*s + .01*k, nsd=.4) for s in range(3) for k in range(4)])
_ps = per_seed(_pv); test_eq(len(_ps), 3); test_close(_ps.dsc.tolist(), [.515, .615, .715])
test_close(summary_table(_ps, ['cps'], .1).dsc[0], .615); test_close(summary_table(_ps, ['cps'], .1).dsc_sd[0], .1)


# %% [markdown]
# ### Results already committed
#
# A fresh clone has no `runs/`: its finished runs are the committed per-volume results in `reports/per_volume.csv`. So
# that rerunning one run (to check a committed number, or to add a seed) does not rebuild the tables from that run alone,
# `with_committed` adds the committed rows of every (variant, ratio, seed) that has no finished run here, and a run here
# replaces its committed rows. The committed rows are used only if the committed tables were made from the same data
# (the data hash in the header of `table_IV.md` equals this run's); the tables then say how many runs came from the
# committed file. `--no-committed` builds the tables from the runs here alone; `make demo` always does.

# %%
#| export
def committed_hash(report_dir) -> str|None:
    "The data hash in the header of `report_dir`/table_IV.md: the data the committed tables were made from (None: no table)."
    import re
    from sapl.data import resolve
    p = resolve(report_dir)/'table_IV.md'
    m = re.search(r'^- \*\*data hash\*\*: (\S+)$', p.read_text(), re.M) if p.exists() else None
    return m.group(1) if m else None

def with_committed(local: pd.DataFrame, # collect_volumes of the runs here
                   report_dir, data_hash: str, ratios, seeds, variants) -> tuple: # (per-volume rows, runs taken from report_dir)
    "Add the rows of `report_dir`/per_volume.csv of each (variant, ratio, seed) without a run here, if made from the same data."
    from sapl.data import resolve
    p, key = resolve(report_dir)/'per_volume.csv', ['variant', 'ratio', 'seed']
    if not p.exists() or committed_hash(report_dir) != data_hash: return local, 0
    old = pd.read_csv(p)
    old = old[old.variant.isin(variants) & old.ratio.isin(ratios) & old.seed.isin(seeds)]
    here = set(local[key].itertuples(index=False, name=None))
    old = old[[k not in here for k in old[key].itertuples(index=False, name=None)]][list(local.columns)]
    if old.empty: return local, 0
    pv = pd.concat([f for f in (local, old) if len(f)], ignore_index=True)
    rank = {v: i for i, v in enumerate(variants)}   # the order collect_volumes writes: variant, ratio, seed, then volume
    pv = pv.sort_values(key, key=lambda c: c.map(rank) if c.name == 'variant' else c, kind='stable', ignore_index=True)
    return pv, len(old[key].drop_duplicates())


# %%
import tempfile
_row = lambda v, s, d: dict(variant=v, ratio=.1, seed=s, volume='v0', dsc=d, nsd=d)
with tempfile.TemporaryDirectory() as _d:
    pd.DataFrame([_row('cps', 0, .5), _row('cps', 1, .6), _row('sacps', 0, .7)]).to_csv(f'{_d}/per_volume.csv', index=False)
    Path(f'{_d}/table_IV.md').write_text('# Table IV\n\n- **data hash**: abc\n')
    _pv, _n = with_committed(pd.DataFrame([_row('cps', 1, .9)]), _d, 'abc', [.1], [0, 1], ['cps', 'sacps'])
    test_eq(_n, 2); test_eq(_pv.dsc.tolist(), [.5, .9, .7])   # the run here replaces its committed row; rows in collected order
    test_eq(with_committed(pd.DataFrame([_row('cps', 1, .9)]), _d, 'xyz', [.1], [0, 1], ['cps'])[1], 0)   # other data: not mixed

# %% [markdown]
# ## Tables and figures
#
# Every table states the profile, the seeds, the git SHA and the data hash. Table II/III list the loss/input switches as
# in the paper; Table IV groups single- and multi-stage methods per ratio; `fig8.md` holds the paired differences
# behind Fig. 8 (SA-CPS with its pool of infected styles against Self Style and Pool (N)). Only variants that have finished runs appear.

# %%
#| export
TABLE_II = [('cps', '✓', '✓', ''), ('sacps-synth', '✓', '', '✓'), ('sacps', '✓', '✓', '✓')]
TABLE_III = [('st', '✓', '✓', ''), ('sast-synth', '✓', '', '✓'), ('sast', '✓', '✓', '✓')]
SINGLE = ['baseline', 'mt', 'uamt', 'cct', 'udc', 'selfens', 'cps', 'sacps', 'sacps-whole', 'sacps-b2000', 'sacps-spade', 'sacps-spade-lungs', 'bcp', 'unimatch', 'sa-mt', 'sa-bcp', 'sa-unimatch']
MULTI = ['semiinfnet', 'st', 'sast', 'sast+sacps', 'sast-spade', 'sast+sacps-spade']
CLAIMS = [('sacps', 'cps'), ('sast', 'st'), ('sast+sacps', 'st'),  # the paper's claims: A beats B
          ('sa-mt', 'mt'), ('sa-bcp', 'bcp'), ('sa-unimatch', 'unimatch'),  # synthesis as a plug-in
          ('sacps-spade', 'cps'), ('sast-spade', 'st'), ('sast+sacps-spade', 'st'),  # the claims with the first synthesizer
          ('sacps', 'sacps-spade'), ('sacps', 'sacps-whole'), ('sacps-spade-lungs', 'cps'), ('sacps-b2000', 'cps')]  # which synthesis helps SA-CPS more
DELTAS_II = [('sacps', 'cps'), ('sacps', 'sacps-synth')]
DELTAS_III = [('sast', 'st'), ('sast', 'sast-synth')]
DELTAS_FIG8 = [('sacps', 'sacps-self'), ('sacps', 'sacps-pooln')]

def _atomic_text(path: Path, text: str):
    from sapl.data import atomic_path
    with atomic_path(path) as tmp: tmp.write_text(text)

def header(title: str, meta: dict) -> list:
    return [f'# {title}', ''] + [f'- **{k}**: {v}' for k, v in meta.items()] + ['']

def _label(v): return BY_VARIANT[v].label if v in BY_VARIANT else v

def delta_table(per_volume: pd.DataFrame, ratio, pairs) -> pd.DataFrame:
    "Paired comparisons (sapl.stats.compare) of DSC and NSD for each (A, B) in `pairs` with runs at `ratio`."
    from sapl.stats import compare
    pv = per_volume[per_volume.ratio == ratio]
    rows = []
    for a, b in pairs:
        if not ({a, b} <= set(pv.variant)): continue
        c, n = compare(pv, a, b, 'dsc'), compare(pv, a, b, 'nsd')
        rows.append({**c, 'ratio': ratio, 'nsd_diff': n['diff'], 'nsd_half': n['half'], 'nsd_verdict': n['verdict']})
    return pd.DataFrame(rows)

def delta_lines(d: pd.DataFrame) -> list:
    "Markdown rows of a delta table: differences in DSC/NSD points, intervals over seeds and over volumes, verdict."
    if d.empty: return []
    pts = lambda x: f'{100*x:+.2f}' if x == x else '–'
    lines = ['| A − B | seeds | Δ DSC (pts) | 95 % CI over seeds | 95 % CI over volumes | Wilcoxon p | Δ NSD (pts) | verdict (DSC) |',
             '|---|---|---|---|---|---|---|---|']
    for _, r in d.iterrows():
        lines.append(f"| {_label(r.a)} − {_label(r.b)} | {r.seeds} | {pts(r['diff'])} | [{pts(r.lo)}, {pts(r.hi)}] | "
                     f"[{pts(r.vol_lo)}, {pts(r.vol_hi)}] | {r.wilcoxon_p:.2g} | {pts(r.nsd_diff)} ± {100*r.nsd_half:.2f} | **{r.verdict}** |")
    return lines + ['']

DELTA_NOTE = ('Δ: paired differences A − B on the same seeds and test volumes. "CI over seeds": paired t-interval of the '
              'per-seed mean differences (Eq. S2); "CI over volumes": paired bootstrap of the seed-averaged per-volume '
              'differences (Eq. S3); Wilcoxon signed-rank p over volumes (Eq. S4). Verdict from the interval over seeds: '
              '**holds** (above 0), **reversed** (below 0), **undecided** (contains 0).')

def _ablation_table(name, rows, cols, per_seed, per_volume, r0, meta, deltas) -> list:
    t = summary_table(per_seed, [r[0] for r in rows], r0)
    if t.seeds.sum() == 0: return []
    lines = header(f"{name.replace('table_', 'Table ')} — {r0:.0%} labeled (mean ± 95 % CI over seeds)", meta)
    lines += [f"| {' | '.join(cols)} | Method | NSD (%) | DSC (%) | seeds |", '|' + '---|'*(len(cols) + 4)]
    for (v, *marks), (_, row) in zip(rows, t.iterrows()):
        lines.append(f"| {' | '.join(marks)} | {row.method} | {fmt(row.nsd, row.nsd_ci)} | {fmt(row.dsc, row.dsc_ci)} | {row.seeds} |")
    lines += ['', *delta_lines(delta_table(per_volume, r0, deltas)), DELTA_NOTE]
    return lines

def write_tables(per_volume: pd.DataFrame, ratios, meta: dict, report_dir='reports') -> list:
    "Write table_II/III/IV (.md + .csv) with paired differences and verdicts; returns the paths written."
    from sapl.data import resolve
    rd = resolve(report_dir); written = []; ps = per_seed(per_volume); r0 = min(ratios)
    for name, rows, cols, deltas in (('table_II', TABLE_II, ('L_s', 'L_pseudo', 'L_synthetic'), DELTAS_II),
                                     ('table_III', TABLE_III, ('Real', 'Pseudo', 'Synthetic'), DELTAS_III)):
        lines = _ablation_table(name, rows, cols, ps, per_volume, r0, meta, deltas)
        if not lines: continue
        _atomic_text(rd/f'{name}.md', '\n'.join(lines) + '\n'); written.append(rd/f'{name}.md')
    fig8 = delta_lines(delta_table(per_volume, r0, DELTAS_FIG8))   # Fig. 8's style choices, paired
    if fig8:
        lines = header(f'Fig. 8 — style source of SA-CPS, {r0:.0%} labeled (paired differences; bars in fig8.png)', meta) + fig8 + [DELTA_NOTE]
        _atomic_text(rd/'fig8.md', '\n'.join(lines) + '\n'); written.append(rd/'fig8.md')
    lines = header('Table IV — phantom test set (mean ± 95 % CI over seeds)', meta)
    lines += ['| Ratio | Stages | Method | NSD (%) | DSC (%) | SD of DSC over seeds (pts) | seeds | NaN volumes |', '|---|---|---|---|---|---|---|---|']
    frames, deltas = [], []
    row_line = lambda r, stage, row: (f"| {r:.0%} | {stage} | {row.method} | {fmt(row.nsd, row.nsd_ci)} | {fmt(row.dsc, row.dsc_ci)} | "
                                      f"{100*row.dsc_sd:.2f} | {row.seeds} | {row.nan_volumes} |")
    for r in ratios:
        for stage, vs in (('Single', SINGLE), ('Multiple', MULTI)):
            t = summary_table(ps, vs, r); t = t[t.seeds > 0]
            lines += [row_line(r, stage, row) for _, row in t.iterrows()]
            frames.append(t.assign(ratio=r, stage=stage))
        present = [v for v in SINGLE + MULTI + ['full'] if v != 'baseline' and v in set(per_volume[per_volume.ratio == r].variant)]
        deltas.append(delta_table(per_volume, r, CLAIMS + [(v, 'baseline') for v in present]))
    t = summary_table(ps, ['full'], None); t = t[t.seeds > 0]
    lines += [row_line(1.0, 'Full', row) for _, row in t.iterrows()]
    frames.append(t.assign(ratio=1.0, stage='Full'))
    for r, d in zip(ratios, deltas):
        if d.empty: continue
        lines += ['', f'## Paired differences at {r:.0%} labeled: the paper\'s claims, then every method against the Baseline', '']
        lines += delta_lines(d)
    lines += [DELTA_NOTE]
    _atomic_text(rd/'table_IV.md', '\n'.join(lines) + '\n'); pd.concat(frames).to_csv(rd/'table_IV.csv', index=False)
    dd = pd.concat(deltas, ignore_index=True) if deltas else pd.DataFrame()
    dd.to_csv(rd/'table_IV_deltas.csv', index=False); ps.to_csv(rd/'per_seed.csv', index=False); per_volume.to_csv(rd/'per_volume.csv', index=False)
    return written + [rd/'table_IV.md', rd/'table_IV.csv', rd/'table_IV_deltas.csv', rd/'per_seed.csv', rd/'per_volume.csv']


# %%
#| export
TABLE_V = ['baseline', 'uamt', 'cct', 'udc', 'selfens', 'cps', 'sacps', 'semiinfnet', 'st', 'sast', 'sast+sacps']

def write_table_v(per_seed: pd.DataFrame, ratio: float, meta: dict, report_dir='reports') -> list:
    "Table V analogue (MosMedData-like phantom: few labels, many unlabeled studies, shifted test set)."
    from sapl.data import resolve
    rd = resolve(report_dir)
    t = summary_table(per_seed, TABLE_V, ratio); t = t[t.seeds > 0]
    lines = header('Table V analogue — MosMedData-like phantom, shifted test set (mean ± 95 % CI over seeds)', meta)
    lines += ['| Stages | Method | NSD (%) | DSC (%) | seeds | NaN volumes |', '|---|---|---|---|---|---|']
    for _, row in t.iterrows():
        stage = 'Multiple' if row.variant in MULTI else 'Single'
        lines.append(f"| {stage} | {row.method} | {fmt(row.nsd, row.nsd_ci)} | {fmt(row.dsc, row.dsc_ci)} | {row.seeds} | {row.nan_volumes} |")
    _atomic_text(rd/'table_V.md', '\n'.join(lines) + '\n'); t.to_csv(rd/'table_V.csv', index=False)
    return [rd/'table_V.md', rd/'table_V.csv']

def bar_figure(per_seed: pd.DataFrame, variants, labels, ratio, path, title) -> Path|None:
    "Bars of NSD and DSC (mean ± 95 % CI over seeds) for the `variants` with runs at `ratio` (Figs. 5 and 8); None below two."
    from matplotlib.figure import Figure
    t = summary_table(per_seed, variants, ratio); keep = (t.seeds > 0).to_numpy()
    if keep.sum() < 2: return None   # no empty bars, and one bar compares nothing
    t, variants, labels = t[keep].reset_index(drop=True), [v for v, k in zip(variants, keep) if k], [l for l, k in zip(labels, keep) if k]
    fig = Figure(figsize=(1.6*len(variants) + 2, 3.2), dpi=120); ax = fig.subplots()
    x = np.arange(len(variants)); w = .38
    for k, (col, name) in enumerate((('nsd', 'NSD'), ('dsc', 'DSC'))):
        ci = np.nan_to_num(t[f'{col}_ci'].to_numpy()*100)
        ax.bar(x + (k - .5)*w, t[col]*100, w, yerr=ci, capsize=3, label=name)
        for xi, val in zip(x, t[col]*100):
            if val == val: ax.text(xi + (k - .5)*w, val + .5, f'{val:.1f}', ha='center', fontsize=7)
    ax.set_xticks(x); ax.set_xticklabels(labels, fontsize=8); ax.set_ylabel('%'); ax.legend(fontsize=8)
    lo = np.nanmin(np.r_[t.nsd, t.dsc])*100; ax.set_ylim(max(0, lo - 10), min(100, np.nanmax(np.r_[t.nsd, t.dsc])*100 + 6))
    ax.set_title(title, fontsize=9); fig.tight_layout()
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True); fig.savefig(path); return path

def visual_comparison(common: dict, ratio: float, seed: int, path, variants=('baseline', 'sacps', 'sast', 'sast+sacps')) -> Path|None:
    "Fig. 6: test slices with the ground truth and each method's prediction."
    register_all()
    from sapl.data import prepare_data
    from sapl.train import RunConfig, Trainer, load_checkpoint
    from sapl.eval import plot_predictions, predict_volume
    data = prepare_data(common['dataset'], common['data_dir'], ratio, common['profile'], progress=False)
    preds = {}
    for v in variants:
        cfg = RunConfig(dataset=common['dataset'], data_dir=common['data_dir'], ratio=ratio, profile=common['profile'],
                        epochs=common.get('epochs'), seed=seed, out_dir=common['out_dir']).variant(v)
        ck = cfg.checkpoint_path
        if not ck.exists(): continue
        from sapl.predict import load_predictor
        import torch
        net = load_predictor(ck).net  # the one checkpoint loader (s1 of two-network methods)
        f = lambda x, n=net: torch.sigmoid(n(x))
        preds[BY_VARIANT[v].label] = [predict_volume(f, vol) for vol in data.test]
    if not preds: return None
    return plot_predictions(data.test, preds, path, n=4)



# %% [markdown]
# ## Learning curves: choosing the iteration budget
#
# Every method gets the same number of iterations, chosen from measured curves rather than guessed: Baseline, CPS and
# SA-CPS at 10 % labeled (and Full Supervision, which the supervised notebook trains alongside) run once for a long
# schedule (`--curves EPOCHS`, epochs of the profile's `iters_per_epoch` iterations, in `out_dir/curves`), and the
# validation DSC of every epoch is plotted against the iteration. With $v_e$ the validation DSC after epoch $e$ and
# $\tilde v_e$ its centred moving average over 5 epochs, a method has **reached its plateau** at the first iteration $t^*$ at
# which $\tilde v$ comes within 2 DSC points of its maximum (the 5-epoch average of a validation curve still moves by
# about that much from epoch to epoch, so "stays within" would be decided by noise),
#
# $$t^* = \min\{\, t_e : \tilde v_e \ge \max_k \tilde v_k - 0.02 \,\}. \tag{R1}$$
#
# With the polynomial schedule the last epochs anneal the learning rate to zero and usually add a final rise, so a
# curve that is still rising at its very end says "a longer schedule may help", and one whose plateau was reached well
# before the anneal says it would not. `reports/learning_curves.md` lists $t^*$, the largest epoch-to-epoch jump and the
# budget the tables use.

# %%
#| export
CURVE_VARIANTS = ('sean', 'baseline', 'cps', 'sacps')

def flattened_at(v: np.ndarray, # [E] validation DSC per epoch
                 tol: float = 0.02, window: int = 5) -> int: # epoch index e (0-based) of Eq. R1
    "First epoch at which the centred moving average of `v` comes within `tol` of its maximum (Eq. R1)."
    s = pd.Series(np.asarray(v, float)).rolling(window, center=True, min_periods=1).mean().to_numpy()
    return int(np.argmax(s >= np.nanmax(s) - tol))

def learning_curves(common: dict, ratio: float, seed: int, report_dir='reports') -> list:
    "Plot validation DSC vs iteration of the curve runs and write reports/learning_curves.md (+ .png, .csv)."
    import seaborn as sns
    from matplotlib.figure import Figure
    from sapl.data import resolve, get_profile
    rd = resolve(report_dir); ipe = get_profile(common['profile']).iters_per_epoch
    frames = []
    for v in ('baseline', 'full', 'cps', 'sacps'):
        p = run_dir(common['out_dir'], common['dataset'], common['profile'], ratio, seed, v)/'metrics.csv'
        if p.exists(): frames.append(pd.read_csv(p).assign(method=_label(v), variant=v))
    if not frames: return []
    df = pd.concat(frames, ignore_index=True); df['iteration'] = df['epoch']*ipe
    df['smoothed'] = df.groupby('variant')['val_dsc'].transform(lambda x: x.rolling(5, center=True, min_periods=1).mean())
    fig = Figure(figsize=(8, 3.4), dpi=120); ax = fig.subplots()
    sns.lineplot(data=df, x='iteration', y='val_dsc', hue='method', alpha=.35, ax=ax, legend=False)
    sns.lineplot(data=df, x='iteration', y='smoothed', hue='method', ax=ax)
    ax.set_ylabel('validation DSC'); ax.set_title(f'Validation DSC per epoch (faint) and its 5-epoch moving average, {ratio:.0%} labeled, seed {seed}', fontsize=9)
    fig.tight_layout(); fig.savefig(rd/'learning_curves.png')
    rows = []
    for v, g in df.groupby('variant', sort=False):
        e = flattened_at(g['val_dsc'].to_numpy()); vv = g['val_dsc'].to_numpy()
        rows.append(dict(method=_label(v), iterations=int(g.iteration.max()), flattened_at=int(g.iteration.iloc[e]),
                         max_smoothed=float(g.smoothed.max()), final=float(vv[-1]), best=float(np.nanmax(vv)),
                         best_at=int(g.iteration.iloc[int(np.nanargmax(vv))]),
                         largest_jump=float(np.nanmax(np.abs(np.diff(vv)))) if len(vv) > 1 else float('nan')))
    t = pd.DataFrame(rows); df.to_csv(rd/'learning_curves.csv', index=False)
    lines = ['# Learning curves', '', f'- **data**: {common["dataset"]}, {ratio:.0%} labeled, seed {seed}, profile {common["profile"]} '
             f'({ipe} iterations per epoch), validation DSC on the preprocessed slices of the validation volumes', '',
             '| Method | iterations run | plateau reached at (Eq. R1) | max of smoothed val DSC | final val DSC | best val DSC (at) | largest epoch-to-epoch jump |',
             '|---|---|---|---|---|---|---|']
    lines += [f"| {r.method} | {r.iterations} | {r.flattened_at} | {100*r.max_smoothed:.2f} | {100*r.final:.2f} | {100*r.best:.2f} ({r.best_at}) | "
              f"{100*r.largest_jump:.2f} |" for r in t.itertuples()]
    semi = t[t.method != _label('full')]
    flat = f"{int(semi.flattened_at.max())} iterations"
    lines += ['', f'Latest plateau (Eq. R1) of Baseline, CPS and SA-CPS: **{flat}**; the curves ran '
              f'{int(df.iteration.max())} iterations, the budget of every method in the tables.', '',
              '![learning curves](learning_curves.png)']
    _atomic_text(rd/'learning_curves.md', '\n'.join(lines) + '\n')
    return [rd/'learning_curves.md', rd/'learning_curves.png', rd/'learning_curves.csv']


# %%
test_eq(flattened_at(np.r_[np.linspace(.2, .6, 10), np.full(10, .6)]), 10); test_eq(flattened_at(np.r_[np.linspace(.2, .6, 10), np.full(10, .6), .3]), 10); test_eq(flattened_at(np.full(5, .5)), 0)

# %% [markdown]
# ## Which checkpoint: last or best validation
#
# The same runs give both: `last.pt` (evaluated in every table) and `best.pt` (the epoch of the highest validation DSC, the
# paper's rule). `selection_effect` evaluates `best.pt` on the test volumes too (cached as `test_best.csv`) and writes
# `reports/selection.md`: mean and standard deviation over seeds of the test DSC under each rule, for the same trained
# networks, so the difference is the selection rule alone.

# %%
#| export
SELECTION_VARIANTS = ('baseline', 'full', 'cps', 'sacps', 'sacps-whole', 'sacps-b2000', 'sacps-spade', 'sacps-spade-lungs', 'mt', 'st', 'sast', 'sast+sacps', 'sast-spade', 'sast+sacps-spade')  # the predicting U-Net (s1 of two)

def _selection_claims(t: pd.DataFrame) -> list:
    "The paper's claims (CLAIMS) as paired t-intervals over seeds (Eq. S2) under each rule, where both methods have runs."
    from sapl.stats import paired_t, verdict
    out = []
    for a, b in CLAIMS:
        m = t[t.variant == a].merge(t[t.variant == b], on='seed', suffixes=('_a', '_b'))
        if len(m) < 2: continue
        cells = []
        for rule in ('last', 'best'):
            r = paired_t(m[f'{rule}_a'], m[f'{rule}_b'])
            cells.append(f"{100*r['diff']:+.2f} [{100*r['lo']:+.2f}, {100*r['hi']:+.2f}] **{verdict(r['lo'], r['hi'])}**")
        out.append(f"| {_label(a)} − {_label(b)} | {len(m)} | {cells[0]} | {cells[1]} |")
    if not out: return []
    return ['', '## The paper\'s claims under each rule (paired over seeds, Δ DSC in points, 95 % CI)', '',
            '| A − B | seeds | last | best val |', '|---|---|---|---|', *out]

def selection_effect(common: dict, ratio: float, seeds, report_dir='reports', variants=SELECTION_VARIANTS) -> Path|None:
    "Test DSC of best.pt beside last.pt for the same runs; mean and SD over seeds per rule (reports/selection.md)."
    import torch
    from sapl.data import prepare_data, resolve, atomic_path
    from sapl.train import RunConfig, load_checkpoint
    from sapl.predict import load_predictor
    from sapl.eval import evaluate
    from sapl.stats import mean_ci
    register_all(); data = prepare_data(common['dataset'], common['data_dir'], ratio, common['profile'], progress=False)
    rows = []
    for v in variants:
        for s in seeds:
            cfg = RunConfig(dataset=common['dataset'], ratio=ratio, profile=common['profile'], seed=s, out_dir=common['out_dir']).variant(v)
            d = cfg.run_dir
            if not ((d/'test.csv').exists() and (d/'best.pt').exists()): continue
            ck = load_checkpoint(d/'best.pt')
            if not (d/'test_best.csv').exists():
                net = load_predictor(d/'best.pt').net
                df = evaluate(lambda x: torch.sigmoid(net(x)), data.test)
                with atomic_path(d/'test_best.csv') as t: df.to_csv(t, index=False)
            rows.append(dict(variant=v, seed=s, last=pd.read_csv(d/'test.csv').dsc.mean(), best=pd.read_csv(d/'test_best.csv').dsc.mean(),
                             best_epoch=int(ck['epoch']), epochs=cfg.n_epochs if common.get('epochs') is None else common['epochs']))
    if not rows: return None
    t = pd.DataFrame(rows); rd = resolve(report_dir)
    lines = ['# Checkpoint selection: last vs best validation epoch', '',
             f'- **runs**: {common["dataset"]}, {ratio:.0%} labeled, profile {common["profile"]}, seeds {sorted(set(t.seed))}; the same trained networks under both rules', '',
             '| Method | seeds | test DSC, last (mean ± 95 % CI) | SD over seeds, last (pts) | test DSC, best val (mean ± 95 % CI) | SD over seeds, best val (pts) | epochs chosen by best val |',
             '|---|---|---|---|---|---|---|']
    for v, g in t.groupby('variant', sort=False):
        (ml, hl), (mb, hb) = mean_ci(g['last']), mean_ci(g['best'])
        sd = lambda x: 100*x.std(ddof=1) if len(x) > 1 else float('nan')
        lines.append(f"| {_label(v)} | {len(g)} | {fmt(ml, hl)} | {sd(g['last']):.2f} | {fmt(mb, hb)} | {sd(g['best']):.2f} | "
                     f"{', '.join(str(e) for e in g.best_epoch)} of {g.epochs.iloc[0]} |")
    lines += _selection_claims(t)
    _atomic_text(rd/'selection.md', '\n'.join(lines) + '\n'); t.to_csv(rd/'selection.csv', index=False)
    return rd/'selection.md'


# %%
_t = pd.DataFrame(dict(variant=['sacps']*3 + ['cps']*3, seed=[0, 1, 2]*2, last=[.60, .62, .61, .63, .64, .62], best=[.65, .66, .64, .66, .66, .65]))
_c = _selection_claims(_t)
test_eq(len([l for l in _c if l.startswith('| SA-CPS − CPS | 3 |')]), 1); assert '-2.00' in _c[-1] and '-0.67' in _c[-1]

# %% [markdown]
# ## Command line
#
# `python -c 'import sys; from sapl.reproduce import main; main(sys.argv[1:])' [--profile quick] [--ratios 0.1 0.2 0.3] [--seeds 0 1 2] [--variants ...] [--demo]`.
# `--demo` is the Table IV 10 % column with one seed (the `make demo` job); without `--variants` every experiment runs.
# `--table-v` runs the Table V analogue on the MosMedData-like phantom (`sapl.data.make_phantom_mosmed`).

# %% [markdown]
# ### Dose-response: SA-CPS's gain against synthesis fidelity
#
# Four SA-CPS variants differ only in the synthetic images they train on: the first quick synthesizer (`quick-spade`)
# decoding whole slices (`sacps-spade`) or only the lungs, pasted into the real slice with matched noise
# (`sacps-spade-lungs`, Eq. 3c), the current one (`quick`, 4000 iterations) the same two ways (`sacps-whole`,
# `sacps`), and the current architecture stopped at 2000 iterations, lungs with matched noise (`sacps-b2000`). Their paired gains over CPS (Eq. F4 in
# `03_style_pool`) are plotted against the fidelity row of their synthesis in `reports/synthesis_fidelity.csv`, once against
# the C2ST AUC (1.0 = always told apart from real slices, 0.5 = indistinguishable; `gain_vs_c2st.png`) and once against
# the size of the segmenter gap ($|\Delta_{DSC}|$ of Eq. F1; `gain_vs_gap.png`), with the table in `gain_vs_fidelity.md`. Written
# when at least two variants have 5 seeds paired with CPS and the fidelity table exists.

# %%
#| export
DOSE_LEVELS = {'sacps-spade': ('quick-spade', 'whole (Eq. 3)'), 'sacps-whole': ('quick', 'whole (Eq. 3)'),
               'sacps-b2000': ('quick-b2000', 'lungs + noise (Eq. 3c)'),
               'sacps': ('quick', 'lungs + noise (Eq. 3c)'), 'sacps-spade-lungs': ('quick-spade', 'lungs + noise (Eq. 3c)')}   # variant: (synthesizer profile, synthesis mode)

def dose_response(ps: pd.DataFrame, ratio: float, rd: Path, min_seeds: int = 5) -> list:
    "Paired gains of the DOSE_LEVELS over CPS against both fidelity measures (Eq. F4): gain_vs_fidelity.md, gain_vs_c2st.png, gain_vs_gap.png in `rd`."
    from sapl.style_pool import gain_vs_fidelity, sean_tag
    from sapl.sean import SEAN_PROFILES
    fid = Path(rd)/'synthesis_fidelity.csv'
    sub = ps[ps.ratio == ratio]
    cps = set(sub[sub.variant == 'cps'].seed)
    levels = {v: (sean_tag(SEAN_PROFILES[n]), mode) for v, (n, mode) in DOSE_LEVELS.items()
              if len(cps & set(sub[sub.variant == v].seed)) >= min_seeds}
    if not fid.exists() or len(levels) < 2: return []
    fidelity = pd.read_csv(fid)
    levels = {v: k for v, k in levels.items() if ((fidelity.synthesizer == k[0]) & (fidelity['mode'] == k[1])).any()}
    if len(levels) < 2: return []
    summ = gain_vs_fidelity(sub, levels, fidelity, Path(rd)/'gain_vs_c2st.png', metric='c2st_auc', min_seeds=min_seeds)
    gap = gain_vs_fidelity(sub, levels, fidelity, Path(rd)/'gain_vs_gap.png', metric='abs_dsc_gap', min_seeds=min_seeds)
    summ = summ.merge(gap[['variant', 'abs_dsc_gap']], on='variant')
    lines = ['# SA-CPS gain over CPS against synthesis fidelity', '', f'{ratio:.0%} labeled; paired over seeds (Eq. F4); '
             'fidelity from `synthesis_fidelity.md` (C2ST AUC and |segmenter DSC gap|, Eq. F1-F2).', '',
             '| variant | synthesis | C2ST AUC | abs. DSC gap | seeds | Δ DSC vs CPS (pts) | 95 % CI | verdict |', '|---|---|---|---|---|---|---|---|']
    from sapl.stats import verdict
    for r in summ.sort_values('abs_dsc_gap', ascending=False).itertuples():
        lines.append(f"| {r.variant} | {r.synthesizer} | {r.c2st_auc:.3f} | {r.abs_dsc_gap:.3f} | {r.count} | {100*r.mean:+.2f} | "
                     f"[{100*r.ci_lo:+.2f}, {100*r.ci_hi:+.2f}] | {verdict(r.ci_lo, r.ci_hi)} |")
    _atomic_text(Path(rd)/'gain_vs_fidelity.md', '\n'.join(lines) + '\n')
    return [Path(rd)/'gain_vs_c2st.png', Path(rd)/'gain_vs_gap.png', Path(rd)/'gain_vs_fidelity.md']


# %%
import tempfile
from sapl.style_pool import sean_tag; from sapl.sean import SEAN_PROFILES as _P
_ps = pd.DataFrame([dict(variant=v, ratio=.1, seed=s, dsc=.6 + .001*s + g) for s in range(5) for v, g in (('cps', 0), ('sacps', .02), ('sacps-spade', -.01))])
with tempfile.TemporaryDirectory() as _d:
    pd.DataFrame([dict(synthesizer=sean_tag(_P[n]), mode=m, c2st_auc=a, dsc_gap=g) for n, m, a, g in (('quick', 'lungs + noise (Eq. 3c)', .53, -.01), ('quick-spade', 'whole (Eq. 3)', 1., .04))]).to_csv(f'{_d}/synthesis_fidelity.csv', index=False)
    test_eq(len(dose_response(_ps, .1, Path(_d))), 3); assert '| +2.00 |' in open(f'{_d}/gain_vs_fidelity.md').read()
    test_eq(dose_response(_ps[_ps.seed < 4], .1, Path(_d)), [])   # fewer than 5 seeds paired with CPS: nothing written


# %%
#| export
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='make reproduce ARGS=', description='Regenerate the tables and figures of the paper.')
    ap.add_argument('--dataset', default='phantom'); ap.add_argument('--data-dir', default='data/phantom')
    ap.add_argument('--profile', default='quick'); ap.add_argument('--epochs', type=int, default=None)
    ap.add_argument('--ratios', type=float, nargs='+', default=[0.1, 0.2, 0.3])
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    ap.add_argument('--variants', nargs='+', default=None, help=f"subset of {[e.variant for e in EXPERIMENTS]}")
    ap.add_argument('--out-dir', default='runs'); ap.add_argument('--report-dir', default='reports')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--sean', default=None, help='synthesizer configuration of the SEAN and SA-CPS runs (a name in sapl.sean.SEAN_PROFILES); default: the profile\'s')
    ap.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1), help='runs in parallel (each single-threaded when > 1)')
    ap.add_argument('--demo', action='store_true', help='the make demo job (see the README)')
    ap.add_argument('--collect-only', action='store_true', help='only rebuild tables and figures from finished runs')
    ap.add_argument('--no-committed', action='store_true', help='tables from the runs here alone, without the committed reports/per_volume.csv')
    ap.add_argument('--table-v', action='store_true', help='the Table V analogue on the MosMedData-like phantom instead of Tables II-IV')
    ap.add_argument('--curves', type=int, default=None, metavar='EPOCHS', help='learning curves: Baseline, CPS, SA-CPS at the first ratio and seed for EPOCHS epochs')
    return ap

def _benchmark(data) -> str:
    s = data.split
    return (f"{len(s.train_l) + len(s.train_u)} training volumes ({len(s.train_l)} labeled at the first ratio), {len(s.val)} validation, "
            f"{len(s.test)} test; {data.profile.size} px slices")

def _figures(ps, common, a, rd) -> list:
    r0 = min(a.ratios)
    f5 = bar_figure(ps, ['baseline', 'sacps', 'sast', 'sast+sacps'], ['B', 'SA-CPS', 'SA-ST', 'SA-ST\n(+SA-CPS)'], r0, rd/'fig5.png',
                    f'Fig. 5 analogue: {r0:.0%} labeled, {a.profile} profile')
    f8 = bar_figure(ps, ['sacps-self', 'sacps-pooln', 'sacps'], ['Self Style', 'Pool (N)', 'Pool (N+)'], r0, rd/'fig8.png',
                    f'Fig. 8 analogue: style source of SA-CPS, {r0:.0%} labeled')
    f6 = visual_comparison(common, r0, min(a.seeds), rd/'fig6.png')
    return [f5, f6, f8] + dose_response(ps, r0, rd)

def main(argv=None):
    ap = _parser(); a = ap.parse_args(argv)
    from sapl.train import git_sha
    from sapl.data import resolve, prepare_data
    sha = git_sha()  # before this run writes anything under reports/
    if a.demo:
        a.ratios, a.seeds, a.variants = [0.1], [0], list(DEMO)
        if a.data_dir == 'data/phantom': a.data_dir = DEMO_DATA['data_dir']
        if a.report_dir == 'reports': a.report_dir = DEMO_DATA['report_dir']
        if a.out_dir == 'runs': a.out_dir = DEMO_DATA['out_dir']   # its own runs and synthesizer: never the benchmark's folders
        a.epochs = a.epochs or DEMO_DATA['epochs']; a.sean = a.sean or DEMO_DATA['sean']
        from sapl.data import ensure_phantom
        ensure_phantom(resolve(a.data_dir), DEMO_DATA['n_volumes'])
    if a.curves: a.ratios, a.seeds, a.variants, a.epochs = a.ratios[:1], a.seeds[:1], list(CURVE_VARIANTS), a.curves
    if a.table_v:
        a.dataset, a.ratios = 'phantom-mosmed', [TABLE_V_RATIO]
        if a.data_dir == 'data/phantom': a.data_dir = 'data/phantom-mosmed'
        a.variants = a.variants or list(TABLE_V)
    variants = a.variants or [e.variant for e in EXPERIMENTS]
    bad = [v for v in variants if v not in BY_VARIANT]
    if bad: ap.error(f"unknown variants {bad}; choose from {[e.variant for e in EXPERIMENTS]}")
    if 'sast+sacps' in variants and 'sacps' not in variants: variants.append('sacps')
    if any(BY_VARIANT[v].notebook in ('04_sacps', '05_sast') for v in variants) and 'sean' not in variants: variants.insert(0, 'sean')
    out_dir = resolve(a.out_dir)/'curves' if a.curves else resolve(a.out_dir)
    common = dict(dataset=a.dataset, data_dir=str(resolve(a.data_dir)), profile=a.profile, epochs=a.epochs, out_dir=str(out_dir), device=a.device,
                  **({'sean': a.sean} if a.sean else {}))
    t0 = time.time()
    data = prepare_data(a.dataset, common['data_dir'], a.ratios[0], a.profile)  # build the data set and its cache once, before parallel runs
    dh = data.fingerprint()   # hashes every preprocessed array: once
    print(f"data: {data.summary()}; data hash {dh}", flush=True)
    if not a.collect_only:
        if 'full' in variants and 'baseline' not in variants: variants.insert(0, 'baseline')
        jobs = [(BY_VARIANT[v], r, s) for v in variants for r in a.ratios for s in a.seeds
                if v != 'full' and not (v == 'sean' and s != a.seeds[0])]
        jobs.sort(key=lambda j: (j[0].stage, j[2], j[1]))
        run_stages(jobs, common, a.report_dir, a.jobs, t0)
    rd = resolve(a.report_dir)
    if a.curves:
        for p in learning_curves(common, a.ratios[0], a.seeds[0], rd): print(f"wrote {p}")
        print((rd/'learning_curves.md').read_text()); return
    pv, n_old = collect_volumes(common, a.ratios, a.seeds, variants), 0
    if not (a.demo or a.table_v or a.no_committed):
        pv, n_old = with_committed(pv, rd, dh, a.ratios, a.seeds, variants)
        print(f"{n_old} runs without a run folder here taken from {rd/'per_volume.csv'}" if n_old else
              f"tables from the runs here alone (committed data hash {committed_hash(rd)}, these runs {dh})", flush=True)
    ps = per_seed(pv)
    meta = {'benchmark': f"{a.dataset}: {_benchmark(data)}", 'profile': a.profile, 'seeds': sorted(set(ps.seed.tolist())),
            'ratios': a.ratios, 'checkpoint evaluated': 'last (end of the schedule)', 'git SHA': sha, 'data hash': dh,
            **({'runs taken from the committed per_volume.csv': n_old} if n_old else {})}
    if a.table_v:
        for p in write_table_v(ps, TABLE_V_RATIO, meta, rd): print(f"wrote {p}")
        print((rd/'table_V.md').read_text()); return
    paths = write_tables(pv, a.ratios, meta, rd) + _figures(ps, common, a, rd)
    if not a.demo: paths.append(selection_effect(common, min(a.ratios), a.seeds, rd))
    for p in paths:
        if p: print(f"wrote {p}")
    print((rd/'table_IV.md').read_text())
    print(f"total {time.time() - t0:.0f}s; executed notebooks in {rd/'runs'}")
