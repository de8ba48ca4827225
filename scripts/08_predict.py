# %% [markdown]
# # Prediction on your own CT
#
# > `sapl-predict`: the infection mask, left/right lung masks, lung involvement and the CT-0..4 severity category
# > of a CT that a trained checkpoint has never seen, written on the CT's own grid; validated on phantom truth.

# %%
#| default_exp predict

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import tempfile

# %%
#| export
from __future__ import annotations
import os, sys, json, time, math, hashlib, argparse
from dataclasses import dataclass, fields
from pathlib import Path
import numpy as np
from scipy import ndimage as ndi
import torch
from sapl.lungs import check_lungs, report_findings
from sapl.data import preprocess_fingerprint, DataError, load_nifti, find_cases, make_split, paper_split, split_source, lung_masks, preprocess_array, window, atomic_path, resolve, log
from sapl.eval import predict_volume, to_original, write_nifti
from sapl.unet import UNet
from sapl.train import RunConfig, load_checkpoint, predict_meta
from sapl.phantom import severity_band, BANDS


# %% [markdown]
# A researcher who trained a model (or received a checkpoint) runs one command on a scan:
#
# ```bash
# sapl-predict scan.nii.gz --checkpoint runs/phantom/quick/r0.1/s0/sacps/best.pt --out predictions/
# python -m sapl.predict dicom_series_folder/ other_scan.nii.gz -c a.pt b.pt --out predictions/ --overlay
# ```
#
# For every case it writes `<id>_infection.nii.gz` (0/1) and `<id>_lungs.nii.gz` (0 background, 1 left lung, 2 right
# lung) on the input's own voxel grid with the input's affine, so ITK-SNAP or 3D Slicer overlays them on the scan without
# resampling, optionally `<id>_overlay.png`, and one row of `report.csv` / `report.json`. The pipeline is the one the
# models were trained and evaluated with: the data module reads and checks the scan and finds the lungs (`lung_masks`),
# `preprocess_array` crops the lung box and resizes to the checkpoint's input size, the network runs slice by slice
# (`predict_volume`), and `to_original` maps the probabilities back to the original grid.
#
# ## Reading a CT: NIfTI or a DICOM series
#
# A NIfTI file goes through `load_nifti` (3D, finite, positive spacing). A DICOM series is read with SimpleITK (which
# applies the rescale slope/intercept, so the values are HU) and its LPS geometry is turned into a NIfTI (RAS) affine:
# with the direction cosines $D$, the spacing $(s_x, s_y, s_z)$ and the origin $o$ of the series,
#
# $$A = \begin{pmatrix} F D\,\mathrm{diag}(s_x, s_y, s_z) & F o \\ 0 & 1 \end{pmatrix}, \qquad F = \mathrm{diag}(-1, -1, 1). \tag{P1}$$
#
# Both give $(z, y, x)$ arrays in HU, the spacing $(s_z, s_y, s_x)$ in mm and the affine in nibabel's axis order. A scan
# with no voxel below $-500$ HU holds no air and no aerated lung: it is not a CT in Hounsfield units (a mask, a
# normalised image), and is refused by name.

# %%
#| export
class PredictError(ValueError):
    "A checkpoint, option or input that prediction cannot use; the message names the file and the problem."

@dataclass(frozen=True)
class CTInput:
    id: str    # case id: output file stem and report row
    path: str  # NIfTI file or DICOM series folder
    kind: str  # 'nifti' | 'dicom'

def _is_nifti(p: Path) -> bool: return p.name.endswith('.nii') or p.name.endswith('.nii.gz')

def _stem(p: Path) -> str:
    s = p.name[:-7] if p.name.endswith('.nii.gz') else p.name[:-4]
    for suffix in ('_ct', '_0000'):
        if s.endswith(suffix) and len(s) > len(suffix): return s[:-len(suffix)]
    return s

def dicom_series(folder) -> list:
    "Series instance UIDs of the DICOM files directly in `folder` (empty when there are none)."
    import SimpleITK as sitk
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])

def read_dicom(folder) -> tuple:
    "Read a DICOM series folder as ((z,y,x) float32 HU, (sz,sy,sx) mm, 4x4 NIfTI affine, Eq. P1)."
    import SimpleITK as sitk
    folder = Path(folder); ids = dicom_series(folder)
    if not ids: raise DataError(f"{folder}: no DICOM series found")
    if len(ids) > 1: raise DataError(f"{folder}: {len(ids)} DICOM series in one folder; give each series its own folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
    try:
        r = sitk.ImageSeriesReader(); r.SetFileNames(files); img = r.Execute()
    except RuntimeError as e:
        msg = [l for l in str(e).splitlines() if l.strip()]
        raise DataError(f"{folder}: cannot read the DICOM series ({msg[-1] if msg else 'unknown error'})") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{folder}: expected a 3D single-channel series, got {img.GetDimension()}D with {img.GetNumberOfComponentsPerPixel()} channels")
    hu = sitk.GetArrayFromImage(img).astype(np.float32)        # (z, y, x)
    if not np.isfinite(hu).all(): raise DataError(f"{folder}: NaN/inf voxels")
    sp = np.asarray(img.GetSpacing(), np.float64)               # (sx, sy, sz)
    if sp.min() <= 0: raise DataError(f"{folder}: non-positive voxel spacing {tuple(sp)}")
    F = np.diag([-1., -1., 1.])                                 # LPS -> RAS
    A = np.eye(4); A[:3, :3] = F @ np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(sp); A[:3, 3] = F @ np.asarray(img.GetOrigin())
    return hu, tuple(float(s) for s in sp[::-1]), A

def read_ct(inp: CTInput) -> tuple:
    "Read and check one input: ((z,y,x) float32 HU, (sz,sy,sx) mm, 4x4 affine)."
    hu, spacing, affine = load_nifti(inp.path) if inp.kind == 'nifti' else read_dicom(inp.path)
    if hu.min() > -500:
        raise DataError(f"{inp.path}: no voxel below -500 HU (values {hu.min():g}..{hu.max():g}); expected a CT in Hounsfield units")
    return hu, spacing, affine


# %% [markdown]
# An input on the command line is a NIfTI file, a folder holding one DICOM series, or a data folder in one of the
# layouts of the data module (`find_cases`: COVID-19-20, MosMedData, nnU-Net raw; its images are predicted, its labels
# ignored). Inputs that cannot be resolved are returned as failures, so that they do not stop the others; ids are made
# unique so that no two cases write the same files.

# %%
#| export
def find_inputs(paths) -> tuple:
    "Resolve command-line inputs into (list of CTInput, list of (path, error message))."
    out, failed = [], []
    for p in map(Path, paths):
        try:
            if not p.exists(): raise DataError(f"{p}: not found")
            if p.is_file():
                if not _is_nifti(p): raise DataError(f"{p}: not a NIfTI file (.nii or .nii.gz); give a DICOM series as its folder")
                out.append(CTInput(_stem(p), str(p), 'nifti'))
            elif dicom_series(p): out.append(CTInput(p.resolve().name, str(p), 'dicom'))
            else: out += [CTInput(c.id, c.image, 'nifti') for c in find_cases(p)]
        except (DataError, OSError) as e: failed.append((str(p), str(e)))
    seen = {}
    for i, c in enumerate(out):
        k = seen.get(c.id, 0); seen[c.id] = k + 1
        if k: out[i] = CTInput(f'{c.id}_{k + 1}', c.path, c.kind)
    return out, failed


# %%
with tempfile.TemporaryDirectory() as _d:
    Path(f'{_d}/a_ct.nii.gz').touch(); Path(f'{_d}/notes.txt').touch()
    _ins, _bad = find_inputs([f'{_d}/a_ct.nii.gz', f'{_d}/notes.txt', f'{_d}/missing.nii.gz'])
    test_eq([(c.id, c.kind) for c in _ins], [('a', 'nifti')]); test_eq(len(_bad), 2); assert 'not a NIfTI' in _bad[0][1] and 'not found' in _bad[1][1]

# %% [markdown]
# ## Self-describing checkpoints
#
# Every checkpoint written by the trainer carries `'predict'` (see `predict_meta` in the trainer notebook): profile,
# input size $S$, U-Net widths, lung-crop margin, HU window, threshold $\tau$, method, number of networks and the run
# configuration. Checkpoints written before that key existed hold `'config'` (method, profile, options) and `'models'`;
# their metadata is derived from the configuration with the same `predict_meta` (they were trained with the same crop
# margin, window and threshold). Every method predicts with `models[0]` (the U-Net; $s_1$ of CPS/SA-CPS and the
# student of Mean Teacher). Anything else is refused with a message naming the file. Files load with
# `weights_only=True`, so a checkpoint cannot run code. The configuration hash in the report is the first 12 hex
# digits of the SHA-1 of the configuration as sorted JSON.

# %%
#| export
_META_KEYS = ('size', 'widths', 'margin_mm', 'hu_window', 'threshold', 'method', 'config')

def config_hash(config: dict) -> str:
    "Short hash of a run configuration (sorted JSON)."
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]

