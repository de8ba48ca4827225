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
# what it depends on: the synthesizer of each split and the supervised runs first, then the single-stage methods and
# self-training (whose baseline teacher now exists), then SA-ST with the SA-CPS teacher.

# %%
#| export
@dataclass(frozen=True)
class Experiment:
    variant: str     # run tag (sapl.train.VARIANTS), or 'sean' for the synthesizer + Fig. 7
    notebook: str
    stage: int
    label: str       # name in the tables

EXPERIMENTS = [
    Experiment('sean', '03_style_pool', 0, 'SEAN synthesizer'),
    Experiment('baseline', '01_unet', 0, 'Baseline'),
    Experiment('full', '01_unet', 0, 'Full Supervision'),
    Experiment('cps', '04_sacps', 1, 'CPS'),
    Experiment('sacps-synth', '04_sacps', 1, 'SA-CPS (synthetic only)'),
    Experiment('sacps', '04_sacps', 1, 'SA-CPS'),
    Experiment('sacps-self', '04_sacps', 1, 'SA-CPS, Self Style'),
    Experiment('sacps-pooln', '04_sacps', 1, 'SA-CPS, Pool (N)'),
    Experiment('st', '05_sast', 1, 'Self-Training'),
    Experiment('sast-synth', '05_sast', 1, 'SA-ST (real + synthetic)'),
    Experiment('sast', '05_sast', 1, 'SA-ST'),
    Experiment('mt', '07_baselines', 1, 'Mean Teacher'),
    Experiment('uamt', '07_baselines', 1, 'UA-MT'),
    Experiment('cct', '07_baselines', 1, 'CCT'),
    Experiment('udc', '07_baselines', 1, 'UDC'),
    Experiment('selfens', '07_baselines', 1, 'Self-Ensembling'),
    Experiment('semiinfnet', '07_baselines', 1, 'SemiInfNet'),
    Experiment('sast+sacps', '05_sast', 2, 'SA-ST(+SA-CPS)'),
]
BY_VARIANT = {e.variant: e for e in EXPERIMENTS}
TABLE_V_RATIO = 0.05  # nominal: the MosMedData-like split fixes 6 labeled of 126 training studies
DEMO = ('sean', 'baseline', 'full', 'cps', 'sacps', 'st', 'sast', 'sast+sacps')
CORE = DEMO + ('sacps-synth', 'sast-synth', 'sacps-self', 'sacps-pooln')

# %%
test_eq(BY_VARIANT['sast+sacps'].stage, 2); assert set(DEMO) <= set(CORE) <= set(BY_VARIANT)


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
    if e.notebook == '03_style_pool': p.pop('epochs', None); p['seed'] = 0  # the synthesizer's own schedule and seed
    if e.notebook in ('04_sacps', '05_sast'): p['variant'] = e.variant
    if e.notebook == '04_sacps': p['benchmark'] = False
    if e.notebook == '07_baselines': p['methods'] = e.variant
    if e.notebook == '01_unet': p['methods'] = 'baseline,full'  # full supervision is trained once (run folder r1) and reused
    return p

def done(e: Experiment, common: dict, ratio: float, seed: int) -> bool:
    if e.variant == 'sean':
        from sapl.style_pool import sean_dir
        from sapl.sean import SEAN_PROFILES
        import torch
        ck = sean_dir(common['out_dir'], common['dataset'], common['profile'], ratio, 0)/'last.pt'
        return ck.exists() and torch.load(ck, weights_only=True)['epoch'] >= SEAN_PROFILES[common['profile']].epochs
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
# half-width of the 95 % confidence interval of that mean,
#
# $$\bar{m} \pm t_{0.975,\,n-1} \frac{s}{\sqrt{n}}, \qquad s^2 = \frac{1}{n-1}\sum_k (m_k - \bar{m})^2$$
#
# ($m_k$ the mean over test volumes of seed $k$; volumes whose metric is undefined, i.e. NaN because both masks are
# empty, are left out of $m_k$ and counted in the table).

# %%
#| export
def ci95(x) -> tuple:
    "(mean, 95 % CI half-width) of the values x (half-width NaN for fewer than two values)."
    from scipy import stats
    x = np.asarray([v for v in x if v == v], dtype=float)
    if len(x) == 0: return float('nan'), float('nan')
    if len(x) < 2: return float(x.mean()), float('nan')
    return float(x.mean()), float(stats.t.ppf(.975, len(x) - 1)*x.std(ddof=1)/math.sqrt(len(x)))

