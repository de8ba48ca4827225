# %% [markdown]
# # Evaluation
#
# > DSC and NSD on the original CT grid (the COVID-19-20 challenge metrics, §IV-A2), mapping predictions
# > back from the lung crop, NIfTI export of predictions, and result tables and figures.

# %%
#| default_exp eval

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import tempfile

# %%
#| export
from __future__ import annotations
import os, math, warnings
from pathlib import Path
import numpy as np
import nibabel as nib
import pandas as pd
import torch
import torch.nn.functional as F
from sapl.data import Volume, load_nifti, atomic_path


# %% [markdown]
# The paper (§IV-A2) scores infection segmentation with the two metrics of the COVID-19-20 challenge:
# the Dice similarity coefficient (DSC) and the normalized surface Dice (NSD) at a tolerance of 1 mm.
# Both are computed **per volume on the original CT grid** (original slices, original in-plane matrix and
# voxel spacing), then averaged over the test volumes. The network works on lung-cropped, resized slices,
# so its output is first mapped back to the original grid (`to_original` below).
#
# ## Metrics
#
# ### Dice similarity coefficient
#
# Let $P$ and $G$ be the sets of voxels labeled foreground (infection) in the prediction and in the ground
# truth, and $|\cdot|$ the number of voxels in a set. Then
#
# $$\mathrm{DSC}(P, G) = \frac{2\,|P \cap G|}{|P| + |G|} \in [0, 1]. \tag{M1}$$
#
# (M1, M2 are labels of this notebook; the paper gives the metrics no equation numbers.) When only one of
# $P$, $G$ is empty the DSC is $0$; when both are empty it is $0/0$, reported as NaN, as in the challenge's
# reference code.

# %%
#| export
def _check_pair(pred, gt) -> tuple:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match ground truth shape {gt.shape}")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)

def dice(pred: np.ndarray, # boolean mask, any shape
         gt: np.ndarray,   # boolean mask, same shape as `pred`
        ) -> float:        # DSC in [0, 1]; NaN when both masks are empty
    "Dice similarity coefficient (Eq. M1) of two binary masks."
    p, g = _check_pair(pred, gt)
    n = np.count_nonzero(p) + np.count_nonzero(g)
    if n == 0: return float('nan')
    return 2.*np.count_nonzero(p & g)/n


# %%
_a = np.zeros((4, 4), bool); _a[:2] = True; _b = np.zeros((4, 4), bool); _b[:, :2] = True
test_eq(dice(_a, _a), 1.); test_eq(dice(_a, _b), 2*4/(8 + 8)); test_eq(dice(_a, ~_a), 0.)
test_eq(dice(_a, np.zeros_like(_a)), 0.); assert math.isnan(dice(np.zeros_like(_a), np.zeros_like(_a)))
test_fail(lambda: dice(_a, np.zeros((4, 5), bool)), contains='(4, 5)')


