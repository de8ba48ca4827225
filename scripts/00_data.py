# %% [markdown]
# # Data
#
# > CT volumes in, 2D lung-cropped slices out: readers for the published layouts, the paper's splits,
# > windowing, lung masks, caching and seeded augmentation.

# %%
#| default_exp data

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import tempfile

# %%
#| export
from __future__ import annotations
import os, sys, re, json, hashlib, logging, math, random, functools
from dataclasses import dataclass, field, asdict, replace
from contextlib import contextmanager
from pathlib import Path
import numpy as np
import nibabel as nib
from scipy import ndimage as ndi
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

class _RouteOnce(logging.Filter):
    "Lines that name a route taken per volume (which lung masks) pass once per process, not once per volume."
    prefixes = ('lung masks:',)
    def __init__(self): super().__init__(); self.seen = set()
    def filter(self, r: logging.LogRecord) -> bool:
        m = r.getMessage()
        if not m.startswith(self.prefixes): return True
        if m in self.seen: return False
        self.seen.add(m); return True

log = logging.getLogger('sapl')
if not log.handlers:
    _h = logging.StreamHandler(sys.__stderr__ or sys.stderr); _h.setFormatter(logging.Formatter('[sapl] %(message)s'))
    log.addHandler(_h); log.setLevel(logging.INFO)
if not any(type(f).__name__ == '_RouteOnce' for f in log.filters): log.addFilter(_RouteOnce())

# %%
_f = _RouteOnce()
_r = lambda m: logging.LogRecord('sapl', logging.INFO, '', 0, m, None, None)
test_eq([_f.filter(_r(m)) for m in ('lung masks: test route', 'lung masks: test route', 'epoch 1')], [True, False, True])


# %% [markdown]
# Relative paths (data folders, run folders, reports) are taken from the project root — the folder holding
# `settings.ini` — when the working directory is inside the project (notebooks run from `nbs/`), else from the
# working directory.

# %%
#| export
def project_root() -> Path:
    "The nearest folder at or above the working directory that holds settings.ini (else the working directory)."
    cwd = Path.cwd()
    return next((p for p in (cwd, *cwd.parents) if (p/'settings.ini').exists() and (p/'sapl').is_dir()), cwd)

def resolve(p) -> Path:
    "`p` as an absolute path, relative paths taken from `project_root()`."
    p = Path(p).expanduser()
    return p if p.is_absolute() else project_root()/p


# %%
test_eq(resolve('/x/y'), Path('/x/y')); assert resolve('data').is_absolute()


# %% [markdown]
# ## Profiles
#
# A *profile* fixes everything that depends on the compute at hand. `paper` is the paper's setting
# (§IV-A4: 512 × 512 slices, U-Net widths 16-32-64-128-256, batch 8 labeled + 8 unlabeled, 20 epochs).
# `quick` is a CPU profile that trains in minutes at 64 × 64; `smoke` is for the notebook tests.
# With `iters_per_epoch` set, every method gets the same number of gradient steps per epoch, whatever
# the size of its labeled set — a fair budget for the comparison tables.

# %%
#| export
@dataclass(frozen=True)
class Profile:
    name: str
    size: int                 # slice side after lung crop + resize (px)
    widths: tuple             # U-Net channel widths, one per level
    batch: int                # B labeled (+ B unlabeled) slices per iteration
    epochs: int
    iters_per_epoch: int|None # None: one pass over the primary data set
    phantom_volumes: int      # size of the default phantom for this profile
    phantom_matrix: int       # in-plane matrix of the phantom volumes

PROFILES = {
    'smoke': Profile('smoke', 32, (4, 8, 16), 4, 2, 3, 8, 64),
    'quick': Profile('quick', 64, (8, 16, 32, 64), 8, 30, 50, 249, 384),
    'paper': Profile('paper', 512, (16, 32, 64, 128, 256), 8, 20, None, 249, 384),
}

def get_profile(name: str) -> Profile:
    "Look up a profile by name, with a clear error for unknown names."
    if name not in PROFILES: raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]


# %%
test_eq(get_profile('quick').size, 64)
test_fail(lambda: get_profile('huge'), contains='unknown profile')


# %% [markdown]
# ## Reading NIfTI
#
# Arrays are handled in **(z, y, x)** index order — the order SimpleITK returns and the paper's slice
# names use (`{volumeID}_{zzzz}.png`, `zzzz` along the first axis). nibabel stores (x, y, z), so we
# transpose. Spacing comes from the header, in the same (z, y, x) order. Every problem with a file
# raises one `DataError` naming the file and the problem.

# %%
#| export
class DataError(ValueError):
    "A problem with an input file or folder; the message names the file and the problem."

def load_nifti(path, kind: str = 'image') -> tuple:
    "Read a 3D NIfTI as ((z,y,x) float32 array, (sz,sy,sx) spacing mm, 4x4 affine). `kind`: 'image' or 'mask'."
    path = Path(path)
    if not path.exists(): raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
    except Exception as e:
        raise DataError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from None
    while arr.ndim > 3 and arr.shape[-1] == 1: arr = arr[..., 0]
    if arr.ndim != 3: raise DataError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr.transpose(2, 1, 0)).astype(np.float32)
    bad = ~np.isfinite(arr)
    if bad.any(): raise DataError(f"{path}: {int(bad.sum())} NaN/inf voxels")
    if kind == 'mask':
        vals = np.unique(arr)
        if not np.isin(vals, (0, 1)).all():
            bad = ', '.join(f'{x:g}' for x in vals[~np.isin(vals, (0, 1))][:5])
            raise DataError(f"{path}: mask values outside {{0, 1}}: [{bad}]")
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3][::-1])
    if min(spacing) <= 0: raise DataError(f"{path}: non-positive voxel spacing {spacing}")
    return arr, spacing, np.asarray(img.affine, dtype=np.float64)

def check_pair(img_path, shape, affine, msk_path, mshape, maffine, atol: float = 1e-3):
    "Raise `DataError` if an image and its mask disagree in shape or affine."
    if tuple(shape) != tuple(mshape):
        raise DataError(f"{msk_path}: shape {tuple(mshape)} does not match image {img_path} shape {tuple(shape)}")
    if not np.allclose(affine, maffine, atol=atol):
        raise DataError(f"{msk_path}: affine does not match image {img_path}")


# %%
#| hide
def _write(path, arr_zyx, spacing=(2., .8, .8), dtype=np.int16, affine=None):
    aff = np.diag([-spacing[2], -spacing[1], spacing[0], 1.]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(arr_zyx).transpose(2, 1, 0).astype(dtype), aff), str(path))


# %%
with tempfile.TemporaryDirectory() as d:
    _write(f'{d}/a.nii.gz', np.zeros((3, 4, 5)), spacing=(2.5, .7, .7))
    a, sp, aff = load_nifti(f'{d}/a.nii.gz'); test_eq(a.shape, (3, 4, 5)); test_close(sp, (2.5, .7, .7))
    open(f'{d}/b.nii.gz', 'wb').write(open(f'{d}/a.nii.gz', 'rb').read()[:40])
    test_fail(lambda: load_nifti(f'{d}/b.nii.gz'), contains='b.nii.gz: cannot read NIfTI')


