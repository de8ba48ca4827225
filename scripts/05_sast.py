# %% [markdown]
# # SA-ST: synthesis-assisted self-training
#
# > §III-D, Algorithm 1, Eq. 15-18, Fig. 4: a teacher labels the unlabeled slices once, images are synthesized to
# > match those pseudo-labels, and a student learns from real, pseudo-labeled and synthetic pairs.

# %%
#| default_exp sast

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail

# %%
#| export
from __future__ import annotations
from dataclasses import replace
import numpy as np
import torch
from sapl.data import Volume, LabeledSlices, log
from sapl.unet import l_seg
from sapl.train import Method, register, RunConfig, Trainer, run, load_checkpoint, VARIANTS
from sapl.style_pool import StylePool, split_synthesizer, check_sean, sample_reference, synthesize_pseudo, self_style


# %% [markdown]
# ## Algorithm 1
#
# 1. Train a teacher $\mathcal{T}$ on $\mathcal{D}_L$ — the supervised baseline — or adopt a trained SA-CPS model
#    (option `teacher`: `'baseline'` or `'sacps'`; the teacher's run is trained first when its checkpoint is missing).
# 2. Pseudo-label every unlabeled slice once: $y_i^p = \mathbb{1}(f_{\mathcal{T}}(x_i^u) \ge \tau)$, giving
#    $\mathcal{D}_U^{pseudo} = \{x_i^u, y_i^p\}$ (teacher in evaluation mode, no augmentation).
# 3. Synthesize one image per pseudo-label, $\hat{x}_i = Dec(y_i^p, \mathcal{SC}_{ref})$ (Eq. 3), giving
#    $\mathcal{D}_U^{synthetic} = \{\hat{x}_i, y_i^p\}$. The synthetic set is built **once**, as in Algorithm 1 (step 3
#    precedes training); a fresh $\mathcal{SC}_{ref}$ (Eq. 2) is drawn for every batch of 64 slices from a seeded generator.
# 4. Train a student from scratch on $\mathcal{D}_L \cup \mathcal{D}_U^{pseudo} \cup \mathcal{D}_U^{synthetic}$, each
#    iteration taking $B$ slices from each set (augmented alike).
#
# `pseudo_volumes` and `synthetic_volumes` return the two sets as `Volume`s whose `label` is the pseudo-label, so they
# plug into the same slice datasets as real data.

# %%
#| export
@torch.no_grad()
def pseudo_volumes(predict, vols: list, tau: float = 0.5, batch: int = 64) -> list:
    "Step 2: the unlabeled volumes with the teacher's binarised predictions as labels."
    out = []
    for v in vols:
        p = torch.cat([predict(torch.from_numpy(v.image[i:i+batch])[:, None]) for i in range(0, len(v.image), batch)])
        out.append(replace(v, label=(p[:, 0] >= tau).numpy().astype(np.uint8)))
    return out

@torch.no_grad()
def synthetic_volumes(gen, pseudo: list, pool: StylePool|None, K: int = 10, seed: int = 0, batch: int = 64,
                      composite: bool = True, # keep the real slice outside the lungs (Eq. 3b); False: Eq. 3
                     ) -> list:
    "Step 3: one synthetic image per pseudo-labeled slice, Dec(y^p, SC_ref); pool None = Self Style."
    g = torch.Generator().manual_seed(seed); out = []
    for v in pseudo:
        lung, lab = torch.from_numpy(v.lung).long(), torch.from_numpy(v.label).float()
        ims = []
        for i in range(0, len(lung), batch):
            if pool is None: sc = self_style(gen, torch.from_numpy(v.image[i:i+batch])[:, None], lung[i:i+batch], lab[i:i+batch])
            else: sc, _ = sample_reference(pool, K, g)
            real = torch.from_numpy(v.image[i:i+batch])[:, None]
            ims.append(synthesize_pseudo(gen, lung[i:i+batch], lab[i:i+batch], sc, real if composite else None, g)[:, 0].cpu())
        out.append(replace(v, id=v.id + ':synthetic', image=torch.cat(ims).numpy().astype(np.float32)))
    return out