def checkpoint_meta(ck, path='checkpoint') -> tuple:
    "The prediction metadata of a loaded checkpoint and whether it was derived from an older 'config': (dict, bool)."
    if not isinstance(ck, dict): raise PredictError(f"{path}: not a sapl checkpoint (holds a {type(ck).__name__}, not a dict)")
    if not (isinstance(ck.get('models'), (list, tuple)) and ck['models'] and isinstance(ck['models'][0], dict)):
        raise PredictError(f"{path}: not a sapl checkpoint (no 'models' list of network weights; keys: {sorted(map(str, ck))[:8]})")
    if 'predict' in ck:
        m = ck['predict']
        miss = [k for k in _META_KEYS if not isinstance(m, dict) or k not in m]
        if miss: raise PredictError(f"{path}: 'predict' metadata lacks {miss}")
        return dict(m), False
    c = ck.get('config')
    if not (isinstance(c, dict) and 'method' in c and 'profile' in c):
        raise PredictError(f"{path}: not a sapl checkpoint (no 'predict' metadata and no 'config' with method and profile)")
    known = {f.name for f in fields(RunConfig)}
    try: cfg = RunConfig(**{k: v for k, v in c.items() if k in known})
    except (TypeError, ValueError) as e: raise PredictError(f"{path}: cannot interpret its 'config' ({e})") from None
    m = predict_meta(cfg); m.update(n_models=len(ck['models']), config=c)
    return m, True


# %%
_cfg = RunConfig(profile='smoke'); _sd = UNet(_cfg.prof.widths).state_dict()
test_eq(checkpoint_meta({'models': [_sd], 'predict': predict_meta(_cfg)})[1], False)
_m, _old = checkpoint_meta({'models': [_sd, _sd], 'config': {'method': 'sacps', 'profile': 'smoke', 'opts': {}}})
test_eq((_old, _m['size'], _m['n_models'], _m['method']), (True, 32, 2, 'sacps'))
test_fail(lambda: checkpoint_meta({'weight': torch.zeros(1)}, 'x.pt'), contains='x.pt: not a sapl checkpoint')


# %% [markdown]
# `load_predictors` loads one or several checkpoints. Several checkpoints are averaged (below), which needs the same
# input: the same size, crop margin, HU window and threshold; a mismatch is refused, naming both files.

# %%
#| export
@dataclass
class Predictor:
    path: str          # checkpoint file
    meta: dict         # prediction metadata (see `checkpoint_meta`)
    net: torch.nn.Module
    derived: bool      # metadata derived from an older checkpoint's 'config'
    @property
    def config_hash(self) -> str: return config_hash(self.meta['config'])
    @property
    def device(self): return next(self.net.parameters()).device

def load_predictor(path, device='cpu') -> Predictor:
    "Load one checkpoint (weights_only) as a U-Net in eval mode with its metadata."
    try: ck = load_checkpoint(path)
    except (FileNotFoundError, RuntimeError) as e: raise PredictError(str(e)) from None
    meta, derived = checkpoint_meta(ck, path)
    net = UNet(tuple(meta['widths']))
    try: net.load_state_dict(ck['models'][int(meta.get('predict_model', 0))])
    except (RuntimeError, KeyError, IndexError, TypeError) as e:
        raise PredictError(f"{path}: its weights do not fit a U-Net of widths {tuple(meta['widths'])} ({str(e).splitlines()[0][:200]})") from None
    return Predictor(str(path), meta, net.to(device).eval(), derived)

def load_predictors(paths, device='cpu') -> list:
    "Load the checkpoints to average; they must share size, crop margin, HU window and threshold."
    if not paths: raise PredictError("no checkpoint given")
    try: dev = torch.device(device)
    except RuntimeError as e: raise PredictError(f"unknown device {device!r} ({e})") from None
    if dev.type == 'cuda' and not torch.cuda.is_available(): raise PredictError(f"device {device!r} requested but CUDA is not available")
    ps = [load_predictor(p, dev) for p in paths]
    for p in ps[1:]:
        for k in ('size', 'margin_mm', 'hu_window', 'threshold'):
            if p.meta[k] != ps[0].meta[k]:
                raise PredictError(f"{p.path}: {k} {p.meta[k]} differs from {ps[0].path} ({ps[0].meta[k]}); averaged checkpoints need the same input")
    return ps