# %% [markdown]
# ## Layouts
#
# Three published layouts are recognised automatically:
#
# | layout | images | labels |
# |---|---|---|
# | `covid19-20` (COVID-19-20 challenge, and the phantom) | `*_ct.nii.gz` (any sub-folder) | `*_seg.nii.gz` beside it |
# | `mosmed` (MosMedData COVID19_1110) | `studies/CT-k/study_NNNN.nii.gz` | `masks/study_NNNN_mask.nii.gz` (most studies have none) |
# | `nnunet` (nnU-Net raw) | `imagesTr/*_0000.nii.gz`, `imagesTs/*_0000.nii.gz` | `labelsTr/<case>.nii.gz` |

# %%
#| export
@dataclass(frozen=True)
class Case:
    id: str
    image: str
    label: str|None = None
    group: str|None = None   # e.g. MosMedData severity folder CT-0..CT-4

LAYOUTS = ('covid19-20', 'mosmed', 'nnunet')

def detect_layout(root) -> str:
    "Name of the layout of the folder `root`."
    root = Path(root)
    if not root.is_dir(): raise DataError(f"{root}: data folder not found")
    if (root/'studies').is_dir() and any((root/'studies').glob('CT-*/study_*.nii*')): return 'mosmed'
    if (root/'imagesTr').is_dir() and any((root/'imagesTr').glob('*_0000.nii*')): return 'nnunet'
    if any(root.rglob('*_ct.nii*')): return 'covid19-20'
    raise DataError(f"{root}: unknown layout; expected COVID-19-20 (*_ct.nii.gz + *_seg.nii.gz), "
                    "MosMedData (studies/CT-k/study_NNNN.nii.gz + masks/) or nnU-Net raw (imagesTr/*_0000.nii.gz + labelsTr/)")

def find_cases(root, layout: str|None = None) -> list:
    "All cases of a data folder, sorted by id; `layout` is detected when not given."
    root = Path(root); layout = layout or detect_layout(root)
    def opt(p): return str(p) if p.exists() else None
    if layout == 'covid19-20':
        out = [Case(p.name.split('_ct.nii')[0], str(p), opt(p.with_name(p.name.replace('_ct.nii', '_seg.nii'))))
               for p in root.rglob('*_ct.nii*')]
    elif layout == 'mosmed':
        out = [Case(p.name.split('.nii')[0], str(p), opt(root/'masks'/(p.name.split('.nii')[0] + '_mask.nii.gz')), p.parent.name)
               for p in (root/'studies').glob('CT-*/study_*.nii*')]
    elif layout == 'nnunet':
        out = []
        for sub in ('imagesTr', 'imagesTs'):
            for p in (root/sub).glob('*_0000.nii*'):
                cid = p.name.split('_0000.nii')[0]
                out.append(Case(cid, str(p), opt(root/'labelsTr'/(cid + '.nii.gz')) if sub == 'imagesTr' else None))
    else: raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if not out: raise DataError(f"{root}: no volumes found for layout {layout}")
    ids = [c.id for c in out]
    if len(set(ids)) != len(ids): raise DataError(f"{root}: duplicate case ids {sorted({i for i in ids if ids.count(i) > 1})[:3]}")
    return sorted(out, key=lambda c: c.id)


# %%
with tempfile.TemporaryDirectory() as d:
    os.makedirs(f'{d}/studies/CT-1'); os.makedirs(f'{d}/masks')
    for i in (1, 2): _write(f'{d}/studies/CT-1/study_000{i}.nii.gz', np.zeros((2, 4, 4)))
    _write(f'{d}/masks/study_0001_mask.nii.gz', np.zeros((2, 4, 4)), dtype=np.uint8)
    cs = find_cases(d); test_eq(detect_layout(d), 'mosmed')
    test_eq([(c.id, c.label is not None, c.group) for c in cs], [('study_0001', True, 'CT-1'), ('study_0002', False, 'CT-1')])


# %% [markdown]
# ## Splits
#
# Splits are made at the **volume** level (slices of one patient never straddle train and test).
# `make_split` shuffles the labeled cases with a seeded generator into train / val / test and takes
# the first ⌈ratio · N_train⌉ training volumes of a second seeded permutation as labeled, so labeled sets
# are nested across ratios (0.1 ⊂ 0.2 ⊂ 0.3), as in the paper's published lists. Cases without a label
# file (most of MosMedData) can only be unlabeled training data.
#
# `read_split_list` reads the published lists (one sheet, column `FILENAME`, slices named
# `{volumeID}_{zzzz}.png`) into {volume id: slice indices}.

# %%
#| export
@dataclass(frozen=True)
class Split:
    train_l: tuple; train_u: tuple; val: tuple; test: tuple
    slices: dict = field(default_factory=dict, compare=False)  # optional {volume id: allowed slice indices}

def make_split(cases, ratio: float, seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.2) -> Split:
    "Seeded volume-level split of `cases` (Case list or ids with labels) into labeled/unlabeled/val/test."
    if not 0 < ratio <= 1: raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"bad val_frac/test_frac: {val_frac}, {test_frac}")
    lab = sorted(c.id for c in cases if c.label); unl = sorted(c.id for c in cases if not c.label)
    if len(lab) < 3: raise DataError(f"need at least 3 labeled volumes to split, found {len(lab)}")
    rng = np.random.default_rng([seed, 1])
    perm = [lab[i] for i in rng.permutation(len(lab))]
    n_test = max(1, round(test_frac*len(lab))) if test_frac > 0 else 0
    n_val = max(1, round(val_frac*len(lab))) if val_frac > 0 else 0
    test, val, train = perm[:n_test], perm[n_test:n_test+n_val], perm[n_test+n_val:]
    train = [train[i] for i in np.random.default_rng([seed, 2]).permutation(len(train))]
    n_l = max(1, math.ceil(round(ratio*len(train), 6)))
    return Split(tuple(sorted(train[:n_l])), tuple(sorted(train[n_l:] + unl)), tuple(sorted(val)), tuple(sorted(test)))

COVID249 = dict(n_val=19, n_test=50, labeled={'0.1': 18, '0.2': 36, '0.3': 54})  # the paper's COVID249 lists: 180 train

def covid249_shape(n: int) -> dict:
    "Split sizes with the COVID249 proportions for n volumes (exactly the paper's for n = 249)."
    n_test, n_val = max(1, round(50*n/249)), max(1, round(19*n/249))
    n_train = n - n_test - n_val
    if n_train < 1: raise ValueError(f"{n} volumes are too few for a train/val/test split")
    return dict(n_val=n_val, n_test=n_test, labeled={r: max(1, round(float(r)*n_train)) for r in ('0.1', '0.2', '0.3')})

def protocol_split(ids, seed: int = 0, n_val: int = COVID249['n_val'], n_test: int = COVID249['n_test'],
                   labeled: dict = COVID249['labeled']) -> dict:
    "Seeded volume-level split of `ids` in the shape of the paper's lists: test, val, train and nested labeled subsets ({ratio: n})."
    ids = sorted(ids)
    n_train = len(ids) - n_val - n_test
    if n_train < max(labeled.values()): raise ValueError(f"{len(ids)} volumes cannot hold {n_test} test + {n_val} val + {max(labeled.values())} labeled")
    perm = [ids[i] for i in np.random.default_rng([seed, 1]).permutation(len(ids))]
    test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    order = [train[i] for i in np.random.default_rng([seed, 2]).permutation(len(train))]  # a prefix of it is labeled: nested
    return {'protocol': f'{len(ids)} volumes: {n_train} train, {n_val} val, {n_test} test', 'seed': seed, 'train': sorted(train),
            'labeled': {f'{float(r):g}': sorted(order[:n]) for r, n in labeled.items()}, 'val': sorted(val), 'test': sorted(test),
            'order': order}

