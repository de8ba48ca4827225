# %% [markdown]
# # The paper profile at scale
#
# > Every registered method at the `paper` profile (512 px slices, U-Net widths 16-256, the paper's SEAN) on a
# > synthetic batch: a few iterations to prove that everything runs, and one profiled iteration per method for the
# > memory a GPU needs.

# %%
#| default_exp paper_profile

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import tempfile

# %%
#| export
from __future__ import annotations
import sys, time, math, contextlib, importlib
from pathlib import Path
import numpy as np
import torch
import torch.nn as nn
from sapl.data import Volume, DataBundle, Split, get_profile, atomic_path
from sapl.train import RunConfig, Trainer, METHODS
from sapl.sean import SEAN, SEAN_PROFILES

# %% [markdown]
# ## Methods and a synthetic batch
#
# The methods are whatever the method modules register in `sapl.train.METHODS`, so a new module is covered as soon
# as it is imported. The batch is synthetic and scale-free (body, two lungs, one lesion, noise), built directly at
# the requested side $S$; no data set is read.

# %%
#| export
METHOD_MODULES = ('sapl.sacps', 'sapl.sast', 'sapl.baselines', 'sapl.modern')

def registered_methods() -> list:
    "Import every method module that exists and return the names registered in METHODS."
    for mod in METHOD_MODULES:
        try: importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod: raise
    return sorted(METHODS)

def synthetic_volume(i: int, n: int, S: int, lesion: bool = True) -> Volume:
    "n slices of side S: body, right/left lungs (labels 2/1), a lesion in the left lung, Gaussian noise; images in [0,1]."
    r = np.random.default_rng(i)
    yy, xx = np.mgrid[:S, :S]/S
    lung = np.zeros((S, S), np.uint8)
    lung[((yy - .5)/.32)**2 + ((xx - .3)/.15)**2 < 1] = 2; lung[((yy - .5)/.32)**2 + ((xx - .7)/.15)**2 < 1] = 1
    body = ((yy - .5)/.45)**2 + ((xx - .5)/.47)**2 < 1
    lab = ((((yy - .45 - .02*(i % 3))/.08)**2 + ((xx - .7)/.06)**2) < 1) & (lung == 1) & lesion
    img = np.where(body, .55, 0.).astype(np.float32); img[lung > 0] = .15; img[lab] = .45
    img = np.repeat(img[None], n, 0) + r.normal(0, .03, (n, S, S)).astype(np.float32)
    return Volume(f's{i}', img.clip(0, 1), np.repeat(lab[None], n, 0).astype(np.uint8), np.repeat(lung[None], n, 0),
                  np.arange(n), (0, S, 0, S), (n, S, S), (1., 1., 1.), np.eye(4))

def synthetic_bundle(S: int, n: int = 2, profile: str = 'paper') -> DataBundle:
    "A split of synthetic volumes of side S: n labeled and n unlabeled slices, one validation and one test slice."
    vs = [synthetic_volume(0, n, S), synthetic_volume(1, n, S), synthetic_volume(2, 1, S), synthetic_volume(3, 1, S)]
    return DataBundle(vs[:1], vs[1:2], vs[2:3], vs[3:], get_profile(profile), Split((), (), (), ()), '')


# %%
_b = synthetic_bundle(64, 2); test_eq(_b.train_l[0].image.shape, (2, 64, 64)); assert _b.train_l[0].label.any() and (_b.train_l[0].lung == 2).any()
assert 'baseline' in registered_methods() and 'sacps' in METHODS

# %% [markdown]
# A few options only set how long a method's own loops run (Semi-Inf-Net's number of pseudo-labelling stages,
# UA-MT's number of stochastic teacher passes); they are shortened so that a test stays short, wherever a method has
# them. A synthesizer is handed to the methods that need one instead of training it (`given_synthesizer`): these
# runs prove that the networks and steps run and are finite, not what they learn.

