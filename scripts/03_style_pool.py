# %% [markdown]
# # Style-code pool and pseudo-label guided synthesis
#
# > Eq. 1-3: a pool of region-wise style codes from labeled slices, a reference code averaged over K draws,
# > and a synthetic image that matches a pseudo-label.

# %%
#| default_exp style_pool

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail

# %%
#| export
from __future__ import annotations
import os
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
import torch.nn as nn
from sapl.data import Volume, LabeledSlices, log, resolve, atomic_path, HU_WINDOW
import hashlib, json, functools
from contextlib import contextmanager
from dataclasses import replace
from sapl.sean import SEAN, SEAN_PROFILES, SeanConfig, config_dict, train_sean, load_sean, freeze_synthesizer, synthesize, encode_style, semantic_mask


# %% [markdown]
# ## The synthesizer of a split
#
# SEAN is trained on the labeled slices only (§IV-A3), so each labeled subset (dataset, ratio, split) gets its own
# synthesizer, stored under `out_dir/dataset/profile/r{ratio}/sean/{tag}/s{seed}`, where `tag` is the configuration's
# name and a hash of all its settings (so a changed synthesizer is trained anew, never confused with an old
# checkpoint). `ensure_sean` loads it, or trains it when missing (and says so) — a training run that was interrupted
# resumes from its last epoch. All segmentation seeds of a split share the synthesizer of `sean_seed` (default 0).
# `cfg` selects another configuration than the profile's (e.g. a shorter training budget).

# %%
#| export
def sean_tag(cfg: SeanConfig) -> str:
    "Folder name of a synthesizer configuration: its name and a hash of every setting."
    return f"{cfg.name}-{hashlib.sha1(json.dumps(config_dict(cfg), sort_keys=True).encode()).hexdigest()[:8]}"

def sean_dir(out_dir, dataset: str, profile: str, ratio: float, seed: int = 0, cfg: SeanConfig|None = None) -> Path:
    cfg = cfg or SEAN_PROFILES[profile]
    return resolve(out_dir)/dataset/profile/f'r{ratio:g}'/'sean'/sean_tag(cfg)/f's{seed}'

def ensure_sean(labeled: list, # labeled Volumes of the split
                out_dir, dataset: str, profile: str, ratio: float, seed: int = 0, epochs: int|None = None,
                device='cpu', verbose: bool = True,
                cfg: SeanConfig|None = None, # None: the profile's synthesizer
               ) -> SEAN:
    "The trained synthesizer of a split; trained here first when its checkpoint is missing or unfinished."
    cfg = cfg or SEAN_PROFILES[profile]
    if epochs is not None: cfg = replace(cfg, epochs=epochs)
    d = sean_dir(out_dir, dataset, profile, ratio, seed, cfg); ck = d/'last.pt'
    done = ck.exists() and torch.load(ck, map_location='cpu', weights_only=True)['epoch'] >= cfg.epochs
    if not done:
        log.info(f"synthesizer for {dataset}/{profile}/r{ratio:g} not found in {d}: training SEAN "
              f"({cfg.epochs} x {cfg.iters_per_epoch or 'all'} iterations) ...")
        return train_sean(cfg, LabeledSlices(labeled, augment=True, seed=seed), d, seed=seed, device=device, verbose=verbose)
    return load_sean(ck, device)