# %% [markdown]
# ### Normalized surface Dice
#
# The NSD (Nikolov et al., 2021) asks which fraction of the two **surfaces** lies within a tolerance
# $\tau$ (mm) of the other surface. Let $S_P, S_G \subset \mathbb{R}^d$ be the boundary surfaces of the
# predicted and reference regions ($d = 3$; contours when $d = 2$), and for a surface $S$ let its *border
# region* at tolerance $\tau$ be
# $$\mathcal{B}_S^{(\tau)} = \{x \in \mathbb{R}^d : \exists\, y \in S,\ \lVert x - y \rVert_2 \le \tau\},$$
# the set of points within $\tau$ mm of $S$. With $|\cdot|$ now the surface area (contour length in 2D),
#
# $$\mathrm{NSD}_\tau(P, G) = \frac{|S_P \cap \mathcal{B}_G^{(\tau)}| + |S_G \cap \mathcal{B}_P^{(\tau)}|}{|S_P| + |S_G|} \in [0, 1].$$
#
# **Discretisation (the challenge's reference implementation, DeepMind `surface-distance`).** Surfaces are
# represented by *surfels* (surface elements). Consider the dual grid whose cells are the $2^d$-voxel
# neighbourhoods: each cell has voxel centres as corners, and the mask is padded with background so that
# regions touching the image border are closed. A cell whose corners are neither all inside nor all
# outside the mask is a surfel $s$, located at the cell centre $c_s$. Its area $a_s$ (mm², or mm in 2D)
# is the area of the marching-cubes (marching-squares in 2D) surface patch inside the cell, computed with
# the voxel spacing $(\delta_1, \dots, \delta_d)$; in 2D, for example, one or three inside corners give
# one diagonal segment of length $\tfrac12\sqrt{\delta_1^2 + \delta_2^2}$, two adjacent inside corners a
# straight segment of length $\delta_1$ or $\delta_2$, and two diagonal corners two diagonal segments.
# The distance of a surfel to the other surface is the Euclidean distance in mm between cell centres,
# $d(s, \mathcal{S}) = \min_{t \in \mathcal{S}} \lVert c_s - c_t \rVert_2$. With $\mathcal{S}_P$,
# $\mathcal{S}_G$ the surfel sets of the two masks,
#
# $$\mathrm{NSD}_\tau(P, G) = \frac{\sum_{s \in \mathcal{S}_P:\ d(s, \mathcal{S}_G) \le \tau} a_s \;+\; \sum_{s \in \mathcal{S}_G:\ d(s, \mathcal{S}_P) \le \tau} a_s}{\sum_{s \in \mathcal{S}_P} a_s \;+\; \sum_{s \in \mathcal{S}_G} a_s}. \tag{M2}$$
#
# The challenge uses $\tau = 1$ mm. One empty mask gives $0$ (no surfel of the other surface is near an
# empty surface), two empty masks give $0/0$, reported as NaN.
#
# MONAI's `compute_surface_dice` with `use_subvoxels=True` computes exactly (M2) (the repository's tests
# check it against an independent brute-force implementation); without `use_subvoxels` it counts boundary
# voxels instead of weighting surfels by area, a different quantity. It expects one-hot `[B,C,...]`
# tensors, spacing in the array's axis order and the tolerance in mm per class.

# %%
#| export
def nsd(pred: np.ndarray,   # boolean mask [Y,X] or [Z,Y,X]
        gt: np.ndarray,     # boolean mask, same shape as `pred`
        spacing_mm,         # voxel spacing in mm, in the arrays' axis order, e.g. (sz, sy, sx)
        tolerance_mm: float = 1.0, # tau in Eq. M2
       ) -> float:          # NSD in [0, 1]; NaN when both masks are empty
    "Normalized surface Dice (Eq. M2) at `tolerance_mm`, surfel-area weighted as in the COVID-19-20 challenge."
    from monai.metrics import compute_surface_dice
    p, g = _check_pair(pred, gt)
    if p.ndim not in (2, 3): raise ValueError(f"nsd needs 2D or 3D masks, got shape {p.shape}")
    spacing = tuple(float(s) for s in np.atleast_1d(spacing_mm))
    if len(spacing) != p.ndim: raise ValueError(f"spacing {spacing} has {len(spacing)} values for {p.ndim}D masks of shape {p.shape}")
    if min(spacing) <= 0: raise ValueError(f"spacing must be positive, got {spacing}")
    if not (np.isfinite(tolerance_mm) and tolerance_mm >= 0): raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")
    hp, hg = bool(p.any()), bool(g.any())
    if not (hp or hg): return float('nan')
    if not (hp and hg): return 0.
    # Every surface point of either mask lies in the bounding box of their union: cropping to it (with a 2-voxel
    # margin, so no mask touches the border) leaves all surface distances, and so the NSD, unchanged, and is much faster.
    box = tuple(slice(max(int(a.min()) - 2, 0), int(a.max()) + 3) for a in np.nonzero(p | g))
    p, g = p[box], g[box]
    t = lambda m: torch.from_numpy(m.astype(np.float32))[None, None]  # one-hot [B=1, C=1, ...]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # a deprecation notice inside MONAI's edge finder
        out = compute_surface_dice(t(p), t(g), class_thresholds=[float(tolerance_mm)], include_background=True,
                                   spacing=list(spacing), use_subvoxels=True)
    return float(out[0, 0])


# %% [markdown]
# Identical masks score 1; masks farther apart than $\tau$ score 0. Two $4\times4$ squares shifted by one
# pixel of 1 mm: the shared top and bottom contour pieces (3 straight unit segments and one corner
# diagonal of $\sqrt2/2$ each, per mask and side) lie at distance 0, everything else at distance 1 mm,
# so $\tau = 0.5$ gives $\frac{4(3 + \sqrt2/2)}{8(3 + \sqrt2/2)} = \frac12$ and $\tau = 1$ gives 1.