# %%
#| export
SHORT_OPTS = {'stages': 2, 'T': 2}

def short_opts(method: str) -> dict:
    "Shortened loop options of `method` (those of SHORT_OPTS it has)."
    return {k: v for k, v in SHORT_OPTS.items() if k in METHODS[method].defaults}

def paper_config(method: str, out_dir, batch: int = 2, iters: int = 2, **kw) -> RunConfig:
    "One epoch of `iters` iterations of `method` at the paper profile, global batch `batch`."
    return RunConfig(method=method, profile='paper', epochs=1, iters_per_epoch=iters, batch=batch, out_dir=str(out_dir),
                     opts=short_opts(method), **kw)

def paper_sean(seed: int = 0) -> SEAN:
    "The paper's SEAN configuration, freshly initialised (seeded), in eval mode."
    with torch.random.fork_rng():
        torch.manual_seed(seed); return SEAN(SEAN_PROFILES['paper']).eval()

@contextlib.contextmanager
def given_synthesizer(gen: nn.Module):
    "Within the block, every loaded sapl module's `ensure_sean` returns `gen` instead of loading or training one."
    mods = [m for n, m in list(sys.modules.items()) if n.startswith('sapl.') and hasattr(m, 'ensure_sean')]
    saved = [(m, m.ensure_sean) for m in mods]
    try:
        for m in mods: m.ensure_sean = lambda *a, **k: gen
        yield gen
    finally:
        for m, f in saved: m.ensure_sean = f


# %%
test_eq(paper_config('uamt', 'runs').opts, {'T': 2}); test_eq(paper_config('baseline', 'runs').opts, {})
import sapl.style_pool
with given_synthesizer('G'): test_eq(sapl.style_pool.ensure_sean(), 'G')
assert sapl.style_pool.ensure_sean.__name__ == 'ensure_sean'   # restored after the block


# %% [markdown]
# ## A few iterations of one method
#
# `paper_iterations` trains `iters` iterations of a method at the paper profile on the synthetic batch of side $S$
# (with validation and checkpoints, as any run), and returns what a test checks: the logged losses, the number of
# iterations done, and the shape and range of a prediction.

# %%
#| export
def paper_iterations(method: str, S: int, out_dir, gen: nn.Module|None = None, batch: int = 2, iters: int = 2, **kw) -> dict:
    "Train `iters` iterations of `method` at the paper profile on synthetic slices of side S; a summary."
    cfg = paper_config(method, out_dir, batch, iters, **kw)
    with given_synthesizer(gen) if gen is not None else contextlib.nullcontext():
        tr = Trainer(cfg, synthetic_bundle(S, batch), progress=False).fit()
    x = torch.from_numpy(tr.data.test[0].image[:1])[:, None]
    p = tr.predict(x)
    return dict(iterations=tr.sched.last_epoch, history=tr.history, pred_shape=tuple(p.shape), pred_finite=bool(torch.isfinite(p).all()),
                pred_range=(float(p.min()), float(p.max())), weights_finite=all(bool(torch.isfinite(t).all()) for t in tr.models.state_dict().values()),
                widths=tr.models[0].widths, amp=tr.amp,
                channels_last=all(w.is_contiguous(memory_format=torch.channels_last) for w in tr.models.parameters() if w.dim() == 4))


# %%
with tempfile.TemporaryDirectory() as _d:
    _r = paper_iterations('baseline', 32, _d, iters=2)
test_eq((_r['iterations'], _r['pred_shape'], _r['widths']), (2, (1, 1, 32, 32), (16, 32, 64, 128, 256))); assert math.isfinite(_r['history'][0]['loss'])