def collect(common: dict, ratios, seeds, variants) -> pd.DataFrame:
    "One row per (variant, ratio, seed) with the mean test DSC/NSD over volumes."
    rows = []
    for v in variants:
        if v == 'sean': continue
        for r in ratios:
            for s in seeds:
                p = run_dir(common['out_dir'], common['dataset'], common['profile'], r, s, v)/'test.csv'
                if not p.exists(): continue
                df = pd.read_csv(p)
                rows.append(dict(variant=v, ratio=r, seed=s, dsc=df['dsc'].mean(), nsd=df['nsd'].mean(),
                                 n_vol=len(df), nan=int(df['dsc'].isna().sum())))
    return pd.DataFrame(rows, columns=['variant', 'ratio', 'seed', 'dsc', 'nsd', 'n_vol', 'nan'])

def fmt(m, h) -> str:
    if m != m: return '–'
    return f"{100*m:.2f} ± {100*h:.2f}" if h == h else f"{100*m:.2f}"

def summary_table(per_seed: pd.DataFrame, variants, ratio) -> pd.DataFrame:
    "Rows = variants at one ratio: NSD/DSC mean ± 95 % CI over seeds, number of seeds."
    out = []
    for v in variants:
        d = per_seed[(per_seed.variant == v) & ((per_seed.ratio == ratio) | (v == 'full'))]
        if v == 'full': d = per_seed[per_seed.variant == v]
        (mn, hn), (md, hd) = ci95(d.nsd), ci95(d.dsc)
        out.append(dict(variant=v, method=BY_VARIANT[v].label if v in BY_VARIANT else v, nsd=mn, nsd_ci=hn, dsc=md, dsc_ci=hd,
                        seeds=len(d), nan_volumes=int(d.nan.sum()) if len(d) else 0))
    return pd.DataFrame(out)


# %%
test_close(ci95([1., 2, 3])[1], 4.303*1/math.sqrt(3), eps=1e-3); test_eq(ci95([1.])[0], 1.)
_ps = pd.DataFrame([dict(variant='cps', ratio=.1, seed=s, dsc=.5 + .1*s, nsd=.4, n_vol=3, nan=0) for s in range(3)])
test_close(summary_table(_ps, ['cps'], .1).dsc[0], .6)

# %% [markdown]
# ## Tables and figures
#
# Every table states the profile, the seeds, the git SHA and the data hash. Table II/III list the loss/input switches as
# in the paper; Table IV groups single- and multi-stage methods per ratio. Only variants that have finished runs appear.

# %%
#| export
TABLE_II = [('cps', '✓', '✓', ''), ('sacps-synth', '✓', '', '✓'), ('sacps', '✓', '✓', '✓')]
TABLE_III = [('st', '✓', '✓', ''), ('sast-synth', '✓', '', '✓'), ('sast', '✓', '✓', '✓')]
SINGLE = ['baseline', 'mt', 'uamt', 'cct', 'udc', 'selfens', 'cps', 'sacps']
MULTI = ['semiinfnet', 'st', 'sast', 'sast+sacps']

def _atomic_text(path: Path, text: str):
    from sapl.data import atomic_path
    with atomic_path(path) as tmp: tmp.write_text(text)

def header(title: str, meta: dict) -> list:
    return [f'# {title}', ''] + [f'- **{k}**: {v}' for k, v in meta.items()] + ['']