def _json_split(js: dict, ratio: float, path) -> Split:
    "A Split from a split.json: fixed parts (train_l/train_u/val/test) or a protocol split with labeled subsets per ratio."
    if 'labeled' not in js: return Split(*(tuple(sorted(js[k])) for k in ('train_l', 'train_u', 'val', 'test')))
    if ratio >= 1: lab = list(js['train'])
    elif f'{ratio:g}' in js['labeled']: lab = js['labeled'][f'{ratio:g}']
    elif 'order' in js: lab = js['order'][:max(1, round(ratio*len(js['train'])))]  # other ratios: a prefix of the same order, nested
    else: raise DataError(f"{path}: no labeled list for ratio {ratio:g}; it has {sorted(js['labeled'])} (and 1 = all training volumes)")
    return Split(tuple(sorted(lab)), tuple(sorted(set(js['train']) - set(lab))), tuple(sorted(js['val'])), tuple(sorted(js['test'])))

_SLICE = re.compile(r'^(?P<vol>.+)_(?P<z>\d{4})\.png$')

def read_split_list(path) -> dict:
    "Read a published split list (xlsx, column FILENAME) into {volume id: sorted slice indices} (empty for volume lists)."
    import pandas as pd
    path = Path(path)
    if not path.exists(): raise DataError(f"{path}: split list not found")
    try: df = pd.read_excel(path)
    except Exception as e: raise DataError(f"{path}: cannot read split list ({type(e).__name__}: {e})") from None
    if 'FILENAME' not in df.columns: raise DataError(f"{path}: no FILENAME column (columns: {list(df.columns)})")
    out: dict = {}
    for name in df['FILENAME'].astype(str):
        m = _SLICE.match(name)
        if m: out.setdefault(m['vol'], []).append(int(m['z']))
        else: out.setdefault(name, [])
    return {k: sorted(v) for k, v in out.items()}

def paper_split(split_dir, ratio: float = 0.1) -> Split:
    "The paper's published split from `split_dir` (COVID249 or MOS1000 folder of xlsx lists), or a `split.json` of volume ids."
    d = Path(split_dir)
    if d.suffix == '.json' or (d/'split.json').exists():
        f = d if d.suffix == '.json' else d/'split.json'
        return _json_split(json.loads(f.read_text()), ratio, f)
    if (d/f'train_{ratio}_l.xlsx').exists(): tl, tu = read_split_list(d/f'train_{ratio}_l.xlsx'), read_split_list(d/f'train_{ratio}_u.xlsx')
    elif (d/'train_slice_label.xlsx').exists(): tl, tu = read_split_list(d/'train_slice_label.xlsx'), read_split_list(d/'train_slice_unlabel.xlsx')
    else: raise DataError(f"{d}: no train_{ratio}_l.xlsx or train_slice_label.xlsx")
    val = read_split_list(d/'val_volume.xlsx'); test = read_split_list(d/'test_volume.xlsx')
    slices = {k: v for k, v in {**tl, **tu}.items() if v}
    return Split(tuple(sorted(tl)), tuple(sorted(tu)), tuple(sorted(val)), tuple(sorted(test)), slices)


# %%
_cs = [Case(f'v{i:02d}', 'x', 'y') for i in range(20)]
_s1, _s2 = make_split(_cs, .1), make_split(_cs, .3)
test_eq(len(_s1.test) + len(_s1.val) + len(_s1.train_l) + len(_s1.train_u), 20)
assert set(_s1.train_l) <= set(_s2.train_l) and not set(_s1.test) & set(_s1.train_u)

# %% [markdown]
# `protocol_split` makes a split in the shape of the paper's COVID249 lists (`shared/splits/sassl/COVID249`): of 249
# volumes, 50 test, 19 validation and 180 training volumes, of which nested prefixes of one seeded permutation are labeled
# (18 / 36 / 54 volumes at 10 / 20 / 30 %). Written as `split.json` beside the data, `paper_split` reads it exactly like the
# published lists (ratio 1 = every training volume labeled, for Full Supervision).

# %%
_js = protocol_split([f'v{i:03d}' for i in range(249)], seed=0)
test_eq([len(_js[k]) for k in ('train', 'val', 'test')], [180, 19, 50]); test_eq({k: len(v) for k, v in _js['labeled'].items()}, {'0.1': 18, '0.2': 36, '0.3': 54})
with tempfile.TemporaryDirectory() as d:
    Path(d, 'split.json').write_text(json.dumps(_js)); _s1, _s3, _sf = (paper_split(d, r) for r in (.1, .3, 1))
    assert set(_s1.train_l) < set(_s3.train_l) and len(_s1.train_u) == 162 and len(_sf.train_l) == 180 and not set(_s1.test) & set(_s1.train_u)
    test_eq(len(paper_split(d, .25).train_l), 45); assert set(_s1.train_l) < set(paper_split(d, .25).train_l)
    del _js['order']; Path(d, 'split.json').write_text(json.dumps(_js)); test_fail(lambda: paper_split(d, .25), contains='no labeled list for ratio 0.25')
test_eq(covid249_shape(249), COVID249); test_eq(covid249_shape(8), dict(n_val=1, n_test=2, labeled={'0.1': 1, '0.2': 1, '0.3': 2}))

# %% [markdown]
# ## Intensity window (§IV-A3)
#
# $$\tilde{x} = \frac{\min(\max(h, h_{lo}), h_{hi}) - h_{lo}}{h_{hi} - h_{lo}}, \qquad h_{lo} = -1250,\; h_{hi} = 250$$
#
# where $h$ is a voxel in Hounsfield units and $\tilde{x} \in [0, 1]$ (the paper scales to [0, 255]; we keep
# [0, 1] floats, the same up to a constant).

# %%
#| export
HU_WINDOW = (-1250., 250.)

def window(hu: np.ndarray, lo: float = HU_WINDOW[0], hi: float = HU_WINDOW[1]) -> np.ndarray:
    "Clip HU to [lo, hi] and scale to [0, 1]."
    return ((np.clip(hu, lo, hi) - lo)/(hi - lo)).astype(np.float32)


# %%
test_close(window(np.array([-2000., -1250, -500, 250, 900])), [0, 0, .5, 1, 1])