# %%
_sq = lambda y, x, n=4, shape=(12, 12): np.pad(np.ones((n, n), bool), ((y, shape[0]-y-n), (x, shape[1]-x-n)))
test_eq(nsd(_sq(2, 2), _sq(2, 2), (1., 1.)), 1.); test_eq(nsd(_sq(0, 0), _sq(8, 8), (1., 1.)), 0.)
test_close(nsd(_sq(2, 2), _sq(2, 3), (1., 1.), 0.5), 0.5, eps=1e-6); test_close(nsd(_sq(2, 2), _sq(2, 3), (1., 1.), 1.), 1., eps=1e-6)
test_eq(nsd(_sq(2, 2), np.zeros((12, 12), bool), (1., 1.)), 0.); assert math.isnan(nsd(*[np.zeros((3, 5, 5), bool)]*2, (2., 1., 1.)))

# %% [markdown]
# Spacing follows the array axes: a cube shifted by one slice of 3 mm is within a 3 mm tolerance but not
# within 2 mm.

# %%
_c = np.zeros((6, 8, 8), bool); _c[1:4, 2:6, 2:6] = True
assert nsd(_c, np.roll(_c, 1, 0), (3., 1., 1.), 2.) < 1; test_close(nsd(_c, np.roll(_c, 1, 0), (3., 1., 1.), 3.), 1., eps=1e-6)


# %% [markdown]
# ## Predictions on a preprocessed volume
#
# `predict_fn` is any callable mapping a batch of preprocessed slices $x \in [0,1]^{B\times1\times S\times S}$
# to infection probabilities $p = \sigma(f_\theta(x))$ of the same shape (e.g. `lambda x: net(x).sigmoid()`).
# Slices go through it in batches under `torch.no_grad()`; the result is stacked into $[Z,S,S]$.

# %%
#| export
@torch.no_grad()
def predict_volume(predict_fn,        # callable: FloatTensor [B,1,S,S] in [0,1] -> probabilities [B,1,S,S]
                   vol: Volume,       # preprocessed volume; its `image` [Z,S,S] is the input
                   batch: int = 16,   # slices per call
                   device=None,       # where the input batch is put (None: CPU)
                  ) -> np.ndarray:    # [Z,S,S] float32 probabilities
    "Run `predict_fn` over all slices of `vol` in batches."
    img = np.asarray(vol.image, dtype=np.float32); outs = []
    for i in range(0, len(img), batch):
        x = torch.from_numpy(img[i:i+batch])[:, None]
        if device is not None: x = x.to(device)
        p = predict_fn(x)
        if tuple(p.shape) != tuple(x.shape):
            raise ValueError(f"predict_fn returned shape {tuple(p.shape)} for input shape {tuple(x.shape)}")
        p = p.detach().float().cpu()
        if p.numel() and (p.min() < 0 or p.max() > 1):
            raise ValueError(f"predict_fn must return probabilities in [0, 1], got range [{p.min():.3g}, {p.max():.3g}] (logits? apply a sigmoid)")
        outs.append(p[:, 0].numpy())
    return np.concatenate(outs) if outs else np.zeros((0,) + img.shape[1:], np.float32)


# %% [markdown]
# For the examples: a hand-built 3-slice $16\times16$ original whose lung box $(y_0, y_1, x_0, x_1) =
# (-2, 10, 6, 18)$ reaches outside the image (above and to the right), kept slices 0 and 2, resized to
# $S = 12$ = the box side, so the resize is the identity.

# %%
def _toy_volume(S=12, box=(-2, 10, 6, 18), z=(0, 2), shape=(3, 16, 16), label_path=None, image_path='', seed=0):
    from sapl.data import crop_resize
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, np.float32); gt[0, 0:5, 10:16] = 1; gt[2, 3:7, 8:12] = 1  # touches the image edges
    img = rng.random(shape).astype(np.float32)
    zs = np.array(z)
    return Volume('toy', crop_resize(img[zs], box, S), (crop_resize(gt[zs], box, S) >= .5).astype(np.uint8),
                  np.ones((len(zs), S, S), np.uint8), zs, box, shape, (2., 1., 1.), np.diag([1., 1., 2., 1.]),
                  image_path, label_path), gt

_v, _gt = _toy_volume()
_p = predict_volume(lambda x: (x > 0.5).float(), _v, batch=1)
test_eq(_p.shape, (2, 12, 12)); test_eq(_p, (_v.image > 0.5).astype(np.float32))
test_fail(lambda: predict_volume(lambda x: x*10 - 5, _v), contains='logits')