# %% [markdown]
# ## Averaging checkpoints
#
# With $M$ checkpoints $f_1, \dots, f_M$ (logits), the probability of infection of a pixel of the cropped slice $x$ is
# the mean of the members' probabilities (the ensembling of nnU-Net, Isensee et al. 2021: softmax/sigmoid outputs
# averaged, then thresholded),
#
# $$\bar p(x) = \frac{1}{M} \sum_{m=1}^{M} \sigma\big(f_m(x)\big), \qquad \hat y = [\,\mathcal{R}(\bar p) \ge \tau\,], \tag{P2}$$
#
# where $\mathcal{R}$ is the bilinear resampling back to the lung box on the original grid (`to_original`) and $\tau$
# the checkpoints' threshold (0.5). $M = 1$ is a single model.

# %%
#| export
@torch.no_grad()
def ensemble_prob(preds: list,       # Predictors
                  x: torch.Tensor,   # [B,1,S,S] in [0,1]
                 ) -> torch.Tensor:  # [B,1,S,S] mean probability (Eq. P2), on the CPU
    "Mean of the members' sigmoid probabilities."
    return torch.stack([torch.sigmoid(p.net(x.to(p.device))).float().cpu() for p in preds]).mean(0)


# %%
_ps = [Predictor('a', _m, UNet(_cfg.prof.widths).eval(), False) for _ in range(2)]; _x = torch.rand(2, 1, 32, 32)
test_close(ensemble_prob(_ps, _x), (torch.sigmoid(_ps[0].net(_x)) + torch.sigmoid(_ps[1].net(_x))).detach()/2, eps=1e-6)


# %% [markdown]
# ## Infected lung is lung
#
# Lung masks that come from thresholding aerated lung (the classical fallback of `lung_masks`: below $-400$ HU) leave out
# dense consolidation, exactly the tissue the involvement is about: on phantom volume 29 (CT-3) the classical left lung
# holds 45 % infection by the true infection mask, the true lung 68 %. So the lungs used for measuring are completed with
# the predicted infection that touches them. Let $L_1, L_2$ be the left and right lung masks and $C_1, \dots, C_n$ the
# 3D connected components of the predicted mask $\hat y$. A component is assigned to the lung $k(C)$ that most of the
# voxels of $C$ touch (lung masks dilated by one voxel, $\oplus B$); components touching no lung are outside the lungs
# (false positives on the chest wall, the mediastinum) and dropped:
#
# $$L'_k = L_k \cup \bigcup_{C:\,k(C) = k} C, \qquad k(C) = \arg\max_{k} |C \cap (L_k \oplus B)| \text{ (if } > 0\text{)},
# \qquad \hat y' = \hat y \cap (L'_1 \cup L'_2). \tag{P3}$$
#
# The written infection mask is $\hat y'$ and the written lung mask $L'$ (1 left, 2 right).

# %%
#| export
def complete_lungs(lung: np.ndarray,       # [Z,Y,X] uint8 {0 bg, 1 left, 2 right}
                   infection: np.ndarray,  # [Z,Y,X] {0,1} predicted infection
                  ) -> tuple:              # (infection in the lungs [Z,Y,X] uint8, completed lungs [Z,Y,X] uint8), Eq. P3
    "Add the infection components that touch a lung to that lung; drop the components that touch none."
    lung = np.asarray(lung, np.uint8); inf = np.asarray(infection) > 0
    if lung.shape != inf.shape: raise ValueError(f"lung shape {lung.shape} does not match infection shape {inf.shape}")
    if not inf.any(): return inf.astype(np.uint8), lung.copy()
    nz = [np.nonzero((inf | (lung > 0)).any(axis=a)) for a in ((1, 2), (0, 2), (0, 1))]  # bounding box of both
    sl = tuple(slice(max(int(i[0].min()) - 1, 0), int(i[0].max()) + 2) for i in nz)
    lab, n = ndi.label(inf[sl])
    touch = np.stack([np.bincount(lab[ndi.binary_dilation(lung[sl] == k)], minlength=n + 1) for k in (1, 2)])  # [2, n+1]
    side = np.where(touch.max(0) > 0, touch.argmax(0) + 1, 0).astype(np.uint8); side[0] = 0
    out_l = lung.copy(); sub = out_l[sl]
    add = side[lab]; sub[(sub == 0) & (add > 0)] = add[(sub == 0) & (add > 0)]
    return (inf & (out_l > 0)).astype(np.uint8), out_l


# %%
_l = np.zeros((1, 4, 9), np.uint8); _l[0, :, :3] = 2; _l[0, :, 6:] = 1
_y = np.zeros_like(_l); _y[0, 1, 2:4] = 1; _y[0, 3, 4:5] = 1   # one blob touching the right lung, one isolated voxel
_yi, _lc = complete_lungs(_l, _y)
test_eq(_lc[0, 1, 3], 2); test_eq(_yi.sum(), 2); test_eq(_lc[0, 3, 4], 0)


# %% [markdown]
# ## Volumes, involvement and the CT-0..4 category
#
# With the voxel volume $v = s_x s_y s_z / 1000$ mL, the lung and infection volumes and the involvement of lung $k$
# (1 left, 2 right) and of both lungs are
#
# $$V_k = v\,|L'_k|, \qquad I_k = v\,|\hat y' \cap L'_k|, \qquad f_k = \frac{I_k}{V_k}, \qquad f = \frac{I_1 + I_2}{V_1 + V_2}. \tag{P4}$$
#
# The severity category is MosMedData's grading of the involved share of the lungs (Morozov et al. 2020; CT-0 no
# signs of pneumonia, CT-1 < 25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 $\ge$ 75 %), the rule `severity_band` the phantom
# uses for its own ground truth:
#
# $$b(f) = \begin{cases} 0 & f = 0 \\ \min\big(4,\; 1 + \lfloor f / 0.25 \rfloor\big) & f > 0. \end{cases} \tag{P5}$$

# %%
#| export
def measure(infection: np.ndarray,  # [Z,Y,X] {0,1} infection
            lung: np.ndarray,       # [Z,Y,X] {0 bg, 1 left, 2 right}
            spacing,                # (sz, sy, sx) mm
           ) -> dict:               # volumes (mL), involvement (%), band 0..4 and category 'CT-k' (Eq. P4-P5)
    "Lung and infection volumes per lung, the involved percentage of each lung and of both, and the CT-0..4 category."
    inf, lung = np.asarray(infection) > 0, np.asarray(lung)
    if inf.shape != lung.shape: raise ValueError(f"infection shape {inf.shape} does not match lung shape {lung.shape}")
    v = float(np.prod(spacing))/1000.
    n = {k: int(np.count_nonzero(lung == k)) for k in (1, 2)}; i = {k: int(np.count_nonzero(inf & (lung == k))) for k in (1, 2)}
    if n[1] + n[2] == 0: raise DataError("no lung voxels to measure")
    pct = lambda a, b: 100.*a/b if b else float('nan')
    f = (i[1] + i[2])/(n[1] + n[2]); band = severity_band(f)
    return dict(lung_left_ml=v*n[1], lung_right_ml=v*n[2], lung_ml=v*(n[1] + n[2]),
                infection_left_ml=v*i[1], infection_right_ml=v*i[2], infection_ml=v*(i[1] + i[2]),
                involvement_left_pct=pct(i[1], n[1]), involvement_right_pct=pct(i[2], n[2]), involvement_pct=100.*f,
                band=band, category=BANDS[band])