# %% [markdown]
# ## Student losses (Eq. 15-18)
#
# $$\mathcal{L}_s = \mathcal{L}_{Seg}(f_{\mathcal{S}}(x_i^l), y_i) \tag{15}$$
#
# $$\mathcal{L}_{pseudo} = \mathcal{L}_{Seg}(f_{\mathcal{S}}(x_i^u), y_i^p) \tag{16}$$
#
# $$\mathcal{L}_{synthetic} = \mathcal{L}_{Seg}(f_{\mathcal{S}}(\hat{x}_i), y_i^p) \tag{17}$$
#
# $$\mathcal{L}_{SA\text{-}ST} = \mathcal{L}_s + \mu \cdot (\mathcal{L}_{pseudo} + \mathcal{L}_{synthetic}), \quad \mu = 0.5 \tag{18}$$
#
# $f_{\mathcal{S}}$ is the student. Switching terms off gives Table III: real + pseudo (classical self-training, `st`),
# real + synthetic, and all three (`sast`).

# %%
#| export
def l_sast(l_s, l_p, l_syn, mu: float = 0.5) -> torch.Tensor:
    "Total SA-ST loss L_s + μ (L_pseudo + L_synthetic) (Eq. 18)."
    return l_s + mu*(l_p + l_syn)


# %%
test_close(l_sast(torch.tensor(1.), torch.tensor(2.), torch.tensor(4.)), 4.)


# %% [markdown]
# ## The method on the shared trainer
#
# Options: `teacher` (`'baseline'` | `'sacps'`), `pseudo` / `synthetic` (Table III switches), `mu` (0.5), `tau` (0.5),
# `K` (10), `style` (`'pos'`, `'all'`, `'self'`), `sean_seed` (0). The teacher is the run of the same dataset, profile,
# ratio and seed with method `teacher` in the same `out_dir`; its best checkpoint is used. `st` is registered as the
# same class with the synthetic term off; `sast+sacps` is SA-ST with the SA-CPS teacher. An epoch is a pass over the
# pseudo-labeled set unless the profile fixes `iters_per_epoch`.

# %%
#| export
@register
class SAST(Method):
    name = 'sast'
    defaults = dict(teacher='baseline', pseudo=True, synthetic=True, mu=0.5, tau=0.5, K=10, style='pos', sean_seed=0, sean=None, composite=True)

    def __init__(self, cfg):
        super().__init__(cfg)
        if VARIANTS.get(self.o['teacher'], ('',))[0] not in ('baseline', 'sacps'):
            raise ValueError(f"teacher must be a Baseline or SA-CPS variant (e.g. 'baseline', 'sacps'), got {self.o['teacher']!r}")
        if not (self.o['pseudo'] or self.o['synthetic']): raise ValueError("at least one of pseudo/synthetic must be on")
        check_sean(self.o['sean'])

    def teacher(self, tr) -> Trainer:
        tc = self.cfg.variant(self.o['teacher'])  # same data, profile, schedule, seed and out_dir
        if not (tc.run_dir/'last.pt').exists(): log.info(f"teacher {tc.name} not found in {tc.run_dir}: training it first ...")
        return run(tc, data=tr.data, progress=tr.progress)

    def setup(self, tr):
        o = self.o
        t = self.teacher(tr)
        self.pseudo = pseudo_volumes(t.predict, tr.data.train_u, o['tau'])
        n_pos = sum(int(v.label.any(axis=(1, 2)).sum()) for v in self.pseudo)
        log.info(f"{self.cfg.name}: {sum(len(v.z) for v in self.pseudo)} pseudo-labeled slices, {n_pos} with infection")
        self.pseudo_ds = LabeledSlices(self.pseudo, augment=True, seed=self.cfg.seed + 2)
        if o['synthetic']:
            c = self.cfg
            gen = split_synthesizer(tr.data.train_l, c, o['sean_seed'], o['sean'], tr.progress)
            pool = None if o['style'] == 'self' else StylePool.build(gen, tr.data.train_l, kind=o['style'])
            self.synth = synthetic_volumes(gen, self.pseudo, pool, o['K'], seed=c.seed, composite=o['composite'])
            self.synth_ds = LabeledSlices(self.synth, augment=True, seed=c.seed + 3)
        del t

    def epoch_size(self, tr): return len(self.pseudo_ds)

    def train_step(self, tr, bl, bu):
        S, o = tr.models[0], self.o
        parts = [bl]
        if o['pseudo']: parts.append(tr.next_batch('pseudo', self.pseudo_ds))
        if o['synthetic']: parts.append(tr.next_batch('synthetic', self.synth_ds))
        z = S(torch.cat([p['image'] for p in parts])); B = len(bl['image'])
        ls = l_seg(z[:B], bl['label'])                                                       # Eq. 15
        k, lp, lsyn = B, torch.zeros(()), torch.zeros(())
        if o['pseudo']: lp = l_seg(z[k:k+B], parts[1]['label']); k += B                       # Eq. 16
        if o['synthetic']: lsyn = l_seg(z[k:k+B], parts[-1]['label'])                          # Eq. 17
        return {'l_s': ls, 'l_pseudo': lp, 'l_synthetic': lsyn, 'loss': l_sast(ls, lp, lsyn, o['mu'])}  # Eq. 18

