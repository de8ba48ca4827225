"Tests of the procedural chest-CT phantom (sapl.phantom): determinism, files, HU ranges, labels, orientation, severity."
import json, os
from pathlib import Path
import sys
import numpy as np, nibabel as nib, pytest

try: import sapl  # noqa: F401  (the package is normally installed with `pip install -e .`)
except ImportError: sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sapl.phantom import (BAND_LIMITS, make_phantom, phantom_name, phantom_seed, phantom_volume, severity_band,
                          _draw_params)

M = 48  # small matrix: the anatomy is the same as at 384, only coarser


@pytest.fixture(scope='module')
def vol():
    return phantom_volume(21, M, severity=2, thickness=2.5)


def test_determinism(vol):
    again = phantom_volume(21, M, severity=2, thickness=2.5)
    for k in ('hu', 'label', 'lung'):
        assert again[k].dtype == vol[k].dtype and np.array_equal(again[k], vol[k]), k
    np.testing.assert_array_equal(again['affine'], vol['affine'])
    assert again['meta'] == {**vol['meta'], 'seconds': again['meta']['seconds']}
    other = phantom_volume(22, M, severity=2, thickness=2.5)
    assert other['hu'].shape != vol['hu'].shape or not np.array_equal(other['hu'], vol['hu'])


def test_arrays_and_meta(vol):
    hu, lab, lung = vol['hu'], vol['label'], vol['lung']
    assert hu.dtype == np.float32 and lab.dtype == np.uint8 and lung.dtype == np.uint8
    assert hu.ndim == 3 and hu.shape[1:] == (M, M) and lab.shape == hu.shape == lung.shape
    assert np.array_equal(hu, np.rint(hu)) and hu.min() >= -1024
    assert set(np.unique(lab)) <= {0, 1} and set(np.unique(lung)) == {0, 1, 2}
    sz, sy, sx = vol['spacing']
    assert sz == 2.5 and sy == sx and 0.6 * 384 / M <= sx <= 0.9 * 384 / M
    assert vol['meta']['shape'] == list(hu.shape) and vol['meta']['spacing'] == list(vol['spacing'])


def test_label_only_inside_lung(vol):
    assert vol['label'].any()
    assert not ((vol['label'] > 0) & (vol['lung'] == 0)).any()


def test_hu_ranges():
    v = phantom_volume(5, 96, severity=1, thickness=5.0)
    hu, lab, lung = v['hu'], v['label'], v['lung']
    par = np.median(hu[(lung > 0) & (lab == 0)])
    assert -900 <= par <= -700, par                                   # lung parenchyma (inspiration level + dependent gradient)
    soft = np.median(hu[(hu > -60) & (hu < 150) & (lung == 0)])
    assert 0 <= soft <= 70, soft                                      # muscle, heart, liver
    fat = np.median(hu[(hu > -160) & (hu < -60) & (lung == 0)])
    assert -130 <= fat <= -70, fat
    assert hu.max() > 400                                             # cortical bone
    corner = hu[:, :3, :3]
    assert abs(np.median(corner) + 1000) < 20                         # air outside the body
    assert np.median(hu[lab > 0]) > par + 80                          # lesions are denser than the parenchyma
    # not a threshold problem: many non-lesion lung voxels lie in the lesion HU range
    les_lo, les_hi = np.percentile(hu[lab > 0], [10, 90])
    inrange = (hu >= les_lo) & (hu <= les_hi) & (lung > 0)
    assert (inrange & (lab == 0)).sum() > 0.1 * (inrange & (lab > 0)).sum()


def test_lesion_free():
    v = phantom_volume(4, M, severity=0)
    assert v['meta']['severity_band'] == 'CT-0' and v['meta']['involvement'] == 0 and not v['label'].any()
    assert (v['lung'] > 0).any()