# %% [markdown]
# ## Memory of one iteration
#
# `step_memory` runs one training iteration (forward, backward, optimizer step) under `torch.profiler` with
# `profile_memory=True` and reads its memory timeline by category. With $P$ the parameters of every network the
# method holds (trained and frozen, fp32), $P_t$ the trained ones (gradients and SGD momentum), and $A(t)$ the
# memory of everything else alive at time $t$ of the iteration (activations kept for backward, gradients,
# temporaries, inputs), the memory a GPU needs for training is estimated as
#
# $$M \approx 4P + 4P_t + \max_t A(t) + M_\text{ctx} \tag{M1}$$
#
# with $M_\text{ctx} \approx 0.5$ GiB for the CUDA context and libraries. The CPU figure $\max_t A(t)$ is the
# same tensors a GPU would hold (fp32, same batch); the caching allocator adds some fragmentation on top.

# %%
#| export
def _param_counts(tr: Trainer) -> tuple:
    "(all parameters of the trained networks and of the method's extra networks, trained parameters)."
    mods = [tr.models] + [v for v in vars(tr.method).values() if isinstance(v, nn.Module)]
    seen, n_all = set(), 0
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen: seen.add(id(p)); n_all += p.numel()
    n_tr = sum(p.numel() for g in tr.opt.param_groups for p in g['params'])
    return n_all, n_tr

def step_memory(tr: Trainer, ctx_gib: float = 0.5) -> dict:
    "Profile one training iteration of `tr`: parameters, peak memory by category, the estimate of Eq. M1 (bytes)."
    from torch.profiler import profile, ProfilerActivity
    from torch.profiler._memory_profiler import MemoryProfileTimeline, Category, _CATEGORY_TO_INDEX
    bl = tr.next_batch('labeled', tr.labeled)
    bu = tr.next_batch('unlabeled', tr.unlabeled) if tr.unlabeled is not None else None
    tr.models.train(); t0 = time.time()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        losses = tr.train_step(bl, bu); tr.optimizer_step(losses['loss'])
    sec = time.time() - t0
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline('cpu')
    sizes = np.asarray(sizes, dtype=np.float64)
    col = lambda c: sizes[:, _CATEGORY_TO_INDEX[c] + 1]
    persistent = col(Category.PARAMETER) + col(Category.OPTIMIZER_STATE)
    n_all, n_tr = _param_counts(tr)
    A = float((sizes.sum(1) - persistent).max())
    return dict(params=n_all, trained=n_tr, activation=float(col(Category.ACTIVATION).max()), step_peak=A,
                gpu_estimate=4*n_all + 4*n_tr + A + ctx_gib*2**30, seconds=sec,
                loss=float(losses['loss'].detach()), finite=all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in losses.values()))


# %%
with tempfile.TemporaryDirectory() as _d:
    _m = step_memory(Trainer(paper_config('baseline', _d, batch=2), synthetic_bundle(32, 2), progress=False))
assert 0 < _m['activation'] <= _m['step_peak'] < _m['gpu_estimate'] and _m['finite']; test_eq(_m['params'], _m['trained'])


# %% [markdown]
# `memory_table` builds a trainer per method (its `setup` runs first: a teacher, Semi-Inf-Net's stages, the
# synthetic set of SA-ST), profiles one iteration, and appends a row to a CSV as each method finishes.

