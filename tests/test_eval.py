"Tests of sapl.eval: NSD against an independent brute-force reference, edge cases, grid mapping, NIfTI I/O, evaluate()."
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from sapl.data import Case, Volume, crop_resize, preprocess_case
from sapl.eval import (dice, evaluate, nsd, plot_predictions, predict_volume, results_markdown, summarize,
                       to_original, write_nifti, write_results)


# ---------------------------------------------------------------- independent 2D NSD reference
def _contour_cells(m, spacing):
    """Surfels of a 2D mask: cells of the dual grid (2x2 pixel neighbourhoods, mask padded with background)
    whose corners are mixed; returns cell centres (mm) and marching-squares contour length in each cell."""
    sy, sx = spacing
    half_diag = 0.5*math.hypot(sy, sx)
    m = np.pad(np.asarray(m, bool), 1).astype(int)
    tl, tr, bl, br = m[:-1, :-1], m[:-1, 1:], m[1:, :-1], m[1:, 1:]
    cnt = tl + tr + bl + br
    length = np.zeros(cnt.shape)
    length[(cnt == 1) | (cnt == 3)] = half_diag            # one corner cut off: one diagonal piece
    saddle = (cnt == 2) & (tl == br)                       # two diagonal corners: two diagonal pieces
    length[saddle] = 2*half_diag
    length[(cnt == 2) & (tl == tr) & ~saddle] = sx         # top or bottom pair inside: piece runs along x
    length[(cnt == 2) & (tl == bl) & ~saddle] = sy         # left or right pair inside: piece runs along y
    ys, xs = np.nonzero((cnt > 0) & (cnt < 4))
    return np.stack([ys*sy, xs*sx], 1), length[ys, xs]


def ref_nsd_2d(p, g, spacing, tol):
    "Brute force: all pairwise surfel distances, area-weighted fraction within `tol`."
    cp, ap = _contour_cells(p, spacing)
    cg, ag = _contour_cells(g, spacing)
    if len(ap) == 0 and len(ag) == 0: return float('nan')
    if len(ap) == 0 or len(ag) == 0: return 0.
    d = np.sqrt(((cp[:, None, :] - cg[None, :, :])**2).sum(-1))
    return float((ap[d.min(1) <= tol].sum() + ag[d.min(0) <= tol].sum())/(ap.sum() + ag.sum()))


def _square(y, x, n, shape):
    m = np.zeros(shape, bool); m[y:y+n, x:x+n] = True; return m


@pytest.mark.parametrize('sy,sx', [(1., 1.), (0.5, 0.8), (1.3, 0.6)])
def test_nsd_shifted_squares_hand_derived(sy, sx):
    # two n x n squares, the second shifted by k pixels along x. Each contour: 2(n-1) pieces of length sx,
    # 2(n-1) of length sy, 4 corner diagonals of length hypot(sy, sx)/2. Below min(sy, sx) only coincident
    # surfels count: per mask, on the top and bottom rows, n-k straight pieces and one corner diagonal.
    n, k, shape = 6, 2, (12, 14)
    p, g = _square(3, 2, n, shape), _square(3, 2 + k, n, shape)
    diag = 0.5*math.hypot(sy, sx)
    low = ((n - k)*sx + diag)/((n - 1)*(sx + sy) + 2*diag)
    tol_low = 0.9*min(sy, sx)
    assert nsd(p, g, (sy, sx), tol_low) == pytest.approx(low, abs=1e-6)
    assert ref_nsd_2d(p, g, (sy, sx), tol_low) == pytest.approx(low, abs=1e-12)
    # at or above the shift k*sx every surfel has a partner within tolerance
    assert nsd(p, g, (sy, sx), k*sx*(1 + 1e-6)) == pytest.approx(1., abs=1e-6)
    assert ref_nsd_2d(p, g, (sy, sx), k*sx*(1 + 1e-6)) == pytest.approx(1., abs=1e-12)
    between = nsd(p, g, (sy, sx), 0.999*k*sx)
    assert low - 1e-6 <= between < 1


def test_nsd_matches_bruteforce_reference_on_random_blobs():
    rng = np.random.default_rng(0)
    done = 0
    while done < 12:
        shape = tuple(int(s) for s in rng.integers(8, 26, 2))
        p = ndi.gaussian_filter(rng.random(shape), 1.5) > 0.5   # irregular, touches the image border
        g = ndi.gaussian_filter(rng.random(shape), 1.5) > 0.5
        if not (p.any() and g.any()): continue
        sp = tuple(float(s) for s in rng.uniform(0.4, 2., 2)); tol = float(rng.uniform(0., 3.))
        assert nsd(p, g, sp, tol) == pytest.approx(ref_nsd_2d(p, g, sp, tol), abs=1e-5), (shape, sp, tol)
        done += 1