# %% [markdown]
# A phantom volume knows its truth: measured on its own label and true lungs, `measure` gives back the involvement the
# phantom recorded.

# %%
from sapl.phantom import phantom_volume
_ph = phantom_volume(3, 64)
_r = measure(_ph['label'], _ph['lung'], _ph['spacing'])
test_close(_r['involvement_pct'], 100*_ph['meta']['involvement'], eps=0.01); test_eq(_r['band'], _ph['meta']['realized_band'])
test_close(_r['involvement_left_pct'], 100*_ph['meta']['involvement_left'], eps=0.01); test_close(_r['lung_ml'], _ph['meta']['lung_ml'], eps=0.1)


# %% [markdown]
# ## One case
#
# `segment` is the model part: crop and resize with the checkpoint's size, margin and window (`preprocess_array` of the
# data module, on lungs computed once), the averaged probabilities (Eq. P2) on every lung slice, back to the original grid
# and threshold (`to_original`); `predict_case` then completes the lungs (Eq. P3). `predict_case` adds reading, lung masks, writing and
# the timing of each stage. A case's files are written atomically (temporary name, then rename); if a case fails part
# way, the files it already wrote in this run are removed, so no case is left half-written.

# %%
#| export
def segment(hu: np.ndarray,      # [Z,Y,X] HU
            spacing, affine,     # (sz, sy, sx) mm; 4x4 affine
            lung: np.ndarray,    # [Z,Y,X] lungs {0,1,2} from `lung_masks`
            preds: list,         # Predictors (several: averaged, Eq. P2)
            batch: int = 16, path: str = '',
           ) -> tuple:           # (network mask [Z,Y,X] uint8 on the original grid, preprocessed Volume)
    "The thresholded average probability (Eq. P2) on the original grid, before the lung completion."
    m = preds[0].meta
    vol, _ = preprocess_array(hu, spacing, affine, int(m['size']), float(m['margin_mm']), lung=lung, hu_window=tuple(m['hu_window']),
                              id=Path(path).name, image_path=str(path))
    prob = predict_volume(lambda x: ensemble_prob(preds, x), vol, batch)
    return to_original(vol, prob, float(m['threshold'])), vol