# %% [markdown]
# ## Back to the original grid
#
# Preprocessing kept the slices $z_1, \dots, z_Z$, cropped each to the square box $[y_0, y_1) \times
# [x_0, x_1)$ of the original in-plane grid (zero padding where the box leaves the image) and resized it to
# $S \times S$. `to_original` inverts this for a probability map $p \in [0,1]^{Z\times S\times S}$: each
# slice is resized bilinearly back to the box size $(y_1 - y_0) \times (x_1 - x_0)$, thresholded,
#
# $$\hat y_{z_k}(i, j) = \big[\, \mathrm{resize}(p_k)(i - y_0,\, j - x_0) \ge t \,\big], \qquad
# (i, j) \in [y_0, y_1) \times [x_0, x_1) \cap [0, Y_o) \times [0, X_o),$$
#
# and pasted into slice $z_k$ of an all-zero $[Z_o, Y_o, X_o]$ array; the parts of the box outside the
# image are dropped and slices that were not kept (no lung) stay 0. $t$ is the threshold (0.5).

# %%
#| export
def to_original(vol: Volume,          # preprocessed volume (uses z, box, shape)
                prob: np.ndarray,     # [Z,S,S] probabilities for the kept slices
                threshold: float = 0.5,
                chunk: int = 32,      # slices resized at a time (memory)
               ) -> np.ndarray:       # [Zo,Yo,Xo] uint8 {0,1} on the original grid
    "Undo the lung crop and resize: resize back to the box (bilinear), threshold, paste into the original slices."
    prob = np.asarray(prob, dtype=np.float32)
    z = np.asarray(vol.z, dtype=np.int64)
    if prob.ndim != 3 or len(prob) != len(z):
        raise ValueError(f"prob must be [Z,S,S] with Z = {len(z)} kept slices, got shape {prob.shape}")
    y0, y1, x0, x1 = (int(b) for b in vol.box); Zo, Yo, Xo = (int(s) for s in vol.shape)
    out = np.zeros((Zo, Yo, Xo), np.uint8)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, Yo), max(x0, 0), min(x1, Xo)
    if sy0 >= sy1 or sx0 >= sx1: return out
    for i in range(0, len(z), chunk):
        t = torch.from_numpy(prob[i:i+chunk])[:, None]
        if t.shape[-2:] != (y1 - y0, x1 - x0):
            t = F.interpolate(t, size=(y1 - y0, x1 - x0), mode='bilinear', align_corners=False, antialias=True)
        m = (t[:, 0].numpy() >= threshold).astype(np.uint8)
        out[z[i:i+chunk], sy0:sy1, sx0:sx1] = m[:, sy0-y0:sy1-y0, sx0-x0:sx1-x0]
    return out


# %% [markdown]
# Round trip: a mask on the original grid → `crop_resize` → `to_original` gives the mask back on the kept
# slices (the resize is lossless here, $S$ = box side), including the parts near the image edges; the
# dropped slice 1 is 0.

# %%
_back = to_original(_v, _v.label.astype(np.float32))
test_eq(_back.shape, (3, 16, 16)); test_eq(_back[[0, 2]], _gt[[0, 2]].astype(np.uint8)); test_eq(_back[1].sum(), 0)


# %% [markdown]
# ## Writing predictions as NIfTI
#
# A prediction is written as a `uint8` NIfTI on the grid of its source image: same affine, and a copy of the
# source header (orientation codes, units, ...) with the data type set to `uint8` and the intensity scaling
# (`scl_slope`, `scl_inter`) reset. Arrays here are $(z, y, x)$; nibabel stores $(x, y, z)$, so the array is
# transposed back. The file is written to a temporary name in the target folder and renamed into place, so
# an interrupted run never leaves a truncated file under the final name.

# %%
#| export
def _nifti_ext(path: Path) -> str:
    return '.nii.gz' if path.name.endswith('.nii.gz') else '.nii'