def test_nsd_3d_spacing_follows_axes():
    c = np.zeros((6, 10, 10), bool); c[1:4, 2:7, 3:8] = True
    sh_z = np.roll(c, 1, 0)
    assert nsd(c, sh_z, (3., 1., 1.), 2.) < 1
    assert nsd(c, sh_z, (3., 1., 1.), 3.01) == pytest.approx(1., abs=1e-6)
    sh_x = np.roll(c, 1, 2)
    assert nsd(c, sh_x, (3., 1., 1.), 1.01) == pytest.approx(1., abs=1e-6)
    assert nsd(c, c, (3., 1., 1.), 0.) == pytest.approx(1., abs=1e-6)


def test_metric_edge_cases():
    a = _square(1, 1, 3, (8, 8)); far = _square(5, 5, 3, (8, 8)); e = np.zeros((8, 8), bool)
    assert dice(a, a) == 1. and nsd(a, a, (1., 1.)) == pytest.approx(1.)
    assert dice(a, far) == 0. and nsd(a, far, (1., 1.), 1.) == 0.
    assert dice(a, e) == 0. and dice(e, a) == 0. and nsd(a, e, (1., 1.)) == 0. and nsd(e, a, (1., 1.)) == 0.
    assert math.isnan(dice(e, e)) and math.isnan(nsd(e, e, (1., 1.)))
    assert dice(a, _square(1, 2, 3, (8, 8))) == pytest.approx(2*6/18)
    with pytest.raises(ValueError, match=r'\(8, 8\).*\(8, 9\)'): dice(a, np.zeros((8, 9), bool))
    with pytest.raises(ValueError, match=r'\(8, 8\).*\(8, 9\)'): nsd(a, np.zeros((8, 9), bool), (1., 1.))
    with pytest.raises(ValueError, match='spacing'): nsd(a, a, (1., 1., 1.))


# ---------------------------------------------------------------- grid mapping
def _vol(box, shape=(4, 20, 20), z=(0, 1, 3), S=None):
    S = S or box[1] - box[0]
    zs = np.array(z)
    return Volume('v', np.zeros((len(zs), S, S), np.float32), None, np.zeros((len(zs), S, S), np.uint8), zs, box, shape,
                  (2., 1., 1.), np.eye(4))


@pytest.mark.parametrize('box', [(-3, 9, -4, 8), (10, 24, 8, 22), (4, 16, 5, 17), (-5, 25, -5, 25)])
def test_to_original_round_trip(box):
    rng = np.random.default_rng(1)
    m = (rng.random((4, 20, 20)) > 0.6).astype(np.float32)
    v = _vol(box)
    back = to_original(v, crop_resize(m[v.z], box, box[1] - box[0]))
    assert back.shape == (4, 20, 20) and back.dtype == np.uint8
    y0, y1, x0, x1 = box
    inside = np.zeros((20, 20), bool); inside[max(y0, 0):y1, max(x0, 0):x1] = True
    for k in range(4):
        if k in v.z: np.testing.assert_array_equal(back[k], (m[k] > 0)*inside)
        else: assert back[k].sum() == 0


def test_to_original_resized_and_errors():
    v = _vol((-2, 18, 0, 20), S=8)
    prob = np.zeros((3, 8, 8), np.float32); prob[:, 2:6, 2:6] = 1
    out = to_original(v, prob)
    assert out.shape == (4, 20, 20) and out[2].sum() == 0 and out[0].sum() > 0
    # the square occupies box rows 5..15 -> original rows 3..13, cols 5..15
    assert out[0, 8, 10] == 1 and out[0, 0, 0] == 0
    with pytest.raises(ValueError, match='kept slices'): to_original(v, prob[:2])


def test_predict_volume_batches():
    v = _vol((0, 8, 0, 8)); v.image = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    calls = []
    def fn(x):
        calls.append(x.shape[0]); assert not torch.is_grad_enabled(); return x.clone()
    out = predict_volume(fn, v, batch=2)
    assert calls == [2, 1]
    np.testing.assert_array_equal(out, v.image)


# ---------------------------------------------------------------- NIfTI
def test_write_nifti_keeps_affine_shape_and_is_atomic(tmp_path):
    aff = np.array([[-0.7, 0, 0, 120.], [0, -0.7, 0, 100.], [0, 0, 2.5, -300.], [0, 0, 0, 1]])
    src = nib.Nifti1Image(np.zeros((20, 18, 5), np.int16), aff)
    src.header.set_slope_inter(1., -1024.); src.header.set_xyzt_units('mm', 'sec')
    nib.save(src, tmp_path/'ct.nii.gz')
    ref = nib.load(tmp_path/'ct.nii.gz')
    mask = np.zeros((5, 18, 20), np.uint8); mask[2, 3:7, 11:15] = 1
    out = tmp_path/'out'/'pred.nii.gz'
    write_nifti(mask, tmp_path/'ct.nii.gz', out)
    o = nib.load(out)
    np.testing.assert_allclose(o.affine, ref.affine)
    assert o.shape == ref.shape and o.get_data_dtype() == np.uint8
    assert o.header.get_xyzt_units() == ('mm', 'sec')
    data = np.asarray(o.dataobj)
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(data.transpose(2, 1, 0), mask)
    assert sorted(p.name for p in out.parent.iterdir()) == ['pred.nii.gz']
    # from a Volume: its source image is the reference
    v = Volume('x', None, None, None, np.arange(5), (0, 18, 0, 18), (5, 18, 20), (2.5, .7, .7), ref.affine, str(tmp_path/'ct.nii.gz'))
    write_nifti(mask, v, tmp_path/'out'/'v.nii')
    np.testing.assert_allclose(nib.load(tmp_path/'out'/'v.nii').affine, ref.affine)
    with pytest.raises(ValueError, match='shape'): write_nifti(mask[:, :, :19], v, tmp_path/'out'/'bad.nii.gz')
    assert sorted(p.name for p in out.parent.iterdir()) == ['pred.nii.gz', 'v.nii']