@register
class ST(SAST):
    "Classical self-training (Zoph et al. 2020): SA-ST without synthetic pairs."
    name = 'st'
    defaults = {**SAST.defaults, 'synthetic': False}


# %% [markdown]
# Named variants: Table III (`st` = real + pseudo, `sast-synth` = real + synthetic, `sast` = all three) and the
# combination `sast+sacps` (SA-ST with the SA-CPS teacher).

# %%
#| export
VARIANTS.update({'st': ('st', {}), 'sast': ('sast', {}), 'sast-synth': ('sast', {'pseudo': False}),
                 'sast+sacps': ('sast', {'teacher': 'sacps'}),
                 # as first benchmarked here: the earlier synthesizer decoding whole images (see 04_sacps)
                 'sast-spade': ('sast', {'sean': 'quick-spade', 'composite': False}),
                 'sast+sacps-spade': ('sast', {'teacher': 'sacps-spade', 'sean': 'quick-spade', 'composite': False})})

# %% [markdown]
# ## Run
#
# `papermill nbs/05_sast.ipynb out.ipynb -p ratio 0.1 -p variant sast+sacps` trains the teacher if its run is missing
# (baseline or SA-CPS of the same ratio and seed), then the student, and evaluates it on the test volumes.

# %% tags=["parameters"]
dataset = 'phantom'
data_dir = 'data/phantom'
ratio = 0.1
profile = 'quick'
epochs = None
seed = 0
split_dir = None
out_dir = 'runs'
device = 'cpu'
variant = 'sast'           # 'sast' | 'st' | 'sast-synth' | 'sast+sacps'

# %%
import os, tempfile
import sapl.sacps  # registers the SA-CPS teacher
from sapl.data import prepare_data
from sapl.train import RunConfig, run, evaluate_run
from sapl.eval import summarize

IN_TEST = bool(os.environ.get('IN_TEST'))
cfg = RunConfig(dataset=dataset, data_dir=data_dir, ratio=ratio, profile=profile, epochs=epochs, seed=seed,
                split_dir=split_dir, out_dir=out_dir, device=device).variant(variant)
if IN_TEST: cfg = cfg.smoke(out_dir=tempfile.mkdtemp())
cfg

# %%
data = prepare_data(cfg.dataset, cfg.data_dir, cfg.ratio, cfg.profile, cfg.split_seed, cfg.split_dir)
print(data.summary())
tr = run(cfg, data)
df = evaluate_run(tr, data)
s = summarize(df)
print(f"{cfg.name}: test DSC {100*s['dsc_mean']:.2f} ± {100*s['dsc_std']:.2f}, NSD {100*s['nsd_mean']:.2f} ± {100*s['nsd_std']:.2f} "
      f"over {s['n']} volumes ({s['dsc_nan']} NaN)")
df