def write_nifti(mask_zyx: np.ndarray,     # [Zo,Yo,Xo] mask on the original grid
                vol_or_reference_path,    # a Volume (its source image) or the path of a reference NIfTI
                path,                     # output file, .nii.gz or .nii
                labels: bool = False,     # keep the values 0..255 (a label map) instead of binarising
               ) -> Path:
    "Write `mask_zyx` as a uint8 NIfTI with the affine and header of the source image, atomically."
    path = Path(path)
    if not (path.name.endswith('.nii.gz') or path.name.endswith('.nii')): raise ValueError(f"{path}: output must end in .nii or .nii.gz")
    ref = vol_or_reference_path
    hdr, affine, klass = None, None, nib.Nifti1Image
    src = ref.image_path if isinstance(ref, Volume) else ref
    if src and Path(src).is_file():
        img = nib.load(str(src))
        hdr, affine = img.header.copy(), np.asarray(img.affine)
        if isinstance(img, nib.Nifti2Image): klass = nib.Nifti2Image
        ref_shape = tuple(int(s) for s in img.shape[:3][::-1])
    elif isinstance(ref, Volume):
        affine, ref_shape = np.asarray(ref.affine, dtype=np.float64), tuple(int(s) for s in ref.shape)
    else: raise FileNotFoundError(f"{src}: reference NIfTI not found")
    arr = np.asarray(mask_zyx)
    if arr.shape != ref_shape: raise ValueError(f"mask shape {arr.shape} does not match the reference (z, y, x) shape {ref_shape}")
    if labels and (arr.min() < 0 or arr.max() > 255 or not np.array_equal(arr, np.round(arr))):
        raise ValueError(f"{path}: a label map needs integer values in 0..255")
    arr = np.ascontiguousarray((arr if labels else arr > 0).astype(np.uint8).transpose(2, 1, 0))
    out = klass(arr, affine, header=hdr)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1., 0.)
    out.header['cal_min'], out.header['cal_max'] = 0, max(1, int(arr.max()))
    with atomic_path(path, suffix=_nifti_ext(path)) as tmp: nib.save(out, str(tmp))
    return path


# %%
with tempfile.TemporaryDirectory() as _d:
    _ref = nib.Nifti1Image(np.zeros((16, 16, 3), np.int16), np.diag([0.8, 0.8, 2., 1.])); _ref.header.set_slope_inter(2., -1024.)
    nib.save(_ref, f'{_d}/ct.nii.gz'); _o = nib.load(write_nifti(_back, f'{_d}/ct.nii.gz', f'{_d}/pred/toy.nii.gz'))
    test_eq(_o.affine, nib.load(f'{_d}/ct.nii.gz').affine); test_eq(np.asarray(_o.dataobj).transpose(2, 1, 0), _back); test_eq(_o.get_data_dtype(), np.uint8)
    test_eq(sorted(p.name for p in Path(f'{_d}/pred').iterdir()), ['toy.nii.gz'])
    _lm = np.asarray(nib.load(write_nifti(2*_back, f'{_d}/ct.nii.gz', f'{_d}/lungs.nii.gz', labels=True)).dataobj).transpose(2, 1, 0)
    test_eq(_lm, 2*_back)  # labels=True keeps the label values


# %% [markdown]
# ## Evaluating a model on a set of volumes
#
# For each volume: predict the kept slices, map the prediction back to the original grid (`to_original`),
# re-read the ground truth from `vol.label_path` on that same original grid, and score DSC (M1) and NSD (M2,
# $\tau$ = `tolerance_mm`, spacing `vol.spacing`). Ground-truth infection on slices without lung counts as
# missed, as it should. One row per volume; with `write_pred` the predictions are also written to
# `out_dir/pred/<id>.nii.gz`.

# %%
#| export
def evaluate(predict_fn,                # callable: FloatTensor [B,1,S,S] in [0,1] -> probabilities [B,1,S,S]
             vols: list,                # preprocessed Volumes with `label_path`
             out_dir=None,              # folder for pred/<id>.nii.gz when `write_pred`
             write_pred: bool = False,
             tolerance_mm: float = 1.0, # NSD tolerance tau
             threshold: float = 0.5,
             batch: int = 16,
             device=None,
            ) -> pd.DataFrame:          # columns id, dsc, nsd, gt_voxels, pred_voxels (+ group)
    "Per-volume DSC and NSD on the original grid."
    if write_pred and out_dir is None: raise ValueError("write_pred=True needs out_dir")
    rows = []
    for vol in vols:
        if not vol.label_path: raise ValueError(f"volume {vol.id}: no label_path to evaluate against")
        gt = load_nifti(vol.label_path, kind='mask')[0] > 0.5
        if gt.shape != tuple(vol.shape):
            raise ValueError(f"volume {vol.id}: label {vol.label_path} has shape {gt.shape}, the volume {tuple(vol.shape)}")
        pred = to_original(vol, predict_volume(predict_fn, vol, batch, device), threshold)
        row = dict(id=vol.id, dsc=dice(pred, gt), nsd=nsd(pred, gt, vol.spacing, tolerance_mm),
                   gt_voxels=int(gt.sum()), pred_voxels=int(pred.sum()))
        if getattr(vol, 'group', None): row['group'] = vol.group
        rows.append(row)
        if write_pred: write_nifti(pred, vol, Path(out_dir)/'pred'/f'{vol.id}.nii.gz')
    return pd.DataFrame(rows, columns=['id', 'dsc', 'nsd', 'gt_voxels', 'pred_voxels'] + (['group'] if any('group' in r for r in rows) else []))