@contextmanager
def sean_lock(d: Path):
    "Exclusive lock on a synthesizer folder while it is trained or loaded (no-op where `fcntl` is missing)."
    d.mkdir(parents=True, exist_ok=True)
    try: import fcntl
    except ImportError: yield; return
    with open(d/'.lock', 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try: yield
        finally: fcntl.flock(f, fcntl.LOCK_UN)

def check_sean(name: str|None) -> str|None:
    "A method's option `sean`: None (the run profile's synthesizer) or a name in `SEAN_PROFILES`."
    if name is not None and name not in SEAN_PROFILES: raise ValueError(f"sean must be None or one of {sorted(SEAN_PROFILES)}, got {name!r}")
    return name

def split_synthesizer(labeled: list, # labeled Volumes of the split
                      run,            # the segmentation run's RunConfig (out_dir, dataset, profile, ratio, device)
                      seed: int = 0,  # synthesizer seed (option `sean_seed`)
                      sean: str|None = None, # option `sean`: a name in SEAN_PROFILES; None: the run profile's
                      verbose: bool = True) -> SEAN:
    "The frozen synthesizer a run uses: loaded, or trained first under a lock (parallel runs of a split train it once)."
    cfg = SEAN_PROFILES[check_sean(sean) or run.profile]
    with sean_lock(sean_dir(run.out_dir, run.dataset, run.profile, run.ratio, seed, cfg)):
        gen = ensure_sean(labeled, run.out_dir, run.dataset, run.profile, run.ratio, seed, device=run.device, verbose=verbose, cfg=cfg)
    return freeze_synthesizer(gen)


# %%
import tempfile
with tempfile.TemporaryDirectory() as _d:
    with sean_lock(Path(_d)/'s0'): test_eq((Path(_d)/'s0'/'.lock').exists(), True)
test_eq(check_sean(None), None); test_fail(lambda: check_sean('no-such'), contains='sean must be')
assert sean_tag(SEAN_PROFILES['quick']) != sean_tag(replace(SEAN_PROFILES['quick'], epochs=1))   # a changed setting, a new folder


# %% [markdown]
# ## Eq. 1 — the style-code pool
#
# $$\mathcal{P} = \{ Enc(x_i^l, y_i) \}_{i=1}^{N^+}, \quad (x_i^l, y_i) \in \mathcal{D}_L \tag{1}$$
#
# $x_i^l$ is a labeled slice, $y_i$ its semantic mask (background, left lung, right lung, infection), $Enc$ the
# region-wise style encoder, whose output $SC_i \in \mathbb{R}^{s \times d}$ has one row per region ($s = 4$) and a
# zero row for a region absent from the slice. $N^+$ counts the labeled slices **with infection** (the paper's
# choice, `kind='pos'`). The Fig. 8 variants: `kind='all'` keeps all $N$ labeled slices ("Pool (N)"); "Self Style"
# takes no pool but the unlabeled image's own code under its pseudo-label (`self_style`). Besides the codes, the pool
# keeps a presence matrix $\pi_{ir} = [\text{region } r \text{ occurs in slice } i]$ and the (volume, slice) of each
# code. The pool is computed once from the trained encoder, in batches.

# %%
#| export
@dataclass
class StylePool:
    codes: torch.Tensor    # [N,s,d] style codes SC_i
    present: torch.Tensor  # [N,s] bool, region r occurs in slice i
    where: list            # [(volume id, slice index)] of each code
    kind: str = 'pos'

    def __len__(self): return len(self.codes)

    @classmethod
    @torch.no_grad()
    def build(cls, gen, vols: list, kind: str = 'pos', batch: int = 64) -> 'StylePool':
        "Encode the labeled slices of `vols` (Eq. 1); `kind` 'pos' keeps slices with infection, 'all' keeps all."
        if kind not in ('pos', 'all'): raise ValueError(f"kind must be 'pos' or 'all', got {kind!r}")
        img = torch.from_numpy(np.concatenate([v.image for v in vols]))[:, None]
        sem = torch.from_numpy(np.concatenate([semantic_np(v) for v in vols])).long()
        where = [(v.id, int(z)) for v in vols for z in v.z]
        keep = (sem == 3).flatten(1).any(1) if kind == 'pos' else torch.ones(len(sem), dtype=torch.bool)
        if not keep.any(): raise ValueError("no labeled slice with infection: the style pool (N+) is empty; use kind='all'")
        img, sem = img[keep], sem[keep]; where = [w for w, k in zip(where, keep.tolist()) if k]
        codes = torch.cat([encode_style(gen, img[i:i+batch], sem[i:i+batch]).cpu() for i in range(0, len(img), batch)])
        present = F.one_hot(sem.flatten(1), codes.shape[1]).amax(1).bool()
        return cls(codes, present, where, kind)

def semantic_np(v: Volume) -> np.ndarray:
    "Semantic mask [Z,S,S] of a labeled volume (new array)."
    from sapl.data import semantic
    return semantic(v.lung, v.label)


# %% [markdown]
# ## Eq. 2 — the reference style code
#
# $$\mathcal{SC}_{ref} = \frac{1}{K} \sum_{i=1}^{K} \mathcal{SC}_i, \quad \mathcal{SC}_i \in \mathcal{P} \tag{2}$$
#
# with $K = 10$ codes drawn uniformly without replacement (with replacement only when $|\mathcal{P}| < K$) from a
# seeded generator, once per mini-batch. A region absent from a drawn slice has a zero row; averaging it in would
# shrink that region's code toward zero, so each row $r$ is averaged over the draws in which region $r$ exists:
#
# $$\mathcal{SC}_{ref}[r] = \frac{\sum_{i=1}^{K} \pi_{ir}\, \mathcal{SC}_i[r]}{\max\!\big(1, \sum_{i=1}^{K} \pi_{ir}\big)}$$
#
# which equals Eq. 2 whenever every region occurs in every draw. The drawn indices are returned with the code, so a
# run can log them.

# %%
#| export
def reference_code(codes: torch.Tensor,   # [K,s,d] drawn style codes
                   present: torch.Tensor, # [K,s] bool
                  ) -> torch.Tensor:      # [s,d]
    "Region-wise mean of drawn codes over the draws where each region exists (Eq. 2)."
    w = present.float()
    return (codes*w[..., None]).sum(0)/w.sum(0).clamp_min(1)[:, None]

def sample_reference(pool: StylePool, K: int = 10, generator: torch.Generator|None = None) -> tuple:
    "Draw K codes from the pool and average them: (SC_ref [1,s,d], drawn indices [K])."
    n = len(pool)
    idx = torch.randperm(n, generator=generator)[:K] if n >= K else torch.randint(n, (K,), generator=generator)
    return reference_code(pool.codes[idx], pool.present[idx])[None], idx


# %%
_codes = torch.tensor([[[1., 1], [2, 2]], [[3., 3], [0, 0]]]); _pres = torch.tensor([[True, True], [True, False]])
test_close(reference_code(_codes, _pres), torch.tensor([[2., 2], [2, 2]]))  # row 1 is not diluted by the absent region
_p = StylePool(torch.randn(30, 4, 8), torch.ones(30, 4, dtype=torch.bool), [('v', i) for i in range(30)])
_a, _ia = sample_reference(_p, 10, torch.Generator().manual_seed(0)); _b, _ib = sample_reference(_p, 10, torch.Generator().manual_seed(0))
test_eq(_ia, _ib); test_eq(_a.shape, (1, 4, 8)); test_eq(len(set(_ia.tolist())), 10)


# %% [markdown]
# ## Eq. 3 — synthesis guided by a pseudo-label
#
# $$\hat{x} = Dec(y^p, \mathcal{SC}_{ref}) \tag{3}$$
#
# The decoder's layout $m$ is the lung mask $l \in \{0,1,2\}$ with the binary pseudo-label $y^p$ painted in as class 3:
# $m = 3$ where $y^p = 1$, else $m = l$. It is built as a **new** tensor (`semantic_mask` clones the lung mask), never by
# writing into the lung mask of the batch. One call synthesizes the whole batch.
#
# **Only the lungs are synthesized (default; a departure from the paper).** The layout holds three regions inside
# the body outline but says nothing about the body itself: ribs, mediastinum, body wall and the air outside all share
# class 0. A decoder can only paint an average of them, and on the phantom this background alone lets a small CNN tell
# synthetic from real slices with ROC AUC 1.00 (`reports/synthesis_fidelity.md`). Since the pseudo-label concerns the
# lungs only, and the real slice it was predicted on is at hand (the unlabeled slice in SA-CPS and SA-ST), sapl keeps
# that slice outside the layout's lungs:
#
# $$\hat{x} = M \odot Dec(y^p, \mathcal{SC}_{ref}) + (1 - M) \odot x^u, \qquad M = [\,m > 0\,] \tag{3b}$$
#
# with $m$ the layout above (lungs and pseudo-infection) and $x^u$ the real slice. Methods switch it with the option
# `composite` (`True` by default; `False` gives the paper's Eq. 3, the whole image decoded).
#
# **CT noise matched to the real slice.** A decoder trained with L1 and feature-matching losses on a few thousand
# updates paints smooth lungs (its learned noise inputs stay near zero), while a CT slice carries noise whose level and
# grain depend on dose and reconstruction kernel. With the real slice at hand, the pasted lungs get noise measured on
# it. With $h_a(x) = x - G_a * x$ the high-pass residual of a Gaussian blur of $a$ px and
# $\hat\sigma_a(x) = 1.4826\,\mathrm{MAD}(h_a(x))$ over the pixels of $M$ (robust to vessel and lesion edges),
#
# $$ \hat{x} = M \odot \big(Dec(y^p, \mathcal{SC}_{ref}) + n\big) + (1 - M) \odot x^u, \qquad
#    n = \frac{\sqrt{\max(0,\ \hat\sigma_1(x^u)^2 - \hat\sigma_1(Dec)^2)}}{\sigma_1(G_c * w)}\; G_c * w \tag{3c} $$
#
# with $w$ white Gaussian noise and the grain $c$ chosen from a grid so that the ratio $\hat\sigma_{1/2} / \hat\sigma_1$
# of the noise equals that of the real slice (the ratio of a blurred white field is a function of $c$, tabulated once).
# At 64 px most of this high-pass signal in real lungs is fine anatomy (vessels, lesion texture) rather than quantum
# noise, so $n$ stands in for the texture the decoder does not paint; its effect on fidelity is measured in
# `reports/synthesis_fidelity.md` (rows "lungs" and "lungs + noise").

# %%
#| export
def pseudo_layout(lung: torch.Tensor,   # [B,H,W] long {0,1,2}
                  pseudo: torch.Tensor, # [B,1,H,W] or [B,H,W] {0,1}
                 ) -> torch.Tensor:     # [B,H,W] long {0,1,2,3}, a new tensor
    "Semantic layout of a pseudo-label: lungs with the pseudo-infection painted as class 3."
    return semantic_mask(lung, pseudo.float())

NOISE_GRAIN = (0.0, 0.35, 0.7, 1.0, 1.4, 2.0)   # candidate blur c (px) of the noise model (Eq. 3c)

def _blur(t: torch.Tensor, s: float) -> torch.Tensor: # [B,1,H,W] -> same, separable Gaussian of s px, reflected borders
    if s <= 0: return t
    r = int(3 * s + .5); x = torch.arange(-r, r + 1, dtype=t.dtype, device=t.device); k = torch.exp(-x**2 / (2 * s * s)); k = k / k.sum()
    t = F.conv2d(F.pad(t, (r, r, 0, 0), mode='reflect'), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(t, (0, 0, r, r), mode='reflect'), k.view(1, 1, -1, 1))

def _robust_sd(v: torch.Tensor, # [B,H,W]
               m: torch.Tensor, # [B,H,W] bool
              ) -> torch.Tensor: # [B]: 1.4826 MAD of each slice's values inside m (NaN where m is empty)
    x = torch.where(m, v, torch.nan).flatten(1)
    return 1.4826 * (x - x.nanmedian(1, keepdim=True).values).abs().nanmedian(1).values

@functools.lru_cache(maxsize=None)
def _grain_table() -> tuple:
    "For each grain c: (ratio sigma_1/2 / sigma_1, sigma_1) of the blurred unit white field G_c * w."
    w = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = []
    for c in NOISE_GRAIN:
        f = _blur(w, c); s1 = float((f - _blur(f, 1.)).std()); out.append((float((f - _blur(f, .5)).std()) / s1, s1))
    return tuple(out)

def ct_noise_like(real: torch.Tensor,      # [B,1,H,W] real slices in [0,1]
                  synthetic: torch.Tensor, # [B,1,H,W] decoded slices
                  region: torch.Tensor,    # [B,H,W] bool M: where the noise is measured and added
                  generator: torch.Generator|None = None,
                 ) -> torch.Tensor:        # [B,1,H,W] noise n of Eq. 3c (0 outside M and on slices with < 20 pixels in M)
    "Noise with the level and grain of each real slice inside M, less what the decoded slice already has (Eq. 3c)."
    real = real.to(synthetic); M = region.to(synthetic.device)
    h = lambda t, a: (t - _blur(t, a))[:, 0]
    sd = _robust_sd(h(real, 1.), M)
    ratio = _robust_sd(h(real, .5), M) / sd.clamp_min(1e-8)
    level = (sd**2 - _robust_sd(h(synthetic, 1.), M)**2).clamp_min(0).sqrt()
    table = torch.tensor(_grain_table(), dtype=synthetic.dtype, device=synthetic.device)   # [grains, 2]
    k = (table[None, :, 0] - ratio[:, None]).abs().argmin(1)                              # grain of each slice
    ok = (M.flatten(1).sum(1) >= 20) & torch.isfinite(level)
    w = torch.randn(synthetic.shape, generator=generator, dtype=synthetic.dtype).to(synthetic.device)
    n = torch.zeros_like(synthetic)
    for j in k[ok].unique().tolist():                                                      # one blur per grain present
        sel = ok & (k == j)
        n[sel] = _blur(w[sel], NOISE_GRAIN[j]) * (level[sel] / table[j, 1])[:, None, None, None]
    return torch.where(M[:, None], n, 0.)

def composite(synthetic: torch.Tensor, # [B,1,H,W] Dec(m, SC)
              real: torch.Tensor,      # [B,1,H,W] the real slices the layouts belong to
              layout: torch.Tensor,    # [B,H,W] long semantic layout m
              noise: bool = True,      # add CT noise matched to the real slice (Eq. 3c)
              generator: torch.Generator|None = None,
             ) -> torch.Tensor:        # [B,1,H,W] in [0,1]
    "M * (synthetic + n) + (1 - M) * real with M = [m > 0]: only lungs and infection are synthesized (Eq. 3b, 3c)."
    M = layout.to(synthetic.device) > 0
    if noise: synthetic = (synthetic + ct_noise_like(real, synthetic, M, generator)).clamp(0, 1)
    return torch.where(M[:, None], synthetic, real.to(synthetic))

def synthesize_pseudo(gen, lung: torch.Tensor, # [B,H,W] long {0,1,2}
                      pseudo: torch.Tensor,    # [B,1,H,W] {0,1}
                      style: torch.Tensor,     # [1,s,d] SC_ref or [B,s,d] codes
                      background: torch.Tensor|None = None, # [B,1,H,W] real slices kept outside the lungs (Eq. 3b); None: Eq. 3
                      generator: torch.Generator|None = None, # source of the noise of Eq. 3c
                     ) -> torch.Tensor:        # [B,1,H,W] in [0,1]
    "x̂ = Dec(y^p, SC_ref) for a batch (Eq. 3), or its lungs pasted into the real slices (Eq. 3b)."
    m = pseudo_layout(lung, pseudo); x = synthesize(gen, m, style)
    return x if background is None else composite(x, background, m, generator=generator)

@torch.no_grad()
def self_style(gen, image: torch.Tensor, lung: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    "'Self Style' (Fig. 8): the code of the unlabeled image under its own pseudo-label, [B,s,d]."
    return encode_style(gen, image, pseudo_layout(lung, pseudo))


# %%
_lung = torch.ones(2, 4, 4, dtype=torch.long); _ps = torch.zeros(2, 1, 4, 4); _ps[:, :, 0, 0] = 1
_lay = pseudo_layout(_lung, _ps); test_eq(int(_lay[0, 0, 0]), 3); test_eq(int(_lung[0, 0, 0]), 1)  # lung untouched
_syn, _real = torch.full((2, 1, 4, 4), .9), torch.zeros(2, 1, 4, 4); _m = torch.zeros(2, 4, 4, dtype=torch.long); _m[:, 1:3, 1:3] = 2
_c = composite(_syn, _real, _m, noise=False); test_close(_c.sum().item(), 2*4*.9, eps=1e-5); test_eq(_c[:, :, 0].abs().sum().item(), 0)  # real outside M
_g = torch.Generator().manual_seed(0); _x = (.5 + .05*torch.randn(1, 1, 64, 64, generator=_g)).clamp(0, 1); _M = torch.ones(1, 64, 64, dtype=torch.bool)
_n = ct_noise_like(_x, torch.full_like(_x, .5), _M, _g); test_close(float(_n.std()), .05, eps=.01)   # white noise of the real slice's level
test_eq(ct_noise_like(_x, torch.full_like(_x, .5), ~_M, _g).abs().sum().item(), 0)                  # nothing outside M


# %% [markdown]
# ## Pseudo-labels of known quality (Fig. 7)
#
# To show what synthesis does with imperfect pseudo-labels, `perturb_label` makes them from the ground truth:
# `'fp'` adds false-positive blobs inside the lungs, `'fn'` keeps only the smallest part of the infection (most of it
# missed), `'acc'` returns the ground truth. The blob positions are drawn from a seeded generator.

# %%
#| export
def perturb_label(label: np.ndarray, # [H,W] {0,1}
                  lung: np.ndarray,  # [H,W] {0,1,2}
                  kind: str, seed: int = 0) -> np.ndarray:
    "Ground truth turned into a pseudo-label with high false positives ('fp'), false negatives ('fn') or accurate ('acc')."
    from scipy import ndimage as ndi
    lab = (label > 0).astype(np.uint8)
    if kind == 'acc': return lab.copy()
    if kind == 'fn':
        comp, n = ndi.label(lab)
        if n == 0: return lab.copy()
        if n == 1: return ndi.binary_erosion(lab, iterations=max(1, int(np.sqrt(lab.sum())/4))).astype(np.uint8)
        sizes = np.bincount(comp.ravel())[1:]; return (comp == (np.argmin(sizes) + 1)).astype(np.uint8)
    if kind == 'fp':
        r = np.random.default_rng(seed); out = lab.copy(); H, W = lab.shape
        ys, xs = np.nonzero((lung > 0) & (lab == 0))
        yy, xx = np.mgrid[:H, :W]
        for _ in range(3 if len(ys) else 0):
            k = r.integers(len(ys)); rad = r.uniform(.04, .08)*H
            out[((yy - ys[k])**2 + (xx - xs[k])**2 <= rad**2) & (lung > 0)] = 1
        return out
    raise ValueError(f"kind must be 'fp', 'fn' or 'acc', got {kind!r}")


# %%
_lab = np.zeros((32, 32), np.uint8); _lab[5:10, 5:10] = 1; _lab[20:22, 20:22] = 1; _lg = np.ones((32, 32), np.uint8)
test_eq(perturb_label(_lab, _lg, 'fn').sum(), 4); assert perturb_label(_lab, _lg, 'fp').sum() > _lab.sum()
test_eq(perturb_label(_lab, _lg, 'acc'), _lab)


# %% [markdown]
# ## Fidelity of a synthesizer
#
# Three measurements on slices the synthesizer never saw (validation and test volumes of the split), each comparing
# a real slice $x$ with its synthetic twin $\hat x = Dec(m, \mathcal{SC}_{ref})$ made from the same semantic mask
# $m$ (a reference code per slice, Eq. 2 with $K = 10$):
#
# **(a) Segmenter test.** A U-Net trained on the real labeled slices only segments both; with $P$ its binarised
# prediction and $Y$ the infection mask, pooled over the slices,
#
# $$ DSC = \frac{2\sum |P \cap Y|}{\sum |P| + \sum |Y|}, \qquad \Delta_{DSC} = DSC(x) - DSC(\hat x) \tag{F1} $$
#
# A synthesizer that paints infection that looks like infection where the mask says gives $\Delta_{DSC} \approx 0$.
#
# **(b) Classifier two-sample test (C2ST).** A small CNN is trained to tell real from synthetic slices on the slices
# of half of the volumes and scores the slices of the other half; with scores $r_i$ (real) and $f_j$ (synthetic),
#
# $$ AUC = \frac{1}{n_r n_f}\sum_{i,j} \Big( [f_j > r_i] + \tfrac12 [f_j = r_i] \Big) \tag{F2} $$
#
# (the Mann-Whitney form of the ROC area; 0.5 = indistinguishable, 1 = always told apart).
#
# **(c) Intensity fidelity per region.** For each region $R$ (background: class 0; lungs: classes 1-2; infection:
# class 3) the 1-Wasserstein distance between the real and the synthetic intensity distributions, in HU (images
# in $[0,1]$ are the window $[h_0, h_1] = [-1250, 250]$ HU, so $HU = h_0 + x(h_1 - h_0)$):
#
# $$ W_1(R) = (h_1 - h_0) \int_0^1 \big| F_R(t) - \hat F_R(t) \big|\, dt \tag{F3} $$
#
# with $F_R, \hat F_R$ the empirical CDFs of the real and synthetic pixel values inside $R$.

# %%
#| export
@torch.no_grad()
def fidelity_set(gen, pool: StylePool, vols: list, K: int = 10, seed: int = 0, noise: bool = False, batch: int = 64,
                 background: bool = True, # the twin keeps the real slice outside the lungs (Eq. 3b); False: Eq. 3
                 ct_noise: bool = True,   # with `background`: add the matched noise of Eq. 3c
                ) -> dict:
    "Real slices of `vols` and their synthetic twins Dec(m, SC_ref), one reference code per slice (Eq. 2-3, 3b)."
    ds = LabeledSlices(vols)
    x, y, lung = ds.image[:, None], ds.label[:, None], ds.lung
    sem = semantic_mask(lung, y)
    g = torch.Generator().manual_seed(seed)
    sc = torch.cat([sample_reference(pool, K, g)[0] for _ in range(len(x))])
    gn = torch.Generator().manual_seed(seed + 1) if noise else None
    syn = torch.cat([synthesize(gen, sem[i:i+batch], sc[i:i+batch], gn).cpu() for i in range(0, len(x), batch)])
    if background: syn = composite(syn, x, sem, ct_noise, torch.Generator().manual_seed(seed + 2))
    group = torch.cat([torch.full((len(v.z),), k) for k, v in enumerate(vols)])
    return {'image': x, 'label': y, 'sem': sem, 'synthetic': syn, 'group': group}

def pooled_dsc(pred: torch.Tensor, # [N,1,H,W] bool
               y: torch.Tensor,    # [N,1,H,W] {0,1}
              ) -> float:
    "Pooled Dice over all slices (Eq. F1)."
    y = y > 0.5
    return float(2 * (pred & y).sum() / (pred.sum() + y.sum()).clamp_min(1))

def segmenter_gap(predict, fs: dict, batch: int = 64) -> dict:
    "DSC of a U-Net on real slices and on their synthetic twins, and the gap (Eq. F1); `predict` maps [B,1,H,W] -> probabilities."
    p = lambda t: torch.cat([predict(t[i:i+batch]) for i in range(0, len(t), batch)]) >= 0.5
    real, syn = pooled_dsc(p(fs['image']), fs['label']), pooled_dsc(p(fs['synthetic']), fs['label'])
    return {'dsc_real': real, 'dsc_synthetic': syn, 'dsc_gap': real - syn}


# %%
_y = torch.zeros(2, 1, 4, 4); _y[0, 0, :2] = 1
test_eq(pooled_dsc(_y > 0, _y), 1.0); test_close(pooled_dsc(torch.ones(2, 1, 4, 4, dtype=torch.bool), _y), 2*8/(32+8))


# %%
#| export
def roc_auc(score: np.ndarray,  # [N] classifier scores
            label: np.ndarray,  # [N] 1 = synthetic, 0 = real
           ) -> float:
    "Area under the ROC curve as the Mann-Whitney statistic (Eq. F2), ties counted one half."
    from scipy.stats import rankdata
    score, label = np.asarray(score, float), np.asarray(label).astype(bool)
    n1, n0 = label.sum(), (~label).sum()
    if n1 == 0 or n0 == 0: raise ValueError("roc_auc needs both classes")
    return float((rankdata(score)[label].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))

def _c2st_net() -> nn.Module:
    c = lambda i, o: [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
    return nn.Sequential(*c(1, 8), *c(8, 16), *c(16, 32), *c(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 1))

def c2st_auc(fs: dict, seed: int = 0, iters: int = 400, batch: int = 32) -> float:
    "Classifier two-sample test (Eq. F2): a small CNN trained on the slices of the even volumes, ROC AUC on the odd ones."
    x = torch.cat([fs['image'], fs['synthetic']]); lab = torch.cat([torch.zeros(len(fs['image'])), torch.ones(len(fs['synthetic']))])
    grp = torch.cat([fs['group'], fs['group']])
    tr, te = grp % 2 == 0, grp % 2 == 1
    if not tr.any() or not te.any(): raise ValueError("c2st_auc needs slices from at least two volumes")
    with torch.random.fork_rng():
        torch.manual_seed(seed); net = _c2st_net(); opt = torch.optim.Adam(net.parameters(), 1e-3)
        xt, yt = x[tr], lab[tr]; g = torch.Generator().manual_seed(seed)
        for _ in range(iters):
            i = torch.randint(len(xt), (batch,), generator=g)
            xb = torch.where(torch.rand(batch, 1, 1, 1, generator=g) < .5, xt[i], xt[i].flip(-1))   # left-right flips
            loss = F.binary_cross_entropy_with_logits(net(xb)[:, 0], yt[i])
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad(): s = torch.cat([net(x[te][j:j+256])[:, 0] for j in range(0, int(te.sum()), 256)])
    return roc_auc(s.numpy(), lab[te].numpy())


# %%
test_eq(roc_auc([.1, .2, .8, .9], [0, 0, 1, 1]), 1.0); test_eq(roc_auc([.5, .5], [0, 1]), 0.5); test_close(roc_auc([.9, .2, .8, .1], [0, 0, 1, 1]), 0.25)  # one of four (synthetic, real) pairs ordered
test_fail(lambda: roc_auc([.1, .2], [1, 1]), contains='both classes')

# %%
#| export
FIDELITY_REGIONS = {'background': (0,), 'lungs': (1, 2), 'infection': (3,)}

def region_wasserstein(fs: dict, window: tuple = HU_WINDOW, max_pixels: int = 200_000, seed: int = 0) -> dict:
    "W1 distance in HU between real and synthetic intensities inside each region (Eq. F3); NaN for an absent region."
    from scipy.stats import wasserstein_distance
    r = np.random.default_rng(seed); out = {}
    real, syn, sem = fs['image'][:, 0].numpy(), fs['synthetic'][:, 0].numpy(), fs['sem'].numpy()
    for name, classes in FIDELITY_REGIONS.items():
        inside = np.isin(sem, classes)
        a, b = real[inside], syn[inside]
        if len(a) > max_pixels: k = r.choice(len(a), max_pixels, replace=False); a, b = a[k], b[k]
        out[f'w1_{name}_hu'] = (window[1] - window[0]) * wasserstein_distance(a, b) if len(a) else float('nan')
    return out


# %%
_fs = {'image': torch.zeros(1, 1, 2, 2), 'synthetic': torch.full((1, 1, 2, 2), .1), 'sem': torch.tensor([[[0, 1], [2, 2]]])}
_w = region_wasserstein(_fs); test_close(_w['w1_lungs_hu'], 150.); test_close(_w['w1_background_hu'], 150.); assert np.isnan(_w['w1_infection_hu'])

# %%
#| export
FIDELITY_COLUMNS = {'synthesizer': 'synthesizer', 'mode': 'synthesized', 'iterations': 'G iters', 'train_min': 'train min', 'dsc_real': 'DSC real',
                    'dsc_synthetic': 'DSC synth', 'dsc_gap': 'DSC gap', 'c2st_auc': 'C2ST AUC', 'w1_background_hu': 'W1 bg (HU)',
                    'w1_lungs_hu': 'W1 lungs (HU)', 'w1_infection_hu': 'W1 infection (HU)'}

def update_fidelity_report(row: dict, path, note: str = '') -> 'pd.DataFrame':
    "Insert or replace the row of (`row['synthesizer']`, `row['mode']`) in `path`.csv and rewrite the Markdown table `path` (atomically)."
    import pandas as pd
    path = Path(path); csv = path.with_suffix('.csv')
    df = pd.read_csv(csv) if csv.exists() else pd.DataFrame(columns=list(FIDELITY_COLUMNS))
    row = {'mode': '', **row}
    if 'mode' not in df: df['mode'] = ''
    df['mode'] = df['mode'].fillna('')
    keep = (df.synthesizer != row['synthesizer']) | (df['mode'] != row['mode'])
    df = pd.concat([df[keep], pd.DataFrame([row])], ignore_index=True)
    df = df[[c for c in FIDELITY_COLUMNS if c in df] + [c for c in df if c not in FIDELITY_COLUMNS]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(csv) as tmp: df.to_csv(tmp, index=False)
    show = df[[c for c in FIDELITY_COLUMNS if c in df]].rename(columns=FIDELITY_COLUMNS)
    head = ["# Synthesis fidelity", "", note, "",
            "Synthesized: the whole slice decoded from its mask, Dec(m, SC_ref) (Eq. 3, the paper's); only the lungs decoded and "
            "pasted into the real slice (Eq. 3b); the same with CT noise matched to the real slice (Eq. 3c, what SA-CPS and SA-ST "
            "use by default). DSC: pooled Dice of a U-Net trained on the real labeled slices (the split's Baseline run), on real "
            "test slices and on their synthetic twins (gap = real - synthetic, Eq. F1; negative: the synthetic infection is "
            "easier to find than the real one). C2ST AUC: held-out ROC area of a small CNN telling real from synthetic slices "
            "(0.5 = indistinguishable, Eq. F2). W1: Wasserstein distance of the intensities inside each region, in HU (Eq. F3). "
            "Written by nbs/03_style_pool.ipynb.", ""]
    fmt = lambda v: f'{v:.3g}' if isinstance(v, float) else str(v)
    lines = ['| ' + ' | '.join(show.columns) + ' |', '|' + '---|' * show.shape[1]]
    lines += ['| ' + ' | '.join(fmt(v) for v in r) + ' |' for r in show.itertuples(index=False)]
    with atomic_path(path) as tmp: open(tmp, 'w').write('\n'.join(head + lines) + '\n')
    return df


# %%
import tempfile
with tempfile.TemporaryDirectory() as _d:
    update_fidelity_report({'synthesizer': 'a', 'dsc_gap': .1}, f'{_d}/f.md'); _df = update_fidelity_report({'synthesizer': 'b', 'dsc_gap': .2}, f'{_d}/f.md')
    _df = update_fidelity_report({'synthesizer': 'a', 'dsc_gap': .05}, f'{_d}/f.md')
    test_eq(sorted(zip(_df.synthesizer, _df.dsc_gap)), [('a', .05), ('b', .2)]); assert '| a ' in open(f'{_d}/f.md').read()


# %% [markdown]
# `fidelity_curve` draws, for the configurations of one architecture trained for different budgets, the segmenter gap
# and the C2ST AUC against training time, one line per synthesis mode, with the targets ($|\Delta_{DSC}| \le 0.03$,
# AUC $\le 0.75$) as dashed lines: where the curves are heading says what a longer budget would reach.

# %%
#| export
def fidelity_curve(df: 'pd.DataFrame', # rows of synthesis_fidelity.csv
                   names: list,        # synthesizer tags of one architecture (different training budgets)
                   path,               # PNG to write
                  ) -> Path|None:       # None when fewer than two budgets are in `df`
    "|DSC gap| and C2ST AUC against SEAN training minutes, one line per synthesis mode (seaborn)."
    import seaborn as sns
    from matplotlib.figure import Figure
    d = df[df.synthesizer.isin(names)].copy()
    if d.synthesizer.nunique() < 2: return None
    d['|DSC gap|'] = d.dsc_gap.abs(); d['C2ST AUC'] = d.c2st_auc
    fig = Figure(figsize=(9, 3.4)); axes = fig.subplots(1, 2)
    for ax, col, target in zip(axes, ['|DSC gap|', 'C2ST AUC'], [0.03, 0.75]):
        sns.lineplot(data=d.sort_values('train_min'), x='train_min', y=col, hue='mode', marker='o', ax=ax, legend=ax is axes[1])
        ax.axhline(target, color='grey', ls='--', lw=.8); ax.set_xlabel('SEAN training (min, 1 thread)')
    if axes[1].get_legend(): sns.move_legend(axes[1], 'upper left', bbox_to_anchor=(1, 1), fontsize=7, title=None)
    fig.tight_layout(); path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp: fig.savefig(tmp, format='png', dpi=110)
    return path


# %%
import tempfile, pandas as pd
_df = pd.DataFrame([dict(synthesizer=s, mode=m, train_min=t, dsc_gap=g, c2st_auc=a) for s, t in (('a', 1.), ('b', 4.))
                    for m, g, a in (('whole', .2, 1.), ('lungs', .05, .6))])
with tempfile.TemporaryDirectory() as _d:
    assert fidelity_curve(_df, ['a', 'b'], f'{_d}/c.png').exists(); test_eq(fidelity_curve(_df, ['a'], f'{_d}/d.png'), None)


# %% [markdown]
# ## Dose-response: does the gain of SA-CPS grow with synthesis quality?
#
# SA-CPS runs with synthetic images of different fidelity (one variant per level), CPS once per seed, all on the same
# split and seeds. The gain of level $L$ at seed $j$ is the paired difference
#
# $$ g_{L,j} = DSC(\text{SA-CPS}_L, j) - DSC(\text{CPS}, j), \qquad
#    \bar g_L \pm t_{0.975,\,n-1}\, \frac{s_L}{\sqrt{n}} \tag{F4} $$
#
# with $n \ge 5$ seeds per level and $s_L$ their standard deviation. `gain_vs_fidelity` plots $g_{L,j}$ and the 95 %
# interval against a fidelity measure of level $L$ (a column of the fidelity table; the row is given as
# (synthesizer tag, synthesis mode)) and refuses fewer than `min_seeds` paired seeds. The levels of the benchmark are
# `sapl.reproduce.DOSE_LEVELS`: the first quick synthesizer decoding whole slices, the current one decoding whole slices,
# and the current one synthesizing the lungs with matched noise (Eq. 3c); `make reproduce` draws the figure
# (`reports/gain_vs_fidelity.png`) once their runs exist. The training budgets `quick-b250`, `quick-b1000`, `quick-b2000`
# and `quick` (4000 iterations) give the fidelity-vs-training-time curve of the same architecture:
#
# ```bash
# .venv/bin/papermill nbs/03_style_pool.ipynb reports/runs/03_fidelity_r0.1.ipynb -p ratio 0.1 \
#     -p extra_synthesizers quick-spade,quick-b250,quick-b1000,quick-b2000
# ```

# %%
#| export
def gain_vs_fidelity(per_seed: 'pd.DataFrame', # columns variant, seed, dsc (one split and ratio)
                     levels: dict,              # {SA-CPS variant: (synthesizer tag, mode)}: its row of the fidelity table
                     fidelity: 'pd.DataFrame',  # synthesis_fidelity.csv
                     path=None,                 # figure file (PNG); None: no figure
                     baseline: str = 'cps', metric: str = 'dsc_gap', min_seeds: int = 5) -> 'pd.DataFrame':
    "Paired gains over `baseline` per fidelity level with 95 % t-intervals (Eq. F4); a seaborn figure at `path`."
    import pandas as pd
    from scipy import stats
    base = per_seed[per_seed.variant == baseline].groupby('seed').dsc.mean()
    fidelity = fidelity.assign(abs_dsc_gap=fidelity.dsc_gap.abs()) if 'dsc_gap' in fidelity else fidelity   # |Eq. F1|
    fid = fidelity.assign(mode=fidelity['mode'].fillna('') if 'mode' in fidelity else '').set_index(['synthesizer', 'mode'])[metric]
    pts = []
    for v, key in levels.items():
        key = tuple(key) if isinstance(key, (tuple, list)) else (key, '')
        d = per_seed[per_seed.variant == v].groupby('seed').dsc.mean()
        seeds = d.index.intersection(base.index)
        if len(seeds) < min_seeds: raise ValueError(f"{v}: {len(seeds)} seeds paired with {baseline}, need >= {min_seeds}")
        if key not in fid.index: raise ValueError(f"{key}: not in the fidelity table")
        pts += [{'variant': v, 'synthesizer': ' / '.join(k for k in key if k), metric: float(fid[key]), 'seed': int(s), 'gain': float(d[s] - base[s])} for s in seeds]
    pts = pd.DataFrame(pts)
    g = pts.groupby(['variant', 'synthesizer', metric]).gain
    summ = g.agg(['count', 'mean', 'std']).reset_index()
    half = stats.t.ppf(0.975, summ['count'] - 1) * summ['std'] / np.sqrt(summ['count'])
    summ['ci_lo'], summ['ci_hi'] = summ['mean'] - half, summ['mean'] + half
    if path is not None:
        import seaborn as sns
        from matplotlib.figure import Figure
        fig = Figure(figsize=(5, 3.6)); ax = fig.subplots()
        sns.stripplot(data=pts, x=metric, y='gain', hue='variant', native_scale=True, jitter=False, alpha=.5, ax=ax, legend=False)
        ax.errorbar(summ[metric], summ['mean'], yerr=[summ['mean'] - summ.ci_lo, summ.ci_hi - summ['mean']], fmt='o', color='k', capsize=4)
        ax.axhline(0, color='grey', lw=.8, ls='--')
        ax.set_xlabel({'dsc_gap': 'segmenter DSC gap (real - synthetic)', 'abs_dsc_gap': '|segmenter DSC gap|', 'c2st_auc': 'C2ST AUC'}.get(metric, metric))
        ax.set_ylabel(f'DSC gain over {baseline.upper()} (paired)'); ax.set_title('gain vs synthesis fidelity', fontsize=10)
        fig.tight_layout(); path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp: fig.savefig(tmp, format='png', dpi=120)
    return summ


# %%
import pandas as pd
_ps = pd.DataFrame([{'variant': v, 'seed': s, 'dsc': .6 + (.01 * s if v == 'cps' else .01 * s + d)} for s in range(5)
                    for v, d in (('cps', 0), ('a', .02), ('b', .05))])
_fid = pd.DataFrame({'synthesizer': ['A', 'B'], 'dsc_gap': [.1, .02]})
_s = gain_vs_fidelity(_ps, {'a': 'A', 'b': 'B'}, _fid)
test_close(list(_s.sort_values('variant')['mean']), [.02, .05], eps=1e-9); test_eq(list(_s['count']), [5, 5])
test_fail(lambda: gain_vs_fidelity(_ps[_ps.seed < 3], {'a': 'A'}, _fid), contains='need >= 5')

# %% [markdown]
# ## Run: the synthesizer of a split, its style pool, and Fig. 7
#
# `papermill nbs/03_style_pool.ipynb out.ipynb -p ratio 0.1` trains (or loads) the split's synthesizer, builds the pool,
# and saves the Fig. 7 analogue to `reports/fig7_r{ratio}.png`: test slices with ground truth, then pseudo-labels with high false
# positives, high false negatives and high accuracy, each with the image synthesized to match it.

# %% tags=["parameters"]
dataset = 'phantom'
data_dir = 'data/phantom'
ratio = 0.1
profile = 'quick'
epochs = None              # SEAN epochs; None: the profile's
seed = 0                   # synthesizer seed
out_dir = 'runs'
report_dir = 'reports'
device = 'cpu'
K = 10
extra_synthesizers = ''    # comma-separated names in sapl.sean.SEAN_PROFILES, measured beside the profile's
fidelity = True            # measure fidelity (reports/synthesis_fidelity.md)
unet_epochs = None         # epochs of the split's Baseline run (seed `seed`) whose U-Net the segmenter test reuses; None: the profile's
sean = None                # the synthesizer configuration (a name in sapl.sean.SEAN_PROFILES); None: the profile's

# %%
import os, tempfile
import numpy as np, torch
from pathlib import Path
from sapl.data import prepare_data, resolve

IN_TEST = bool(os.environ.get('IN_TEST'))
if IN_TEST: profile, data_dir, epochs, out_dir = 'smoke', 'data/phantom-smoke', 1, tempfile.mkdtemp(); report_dir = out_dir
data = prepare_data(dataset, data_dir, ratio, profile)
print(data.summary())
from sapl.sean import SEAN_PROFILES
if IN_TEST: sean = None
gen = ensure_sean(data.train_l, out_dir, dataset, profile, ratio, seed, epochs=epochs, device=device, cfg=SEAN_PROFILES[sean] if sean else None)
pool = StylePool.build(gen, data.train_l, 'pos'); pool_n = StylePool.build(gen, data.train_l, 'all')
print(f"style pool: N+ = {len(pool)} codes with infection, N = {len(pool_n)} labeled slices")


# %%
def fig7(vols, gen, pool, path, n=3, K=10, seed=0, whole=False):
    "Rows: test slices; columns: image | ground truth | then for FP, FN, accurate pseudo-labels: label and synthetic image (lungs synthesized, Eq. 3c; `whole`: Eq. 3)."
    from matplotlib.figure import Figure
    cand = sorted(((int(v.label[j].sum()), i, j) for i, v in enumerate(vols) for j in range(len(v.z))), reverse=True)
    picks = [c for c in cand if c[0] > 0][:n]
    kinds = [('fp', 'high false positive'), ('fn', 'high false negative'), ('acc', 'high accuracy')]
    fig = Figure(figsize=(2*(2 + 2*len(kinds)), 2.1*len(picks)), dpi=100); axes = fig.subplots(len(picks), 2 + 2*len(kinds), squeeze=False)
    g = torch.Generator().manual_seed(seed)
    for r, (_, i, j) in enumerate(picks):
        v = vols[i]; lung = torch.from_numpy(v.lung[j:j+1]).long(); real = None if whole else torch.from_numpy(v.image[j:j+1])[:, None]
        cells = [(v.image[j], None, 'image'), (v.image[j], v.label[j], 'ground truth')]
        for k, name in kinds:
            yp = perturb_label(v.label[j], v.lung[j], k, seed=r)
            sc, _ = sample_reference(pool, K, g)
            xs = synthesize_pseudo(gen, lung, torch.from_numpy(yp)[None].float(), sc, real)[0, 0].numpy()
            cells += [(v.image[j], yp, f'pseudo-label:\n{name}'), (xs, None, 'synthetic')]
        for c, (ax, (im, m, title)) in enumerate(zip(axes[r], cells)):
            ax.imshow(im, cmap='gray', vmin=0, vmax=1)
            if m is not None: ax.contour(m, levels=[.5], colors='r', linewidths=.8)
            ax.set_xticks([]); ax.set_yticks([])
            if r == 0: ax.set_title(title, fontsize=8)
    fig.tight_layout(); path = Path(path); path.parent.mkdir(parents=True, exist_ok=True); fig.savefig(path); return path

p = fig7(data.test, gen, pool, resolve(report_dir)/f'fig7_r{ratio:g}.png', n=2 if IN_TEST else 3, K=K)
from IPython.display import Image; Image(filename=str(p))

# %% [markdown]
# ### Fidelity of the split's synthesizer (and of other configurations)
#
# `extra_synthesizers` names further configurations of `sapl.sean.SEAN_PROFILES` to train (when missing) and measure on
# the same split; each gets a row in `reports/synthesis_fidelity.md` (+ `.csv`, rows replaced by configuration tag) and
# its own Fig. 7 (`fig7_r{ratio}_{name}.png`). The U-Net of the segmenter test is the split's `baseline` run at the synthesizer's seed (the benchmark's own run when it exists; trained here otherwise).

# %%
from dataclasses import replace
import pandas as pd
from sapl.train import RunConfig, Trainer
from sapl.sean import SEAN_PROFILES
if fidelity:
    run = RunConfig(method='baseline', dataset=dataset, data_dir=data_dir, ratio=ratio, profile=profile, seed=seed, out_dir=out_dir,
                    device=device, **(dict(epochs=1, iters_per_epoch=3) if IN_TEST else dict(epochs=unet_epochs)))
    unet = Trainer(run, data, progress=False).fit()   # the U-Net of the segmenter test: the split's Baseline run (reused when finished)
    note = (f"Data: {dataset} in {data_dir}, labeled ratio {ratio:g} ({len(data.train_l)} labeled volumes), profile {profile}, "
            f"synthesizer seed {seed}, K = {K}. Real and synthetic slices share the masks of {len(data.val)} validation + "
            f"{len(data.test)} test volumes (C2ST: trained on half of these volumes, scored on the other half); DSC and W1 on the test volumes.")
    rows = []
    modes = {'whole (Eq. 3)': dict(background=False), 'lungs (Eq. 3b)': dict(ct_noise=False), 'lungs + noise (Eq. 3c)': {}}
    first = sean or profile
    for name in [first] + [s.strip() for s in extra_synthesizers.split(',') if s.strip()]:
        scfg = SEAN_PROFILES[name] if name != first or epochs is None else replace(SEAN_PROFILES[name], epochs=epochs)
        g = ensure_sean(data.train_l, out_dir, dataset, profile, ratio, seed, device=device, cfg=scfg)
        p = StylePool.build(g, data.train_l, 'pos')
        log_df = pd.read_csv(sean_dir(out_dir, dataset, profile, ratio, seed, scfg)/'log.csv')
        for mode, kw in modes.items():
            fs = fidelity_set(g, p, data.val + data.test, K=K, seed=seed, **kw)
            te = {k: v[fs['group'] >= len(data.val)] for k, v in fs.items()}
            row = {'synthesizer': sean_tag(scfg), 'mode': mode, 'iterations': int(log_df.iters.sum()), 'train_min': log_df.seconds.sum()/60,
                   **segmenter_gap(unet.predict, te), 'c2st_auc': c2st_auc(fs, seed, iters=20 if IN_TEST else 400), **region_wasserstein(te)}
            rows.append(row); update_fidelity_report(row, resolve(report_dir)/'synthesis_fidelity.md', note)
        if name != first: fig7(data.test, g, p, resolve(report_dir)/f'fig7_r{ratio:g}_{name}.png', n=2 if IN_TEST else 3, K=K, whole=name == 'quick-spade')
    budgets = [sean_tag(SEAN_PROFILES[n]) for n in SEAN_PROFILES if n == profile or n.startswith(f'{profile}-b')]
    fidelity_curve(pd.read_csv(resolve(report_dir)/'synthesis_fidelity.csv'), budgets, resolve(report_dir)/'synthesis_fidelity.png')
    print((resolve(report_dir)/'synthesis_fidelity.md').read_text())


# %% [markdown]
# ## Explorer
#
# Pick a test slice, a pseudo-label source (ground truth, an edited mask, or a model's prediction when its checkpoint
# exists), K, the style source and what is synthesized (the lungs with matched noise, as SA-CPS and SA-ST use them; the
# lungs alone; or the whole slice, the paper's Eq. 3); the synthetic image updates. Needs a live kernel (ipywidgets).

# %%
def explorer(vols, gen, pool, pool_n, predict=None):
    import ipywidgets as W
    from matplotlib.figure import Figure
    import io
    img = W.Image(format='png')  # the figure as PNG bytes: shown the same with any matplotlib backend
    index = [(i, j) for i, v in enumerate(vols) for j in range(len(v.z))]
    most = max(range(len(index)), key=lambda n: int(vols[index[n][0]].label[index[n][1]].sum()))   # start on the most infected slice
    sl = W.IntSlider(description='slice', min=0, max=len(index) - 1, value=most)
    src = W.Dropdown(description='pseudo-label', options=['ground truth', 'edited: false positives', 'edited: false negatives'] + (['model'] if predict else []))
    k = W.IntSlider(description='K', value=10, min=1, max=30)
    sty = W.Dropdown(description='style', options=['Pool (N+)', 'Pool (N)', 'Self Style'])
    seedw = W.IntText(description='seed', value=0)
    mode = W.Dropdown(description='synthesize', options=['lungs + noise (Eq. 3c)', 'lungs (Eq. 3b)', 'whole slice (Eq. 3)'])
    def draw(*_):
        i, j = index[sl.value]; v = vols[i]
        x = torch.from_numpy(v.image[j:j+1])[:, None]; lung = torch.from_numpy(v.lung[j:j+1]).long()
        yp = {'ground truth': v.label[j], 'edited: false positives': perturb_label(v.label[j], v.lung[j], 'fp', seedw.value),
              'edited: false negatives': perturb_label(v.label[j], v.lung[j], 'fn')}.get(src.value)
        if yp is None: yp = (predict(x)[0, 0] >= .5).numpy().astype(np.uint8)
        ypt = torch.from_numpy(yp)[None].float()
        if sty.value == 'Self Style': sc = self_style(gen, x, lung, ypt)
        else: sc, _ = sample_reference(pool if sty.value == 'Pool (N+)' else pool_n, k.value, torch.Generator().manual_seed(seedw.value))
        lay = pseudo_layout(lung, ypt); xs = synthesize(gen, lay, sc)
        if not mode.value.startswith('whole'): xs = composite(xs, x, lay, mode.value.startswith('lungs +'), torch.Generator().manual_seed(seedw.value))
        xs = xs[0, 0].numpy()
        fig = Figure(figsize=(7.5, 2.6)); ax = fig.subplots(1, 3)
        for a, (im, m, t) in zip(ax, [(v.image[j], None, f'{v.id} z={int(v.z[j])}'), (v.image[j], yp, 'pseudo-label'), (xs, None, 'synthetic')]):
            a.imshow(im, cmap='gray', vmin=0, vmax=1); a.set_axis_off(); a.set_title(t, fontsize=8)
            if m is not None: a.contour(m, levels=[.5], colors='r', linewidths=.8)
        buf = io.BytesIO(); fig.savefig(buf, format='png'); img.value = buf.getvalue()
    for w in (sl, src, k, sty, seedw, mode): w.observe(draw, 'value')
    draw(); return W.VBox([W.HBox([sl, src, mode]), W.HBox([k, sty, seedw]), img])

explorer(data.test, gen, pool, pool_n)