def test_default_set_band_mix():
    "The default data set (seed 0, 40 volumes) has lesions in every volume, mostly CT-1/CT-2 (parameters only: fast)."
    bands = [_draw_params(phantom_seed(0, i), 384)['band'] for i in range(40)]
    assert bands.count(0) == 0 and bands.count(1) + bands.count(2) >= 28 and max(bands) >= 3
    # lesion-free volumes on request
    assert _draw_params(phantom_seed(0, 0), 384, band_probs=(1, 0, 0, 0, 0))['band'] == 0


def test_patients_differ():
    "Between-patient variation of the default set: parenchyma, lesion density and pattern, distractors, kernel, noise."
    P = [_draw_params(phantom_seed(0, i), 384) for i in range(40)]
    mu = [p['mu_lung'] for p in P]
    assert min(mu) < -880 and max(mu) > -790 and all(-900 <= m <= -760 for m in mu)
    assert all(50 <= p['gravity'] <= 150 for p in P)
    con = [p['mu_ggo'] - p['mu_lung'] - 0.5 * p['gravity'] for p in P]
    assert min(con) >= 100 - 1e-9 and min(con) < 150 and max(con) > 350          # faint and dense ground glass
    assert all(-750 - 1e-9 <= p['mu_ggo'] <= -300 for p in P)
    assert len({p['pattern'] for p in P}) == 4 and {p['kernel'] for p in P} == {'sharp', 'soft'}
    assert any(p['emph'] > 0 for p in P) and any(p['n_scars'] > 0 for p in P) and any(p['motion_mm'] > 0 for p in P)
    assert 0.5 <= np.mean([p['atel'] > 0 for p in P]) <= 0.9 and min(p['atel_hu'] for p in P) < -500   # ground-glass-like mimic
    noise = [p['noise_hu'] for p in P]
    assert min(noise) >= 10 and max(noise) <= 80 and max(noise) > 50


def test_noise_level():
    "The noise standard deviation of the final image is the drawn noise_hu, for sharp and soft kernels (air outside the body)."
    kernels = set()
    for seed in (3, 9, 12, 14):
        v = phantom_volume(seed, 128, severity=1, thickness=5.0)
        air = np.concatenate([v['hu'][:, 3:8, 3:8].ravel(), v['hu'][:, 3:8, -8:-3].ravel()]) + 1000   # top corners: air at -1000
        up = air[air >= 0]                     # values below -1024 HU are clipped: use the upper half of the distribution
        sd = np.sqrt(np.mean(up ** 2) - 1 / 12)
        kernels.add(v['meta']['kernel'])
        assert abs(sd / v['meta']['noise_hu'] - 1) < 0.15, (v['meta']['kernel'], sd, v['meta']['noise_hu'])
    assert kernels == {'sharp', 'soft'}


@pytest.mark.parametrize('band', [1, 2, 3, 4])
def test_involvement_matches_band(band):
    v = phantom_volume(100 + band, M, severity=band, thickness=5.0)
    lo, hi = BAND_LIMITS[band]
    frac = v['label'].sum() / (v['lung'] > 0).sum()
    assert lo < frac < hi or (band == 4 and frac >= lo), (band, frac)
    assert abs(frac - v['meta']['involvement']) < 1e-3 and severity_band(frac) == band
    assert abs(frac - v['meta']['target_fraction']) < 0.02


def _centroid_ras(mask_zyx, affine):
    z, y, x = np.nonzero(mask_zyx)
    ijk = np.stack([x.mean(), y.mean(), z.mean(), 1.0])
    return affine @ ijk