# %% [markdown]
# ## Lung masks
#
# The paper segments the lungs with the pretrained R231 model of `lungmask` (Hofmanninger et al., ref. 45).
# `lungmask` downloads its weights at run time, which fails offline, so the model is used only when a local
# weights file is given (`weights=` or the environment variable `SAPL_LUNGMASK_WEIGHTS`; the file is
# `unet_r231-d5d2fc3d.pth` from the lungmask releases). Otherwise a classical fallback runs. The default,
# `fallback='filled'`, puts dense disease back into the lungs and keeps every sizeable piece of a lung (its own
# notebook, `00b_lungs`); `fallback='threshold'` is the original one, described here, which the committed phantom
# benchmark was made with (`BENCHMARK_LUNGS`). The **threshold fallback**:
#
# 1. work in the LPS frame (x toward the patient's left, y toward posterior), reoriented from the affine;
# 2. body = largest 3D component of $h > -500$ HU, holes filled slice by slice;
# 3. lung candidates = $h < -400$ HU inside the body (drops the outside air);
# 4. airways (`_airways`): voxels whose 1 mm-smoothed value is below −950 HU (pure air; lung parenchyma sits near −850 HU)
#    in the component touching the top slice's centre are removed — trachea and main bronchi;
# 5. the two largest 3D components are the lungs (if one component holds both, it is split at the body's
#    mid-sagittal plane); the one lying toward the patient's left is label 1;
# 6. each lung is closed with a 7 mm disc and its holes filled slice by slice, so vessels and dense
#    consolidation enclosed by the lung are included.
#
# Thin volumes (a few slices) work because every 3D operation also works on a slab. The function logs
# which method ran. Dense consolidation touching the chest wall is not enclosed by aerated lung, so step 6 does not
# fill it back, and step 5 drops any third piece of a lung cut apart by a dense band: `00b_lungs` measures both. Output: 0 background, 1 left lung, 2 right lung.

# %%
#| export
FALLBACKS = ('filled', 'threshold')

def _to_lps(arr_zyx, affine):
    "Reorient a (z,y,x) array to LPS; returns (array, inverse function)."
    if affine is None: return arr_zyx, (lambda a: a)
    src = nib.orientations.io_orientation(affine)
    tgt = nib.orientations.axcodes2ornt(('L', 'P', 'S'))
    fwd = nib.orientations.ornt_transform(src, tgt); inv = nib.orientations.ornt_transform(tgt, src)
    conv = lambda a, t: nib.orientations.apply_orientation(a.transpose(2, 1, 0), t).transpose(2, 1, 0)
    return np.ascontiguousarray(conv(arr_zyx, fwd)), (lambda a: np.ascontiguousarray(conv(a, inv)))

def _close2d(m, r_mm: float, sy: float, sx: float):
    "Slice-wise closing with a disc of radius r_mm, via 2D Euclidean distance transforms on the mask's bounding box, slices with mask only."
    if not m.any(): return m.copy()
    pad = int(np.ceil(r_mm/min(sy, sx))) + 2
    ys, xs = np.nonzero(m.any(0))
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    out, (Y, X) = m.copy(), m.shape[1:]
    cy0, cx0 = y0 - pad, x0 - pad
    ty0, tx0 = max(cy0, 0), max(cx0, 0); ty1, tx1 = min(y1 + pad, Y), min(x1 + pad, X)
    for z in np.nonzero(m.any((1, 2)))[0]:   # an empty slice stays empty
        sub = np.pad(m[z, y0:y1, x0:x1], pad)
        dil = ndi.distance_transform_edt(~sub, sampling=(sy, sx)) <= r_mm
        closed = ndi.distance_transform_edt(dil, sampling=(sy, sx)) > r_mm
        out[z, ty0:ty1, tx0:tx1] |= closed[ty0-cy0:ty1-cy0, tx0-cx0:tx1-cx0]
    return out

def _fill2d(m): # [Z,Y,X] bool -> same, the holes of every slice filled
    "`ndi.binary_fill_holes` per slice, in one labelling: background pieces (in-plane, 4-connected) that touch no slice border are holes."
    lab, n = ndi.label(~m, [np.zeros((3, 3)), [[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.zeros((3, 3))])
    edge = np.zeros(n + 1, bool)
    for e in (lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]): edge[e] = True
    edge[0] = False
    return ~edge[lab]

def _largest(m):
    lab, n = ndi.label(m)
    if n == 0: return m
    return lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)

def _airways(hu, cand, body, spacing_mm) -> np.ndarray:
    "Trachea and main bronchi: the pure-air component of `cand` (< 250 ml) that reaches the top slice near the body centre."
    sz, sy, sx = spacing_mm
    air = ndi.gaussian_filter(hu, sigma=(0, 1/sy, 1/sx)) < -950
    air &= cand
    lab, n = ndi.label(air)
    if n:  # airway tree: air components reaching the top slice near the body centre
        top = lab[-1]; ys, xs = np.nonzero(body[-1]) if body[-1].any() else (np.array([0]), np.array([0]))
        cy, cx = ys.mean(), xs.mean(); Y, X = top.shape
        win = top[max(0, int(cy - 25/sy)):int(cy + 25/sy), max(0, int(cx - 25/sx)):int(cx + 25/sx)]
        ids = [i for i in np.unique(win) if i]
        big = {i for i in ids if (lab == i).sum()*sz*sy*sx < 2.5e5}  # the airway tree is < 250 ml
        if big: return np.isin(lab, list(big))
    return np.zeros(hu.shape, bool)

def classical_lung_masks(hu: np.ndarray, spacing_mm) -> np.ndarray:
    "Threshold-based lungs of an LPS-ordered (z,y,x) HU volume: 0 bg, 1 left, 2 right."
    sz, sy, sx = spacing_mm
    body = _fill2d(_largest(hu > -500))
    cand = (hu < -400) & body
    cand &= ~_airways(hu, cand, body, spacing_mm)
    lab, n = ndi.label(cand)
    if n == 0: return np.zeros(hu.shape, np.uint8)
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    vox_ml = sz*sy*sx/1000
    min_ml = max(0.05, 0.005*body.sum()*vox_ml)  # relative to the body, so thin slabs work
    keep = [i + 1 for i in order[:2] if sizes[i]*vox_ml >= min_ml]
    if not keep: return np.zeros(hu.shape, np.uint8)
    mid = np.nonzero(body.any(axis=(0, 1)))[0].mean()
    if len(keep) == 1 or sizes[keep[1]-1] < 0.15*sizes[keep[0]-1]:
        both = np.isin(lab, keep)
        xs = np.arange(hu.shape[2])[None, None, :]
        parts = [both & (xs >= mid), both & (xs < mid)]
    else:
        parts = [lab == k for k in keep]
        parts.sort(key=lambda p: -np.nonzero(p)[2].mean())  # larger x = patient's left (LPS)
    out = np.zeros(hu.shape, np.uint8)
    for value, p in zip((1, 2), parts):
        pc = _fill2d(_close2d(p, 7., sy, sx)) & body
        out[pc & (out == 0)] = value
    return out