# ---------------------------------------------------------------- evaluate on toy chests
def _toy_chest(path_ct, path_seg, lung_side):
    Z, Y, X = 8, 48, 48
    zz, yy, xx = np.mgrid[:Z, :Y, :X]
    hu = np.full((Z, Y, X), -1000., np.float32)
    hu[((yy - 24)/21.)**2 + ((xx - 24)/22.)**2 <= 1] = 40.                       # body
    lungs = np.zeros((Z, Y, X), bool)
    for cx in (14, 34):
        lungs |= (((yy - 24)/12.)**2 + ((xx - cx)/7.)**2 <= 1) & (zz >= 1) & (zz <= 6)
    hu[lungs] = -850.
    cx = 14 if lung_side == 'a' else 34
    lesion = (((yy - 24)**2 + (xx - cx)**2) <= 16) & (zz >= 2) & (zz <= 5)
    hu[lesion] = -400.
    aff = np.diag([1.5, 1.5, 5., 1.])
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).astype(np.int16), aff), path_ct)
    nib.save(nib.Nifti1Image(lesion.transpose(2, 1, 0).astype(np.uint8), aff), path_seg)


def test_evaluate_perfect_predictor(tmp_path):
    vols = []
    for i, side in ((1, 'a'), (2, 'b')):
        ct, seg = tmp_path/f'volume-covid19-A-000{i}_ct.nii.gz', tmp_path/f'volume-covid19-A-000{i}_seg.nii.gz'
        _toy_chest(ct, seg, side)
        vols.append(preprocess_case(Case(f'volume-covid19-A-000{i}', str(ct), str(seg)), 32))
    lut = {v.image[j].tobytes(): v.label[j] for v in vols for j in range(len(v.z))}
    perfect = lambda x: torch.stack([torch.from_numpy(lut[s[0].numpy().tobytes()].astype(np.float32))[None] for s in x])
    df = evaluate(perfect, vols, tmp_path/'res', write_pred=True, batch=3)
    assert list(df.columns) == ['id', 'dsc', 'nsd', 'gt_voxels', 'pred_voxels']
    assert df['id'].tolist() == [v.id for v in vols]
    assert (df['gt_voxels'] > 0).all()
    assert (df['dsc'] > 0.9).all(), df
    assert (df["nsd"] > 0.8).all(), df
    for v in vols:
        o = nib.load(tmp_path/'res'/'pred'/f'{v.id}.nii.gz')
        assert o.shape == (48, 48, 8)
        np.testing.assert_allclose(o.affine, nib.load(v.image_path).affine)
    # an empty predictor scores 0
    df0 = evaluate(lambda x: torch.zeros_like(x), vols)
    assert (df0['dsc'] == 0).all() and (df0['nsd'] == 0).all() and (df0['pred_voxels'] == 0).all()
    # reporting
    csv, md = write_results(df, tmp_path/'res', 'perfect', meta={'profile': 'smoke'})
    assert csv.is_file() and md.is_file() and '| perfect |' in md.read_text()
    assert not [p for p in (tmp_path/'res').iterdir() if p.name.startswith('.')]
    png = plot_predictions(vols, {'perfect': [v.label for v in vols]}, tmp_path/'res'/'fig.png', n=3)
    assert png.read_bytes()[:4] == b'\x89PNG'


def test_summarize_reports_nan():
    import pandas as pd
    df = pd.DataFrame(dict(id=['a', 'b', 'c'], dsc=[0.5, np.nan, 0.7], nsd=[np.nan, np.nan, 0.9]))
    s = summarize(df)
    assert s['n'] == 3 and s['dsc_nan'] == 1 and s['nsd_nan'] == 2
    assert s['dsc_mean'] == pytest.approx(0.6) and s['nsd_mean'] == pytest.approx(0.9)
    md = results_markdown({'A': df, 'B': df.assign(dsc=np.nan, nsd=np.nan)}, 'T', {'seed': 0})
    assert '| A | 90.00 ± 0.00 | 60.00 ± 10.00 | 3 | 2 / 1 |' in md
    assert '| B | n/a | n/a | 3 | 3 / 3 |' in md