def write_tables(per_seed: pd.DataFrame, ratios, meta: dict, report_dir='reports') -> list:
    "Write table_II/III/IV (.md + .csv) from the per-seed results; returns the paths written."
    from sapl.data import resolve
    rd = resolve(report_dir); written = []
    r0 = min(ratios)
    for name, rows, cols in (('table_II', TABLE_II, ('L_s', 'L_pseudo', 'L_synthetic')), ('table_III', TABLE_III, ('Real', 'Pseudo', 'Synthetic'))):
        t = summary_table(per_seed, [r[0] for r in rows], r0)
        if t.seeds.sum() == 0: continue
        lines = header(f"{name.replace('_', ' ').title()} — {r0:.0%} labeled (mean ± 95 % CI over seeds)", meta)
        lines += [f"| {' | '.join(cols)} | Method | NSD (%) | DSC (%) | seeds |", '|' + '---|'*(len(cols) + 4)]
        for (v, *marks), (_, row) in zip(rows, t.iterrows()):
            lines.append(f"| {' | '.join(marks)} | {row.method} | {fmt(row.nsd, row.nsd_ci)} | {fmt(row.dsc, row.dsc_ci)} | {row.seeds} |")
        _atomic_text(rd/f'{name}.md', '\n'.join(lines) + '\n'); t.assign(ratio=r0).to_csv(rd/f'{name}.csv', index=False)
        written += [rd/f'{name}.md', rd/f'{name}.csv']
    lines = header('Table IV — phantom test set (mean ± 95 % CI over seeds)', meta)
    lines += ['| Ratio | Stages | Method | NSD (%) | DSC (%) | seeds | NaN volumes |', '|---|---|---|---|---|---|---|']
    frames = []
    for r in ratios:
        for stage, vs in (('Single', SINGLE), ('Multiple', MULTI)):
            t = summary_table(per_seed, vs, r); t = t[t.seeds > 0]
            for _, row in t.iterrows():
                lines.append(f"| {r:.0%} | {stage} | {row.method} | {fmt(row.nsd, row.nsd_ci)} | {fmt(row.dsc, row.dsc_ci)} | {row.seeds} | {row.nan_volumes} |")
            frames.append(t.assign(ratio=r, stage=stage))
    t = summary_table(per_seed, ['full'], None); t = t[t.seeds > 0]
    for _, row in t.iterrows():
        lines.append(f"| 100% | Full | {row.method} | {fmt(row.nsd, row.nsd_ci)} | {fmt(row.dsc, row.dsc_ci)} | {row.seeds} | {row.nan_volumes} |")
    frames.append(t.assign(ratio=1.0, stage='Full'))
    _atomic_text(rd/'table_IV.md', '\n'.join(lines) + '\n'); pd.concat(frames).to_csv(rd/'table_IV.csv', index=False)
    per_seed.to_csv(rd/'per_seed.csv', index=False)
    return written + [rd/'table_IV.md', rd/'table_IV.csv', rd/'per_seed.csv']

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
    "Bars of NSD and DSC (mean ± 95 % CI over seeds) for `variants` at `ratio` (Figs. 5 and 8)."
    from matplotlib.figure import Figure
    t = summary_table(per_seed, variants, ratio)
    if t.seeds.sum() == 0: return None
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
        ck = cfg.run_dir/'best.pt'
        if not ck.exists(): continue
        from sapl.train import get_method
        from sapl.unet import UNet
        import torch
        nets = [UNet(cfg.prof.widths) for _ in range(get_method(cfg).n_models)]
        for n, sd in zip(nets, load_checkpoint(ck)['models']): n.load_state_dict(sd); n.eval()
        f = lambda x, n=nets[0]: torch.sigmoid(n(x))
        preds[BY_VARIANT[v].label] = [predict_volume(f, vol) for vol in data.test]
    if not preds: return None
    return plot_predictions(data.test, preds, path, n=4)


# %% [markdown]
# ## Command line
#
# `python -c 'import sys; from sapl.reproduce import main; main(sys.argv[1:])' [--profile quick] [--ratios 0.1 0.2 0.3] [--seeds 0 1 2] [--variants ...] [--demo]`.
# `--demo` is the Table IV 10 % column with one seed (the `make demo` job); without `--variants` every experiment runs.
# `--table-v` runs the Table V analogue on the MosMedData-like phantom (`sapl.data.make_phantom_mosmed`).