def lung_masks(hu: np.ndarray, # [Z,Y,X] HU
               spacing_mm,     # (sz, sy, sx) in the array's axis order
               affine=None,    # NIfTI affine (nibabel x,y,z order); None: x runs toward the patient's left
               weights=None,   # lungmask R231 weights file; default $SAPL_LUNGMASK_WEIGHTS
               fallback: str = 'filled', # without weights: 'filled' (sapl.lungs) or 'threshold' (classical_lung_masks)
              ) -> np.ndarray: # [Z,Y,X] uint8: 0 background, 1 left lung, 2 right lung
    "Left/right lung masks: lungmask when a weights file is available, else a classical fallback."
    if fallback not in FALLBACKS: raise ValueError(f"unknown lung-mask fallback {fallback!r}; choose one of {FALLBACKS}")
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3: raise ValueError(f"hu must be a (z, y, x) array, got shape {hu.shape}")
    lps, back = _to_lps(hu, affine)
    sp = spacing_mm
    if affine is not None:  # spacing follows the axes through the reorientation
        ornt = nib.orientations.io_orientation(affine)
        sp_xyz = np.asarray(spacing_mm)[::-1]
        sp = tuple(sp_xyz[np.argsort(ornt[:, 0])][::-1])
    weights = weights or os.environ.get('SAPL_LUNGMASK_WEIGHTS')
    if weights:
        if not Path(weights).is_file(): raise DataError(f"{weights}: lungmask weights file not found")
        from lungmask import LMInferer
        log.info(f"lung masks: lungmask R231 ({weights})")
        r231 = LMInferer(modelpath=str(weights), force_cpu=not torch.cuda.is_available(), tqdm_disable=True).apply(lps)
        out = np.zeros_like(r231); out[r231 == 2] = 1; out[r231 == 1] = 2  # R231: 1 right, 2 left
    else:
        log.info(f"lung masks: classical fallback '{fallback}' (no lungmask weights given)")
        if fallback == 'filled':
            from sapl.lungs import filled_lung_masks
            out = filled_lung_masks(lps, sp)
        else: out = classical_lung_masks(lps, sp)
    return back(out.astype(np.uint8))


# %% [markdown]
# A toy chest: body at 40 HU, two air-filled lungs at −850 HU; the lung at high x is the patient's left.

# %%
_hu = np.full((6, 64, 64), -1000, np.float32); _hu[:, 8:56, 4:60] = 40
_hu[:, 16:48, 10:28] = -850; _hu[:, 16:48, 36:54] = -850
_m = lung_masks(_hu, (5, 1., 1.))
test_eq(_m[3, 30, 45], 1); test_eq(_m[3, 30, 20], 2); test_eq(_m[3, 4, 4], 0)

# %%
_r = np.random.default_rng(0).random((4, 12, 15)) < .6   # the one-labelling hole filling equals scipy's, slice by slice
test_eq(_fill2d(_r), np.stack([ndi.binary_fill_holes(s) for s in _r]))


# %% [markdown]
# ## Preprocessing to lung-cropped slices
#
# Like the paper we ignore what lies outside the lungs: each volume is cropped in-plane to the bounding box of
# its lung mask (over all slices, widened by `margin_mm` and made square so shapes are not distorted), every
# slice that contains lung is kept, and slices are resized to the profile's side $S$ (bilinear for the image,
# bilinear + threshold 0.5 for masks). The crop box and kept slice indices are stored so predictions can be put
# back onto the original grid (`sapl.eval`).
#
# **Semantic mask** (for the synthesizer): $m = \text{lung} \in \{0, 1, 2\}$ with infection painted over it as 3.
# Infection voxels outside the lung mask (the fallback can miss dense subpleural consolidation) are still class 3:
# the label is the ground truth; the lung mask is only used for cropping and as the synthesizer's layout.
# Infection outside the crop box (beyond the margin) is lost for training and counted as missed at evaluation,
# which happens on the original, uncropped grid.

# %%
#| export
@dataclass
class Volume:
    id: str
    image: np.ndarray          # [Z,S,S] float32 in [0,1]
    label: np.ndarray|None     # [Z,S,S] uint8 {0,1}
    lung: np.ndarray           # [Z,S,S] uint8 {0 bg, 1 left, 2 right}
    z: np.ndarray              # [Z] original slice indices kept
    box: tuple                 # (y0, y1, x0, x1) square crop box in the original in-plane grid
    shape: tuple               # original (Zo, Yo, Xo)
    spacing: tuple             # original (sz, sy, sx) mm
    affine: np.ndarray         # 4x4 source affine (nibabel order)
    image_path: str = ''
    label_path: str|None = None
    group: str|None = None
    lung_findings: tuple = ()  # what `sapl.lungs.check_lungs` found odd in the lung masks (empty: nothing)

def semantic(lung: np.ndarray, label: np.ndarray|None) -> np.ndarray:
    "4-class semantic mask {0 bg, 1 left, 2 right, 3 infection} as a new array (inputs untouched)."
    sem = np.array(lung, dtype=np.uint8, copy=True)
    if label is not None: sem[np.asarray(label) > 0] = 3
    return sem