@pytest.mark.parametrize('flip', [False, True])
def test_left_lung_on_patient_left(flip):
    v = phantom_volume(8, M, thickness=5.0, flip_x=flip)
    assert v['meta']['flip_x'] == flip
    assert np.sign(v['affine'][0, 0]) == (1 if flip else -1) and v['affine'][1, 1] < 0 and v['affine'][2, 2] > 0
    left, right = _centroid_ras(v['lung'] == 1, v['affine']), _centroid_ras(v['lung'] == 2, v['affine'])
    assert left[0] < 0 < right[0]              # RAS: +x is the patient's right
    if not flip:                               # array x runs toward the patient's left
        assert np.nonzero(v['lung'] == 1)[2].mean() > np.nonzero(v['lung'] == 2)[2].mean()
    # the same patient: flipping is a pure storage change
    other = phantom_volume(8, M, thickness=5.0, flip_x=not flip)
    assert np.array_equal(other['hu'][:, :, ::-1], v['hu']) and np.array_equal(other['lung'][:, :, ::-1], v['lung'])


def test_make_phantom_files(tmp_path, capsys):
    paths = make_phantom(tmp_path, n_volumes=3, seed=7, matrix=40, thickness=5.0, p_flip=0.5)
    names = sorted(p.name for p in tmp_path.iterdir())
    want = sorted([f'volume-covid19-A-{i:04d}_{k}.nii.gz' for i in range(3) for k in ('ct', 'seg', 'lung')] + ['phantom.json'])
    assert names == want and [p.name for p in paths] == [f'volume-covid19-A-{i:04d}_ct.nii.gz' for i in range(3)]
    meta = json.loads((tmp_path / 'phantom.json').read_text())
    assert meta['params']['n_volumes'] == 3 and meta['params']['options'] == {'p_flip': 0.5, 'thickness': 5.0}
    for i, m in enumerate(meta['volumes']):
        assert m['ct'] == phantom_name(i, 'ct') and m['seg'] == phantom_name(i, 'seg')
        ct, seg = nib.load(tmp_path / m['ct']), nib.load(tmp_path / m['seg'])
        assert ct.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
        np.testing.assert_allclose(ct.affine, np.array(m['affine']), atol=1e-4)
        np.testing.assert_allclose(ct.header.get_zooms(), m['spacing'][::-1], rtol=1e-5)
        assert int(ct.header['sform_code']) == 1 and int(ct.header['qform_code']) == 1
        np.testing.assert_allclose(seg.affine, ct.affine)
        v = phantom_volume(phantom_seed(7, i), 40, thickness=5.0, p_flip=0.5)
        assert np.array_equal(np.asarray(ct.dataobj).transpose(2, 1, 0), v['hu'].astype(np.int16))
        assert np.array_equal(np.asarray(seg.dataobj).transpose(2, 1, 0), v['label'])
        # left lung (file) on the patient's left according to the file's affine, flipped or not
        lung = np.asarray(nib.load(tmp_path / m['lung']).dataobj).transpose(2, 1, 0)
        assert _centroid_ras(lung == 1, ct.affine)[0] < 0 < _centroid_ras(lung == 2, ct.affine)[0]
    # a volume does not depend on how many volumes are built
    one = make_phantom(tmp_path / 'one', n_volumes=1, seed=7, matrix=40, thickness=5.0, p_flip=0.5, verbose=False)
    assert np.array_equal(np.asarray(nib.load(one[0]).dataobj), np.asarray(nib.load(paths[0]).dataobj))
    # same parameters: returned as they are, not rewritten, and said so
    capsys.readouterr()
    mt = [p.stat().st_mtime_ns for p in paths]
    again = make_phantom(tmp_path, n_volumes=3, seed=7, matrix=40, thickness=5.0, p_flip=0.5)
    assert again == paths and [p.stat().st_mtime_ns for p in paths] == mt
    assert 'not regenerating' in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]        # no temporary files left
    # other parameters: regenerated, files of the old set that the new one lacks are removed
    make_phantom(tmp_path, n_volumes=2, seed=8, matrix=40, thickness=5.0, verbose=False)
    assert not (tmp_path / phantom_name(2, 'ct')).exists()
    assert json.loads((tmp_path / 'phantom.json').read_text())['params']['seed'] == 8