# %%
#| export
def main(argv=None):
    ap = argparse.ArgumentParser(prog='make reproduce ARGS=', description='Regenerate the tables and figures of the paper.')
    ap.add_argument('--dataset', default='phantom'); ap.add_argument('--data-dir', default='data/phantom')
    ap.add_argument('--profile', default='quick'); ap.add_argument('--epochs', type=int, default=None)
    ap.add_argument('--ratios', type=float, nargs='+', default=[0.1, 0.2, 0.3])
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--variants', nargs='+', default=None, help=f"subset of {[e.variant for e in EXPERIMENTS]}")
    ap.add_argument('--out-dir', default='runs'); ap.add_argument('--report-dir', default='reports')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1), help='runs in parallel (each single-threaded when > 1)')
    ap.add_argument('--demo', action='store_true', help='Table IV 10%% column, one seed')
    ap.add_argument('--collect-only', action='store_true', help='only rebuild tables and figures from finished runs')
    ap.add_argument('--table-v', action='store_true', help='the Table V analogue on the MosMedData-like phantom instead of Tables II-IV')
    a = ap.parse_args(argv)
    if a.demo: a.ratios, a.seeds, a.variants = [0.1], [0], list(DEMO)
    if a.table_v:
        a.dataset, a.ratios = 'phantom-mosmed', [TABLE_V_RATIO]
        if a.data_dir == 'data/phantom': a.data_dir = 'data/phantom-mosmed'
        a.variants = a.variants or list(TABLE_V)
    variants = a.variants or [e.variant for e in EXPERIMENTS]
    bad = [v for v in variants if v not in BY_VARIANT]
    if bad: ap.error(f"unknown variants {bad}; choose from {[e.variant for e in EXPERIMENTS]}")
    if 'sast+sacps' in variants and 'sacps' not in variants: variants.append('sacps')
    if any(BY_VARIANT[v].notebook in ('04_sacps', '05_sast') for v in variants) and 'sean' not in variants: variants.insert(0, 'sean')
    from sapl.data import resolve
    common = dict(dataset=a.dataset, data_dir=str(resolve(a.data_dir)), profile=a.profile, epochs=a.epochs,
                  out_dir=str(resolve(a.out_dir)), device=a.device)
    t0 = time.time()
    from sapl.data import prepare_data
    if not a.collect_only:  # build the data set and its cache once, before parallel runs would each start on it
        prepare_data(a.dataset, common['data_dir'], a.ratios[0], a.profile, split_dir=None)
        if 'full' in variants and 'baseline' not in variants: variants.insert(0, 'baseline')
        jobs = [(BY_VARIANT[v], r, s) for v in variants for r in a.ratios for s in a.seeds
                if v != 'full' and not (v == 'sean' and s != a.seeds[0])]
        jobs.sort(key=lambda j: (j[0].stage, j[2], j[1]))
        run_stages(jobs, common, a.report_dir, a.jobs, t0)
    from sapl.train import git_sha
    from sapl.data import prepare_data
    per_seed = collect(common, a.ratios, a.seeds, variants)
    fp = prepare_data(a.dataset, a.data_dir, a.ratios[0], a.profile, progress=False).fingerprint()
    meta = {'dataset': a.dataset, 'profile': a.profile, 'seeds': sorted(set(per_seed.seed.tolist())), 'ratios': a.ratios,
            'git SHA': git_sha(), 'data hash': fp}
    from sapl.data import resolve
    rd = resolve(a.report_dir)
    if a.table_v:
        for p in write_table_v(per_seed, TABLE_V_RATIO, meta, rd): print(f"wrote {p}")
        print((rd/'table_V.md').read_text()); return
    paths = write_tables(per_seed, a.ratios, meta, rd)
    r0 = min(a.ratios)
    f5 = bar_figure(per_seed, ['baseline', 'sacps', 'sast', 'sast+sacps'], ['B', 'SA-CPS', 'SA-ST', 'SA-ST\n(+SA-CPS)'], r0, rd/'fig5.png',
                    f'Fig. 5 analogue: {r0:.0%} labeled, {a.profile} profile')
    f8 = bar_figure(per_seed, ['sacps-self', 'sacps-pooln', 'sacps'], ['Self Style', 'Pool (N)', 'Pool (N+)'], r0, rd/'fig8.png',
                    f'Fig. 8 analogue: style source of SA-CPS, {r0:.0%} labeled')
    f6 = visual_comparison(common, r0, min(a.seeds), rd/'fig6.png')
    for p in paths + [f5, f6, f8]:
        if p: print(f"wrote {p}")
    print((rd/'table_IV.md').read_text())
    print(f"total {time.time() - t0:.0f}s; executed notebooks in {rd/'runs'}")