def lung_box(lung: np.ndarray, spacing, margin_mm: float = 5.) -> tuple:
    "Square in-plane (y0, y1, x0, x1) box around all lung voxels, widened by `margin_mm`."
    ys, xs = np.nonzero(lung.any(0))
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    y0 -= round(margin_mm/spacing[1]); y1 += round(margin_mm/spacing[1])
    x0 -= round(margin_mm/spacing[2]); x1 += round(margin_mm/spacing[2])
    side = max(y1 - y0, x1 - x0); cy, cx = (y0 + y1)//2, (x0 + x1)//2
    return (int(cy - side//2), int(cy - side//2 + side), int(cx - side//2), int(cx - side//2 + side))

def crop_resize(a: np.ndarray, box, size: int, mode: str = 'bilinear') -> np.ndarray:
    "Crop [Z,Y,X] to `box` (zero padding outside) and resize to [Z,size,size]."
    y0, y1, x0, x1 = box; Z, Y, X = a.shape
    out = np.zeros((Z, y1 - y0, x1 - x0), np.float32)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, Y), max(x0, 0), min(x1, X)
    out[:, sy0-y0:sy1-y0, sx0-x0:sx1-x0] = a[:, sy0:sy1, sx0:sx1]
    t = torch.from_numpy(out)[:, None]
    kw = dict(align_corners=False, antialias=True) if mode == 'bilinear' else {}
    return F.interpolate(t, size=(size, size), mode=mode, **kw)[:, 0].numpy()


# %%
test_eq(lung_box(np.pad(np.ones((1, 4, 2)), ((0, 0), (3, 3), (5, 5))), (1, 1, 1), 0), (3, 7, 4, 8))
test_eq(crop_resize(np.ones((2, 4, 4), np.float32), (-2, 6, -2, 6), 8)[0, :, 0], np.zeros(8))
_l = np.array([[1, 2]]); _s = semantic(_l, np.array([[0, 1]])); test_eq(_s.tolist(), [[1, 3]]); test_eq(_l.tolist(), [[1, 2]])

# %% [markdown]
# Preprocessed volumes are cached under `cache_dir` as `.npz`, keyed by a hash of the source files
# (path, size, modification time), the slice size, margin, lung-mask method (weights file or fallback), a format version
# and the source code of the preprocessing functions, those of the lung check and of the chosen fallback in `sapl.lungs` included
# (`preprocess_fingerprint`: editing the 'filled' fallback does not invalidate 'threshold' volumes), so a second run skips preprocessing and a change of the code that
# makes the cached arrays (windowing, lung masks, crop) makes a new entry instead of silently reusing a stale one. Files are written to a temporary name and renamed, so an interrupted run
# never leaves a half-written cache entry.

# %%
#| export
CACHE_VERSION = 4
_PREPROCESS_CODE = ('preprocess_case', 'preprocess_array', 'load_nifti', 'check_pair', 'window', 'lung_masks', 'classical_lung_masks', '_airways',
                    '_to_lps', '_close2d', '_fill2d', '_largest', 'lung_box', 'crop_resize')

@functools.lru_cache(maxsize=None)
def preprocess_fingerprint(fallback: str = 'filled') -> str:
    "Hash of the source code that turns a CT into a cached volume (as loaded) with this lung fallback: editing any of it invalidates the cache."
    import inspect, sapl.data as m, sapl.lungs as lm
    code = [(m, f) for f in _PREPROCESS_CODE] + [(lm, '_ranges'), (lm, 'check_lungs')] + [(lm, f) for f in (lm.LUNG_CODE if fallback == 'filled' else ())]
    try: text = ''.join(inspect.getsource(getattr(mod, f)) for mod, f in code)
    except (OSError, TypeError, AttributeError): text = 'source unavailable'
    return hashlib.sha1(text.encode()).hexdigest()[:12]

def _stamp(p):
    if not p: return None
    st = os.stat(p); return (str(Path(p).resolve()), st.st_size, st.st_mtime_ns)

def cache_key(case: Case, size: int, margin_mm: float, weights, fallback: str = 'filled') -> str:
    "Hash of everything the preprocessed volume depends on."
    w = _stamp(weights) if weights else f'classical-{fallback}'
    blob = json.dumps([CACHE_VERSION, preprocess_fingerprint('r231' if weights else fallback), _stamp(case.image), _stamp(case.label), size, margin_mm, w], default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]

@contextmanager
def atomic_path(path, suffix: str = ''):
    "Yield a temporary path beside `path`; it is renamed onto `path` if the block succeeds and deleted otherwise."
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp{suffix}')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists(): tmp.unlink()

def atomic_save_npz(path, **arrays):
    "Write an .npz atomically (temporary file, then rename)."
    with atomic_path(path) as tmp, open(tmp, 'wb') as f: np.savez_compressed(f, **arrays)

CROP_MARGIN_MM = 5.  # margin of the lung crop box

def preprocess_array(hu: np.ndarray,  # [Zo,Yo,Xo] HU
                     spacing, affine, # (sz, sy, sx) mm; 4x4 NIfTI affine
                     size: int,       # slice side S after crop + resize
                     margin_mm: float = CROP_MARGIN_MM,
                     weights=None,    # lungmask weights (see `lung_masks`)
                     label: np.ndarray|None = None, # [Zo,Yo,Xo] {0,1} infection, optional
                     lung: np.ndarray|None = None,  # [Zo,Yo,Xo] lungs {0,1,2} when already computed
                     hu_window=HU_WINDOW, id: str = '', image_path: str = '', label_path: str|None = None, group: str|None = None,
                     fallback: str = 'filled', # lung-mask fallback without weights (see `lung_masks`)
                    ) -> tuple:       # (Volume, lungs [Zo,Yo,Xo] uint8 on the original grid)
    "Lung-mask (unless given; the masks are then checked), window, crop to the lung box and resize an array already read and checked."
    findings = ()
    if lung is None:
        from sapl.lungs import check_lungs, report_findings
        lung = lung_masks(hu, spacing, affine, weights, fallback)
        findings = report_findings(image_path or id, check_lungs(lung, spacing, hu))
    keep = np.nonzero(lung.any(axis=(1, 2)))[0]
    if len(keep) == 0: raise DataError(f"{image_path or id}: no lungs found")
    box = lung_box(lung[keep], spacing, margin_mm)
    img = crop_resize(window(hu[keep], *hu_window), box, size)
    lng = np.zeros((len(keep), size, size), np.uint8)
    for v in (1, 2): lng[crop_resize((lung[keep] == v).astype(np.float32), box, size) >= .5] = v
    lab = (crop_resize(label[keep], box, size) >= .5).astype(np.uint8) if label is not None else None
    vol = Volume(id, img.clip(0, 1).astype(np.float32), lab, lng, keep, box, hu.shape, spacing, affine, image_path, label_path, group, findings)
    return vol, lung

def preprocess_case(case: Case, size: int, cache_dir=None, margin_mm: float = CROP_MARGIN_MM, weights=None, fallback: str = 'filled') -> Volume:
    "Load, check, window, lung-mask, crop and resize one case (cached, with the lung-mask findings)."
    weights = weights or os.environ.get('SAPL_LUNGMASK_WEIGHTS') or None
    key = cache_key(case, size, margin_mm, weights, fallback) if cache_dir else None
    cpath = Path(cache_dir)/f'{case.id}-{key}.npz' if cache_dir else None
    if cpath is not None and cpath.exists():
        z = np.load(cpath, allow_pickle=False)
        return Volume(case.id, z['image'], z['label'] if z['has_label'] else None, z['lung'], z['z'], tuple(z['box'].tolist()),
                      tuple(z['shape'].tolist()), tuple(z['spacing'].tolist()), z['affine'], case.image, case.label, case.group,
                      tuple(str(f) for f in z['lung_findings']))
    hu, spacing, affine = load_nifti(case.image)
    label = None
    if case.label:
        label, _, laff = load_nifti(case.label, kind='mask')
        check_pair(case.image, hu.shape, affine, case.label, label.shape, laff)
    vol, _ = preprocess_array(hu, spacing, affine, size, margin_mm, weights, label, id=case.id, image_path=case.image,
                              label_path=case.label, group=case.group, fallback=fallback)
    lab = vol.label
    if cpath is not None:
        atomic_save_npz(cpath, image=vol.image, label=lab if lab is not None else np.zeros(0, np.uint8), has_label=lab is not None,
                        lung=vol.lung, z=vol.z, box=np.array(vol.box), shape=np.array(hu.shape), spacing=np.array(spacing), affine=affine,
                        lung_findings=np.array(vol.lung_findings, dtype=str))
    return vol


# %%
with tempfile.TemporaryDirectory() as d:
    with atomic_path(f'{d}/b.txt') as t: t.write_text('ok')
    try:
        with atomic_path(f'{d}/c.txt') as t: t.write_text('half'); raise KeyError  # interrupted write
    except KeyError: pass
    test_eq(os.listdir(d), ['b.txt'])


# %% [markdown]
# ## Slice datasets and seeded augmentation
#
# Augmentation (flip, rot90, rotation by ±20°) follows the *sample, log, apply* pattern: `sample_aug` draws the
# parameters for item $i$ of epoch $e$ from a generator seeded with $(seed, e, i)$, so an item's transform is
# known before it is applied, can be logged, and is the same after a resume. `apply_aug` applies one parameter
# set identically to the image (bilinear) and to the masks (nearest).

# %%
#| export
def sample_aug(seed: int, epoch: int, idx: int, max_deg: float = 20.) -> dict:
    "Random augmentation parameters for one item, drawn from a generator seeded by (seed, epoch, idx)."
    r = np.random.default_rng([seed, epoch, idx])
    return dict(flip=bool(r.random() < .5), k=int(r.integers(4)), deg=float(r.uniform(-max_deg, max_deg)))

def apply_aug(x: torch.Tensor, # [C,H,W]
              p: dict, mode: str = 'bilinear') -> torch.Tensor:
    "Apply one sampled augmentation to a [C,H,W] tensor (`mode` 'nearest' for masks)."
    if p['flip']: x = x.flip(-1)
    x = torch.rot90(x, p['k'], dims=(-2, -1))
    if p['deg']:
        a = math.radians(p['deg'])
        theta = torch.tensor([[math.cos(a), -math.sin(a), 0.], [math.sin(a), math.cos(a), 0.]], dtype=torch.float32)[None]
        grid = F.affine_grid(theta, (1, *x.shape), align_corners=False)
        x = F.grid_sample(x[None].float(), grid, mode=mode, padding_mode='zeros', align_corners=False)[0].to(x.dtype)
    return x

class SliceSet(Dataset):
    "2D slices of preprocessed volumes; labeled items carry 'label', all carry 'image', 'lung', 'idx'."
    def __init__(self, vols, labeled: bool = True, augment: bool = False, seed: int = 0):
        if not vols: raise ValueError("SliceSet needs at least one volume")
        if labeled and any(v.label is None for v in vols): raise ValueError(f"volume without label in a labeled set: {[v.id for v in vols if v.label is None][:3]}")
        self.labeled, self.augment, self.seed, self.epoch = labeled, augment, seed, 0
        self.image = torch.from_numpy(np.concatenate([v.image for v in vols]))
        self.lung = torch.from_numpy(np.concatenate([v.lung for v in vols]).astype(np.int64))
        self.label = torch.from_numpy(np.concatenate([v.label for v in vols]).astype(np.float32)) if labeled else None
        self.where = [(v.id, int(z)) for v in vols for z in v.z]
    def __len__(self): return len(self.image)
    def set_epoch(self, e: int): self.epoch = e
    def __getitem__(self, i):
        img, lung = self.image[i][None], self.lung[i][None]
        lab = self.label[i][None] if self.labeled else None
        if self.augment:
            p = sample_aug(self.seed, self.epoch, i)
            img = apply_aug(img, p).clamp(0, 1); lung = apply_aug(lung, p, 'nearest')
            if lab is not None: lab = apply_aug(lab, p, 'nearest')
        out = {'image': img, 'lung': lung[0], 'idx': i}
        if lab is not None: out['label'] = lab
        return out

def LabeledSlices(vols, augment: bool = False, seed: int = 0): return SliceSet(vols, True, augment, seed)
def UnlabeledSlices(vols, augment: bool = False, seed: int = 0): return SliceSet(vols, False, augment, seed)


# %%
_v = Volume('a', np.random.rand(2, 8, 8).astype(np.float32), np.zeros((2, 8, 8), np.uint8), np.ones((2, 8, 8), np.uint8), np.array([3, 4]), (0, 8, 0, 8), (6, 8, 8), (1, 1, 1), np.eye(4))
_ds = LabeledSlices([_v], augment=True, seed=1)
test_eq(_ds[1]['image'].shape, (1, 8, 8)); test_eq(_ds[1]['image'], _ds[1]['image']); test_eq(_ds.where[1], ('a', 4))
test_eq(sample_aug(0, 1, 2), sample_aug(0, 1, 2))

# %% [markdown]
# ## A MosMedData-like phantom (Table V)
#
# The paper's Table V studies plenty of unlabeled data with few labels on MosMedData, whose annotated test set was
# collected at in-patient clinics weeks after the out-patient training studies. `make_phantom_mosmed` writes the same
# situation in the MosMedData layout: `n_labeled` labeled and `n_val` validation studies with masks, `n_unlabeled`
# studies without, all drawn with MosMedData's severity shares (CT-0 23 %, CT-1 62 %, CT-2 11 %, CT-3 4 %), and
# `n_test` test studies with an in-patient severity mix (more CT-2..CT-4) reconstructed by "another scanner" (0.8 mm
# extra Gaussian blur, +30 HU noise, +25 HU offset). Matrix 256 keeps generation short (in-plane spacing 0.9-1.35 mm).
# The split is stored in `split.json` in the folder and used via `split_dir`.

# %% [markdown]
# ## Putting it together
#
# `prepare_data` is the one call the run notebooks make: it builds the phantom when it is missing (and says so),
# finds the cases, splits them (seeded, or the paper's published lists via `split_dir`), preprocesses every
# volume it needs (cached) and returns a `DataBundle`. For the paper's lists, the slice indices of the training
# lists restrict which slices are used.
#
# Lung masks come from R231 when weights are given, else from the `lung_fallback` (default `'filled'`, `00b_lungs`). The
# one exception is the benchmark phantom (`dataset='phantom'`, `BENCHMARK_LUNGS`): its committed tables were made with
# the `'threshold'` fallback, so it keeps that one until the benchmark is run again, and a fresh clone still reproduces
# the committed numbers. Pass `lung_fallback='filled'` to train on the phantom with the new masks. Every preprocessed
# volume carries the plausibility findings of its lung masks (`Volume.lung_findings`), logged once when it is made.

# %%
#| export
DATASETS = ('phantom', 'phantom-mosmed', 'covid19-20', 'mosmed', 'nnunet')

@dataclass
class DataBundle:
    train_l: list; train_u: list; val: list; test: list
    profile: Profile
    split: Split
    data_dir: str

    def summary(self) -> str:
        n = lambda vs: f"{len(vs)} vols / {sum(len(v.z) for v in vs)} slices"
        return (f"labeled {n(self.train_l)}, unlabeled {n(self.train_u)}, val {n(self.val)}, test {n(self.test)} "
                f"at {self.profile.size}px ({self.profile.name})")

    def fingerprint(self) -> str:
        "Short hash of what training and evaluation see: the split and every preprocessed array (image, label, lungs, slices)."
        h = hashlib.sha1()
        for vs in (self.train_l, self.train_u, self.val, self.test):
            h.update(json.dumps([v.id for v in vs]).encode())
            for v in vs:
                for a in (v.image, v.label, v.lung, v.z):
                    if a is not None: h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:12]