# %%
#| export
def memory_table(methods: list, S: int = 512, batch: int = 2, out_dir='runs/paper-profile', gen: nn.Module|None = None,
                 batch_for: dict|None = None, progress: bool = True):
    "Profile one iteration per method at side S, global batch `batch` (or `batch_for[method]`); rows accumulate in out_dir/memory.csv."
    import pandas as pd
    csv_path, GiB = Path(out_dir)/'memory.csv', 2**30
    rows = pd.read_csv(csv_path).to_dict('records') if csv_path.exists() else []
    for m in methods:
        b = (batch_for or {}).get(m, batch)
        if any(r['method'] == m and r['S'] == S and r['batch'] == b for r in rows): continue   # measured before: not redone
        gen = gen if gen is not None else paper_sean()
        t0 = time.time()
        with given_synthesizer(gen):
            tr = Trainer(paper_config(m, Path(out_dir)/f'{m}-S{S}-b{b}', batch=b, iters=1), synthetic_bundle(S, b), progress=False)
            r = step_memory(tr)
        rows.append({'method': m, 'S': S, 'batch': b, 'params_M': r['params']/1e6, 'trained_M': r['trained']/1e6,
                     'activations_GiB': r['activation']/GiB, 'step_peak_GiB': r['step_peak']/GiB,
                     'persistent_GiB': (r['gpu_estimate'] - r['step_peak'])/GiB, 'step_s_cpu': r['seconds'], 'loss': r['loss'], 'finite': r['finite']})
        if progress: print(f"{m} ({S} px, batch {b}): {r['step_peak']/GiB:.2f} GiB step peak, {time.time() - t0:.0f} s", flush=True)
        del tr
        with atomic_path(csv_path) as tmp: pd.DataFrame(rows).to_csv(tmp, index=False)
    return pd.DataFrame(rows)

def estimate(df, S: int = 512, batch: int = 8):
    "Per method, the measurement at the largest side and batch, with Eq. M1 for side S and batch `batch` (step peak scaled by pixels x batch)."
    d = df.sort_values(['S', 'batch']).groupby('method').tail(1).copy()
    d['gpu_estimate_GiB'] = d.persistent_GiB + d.step_peak_GiB*(S/d.S)**2*(batch/d.batch)
    return d.sort_values('gpu_estimate_GiB')

def scaling_check(df) -> list:
    "Methods measured at several (side, batch): step-peak ratio measured vs. the pixels x batch ratio."
    out = []
    for m, g in df.groupby('method'):
        g = g.sort_values(['S', 'batch'])
        if len(g) < 2: continue
        lo, hi = g.iloc[0], g.iloc[-1]
        out.append((m, f"{lo.S} px b{lo.batch}", f"{hi.S} px b{hi.batch}", hi.step_peak_GiB/lo.step_peak_GiB, (hi.S/lo.S)**2*hi.batch/lo.batch))
    return out

def memory_markdown(d, S: int = 512, batch: int = 8) -> str:
    "The estimate table as Markdown."
    head = (f'| method | parameters (M) | trained (M) | profiled at | activations (GiB) | step peak (GiB) | GPU estimate at {S} px, batch {batch}, fp32 (GiB) | CPU s/iteration | loss finite |\n'
            '|---|---:|---:|---|---:|---:|---:|---:|---|\n')
    return head + ''.join(f"| {r.method} | {r.params_M:.1f} | {r.trained_M:.1f} | {r.S} px, batch {r.batch} | {r.activations_GiB:.2f} | {r.step_peak_GiB:.2f} | "
                          f"{r.gpu_estimate_GiB:.1f} | {r.step_s_cpu:.0f} | {'yes' if r.finite else 'NO'} |\n" for r in d.itertuples())


# %%
#| export
def memory_report(df, S: int = 512, batch: int = 8) -> str:
    "reports/paper_profile.md: the estimate table of the measurements in `df` and the scaling check."
    import datetime
    with torch.device('meta'): n_sean = sum(p.numel() for p in SEAN(SEAN_PROFILES['paper']).parameters())/1e6
    chk = scaling_check(df)
    return (f"# Paper profile: memory per method\n\nOne training iteration (forward, backward, SGD step) per method, fp32, measured on the CPU "
            f"with `torch.profiler` (`profile_memory=True`) by `nbs/01c_paper_profile.ipynb` ({datetime.date.today()}, torch {torch.__version__}), "
            f"on synthetic slices with the paper's U-Net widths and SEAN ({n_sean:.0f} M parameters, frozen inside SA-CPS).\n\n"
            "Parameters include frozen networks (EMA teachers, the synthesizer). Activations: tensors kept for backward, at their peak; step peak: "
            "everything alive during the iteration except parameters and optimizer state. GPU estimate: Eq. M1 = 4 B x (parameters + trained "
            f"parameters) + step peak + 0.5 GiB CUDA context, before allocator fragmentation, with the step peak scaled by pixels x batch from where "
            f"it was profiled to {S} px, batch {batch}. CPU s/iteration: single-threaded, profiler on, on a shared machine (not a speed figure). "
            "bf16 autocast roughly halves activations.\n\n" + memory_markdown(estimate(df, S, batch), S, batch) +
            "\nScaling check (step peak, measured ratio vs. pixels x batch ratio): " +
            ('; '.join(f"{m} {a} -> {b}: {r:.2f} vs {e:.2f}" for m, a, b, r, e in chk) or 'none measured') + ".\n")