# %% [markdown]
# A perfect predictor for the toy volume (it returns the preprocessed label) scores 1 on both metrics.

# %%
with tempfile.TemporaryDirectory() as _d:
    nib.save(nib.Nifti1Image(_gt.transpose(2, 1, 0).astype(np.uint8), np.diag([1., 1., 2., 1.])), f'{_d}/seg.nii.gz')
    _v2, _ = _toy_volume(label_path=f'{_d}/seg.nii.gz')
    _df = evaluate(lambda x: torch.from_numpy(_v2.label[:len(x)].astype(np.float32))[:, None], [_v2], _d, write_pred=True, batch=16)
    test_eq(_df.loc[0, ['dsc', 'nsd']].tolist(), [1., 1.]); assert Path(f'{_d}/pred/toy.nii.gz').is_file()


# %% [markdown]
# ## Reporting
#
# Over the $n$ test volumes the tables report mean ± standard deviation (population standard deviation,
# `ddof=0`) of per-volume DSC and NSD in percent, as the paper's tables do. A volume with NaN for a metric
# (empty ground truth and empty prediction) is left out of that metric's mean, and the number of such
# volumes is reported beside it, never silently dropped.

# %%
#| export
def summarize(df: pd.DataFrame) -> dict:
    "Mean and std of dsc and nsd over volumes (NaN volumes excluded from the means and counted)."
    out = dict(n=int(len(df)))
    for k in ('dsc', 'nsd'):
        v = df[k].to_numpy(dtype=np.float64) if k in df else np.zeros(0)
        ok = v[~np.isnan(v)]
        out[f'{k}_mean'] = float(ok.mean()) if len(ok) else float('nan')
        out[f'{k}_std'] = float(ok.std()) if len(ok) else float('nan')
        out[f'{k}_nan'] = int(np.isnan(v).sum())
    return out


# %%
_s = summarize(pd.DataFrame(dict(id=list('abc'), dsc=[.5, .7, np.nan], nsd=[.4, .6, .8])))
test_close(_s['dsc_mean'], .6); test_close(_s['dsc_std'], .1); test_eq((_s['n'], _s['dsc_nan'], _s['nsd_nan']), (3, 1, 0))


# %% [markdown]
# `results_markdown` turns one per-volume table per method into the paper's table layout (rows = methods,
# NSD (%) and DSC (%) as mean ± std), with the number of volumes and of NaN volumes, under a metadata header
# (profile, seeds, git SHA, data hash, ...) so that a results file says how it was produced.

# %%
#| export
def _pm(mean, std) -> str:
    return 'n/a' if np.isnan(mean) else f"{100*mean:.2f} ± {100*std:.2f}"

def results_markdown(tables: dict,       # {method name: per-volume DataFrame from `evaluate`}
                     title: str = 'Results',
                     meta: dict|None = None, # e.g. {'profile': 'quick', 'seeds': [0, 1], 'git': sha, 'data': hash}
                    ) -> str:
    "Markdown results table: rows = methods, columns NSD(%) and DSC(%) as mean ± std, n and NaN counts."
    lines = [f"# {title}", ""]
    for k, v in (meta or {}).items(): lines.append(f"- **{k}**: {v}")
    if meta: lines.append("")
    lines += ["| Method | NSD (%) | DSC (%) | n volumes | NaN (NSD / DSC) |", "|---|---|---|---|---|"]
    for name, df in tables.items():
        s = summarize(df)
        lines.append(f"| {name} | {_pm(s['nsd_mean'], s['nsd_std'])} | {_pm(s['dsc_mean'], s['dsc_std'])} | {s['n']} | {s['nsd_nan']} / {s['dsc_nan']} |")
    return "\n".join(lines) + "\n"