MOSMED_TRAIN_BANDS = (0.23, 0.62, 0.11, 0.04, 0.002)  # MosMedData's CT-0..CT-4 shares (out-patients)
MOSMED_TEST_BANDS = (0.0, 0.25, 0.40, 0.25, 0.10)     # an in-patient mix: more extensive disease

def ensure_phantom(data_dir='data/phantom', n_volumes: int = 249, seed: int = 0, matrix: int = 384) -> Path:
    "Generate the phantom into `data_dir` unless it is already there, with its `split.json` in the COVID249 proportions."
    from sapl.phantom import make_phantom, phantom_name
    d = resolve(data_dir)
    if not (d/'phantom.json').exists(): log.info(f"phantom not found in {d}: generating {n_volumes} volumes (matrix {matrix}, seed {seed}) ...")
    make_phantom(d, n_volumes=n_volumes, seed=seed, matrix=matrix, verbose=not (d/'phantom.json').exists())
    if n_volumes >= 8:
        js = protocol_split([phantom_name(i, 'ct').split('_ct.nii')[0] for i in range(n_volumes)], seed, **covid249_shape(n_volumes))
        f = d/'split.json'
        if not f.exists() or json.loads(f.read_text()) != js:
            with atomic_path(f) as t: t.write_text(json.dumps(js, indent=1))
    return d