# %%
import pandas as pd
_df = pd.DataFrame([dict(method='a', S=256, batch=2, params_M=1., trained_M=1., activations_GiB=.5, step_peak_GiB=1., persistent_GiB=.5, step_s_cpu=1., loss=1., finite=True),
                    dict(method='a', S=512, batch=2, params_M=1., trained_M=1., activations_GiB=2., step_peak_GiB=4., persistent_GiB=.5, step_s_cpu=1., loss=1., finite=True)])
test_eq(float(estimate(_df).gpu_estimate_GiB.iloc[0]), .5 + 16.); test_eq(scaling_check(_df)[0][3:], (4., 4.))
assert '| a | 1.0 | 1.0 | 512 px, batch 2 |' in memory_report(_df)

# %% [markdown]
# ## The benchmark
#
# Parameters: the side `S` and global `batch` the estimate is for; the side and batch actually profiled
# (`measure_S`, `measure_batch`, or `batch_for[method]`): smaller ones keep the largest methods within a CPU
# machine's memory and time, and the step peak is scaled by pixels × batch (every activation of these fully
# convolutional networks has one batch and two pixel dimensions); `checks`: extra (method, side, batch) measurements
# that test this scaling. Measurements accumulate in `out_dir/memory.csv` and are not redone; the report uses, per
# method, the one at the largest side and batch. As a test (`IN_TEST`) the notebook profiles two methods at 32 px.
# *This is a measurement, run by hand; its result is `reports/paper_profile.md`.*

# %% tags=["parameters"]
S = 512
batch = 8
measure_S = 512
measure_batch = 2
batch_for = {}                   # e.g. {'sacps': 1}: methods profiled at a smaller batch still
methods = None                   # None: every registered method
checks = [['baseline', 512, 8]]  # (method, side, batch) measured as well, to check the scaling
out_dir = 'runs/paper-profile'
report = 'reports/paper_profile.md'
threads = 1

# %%
import os
if os.environ.get('IN_TEST'):
    S, batch, measure_S, measure_batch, batch_for, methods, checks = 32, 4, 32, 2, {'mt': 1}, ['baseline', 'mt'], [['baseline', 32, 4]]
    report, out_dir = None, tempfile.mkdtemp()
from sapl.data import resolve
out_dir, report = resolve(out_dir), (resolve(report) if report else None)   # relative to the project, wherever papermill runs
torch.set_num_threads(threads)
methods = methods or registered_methods()
print(f"{len(methods)} methods at {measure_S} px, batch {measure_batch}: {', '.join(methods)}")

# %%
t0 = time.time()
df = memory_table(methods, measure_S, measure_batch, out_dir, batch_for=batch_for)
for m, s_, b_ in checks: df = memory_table([m], s_, b_, out_dir)
est, chk = estimate(df, S, batch), scaling_check(df)
print(f"{time.time() - t0:.0f} s"); print(memory_markdown(est, S, batch)); print(chk)

# %%
if report:
    txt = memory_report(df, S, batch)
    with atomic_path(report) as tmp: Path(tmp).write_text(txt)
    print(txt)
