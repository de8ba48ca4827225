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
from sapl.data import Volume, LabeledSlices, log, resolve
from sapl.sean import SEAN, SEAN_PROFILES, train_sean, load_sean, synthesize, encode_style, semantic_mask


# %% [markdown]
# ## The synthesizer of a split
#
# SEAN is trained on the labeled slices only (§IV-A3), so each labeled subset (dataset, ratio, split) gets its own
# synthesizer, stored under `out_dir/dataset/profile/r{ratio}/sean/s{seed}`. `ensure_sean` loads it, or trains it
# when missing (and says so) — a training run that was interrupted resumes from its last epoch. All segmentation
# seeds of a split share the synthesizer of `sean_seed` (default 0).

# %%
#| export
def sean_dir(out_dir, dataset: str, profile: str, ratio: float, seed: int = 0) -> Path:
    return resolve(out_dir)/dataset/profile/f'r{ratio:g}'/'sean'/f's{seed}'

def ensure_sean(labeled: list, # labeled Volumes of the split
                out_dir, dataset: str, profile: str, ratio: float, seed: int = 0, epochs: int|None = None,
                device='cpu', verbose: bool = True) -> SEAN:
    "The trained synthesizer of a split; trained here first when its checkpoint is missing or unfinished."
    d = sean_dir(out_dir, dataset, profile, ratio, seed); cfg = SEAN_PROFILES[profile]
    n_ep = cfg.epochs if epochs is None else epochs
    ck = d/'last.pt'
    done = ck.exists() and torch.load(ck, map_location='cpu', weights_only=True)['epoch'] >= n_ep
    if not done:
        log.info(f"synthesizer for {dataset}/{profile}/r{ratio:g} not found in {d}: training SEAN ({n_ep} epochs) ...")
        return train_sean(cfg, LabeledSlices(labeled, augment=True, seed=seed), d, seed=seed, epochs=n_ep, device=device, verbose=verbose)
    return load_sean(ck, device)


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

# %%
#| export
def pseudo_layout(lung: torch.Tensor,   # [B,H,W] long {0,1,2}
                  pseudo: torch.Tensor, # [B,1,H,W] or [B,H,W] {0,1}
                 ) -> torch.Tensor:     # [B,H,W] long {0,1,2,3}, a new tensor
    "Semantic layout of a pseudo-label: lungs with the pseudo-infection painted as class 3."
    return semantic_mask(lung, pseudo.float())

def synthesize_pseudo(gen, lung: torch.Tensor, pseudo: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    "x̂ = Dec(y^p, SC_ref) for a batch (Eq. 3): [B,1,H,W] in [0,1]."
    return synthesize(gen, pseudo_layout(lung, pseudo), style)

@torch.no_grad()
def self_style(gen, image: torch.Tensor, lung: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    "'Self Style' (Fig. 8): the code of the unlabeled image under its own pseudo-label, [B,s,d]."
    return encode_style(gen, image, pseudo_layout(lung, pseudo))


# %%
_lung = torch.ones(2, 4, 4, dtype=torch.long); _ps = torch.zeros(2, 1, 4, 4); _ps[:, :, 0, 0] = 1
_lay = pseudo_layout(_lung, _ps); test_eq(int(_lay[0, 0, 0]), 3); test_eq(int(_lung[0, 0, 0]), 1)  # lung untouched


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

# %%
import os, tempfile
import numpy as np, torch
from pathlib import Path
from sapl.data import prepare_data, resolve

IN_TEST = bool(os.environ.get('IN_TEST'))
if IN_TEST: profile, data_dir, epochs, out_dir = 'smoke', 'data/phantom-smoke', 1, tempfile.mkdtemp(); report_dir = out_dir
data = prepare_data(dataset, data_dir, ratio, profile)
print(data.summary())
gen = ensure_sean(data.train_l, out_dir, dataset, profile, ratio, seed, epochs=epochs, device=device)
pool = StylePool.build(gen, data.train_l, 'pos'); pool_n = StylePool.build(gen, data.train_l, 'all')
print(f"style pool: N+ = {len(pool)} codes with infection, N = {len(pool_n)} labeled slices")


# %%
def fig7(vols, gen, pool, path, n=3, K=10, seed=0):
    "Rows: test slices; columns: image | ground truth | then for FP, FN, accurate pseudo-labels: label and synthetic image."
    from matplotlib.figure import Figure
    cand = sorted(((int(v.label[j].sum()), i, j) for i, v in enumerate(vols) for j in range(len(v.z))), reverse=True)
    picks = [c for c in cand if c[0] > 0][:n]
    kinds = [('fp', 'high false positive'), ('fn', 'high false negative'), ('acc', 'high accuracy')]
    fig = Figure(figsize=(2*(2 + 2*len(kinds)), 2.1*len(picks)), dpi=100); axes = fig.subplots(len(picks), 2 + 2*len(kinds), squeeze=False)
    g = torch.Generator().manual_seed(seed)
    for r, (_, i, j) in enumerate(picks):
        v = vols[i]; lung = torch.from_numpy(v.lung[j:j+1]).long()
        cells = [(v.image[j], None, 'image'), (v.image[j], v.label[j], 'ground truth')]
        for k, name in kinds:
            yp = perturb_label(v.label[j], v.lung[j], k, seed=r)
            sc, _ = sample_reference(pool, K, g)
            xs = synthesize_pseudo(gen, lung, torch.from_numpy(yp)[None].float(), sc)[0, 0].numpy()
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
# ## Explorer
#
# Pick a test slice, a pseudo-label source (ground truth, an edited mask, or a model's prediction when its checkpoint
# exists), K and the style source; the synthetic image updates. Needs a live kernel (ipywidgets).

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
    def draw(*_):
        i, j = index[sl.value]; v = vols[i]
        x = torch.from_numpy(v.image[j:j+1])[:, None]; lung = torch.from_numpy(v.lung[j:j+1]).long()
        yp = {'ground truth': v.label[j], 'edited: false positives': perturb_label(v.label[j], v.lung[j], 'fp', seedw.value),
              'edited: false negatives': perturb_label(v.label[j], v.lung[j], 'fn')}.get(src.value)
        if yp is None: yp = (predict(x)[0, 0] >= .5).numpy().astype(np.uint8)
        ypt = torch.from_numpy(yp)[None].float()
        if sty.value == 'Self Style': sc = self_style(gen, x, lung, ypt)
        else: sc, _ = sample_reference(pool if sty.value == 'Pool (N+)' else pool_n, k.value, torch.Generator().manual_seed(seedw.value))
        xs = synthesize_pseudo(gen, lung, ypt, sc)[0, 0].numpy()
        fig = Figure(figsize=(7.5, 2.6)); ax = fig.subplots(1, 3)
        for a, (im, m, t) in zip(ax, [(v.image[j], None, f'{v.id} z={int(v.z[j])}'), (v.image[j], yp, 'pseudo-label'), (xs, None, 'synthetic')]):
            a.imshow(im, cmap='gray', vmin=0, vmax=1); a.set_axis_off(); a.set_title(t, fontsize=8)
            if m is not None: a.contour(m, levels=[.5], colors='r', linewidths=.8)
        buf = io.BytesIO(); fig.savefig(buf, format='png'); img.value = buf.getvalue()
    for w in (sl, src, k, sty, seedw): w.observe(draw, 'value')
    draw(); return W.VBox([W.HBox([sl, src]), W.HBox([k, sty, seedw]), img])

explorer(data.test, gen, pool, pool_n)