def make_phantom_mosmed(out_dir='data/phantom-mosmed', n_labeled: int = 6, n_unlabeled: int = 120, n_val: int = 4,
                        n_test: int = 12, seed: int = 0, matrix: int = 256) -> Path:
    "A MosMedData-like phantom: few labeled studies, many unlabeled ones, and a shifted test set (see the text above)."
    from sapl.phantom import phantom_volume, phantom_seed
    d = resolve(out_dir); marker = d/'split.json'
    params = dict(n_labeled=n_labeled, n_unlabeled=n_unlabeled, n_val=n_val, n_test=n_test, seed=seed, matrix=matrix, version=1)
    if marker.exists() and json.loads(marker.read_text()).get('params') == params: return d
    log.info(f"MosMedData-like phantom not found in {d}: generating {n_labeled + n_unlabeled + n_val + n_test} volumes ...")
    parts = {'train_l': n_labeled, 'train_u': n_unlabeled, 'val': n_val, 'test': n_test}
    split, k = {p: [] for p in parts}, 0
    for part, n in parts.items():
        for _ in range(n):
            k += 1; sid = f'study_{k:04d}'
            test = part == 'test'
            ph = phantom_volume(phantom_seed(seed + (7919 if test else 0), k), matrix, band_probs=MOSMED_TEST_BANDS if test else MOSMED_TRAIN_BANDS)
            hu = ph['hu']
            if test:  # another hospital's scanner: softer kernel, more noise, a calibration offset
                r = np.random.default_rng([seed, k])
                sz, sy, sx = ph['spacing']
                hu = ndi.gaussian_filter(hu, (0, .8/sy, .8/sx)) + r.normal(0, 30, hu.shape).astype(np.float32) + 25
            band = int(ph['meta']['realized_band'])
            img = nib.Nifti1Image(np.round(hu).astype(np.int16).transpose(2, 1, 0), ph['affine'])
            with atomic_path(d/'studies'/f'CT-{band}'/f'{sid}.nii.gz', '.nii.gz') as t: nib.save(img, str(t))
            if part != 'train_u':
                with atomic_path(d/'masks'/f'{sid}_mask.nii.gz', '.nii.gz') as t:
                    nib.save(nib.Nifti1Image(ph['label'].transpose(2, 1, 0).astype(np.uint8), ph['affine']), str(t))
            split[part].append(sid)
    with atomic_path(marker) as t: t.write_text(json.dumps({'params': params, **split}, indent=1))
    return d

def _preprocess_job(job):
    case, size, cache_dir, weights, fallback = job
    preprocess_case(case, size, cache_dir, weights=weights, fallback=fallback)
    return case.id

def preprocess_all(cases: list, size: int, cache_dir, weights=None, workers: int|None = None, progress: bool = True, fallback: str = 'filled') -> list:
    "Preprocessed volumes of `cases`: missing cache entries are made by a process pool (one process per core), then all are read."
    from tqdm.auto import tqdm
    weights = weights or os.environ.get('SAPL_LUNGMASK_WEIGHTS') or None
    todo = [c for c in cases if not (Path(cache_dir)/f'{c.id}-{cache_key(c, size, CROP_MARGIN_MM, weights, fallback)}.npz').exists()]
    workers = 1 if weights else max(1, min(int(workers or os.cpu_count() or 1), len(todo)))  # the R231 network uses its own threads
    if len(todo) > 1 and workers > 1:
        from sapl.phantom import process_pool
        from sapl.data import _preprocess_job as job  # a process pool pickles the task by reference
        with process_pool(workers) as ex:
            for _ in tqdm(ex.map(job, [(c, size, cache_dir, weights, fallback) for c in todo]), total=len(todo),
                          desc=f'preprocess ({workers} processes)', disable=not progress, leave=False): pass
    return [preprocess_case(c, size, cache_dir, weights=weights, fallback=fallback) for c in tqdm(cases, desc='load', disable=not progress or len(todo) > 1, leave=False)]

def _restrict(v: Volume, allowed) -> Volume:
    m = np.isin(v.z, allowed)
    if not m.any(): return v
    return replace(v, image=v.image[m], label=None if v.label is None else v.label[m], lung=v.lung[m], z=v.z[m])

def split_source(dataset: str, data_dir, split_dir=None) -> Path|None:
    "Where a run's split comes from: `split_dir` when given, else a phantom data set's own split.json, else None (a seeded split)."
    if split_dir: return resolve(split_dir)
    js = resolve(data_dir)/'split.json'
    return js if dataset.startswith('phantom') and js.exists() else None

BENCHMARK_LUNGS = {'phantom': 'threshold'}  # the lung-mask fallback the committed benchmark tables were made with

def lung_fallback_for(dataset: str, lung_fallback: str|None = None) -> str:
    "The lung-mask fallback of a data set: the one asked for, else BENCHMARK_LUNGS's for the benchmark's data set, else 'filled'."
    fallback = lung_fallback or BENCHMARK_LUNGS.get(dataset, 'filled')
    if fallback not in FALLBACKS: raise ValueError(f"unknown lung-mask fallback {fallback!r}; choose one of {FALLBACKS}")
    return fallback

def prepare_data(dataset: str = 'phantom', data_dir='data/phantom', ratio: float = 0.1, profile='quick', split_seed: int = 0,
                 split_dir=None, cache_dir=None, weights=None, phantom_seed: int = 0, progress: bool = True,
                 lung_fallback: str|None = None) -> DataBundle:  # None: BENCHMARK_LUNGS for the benchmark's data set, else 'filled'
    "Cases -> split -> preprocessed volumes for a run."
    from tqdm.auto import tqdm
    fallback = lung_fallback_for(dataset, lung_fallback)
    prof = get_profile(profile) if isinstance(profile, str) else profile
    if dataset not in DATASETS: raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    data_dir = resolve(data_dir)
    if dataset == 'phantom':  # a phantom already there keeps its size (e.g. the smaller demo set)
        js = data_dir/'phantom.json'
        pp = json.loads(js.read_text())['params'] if js.exists() else dict(n_volumes=prof.phantom_volumes, matrix=prof.phantom_matrix)
        ensure_phantom(data_dir, pp['n_volumes'], phantom_seed, pp['matrix'])
    if dataset == 'phantom-mosmed':
        small = prof.name == 'smoke'
        make_phantom_mosmed(data_dir, *((2, 6, 1, 2) if small else (6, 120, 4, 12)), seed=phantom_seed, matrix=64 if small else 256)
    split_dir = split_source(dataset, data_dir, split_dir)
    cases = {c.id: c for c in find_cases(data_dir, None if dataset.startswith('phantom') else dataset)}
    if split_dir: split = paper_split(resolve(split_dir), ratio)
    else: split = make_split(list(cases.values()), ratio, split_seed)
    missing = [i for part in (split.train_l, split.train_u, split.val, split.test) for i in part if i not in cases]
    if missing: raise DataError(f"{data_dir}: {len(missing)} volumes of the split are missing, e.g. {missing[:3]}")
    cache_dir = resolve(cache_dir) if cache_dir else data_dir/'.cache'
    ids = [i for part in (split.train_l, split.train_u, split.val, split.test) for i in part]
    vols = {}
    for i, v in zip(ids, preprocess_all([cases[i] for i in ids], prof.size, cache_dir, weights, progress=progress, fallback=fallback)):
        vols[i] = _restrict(v, split.slices[i]) if i in split.slices else v
    get = lambda part: [vols[i] for i in part]
    return DataBundle(get(split.train_l), get(split.train_u), get(split.val), get(split.test), prof, split, str(data_dir))


# %%
import tempfile
_d = Path(tempfile.mkdtemp()); (_d/'split.json').write_text('{}')
test_eq(split_source('phantom', _d), _d/'split.json'); test_eq(split_source('covid19-20', _d), None)   # real layouts: seeded split unless split_dir
test_eq(split_source('covid19-20', _d, _d/'lists'), _d/'lists')