# %%
_t = pd.DataFrame(dict(id=['a', 'b'], dsc=[.6, .7], nsd=[.5, np.nan]))
_md = results_markdown({'Baseline': _t}, 'Test', {'profile': 'smoke', 'git': 'abc123'})
assert '| Baseline | 50.00 ± 0.00 | 65.00 ± 5.00 | 2 | 1 / 0 |' in _md and '- **git**: abc123' in _md


# %% [markdown]
# `write_results` stores one method's per-volume table as `out_dir/{name}.csv` and its summary as
# `out_dir/{name}.md`, each written to a temporary file in `out_dir` and renamed into place.

# %%
#| export
def _atomic_write_text(path: Path, text: str):
    with atomic_path(path) as tmp: tmp.write_text(text)

def write_results(df: pd.DataFrame,  # per-volume table from `evaluate`
                  out_dir,
                  name: str,         # file stem and method name
                  title: str|None = None,
                  meta: dict|None = None,
                 ) -> tuple:         # (csv path, markdown path)
    "Write the per-volume CSV and the markdown summary `out_dir/{name}.csv|.md`, atomically."
    out_dir = Path(out_dir)
    csv, md = out_dir/f'{name}.csv', out_dir/f'{name}.md'
    _atomic_write_text(csv, df.to_csv(index=False))
    _atomic_write_text(md, results_markdown({name: df}, title or name, meta))
    return csv, md


# %%
with tempfile.TemporaryDirectory() as _d:
    _csv, _mdp = write_results(_t, _d, 'base'); test_eq(pd.read_csv(_csv).shape, (2, 3)); assert '| base |' in _mdp.read_text()


# %% [markdown]
# ## Figures
#
# `plot_predictions` shows, for the $n$ preprocessed slices with the most ground-truth infection (over all
# given volumes), the image, the ground truth and each method's prediction ($p \ge 0.5$) as red overlays.
# It draws with matplotlib's Agg canvas directly (no pyplot, no global backend change) and writes a PNG.