def overlay_png(hu: np.ndarray, lung: np.ndarray, infection: np.ndarray, path, title: str = '', n: int = 12,
                hu_window=(-1250., 250.)) -> Path:
    "PNG montage of the `n` slices with most infection (or evenly spaced lung slices): infection red, lung outline cyan."
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    per = infection.reshape(len(infection), -1).sum(1)
    zs = np.sort(np.argsort(-per, kind='stable')[:n][per[np.argsort(-per, kind='stable')[:n]] > 0])
    if not len(zs):
        lz = np.nonzero(lung.any(axis=(1, 2)))[0]
        zs = lz[np.linspace(0, len(lz) - 1, min(n, len(lz))).round().astype(int)] if len(lz) else np.array([len(hu)//2])
    cols = min(4, len(zs)); rows = math.ceil(len(zs)/cols)
    fig = Figure(figsize=(3*cols, 3*rows + .4), dpi=80); FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes: ax.axis('off')
    for ax, z in zip(axes, zs):
        ax.imshow(window(hu[z], *hu_window), cmap='gray', vmin=0, vmax=1, interpolation='nearest')
        rgba = np.zeros(infection[z].shape + (4,), np.float32); rgba[infection[z] > 0] = (1, 0, 0, .5)
        ax.imshow(rgba, interpolation='nearest')
        if (lung[z] > 0).any(): ax.contour(lung[z] > 0, levels=[.5], colors='c', linewidths=.6)
        ax.set_title(f'z = {int(z)}', fontsize=8)
    if title: fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, '.png') as tmp: fig.savefig(tmp, format='png')
    return path


# %%
#| export
def _round_row(r: dict) -> dict:
    return {k: (round(v, 2) if isinstance(v, float) and k.endswith('_pct') else round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}

def predict_case(inp: CTInput, preds: list, out_dir, weights=None, overlay: bool = False, batch: int = 16) -> dict:
    "Read, lung-mask, segment, measure and write one case; returns its report row (with the seconds of each stage)."
    out_dir = Path(out_dir); written = []; t = time.perf_counter; t0 = t()
    try:
        hu, spacing, affine = read_ct(inp); t1 = t()
        lung = lung_masks(hu, spacing, affine, weights)
        findings = report_findings(str(inp.path), check_lungs(lung, spacing, hu)); t2 = t()
        y_net, vol = segment(hu, spacing, affine, lung, preds, batch, inp.path)
        y, lung2 = complete_lungs(lung, y_net); t3 = t()
        row = dict(id=inp.id, input=str(inp.path), **measure(y, lung2, spacing), lung_check='; '.join(findings) or 'ok')
        ref = inp.path if inp.kind == 'nifti' else vol   # the NIfTI's own header, or the DICOM geometry (Eq. P1)
        for name, arr, lab in ((f'{inp.id}_infection.nii.gz', y, False), (f'{inp.id}_lungs.nii.gz', lung2, True)):
            written.append(write_nifti(arr, ref, out_dir/name, labels=lab))
        if overlay:
            written.append(overlay_png(hu, lung2, y, out_dir/f'{inp.id}_overlay.png', f"{inp.id}: {row['category']}, "
                                       f"{row['involvement_pct']:.1f} % involved", hu_window=tuple(preds[0].meta['hu_window'])))
        t4 = t()
    except BaseException:
        for p in written: Path(p).unlink(missing_ok=True)
        raise
    row.update(checkpoints=';'.join(p.path for p in preds), config_hashes=';'.join(p.config_hash for p in preds),
               infection_file=str(written[0]), lungs_file=str(written[1]),
               read_s=t1 - t0, lungs_s=t2 - t1, network_s=t3 - t2, write_s=t4 - t3, seconds=t4 - t0)
    return _round_row(row)


# %% [markdown]
# ## Report and command line
#
# `report.csv` has one row per case that succeeded, with `lung_check`: `ok`, or what the plausibility check of the lung
# masks found (`sapl.lungs.check_lungs`: a lung missing or absent on slices between slices that have it, a slice where it
# shrinks, an odd left/right ratio or share of the body; the same text is logged with the file's name), so a severity
# computed on doubtful lungs is marked as such; `report.json` holds the same rows, the failed inputs with their
# error, and the checkpoints with their metadata. Both are written atomically at the end of the run (an existing report
# in the output folder is replaced). A case that fails is reported and skipped; the run continues, lists the failures at
# the end and exits with status 1 (2 when no checkpoint could be loaded, so nothing ran).

# %%
#| export
REPORT_COLUMNS = ('id', 'category', 'involvement_pct', 'involvement_left_pct', 'involvement_right_pct', 'lung_left_ml',
                  'lung_right_ml', 'lung_ml', 'infection_left_ml', 'infection_right_ml', 'infection_ml', 'band', 'lung_check', 'input',
                  'infection_file', 'lungs_file', 'checkpoints', 'config_hashes', 'read_s', 'lungs_s', 'network_s', 'write_s', 'seconds')

def write_report(rows: list, failed: list, preds: list, out_dir) -> tuple:
    "Write report.csv (one row per case) and report.json (rows, failures, checkpoints) atomically; returns both paths."
    import pandas as pd
    out_dir = Path(out_dir)
    df = pd.DataFrame(rows, columns=[c for c in REPORT_COLUMNS if not rows or c in rows[0]])
    with atomic_path(out_dir/'report.csv') as tmp: df.to_csv(tmp, index=False)
    js = dict(cases=rows, failed=[dict(input=p, error=e) for p, e in failed],
              checkpoints=[dict(path=p.path, config_hash=p.config_hash, derived_metadata=p.derived, **{k: v for k, v in p.meta.items() if k != 'config'},
                                config=p.meta['config']) for p in preds])
    with atomic_path(out_dir/'report.json') as tmp: tmp.write_text(json.dumps(js, indent=1, default=str))
    return out_dir/'report.csv', out_dir/'report.json'

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='sapl-predict', description="Infection mask, lung masks, lung involvement and CT-0..4 "
                                 "severity for CT scans, from trained sapl checkpoints.")
    ap.add_argument('inputs', nargs='+', help="NIfTI file(s), DICOM series folder(s), or data folder(s) in a supported layout")
    ap.add_argument('-c', '--checkpoint', nargs='+', action='extend', required=True,
                    help="checkpoint file(s) (best.pt); several are averaged")
    ap.add_argument('-o', '--out', default='predictions', help="output folder (default: predictions)")
    ap.add_argument('--device', default='cpu', help="torch device, e.g. cpu or cuda (default: cpu)")
    ap.add_argument('--overlay', action='store_true', help="also write <id>_overlay.png, a montage of the infected slices")
    ap.add_argument('--lung-weights', default=None, help="lungmask R231 weights file (default: $SAPL_LUNGMASK_WEIGHTS, else the classical lung masks)")
    ap.add_argument('--batch', type=int, default=16, help="slices per network call (default: 16)")
    ap.add_argument('-q', '--quiet', action='store_true', help="no progress bar")
    return ap

def main(argv=None) -> int:
    "The `sapl-predict` command; returns the exit status (0 all cases written, 1 some failed, 2 nothing ran)."
    from tqdm.auto import tqdm
    a = _parser().parse_args(argv)
    try:
        if a.batch < 1: raise PredictError(f"--batch must be >= 1, got {a.batch}")
        preds = load_predictors(a.checkpoint, a.device)
    except PredictError as e:
        print(f"sapl-predict: error: {e}", file=sys.stderr); return 2
    inputs, failed = find_inputs(a.inputs); n_total = len(inputs) + len(failed)
    for p, e in failed: print(f"sapl-predict: skipped: {e}", file=sys.stderr)
    rows = []
    for inp in tqdm(inputs, desc='cases', unit='case', disable=a.quiet):
        try: rows.append(predict_case(inp, preds, a.out, a.lung_weights, a.overlay, a.batch))
        except Exception as e:
            msg = str(e) if str(inp.path) in str(e) else f"{inp.path}: {type(e).__name__}: {e}"
            failed.append((inp.path, msg)); tqdm.write(f"sapl-predict: failed: {msg}", file=sys.stderr)
    csv_path, _ = write_report(rows, failed, preds, a.out)
    for r in rows: print(f"{r['id']}: {r['category']}, {r['involvement_pct']:.1f} % of the lungs involved "
                        f"(left {r['involvement_left_pct']:.1f} %, right {r['involvement_right_pct']:.1f} %)")
    print(f"{len(rows)} of {n_total} cases written to {Path(a.out)} (report: {csv_path})")
    if failed:
        print(f"{len(failed)} failed:", file=sys.stderr)
        for p, e in failed: print(f"  {e}", file=sys.stderr)
        return 1
    return 0

if __name__ == '__main__' and Path(sys.argv[0]).name == 'predict.py': sys.exit(main())


# %% [markdown]
# ## Validation on truth we own
#
# The phantom records each volume's true involvement (of both lungs and of each lung) and its realised CT band
# (`phantom.json`), and writes its true lungs (`*_lung.nii.gz`). `evaluate_severity` runs the whole pipeline of
# `predict_case` (classical lung masks, network, Eq. P2-P5) on the **test** volumes of the checkpoints' own split
# (`make_split` with their `split_seed`; the test volumes are never trained or validated on) and compares:
#
# $$\mathrm{MAE} = \frac{1}{N} \sum_{j=1}^{N} \big|\,100 f_j - 100 f_j^{\star}\big| \text{ percentage points}, \qquad
# \mathrm{acc} = \frac{1}{N} \sum_{j=1}^{N} [\,b(f_j) = b^{\star}_j\,], \tag{P6}$$
#
# per lung ($f_{k,j}$) and for both lungs, with $f^\star, b^\star$ the phantom's record. Two more columns separate the
# sources of error: the predicted infection measured in the **true** lungs (`pred_truelung_pct`, the error of the
# network alone) and the **true** infection measured in our completed lungs (`truelabel_pct`, the error of the lung
# masks alone). Intervals: a $t$ interval for the MAE and a Wilson interval for the accuracy (95 %). The lung masks of
# the test volumes do not depend on the checkpoints; they are cached in the data folder's `.cache/`, so a rerun on other
# checkpoints only runs the networks.

# %%
#| export
def phantom_truth(data_dir) -> dict:
    "{volume id: record} from the phantom's phantom.json (true involvement, per lung, realised band)."
    js = resolve(data_dir)/'phantom.json'
    if not js.exists(): raise DataError(f"{js}: not found; the severity truth comes from a phantom data set's record")
    return {v['id']: v for v in json.loads(js.read_text())['volumes']}

def _group(v) -> list: return [str(v)] if isinstance(v, (str, Path)) else [str(p) for p in v]

def cached_lungs(image, hu, spacing, affine, weights=None, cache_dir=None) -> np.ndarray:
    "`lung_masks` of a NIfTI file, cached in `cache_dir` under a hash of the file (path, size, mtime), the lung method and the code that makes the masks."
    weights = weights or os.environ.get('SAPL_LUNGMASK_WEIGHTS') or None
    if cache_dir is None: return lung_masks(hu, spacing, affine, weights)
    st, w = os.stat(image), (str(Path(weights).resolve()), os.stat(weights).st_mtime_ns) if weights else 'classical-filled'
    key = hashlib.sha1(json.dumps([str(Path(image).resolve()), st.st_size, st.st_mtime_ns, w, preprocess_fingerprint('r231' if weights else 'filled')]).encode()).hexdigest()[:16]
    p = Path(cache_dir)/f'lungs-{_stem(Path(image))}-{key}.npz'
    if p.exists(): return np.load(p)['lung']
    lung = lung_masks(hu, spacing, affine, weights)
    with atomic_path(p) as tmp, open(tmp, 'wb') as f: np.savez_compressed(f, lung=lung)
    return lung

def test_volumes(data_dir, config: dict) -> list:
    "Test volume ids of the run a checkpoint config describes, from the split source its training used (`split_source`)."
    d, ratio = resolve(data_dir), config.get('ratio') or 0.1
    sd = split_source(config.get('dataset', 'phantom'), d, config.get('split_dir'))
    if sd: return list(paper_split(sd, ratio).test)
    return list(make_split(find_cases(d), ratio, config.get('split_seed', 0)).test)

def evaluate_severity(checkpoints: dict,   # {name: checkpoint path, or a list of paths to average}
                      data_dir=None,       # phantom folder (default: the data_dir of the first checkpoint's run)
                      weights=None,        # lungmask weights (default: classical lung masks)
                      progress: bool = True,
                     ) -> 'pd.DataFrame':  # one row per (model, test volume), percentages and bands
    "Involvement and CT band predicted by each model on the test volumes of a phantom, beside the phantom's truth."
    import pandas as pd
    from tqdm.auto import tqdm
    groups = {k: load_predictors(_group(v)) for k, v in checkpoints.items()}
    if not groups: raise PredictError("no checkpoints to evaluate")
    cfgs = [p.meta['config'] for ps in groups.values() for p in ps]
    data_dir = resolve(data_dir or cfgs[0].get('data_dir') or 'data/phantom')
    truth, cases = phantom_truth(data_dir), {c.id: c for c in find_cases(data_dir)}
    tests = {tuple(test_volumes(data_dir, c)) for c in cfgs}   # the test part does not depend on the ratio
    if len(tests) > 1: raise PredictError(f"the checkpoints come from different splits of {data_dir}; their test volumes differ")
    test = list(tests.pop())
    rows = []
    for vid in tqdm(test, desc='severity', disable=not progress):
        c, t = cases[vid], truth[vid]
        hu, sp, aff = load_nifti(c.image)
        lung = cached_lungs(c.image, hu, sp, aff, weights, data_dir/'.cache')   # reruns with other checkpoints reuse them
        lp = Path(c.image.replace('_ct.nii', '_lung.nii'))
        true_lung = load_nifti(lp)[0].astype(np.uint8) if lp.exists() else None
        lab = load_nifti(c.label, kind='mask')[0] if c.label else None
        lab_r = measure(*complete_lungs(lung, lab), sp) if lab is not None else None
        for name, ps in groups.items():
            y, _ = segment(hu, sp, aff, lung, ps, path=c.image)
            r = measure(*complete_lungs(lung, y), sp)
            row = dict(model=name, id=vid, true_pct=100*t['involvement'], true_left_pct=100*t['involvement_left'],
                       true_right_pct=100*t['involvement_right'], true_band=int(t['realized_band']),
                       pred_pct=r['involvement_pct'], pred_left_pct=r['involvement_left_pct'], pred_right_pct=r['involvement_right_pct'],
                       pred_band=r['band'], pred_truelung_pct=measure(y, true_lung, sp)['involvement_pct'] if true_lung is not None else np.nan,
                       truelabel_pct=lab_r['involvement_pct'] if lab_r else np.nan)
            rows.append(row)
    return pd.DataFrame(rows)


# %%
_d = Path(tempfile.mkdtemp()); (_d/'split.json').write_text(json.dumps({'train_l': ['a'], 'train_u': ['b'], 'val': ['c'], 'test': ['e', 'd']}))
test_eq(test_volumes(_d, {'ratio': 0.1}), ['d', 'e'])   # the data set's own split, not a seeded one


# %% [markdown]
# `severity_summary` condenses the rows per model (Eq. P6 with its intervals); `write_severity_report` writes the
# markdown report with the confusion matrices (rows: true band, columns: predicted band) as a seaborn heatmap beside it.

# %%
#| export
def _t_ci(x) -> tuple:
    from sapl.stats import mean_ci
    m, h = mean_ci(x)
    return (m - h, m + h)

def _wilson(k: int, n: int, z: float = 1.959964) -> tuple:
    if n == 0: return (float('nan'), float('nan'))
    p = k/n; d = 1 + z*z/n; c = (p + z*z/(2*n))/d; h = z*math.sqrt(p*(1 - p)/n + z*z/(4*n*n))/d
    return (c - h, c + h)

def severity_summary(df) -> 'pd.DataFrame':
    "Per model: n, MAE of % involvement (both lungs, left, right; Eq. P6) with a 95 % t interval, band accuracy with a Wilson interval."
    import pandas as pd
    out = []
    for name, g in df.groupby('model', sort=False):
        e = (g.pred_pct - g.true_pct).abs(); k = int((g.pred_band == g.true_band).sum()); n = len(g)
        out.append(dict(model=name, n=n, mae=e.mean(), mae_lo=_t_ci(e)[0], mae_hi=_t_ci(e)[1],
                        mae_left=(g.pred_left_pct - g.true_left_pct).abs().mean(), mae_right=(g.pred_right_pct - g.true_right_pct).abs().mean(),
                        bias=(g.pred_pct - g.true_pct).mean(), acc=k/n, acc_lo=_wilson(k, n)[0], acc_hi=_wilson(k, n)[1],
                        mae_truelung=(g.pred_truelung_pct - g.true_pct).abs().mean(), mae_lungs_only=(g.truelabel_pct - g.true_pct).abs().mean()))
    return pd.DataFrame(out)


# %%
import pandas as pd
_df = pd.DataFrame(dict(model=['a']*4, id=list('wxyz'), true_pct=[10., 30., 60., 80.], pred_pct=[12., 24., 61., 80.],
                        true_left_pct=[10.]*4, pred_left_pct=[11.]*4, true_right_pct=[10.]*4, pred_right_pct=[10.]*4,
                        true_band=[1, 2, 3, 4], pred_band=[1, 1, 3, 4], pred_truelung_pct=[10.]*4, truelabel_pct=[10.]*4))
_s = severity_summary(_df).iloc[0]
test_close(_s.mae, 9/4); test_close(_s.acc, .75); test_close(_s.mae_left, 1.); assert _s.acc_lo < .75 < _s.acc_hi


# %%
#| export
def _error_source(b) -> str:
    "One sentence on where the best model's involvement error comes from: the network or the lung masks."
    net, lungs = b.mae_truelung, b.mae_lungs_only
    side = 'under-segments' if b.bias < 0 else 'over-segments'
    if net >= 2*lungs: return (f"Where the error comes from: measured in the phantom's true lungs the MAE is still {net:.2f} points, while the "
                               f"lung masks alone (true infection, pipeline lungs) cost {lungs:.2f}: the network's segmentation limits it "
                               f"(bias {b.bias:+.2f}: it {side}).")
    return (f"Where the error comes from: the lung masks alone (true infection, pipeline lungs) cost {lungs:.2f} points against {net:.2f} "
            f"for the network measured in the true lungs: the lung masks limit it.")

def write_severity_report(df, path, meta: dict|None = None, targets=(3., .85)) -> tuple:
    "Write the severity report (markdown) and its confusion-matrix heatmap (png beside it), atomically."
    import seaborn as sns
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    path = Path(path); png = path.with_suffix('.png'); s = severity_summary(df)
    models = list(s.model)
    fig = Figure(figsize=(3.6*len(models), 3.4), dpi=100); FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(models), squeeze=False)).ravel()
    for ax, name in zip(axes, models):
        g = df[df.model == name]
        cm = np.zeros((5, 5), int)
        for a, b in zip(g.true_band, g.pred_band): cm[int(a), int(b)] += 1
        sns.heatmap(cm, annot=True, fmt='d', cbar=False, cmap='Blues', ax=ax, xticklabels=BANDS, yticklabels=BANDS, square=True)
        ax.set_xlabel('predicted'); ax.set_ylabel('true'); ax.set_title(name, fontsize=10)
    fig.tight_layout()
    with atomic_path(png, '.png') as tmp: fig.savefig(tmp, format='png')
    f = lambda x: f'{x:.2f}'
    L = ["# Lung involvement and CT-0..4 severity from predicted masks", ""]
    for k, v in (meta or {}).items(): L.append(f"- **{k}**: {v}")
    L += ["", "Involvement errors in percentage points of lung volume (Eq. P6; 95 % t interval); band accuracy with a 95 % Wilson "
          "interval. *True lungs*: predicted infection measured in the phantom's true lungs (network error alone). "
          "*Lung masks only*: the true infection measured in the pipeline's lungs (lung-mask error alone).", "",
          "| model | n | MAE both lungs [95 % CI] | MAE left | MAE right | bias | band accuracy [95 % CI] | MAE, true lungs | MAE, lung masks only |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in s.itertuples():
        L.append(f"| {r.model} | {r.n} | {f(r.mae)} [{f(r.mae_lo)}, {f(r.mae_hi)}] | {f(r.mae_left)} | {f(r.mae_right)} | {r.bias:+.2f} | "
                 f"{100*r.acc:.1f} % [{100*r.acc_lo:.1f}, {100*r.acc_hi:.1f}] | {f(r.mae_truelung)} | {f(r.mae_lungs_only)} |")
    b = s.sort_values(['mae', 'acc'], ascending=[True, False]).iloc[0]
    ok = b.mae <= targets[0] and b.acc >= targets[1]
    L += ["", f"Best model by MAE: **{b.model}**, MAE {f(b.mae)} points, band accuracy {100*b.acc:.1f} % "
          f"(targets: MAE <= {targets[0]:g} points, accuracy >= {100*targets[1]:g} %): **{'met' if ok else 'not met'}**.", "",
          _error_source(b), "", f"![confusion matrices]({png.name})", "", "## Per volume", "",
          "| model | volume | true % | predicted % | true lungs % | lung masks only % | true band | predicted band |", "|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        L.append(f"| {r.model} | {r.id} | {f(r.true_pct)} | {f(r.pred_pct)} | {f(r.pred_truelung_pct)} | {f(r.truelabel_pct)} | "
                 f"{BANDS[int(r.true_band)]} | {BANDS[int(r.pred_band)]} |")
    with atomic_path(path) as tmp: tmp.write_text("\n".join(L) + "\n")
    return path, png


# %% [markdown]
# ## Run: the command on a phantom volume, the severity report, the speed benchmark
#
# Parameters (papermill). `checkpoints` names the models to evaluate as `name=path` pairs separated by `;` (join the
# paths of an averaged group with `+`); left empty, the quick-profile runs of `methods` under `out_dir` are used, and
# those listed in `train_missing` are trained first when their checkpoint is missing. To regenerate
# `reports/severity.md` with other checkpoints:
#
# ```bash
# .venv/bin/papermill nbs/08_predict.ipynb reports/runs/08_predict.ipynb \
#     -p checkpoints "Baseline=runs/phantom/quick/r0.1/s0/baseline/last.pt;SA-CPS=runs/phantom/quick/r0.1/s0/sacps/last.pt"
# ```

# %% tags=["parameters"]
checkpoints = ''                  # 'name=path[+path...];name=path' ('' : the runs of `methods` below)
methods = 'baseline,full,sacps'   # default models: quick-profile runs under out_dir (skipped when missing and not trained here)
train_missing = 'baseline,full'   # default runs trained here when their checkpoint is missing (~1-2 min each on 2 cores)
data_dir = 'data/phantom'         # phantom with phantom.json (truth) and *_lung.nii.gz
ratio = 0.1
profile = 'quick'
seed = 0
out_dir = 'runs'
report_dir = 'reports'
device = 'cpu'
bench = True                      # time one 512 x 512 x 300 CT (a few minutes on a busy 2-core machine)
bench_shape = '300,512,512'       # (z, y, x) of the benchmark CT
bench_threads = 2

# %%
import os, tempfile, shutil
from dataclasses import replace
from sapl.train import VARIANTS, run, git_sha
import sapl.sacps, sapl.sast, sapl.baselines   # register every method's variants

IN_TEST = bool(os.environ.get('IN_TEST'))
cfg = RunConfig(method='baseline', data_dir=data_dir, ratio=ratio, profile=profile, seed=seed, out_dir=out_dir, device=device)
if IN_TEST:  # tiny smoke configuration when the notebook runs as a test
    report_dir = tempfile.mkdtemp(); cfg = cfg.smoke(out_dir=report_dir); data_dir = cfg.data_dir
    checkpoints, methods, train_missing, bench_shape = '', 'baseline', 'baseline', '24,96,96'
NAMES = {'baseline': 'Baseline', 'full': 'Full Supervision', 'sacps': 'SA-CPS', 'cps': 'CPS'}
if checkpoints:
    models = {k.strip(): [resolve(p.strip()) for p in v.split('+')] for k, v in (x.split('=', 1) for x in checkpoints.split(';') if x.strip())}
else:
    models = {}
    for m in [m.strip() for m in methods.split(',') if m.strip()]:
        c = cfg.variant(m)
        if not c.checkpoint_path.exists() and m in train_missing.split(','):
            print(f"{m}: no checkpoint in {c.run_dir}: training it ...", flush=True); run(c, progress=False)
        if c.checkpoint_path.exists(): models[NAMES.get(m, m)] = [c.checkpoint_path]   # the checkpoint the tables evaluate (`select`)
        else: print(f"{m}: no checkpoint in {c.run_dir}; not evaluated")
models

# %% [markdown]
# The command on one test volume of the phantom, with the overlay montage:

# %%
_first = next(iter(models.values()))
_test = test_volumes(data_dir, load_predictor(_first[0]).meta['config'])
_img = str(resolve(data_dir)/f'{_test[0]}_ct.nii.gz')
_out = Path(tempfile.mkdtemp())
rc = main([_img, '--checkpoint', *map(str, _first), '--out', str(_out), '--overlay', '--quiet'])
test_eq(rc, 0)
print(sorted(p.name for p in _out.iterdir()))
pd.read_csv(_out/'report.csv').T

# %%
from IPython.display import Image, display
display(Image(filename=str(_out/f'{_test[0]}_overlay.png'), width=700))

# %% [markdown]
# The severity report on the test volumes:

# %%
sev = evaluate_severity({k: list(map(str, v)) for k, v in models.items()}, data_dir)
_meta = {'checkpoints': '; '.join(f"{k}: `{', '.join(os.path.relpath(p, resolve('.')) for p in v)}` (config {load_predictor(v[0]).config_hash})" for k, v in models.items()),
         'data': f"`{os.path.relpath(resolve(data_dir), resolve('.'))}`, the {sev.id.nunique()} test volumes of the runs' split",
         'profile': f"{load_predictor(_first[0]).meta['profile']} ({load_predictor(_first[0]).meta['size']} px)",
         'lung masks': 'lungmask R231' if os.environ.get('SAPL_LUNGMASK_WEIGHTS') else 'classical fallback (no lungmask weights), completed with the predicted infection (Eq. P3)',
         'git': git_sha(),
         'regenerate': '`.venv/bin/papermill nbs/08_predict.ipynb reports/runs/08_predict.ipynb -p checkpoints "Name=path/last.pt;Other=path/last.pt"`'}
md, png = write_severity_report(sev, resolve(report_dir)/'severity.md', _meta)
print(md.read_text()[:3000])
severity_summary(sev).round(2)

# %%
display(Image(filename=str(png)))

# %% [markdown]
# ## Speed
#
# Seconds per volume for a $512 \times 512 \times 300$ CT on the CPU with `bench_threads` torch threads (quick profile,
# first checkpoint), split into reading (NIfTI decompression and checks), lung masks, network (crop, resize, the U-Net on
# every lung slice, back to the original grid, lung completion) and writing (two compressed NIfTI files): the stages of
# `predict_case`, called one by one so that each gets its wall-clock and its CPU time (all threads of this process). The
# CT is a phantom test volume resampled to that matrix. On a shared machine the wall-clock time depends on the other
# jobs; the CPU time does not. A measurement, not a timed test.

# %%
if bench:
    import torch, nibabel as nib
    _shape = tuple(int(s) for s in bench_shape.split(','))
    _hu, _sp, _aff = load_nifti(_img)
    _zoom = np.array(_shape)/np.array(_hu.shape)
    _a2 = _aff.copy(); _a2[:3, :3] = _aff[:3, :3] @ np.diag(1/_zoom[::-1])
    _bd = Path(tempfile.mkdtemp())
    nib.save(nib.Nifti1Image(ndi.zoom(_hu, _zoom, order=1).astype(np.int16).transpose(2, 1, 0), _a2), str(_bd/'bench_ct.nii.gz'))
    _in, _ps = CTInput('bench', str(_bd/'bench_ct.nii.gz'), 'nifti'), load_predictors(list(map(str, _first)))
    def _timed(f):
        w, c = time.perf_counter(), time.process_time(); r = f(); return r, time.perf_counter() - w, time.process_time() - c
    _threads = torch.get_num_threads(); torch.set_num_threads(bench_threads); _load0 = os.getloadavg()[0]
    try:
        (_h, _s, _a), *t_read = _timed(lambda: read_ct(_in))
        _l, *t_lung = _timed(lambda: lung_masks(_h, _s, _a))
        (_y, _l2), *t_net = _timed(lambda: complete_lungs(_l, segment(_h, _s, _a, _l, _ps, path=_in.path)[0]))
        _, *t_write = _timed(lambda: [write_nifti(_y, _in.path, _bd/'bench_infection.nii.gz'), write_nifti(_l2, _in.path, _bd/'bench_lungs.nii.gz', labels=True)])
    finally: torch.set_num_threads(_threads)
    speed = pd.DataFrame([t_read, t_lung, t_net, t_write], index=['reading', 'lung masks', 'network', 'writing'], columns=['wall s', 'CPU s'])
    speed.loc['total'] = speed.sum()
    print(f"CT {_h.shape} (z, y, x) = {_h.size/1e6:.0f} M voxels, {bench_threads} torch threads, "
          f"load average {_load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {measure(_y, _l2, _s)['category']}")
    print(speed.round(1).to_string())
    _hdr = (f"# Prediction speed: one {' x '.join(map(str, _shape[::-1]))} CT (x, y, z)\n\n- CT: {_h.size/1e6:.0f} M voxels, a phantom test volume "
            f"resampled; first checkpoint `{os.path.relpath(_first[0], resolve('.'))}` ({_ps[0].meta['profile']} profile)\n"
            f"- machine: {os.cpu_count()} CPUs, {bench_threads} torch threads, load average {_load0:.1f} -> {os.getloadavg()[0]:.1f} "
            f"(wall-clock time grows with other jobs, CPU time does not)\n- git: {git_sha()}\n\n")
    with atomic_path(resolve(report_dir)/'predict_speed.md') as tmp: tmp.write_text(_hdr + "| stage | wall s | CPU s |\n|---|---|---|\n" + "".join(f"| {k} | {r['wall s']:.1f} | {r['CPU s']:.1f} |\n" for k, r in speed.iterrows()))
    shutil.rmtree(_bd, ignore_errors=True)