# %%
#| export
def plot_predictions(vols: list,    # preprocessed Volumes with labels
                     preds: dict,   # {method: list (one per volume) of [Z,S,S] probabilities or masks}
                     path,          # output .png
                     n: int = 4,    # number of slices (rows)
                     threshold: float = 0.5,
                    ) -> Path:
    "PNG of image | ground truth | each method's prediction (red overlay) on the slices with most infection."
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    for k, ps in preds.items():
        if len(ps) != len(vols): raise ValueError(f"preds[{k!r}] has {len(ps)} volumes, expected {len(vols)}")
    cand = [(int(v.label[j].sum()), i, j) for i, v in enumerate(vols) if v.label is not None for j in range(len(v.label))]
    if not cand: raise ValueError("plot_predictions needs volumes with labels")
    picks = sorted(cand, key=lambda c: (-c[0], c[1], c[2]))[:n]
    cols = ['image', 'ground truth'] + list(preds)
    fig = Figure(figsize=(2.2*len(cols), 2.2*len(picks)), dpi=100); FigureCanvasAgg(fig)
    axes = fig.subplots(len(picks), len(cols), squeeze=False)
    def overlay(m):
        rgba = np.zeros(m.shape + (4,), np.float32); rgba[m > 0] = (1, 0, 0, .5); return rgba
    for r, (_, i, j) in enumerate(picks):
        img = vols[i].image[j]
        masks = [None, vols[i].label[j]] + [np.asarray(preds[k][i][j]) >= threshold for k in preds]
        for c, (ax, m) in enumerate(zip(axes[r], masks)):
            ax.imshow(img, cmap='gray', vmin=0, vmax=1, interpolation='nearest')
            if m is not None: ax.imshow(overlay(m), interpolation='nearest')
            ax.set_xticks([]); ax.set_yticks([])
            if r == 0: ax.set_title(cols[c], fontsize=9)
            if c == 0: ax.set_ylabel(f"{vols[i].id} z={int(vols[i].z[j])}", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp: fig.savefig(tmp, format='png')
    return path


# %%
with tempfile.TemporaryDirectory() as _d:
    _f = plot_predictions([_v], {'thresh': [_p]}, f'{_d}/fig.png', n=2)
    test_eq(open(_f, 'rb').read(8), b'\x89PNG\r\n\x1a\n')


# %% [markdown]
# ## Seeds and paired differences
#
# The results tables give, per method, the mean over the $n$ seeds of the test-set mean DSC (or NSD) with a
# 95 % Student-$t$ interval,
#
# $$\bar{s} \pm t_{0.975,\,n-1}\,\frac{\sigma_s}{\sqrt{n}}, \qquad \bar{s} = \frac{1}{n}\sum_{k=1}^{n} s_k, \quad
# \sigma_s^2 = \frac{1}{n-1}\sum_{k=1}^{n} (s_k - \bar{s})^2 \tag{R1}$$
#
# with $s_k$ the score of seed $k$. Two methods are compared **paired**: both ran on the same split with the same
# seed, so the interval is taken over the per-seed differences $d_k = s_k^{A} - s_k^{B}$ (Eq. R1 with $d$ for $s$),
# which removes the seed-to-seed variation that both share. `t_interval` is Eq. R1; `seed_figure` draws, with
# seaborn, every seed's score and the mean ± interval per method (left) and the paired differences to a reference
# method (right, Baseline by default; a zero line that the interval does not cross marks a difference that three or
# more seeds support).

# %%
#| export
def t_interval(x) -> tuple:
    "(lower, upper) of the 95 % Student-t interval of the mean of x (Eq. R1); NaNs dropped, (mean, mean) for one value."
    from sapl.stats import mean_ci
    m, h = mean_ci(x)
    return (m, m) if h != h else (m - h, m + h)

def seed_figure(per_seed: pd.DataFrame,   # one row per run: variant, ratio, seed and the metric column
                path,                     # PNG to write
                labels: dict|None = None,  # {variant: display name}
                ratio: float|None = None,  # labeled ratio shown (default: the lowest present)
                metric: str = 'dsc',       # 'dsc' | 'nsd'
                reference: str = 'baseline') -> Path|None:
    "Per-seed scores with mean ± Eq. R1 interval (left) and paired differences to `reference` (right), seaborn."
    import seaborn as sns
    from matplotlib.figure import Figure
    d = per_seed[per_seed.ratio == (per_seed.ratio.min() if ratio is None else ratio)]
    d = d[d[metric].notna()].assign(method=lambda t: t.variant.map(lambda v: (labels or {}).get(v, v)),
                                    score=lambda t: 100*t[metric])
    if d.empty: return None
    order, name = list(dict.fromkeys(d.method)), (labels or {}).get(reference, reference)
    ref = d[d.variant == reference].set_index('seed').score
    p = d[d.variant != reference].assign(diff=lambda t: t.score - t.seed.map(ref)).dropna(subset=['diff'])
    fig = Figure(figsize=(10, .32*len(order) + 1.5), dpi=120)
    axs = fig.subplots(1, 2 if len(p) else 1, squeeze=False)[0]
    pts = dict(errorbar=t_interval, linestyle='none', markers='d', markersize=5, linewidth=1.2, color='k', capsize=.2, zorder=3)
    for ax, t, x, o in [(axs[0], d, 'score', order)] + ([(axs[1], p, 'diff', [m for m in order if m in set(p.method)])] if len(p) else []):
        sns.stripplot(t, x=x, y='method', order=o, hue='seed', palette='crest', ax=ax, size=4, alpha=.8, legend=ax is axs[0])
        sns.pointplot(t, x=x, y='method', order=o, ax=ax, **pts)
        ax.set_ylabel(''); ax.grid(axis='x', alpha=.3)
    axs[0].set_xlabel(f'{metric.upper()} (%): seeds and mean ± 95 % CI')
    if len(p): axs[1].axvline(0, color='grey', lw=.8); axs[1].set_xlabel(f'{metric.upper()} − {name} (points, same seed)')
    fig.suptitle(f"{int(d.seed.nunique())} seeds, {d.ratio.iloc[0]:.0%} labeled", fontsize=9); fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp: fig.savefig(tmp, format='png')
    return path


# %%
test_close(t_interval([1., 2., 3.]), (2 - 4.302653/math.sqrt(3), 2 + 4.302653/math.sqrt(3)), eps=1e-5)
_ps = pd.DataFrame(dict(variant=['baseline']*3 + ['cps']*3, ratio=.1, seed=[0, 1, 2]*2, dsc=[.5, .6, .7, .55, .66, .74]))
with tempfile.TemporaryDirectory() as _d: test_eq(open(seed_figure(_ps, f'{_d}/s.png', {'cps': 'CPS'}), 'rb').read(8), b'\x89PNG\r\n\x1a\n')
