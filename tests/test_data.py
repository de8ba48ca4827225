import os, logging
from pathlib import Path
import numpy as np, nibabel as nib, pytest, torch
from sapl import data as D
from sapl.data import DataError
from conftest import toy_chest, write_nii, SHARED


# ---------------------------------------------------------------- layouts
def test_covid_layout(covid_dir):
    cs = D.find_cases(covid_dir)
    assert D.detect_layout(covid_dir) == 'covid19-20'
    assert [c.id for c in cs] == [f'volume-covid19-A-{i:04d}' for i in range(3)]
    assert all(c.label and c.label.endswith('_seg.nii.gz') for c in cs)


def test_mosmed_layout(tmp_path):
    hu, lab = toy_chest()
    for k, n in (('CT-0', 1), ('CT-2', 2)):
        (tmp_path/'studies'/k).mkdir(parents=True, exist_ok=True)
        write_nii(tmp_path/'studies'/k/f'study_{n:04d}.nii.gz', hu)
    (tmp_path/'masks').mkdir()
    write_nii(tmp_path/'masks'/'study_0002_mask.nii.gz', lab, dtype=np.uint8)
    cs = D.find_cases(tmp_path)
    assert [(c.id, c.group, c.label is not None) for c in cs] == [('study_0001', 'CT-0', False), ('study_0002', 'CT-2', True)]
    v = D.preprocess_case(cs[1], 32)
    assert v.label.sum() > 0 and v.group == 'CT-2'


def test_nnunet_layout(tmp_path):
    hu, lab = toy_chest()
    for d in ('imagesTr', 'labelsTr', 'imagesTs'): (tmp_path/d).mkdir()
    write_nii(tmp_path/'imagesTr'/'covid_001_0000.nii.gz', hu)
    write_nii(tmp_path/'labelsTr'/'covid_001.nii.gz', lab, dtype=np.uint8)
    write_nii(tmp_path/'imagesTs'/'covid_101_0000.nii.gz', hu)
    cs = D.find_cases(tmp_path)
    assert D.detect_layout(tmp_path) == 'nnunet'
    assert [(c.id, c.label is not None) for c in cs] == [('covid_001', True), ('covid_101', False)]


def test_unknown_and_missing_layout(tmp_path):
    with pytest.raises(DataError, match='unknown layout'): D.find_cases(tmp_path)
    with pytest.raises(DataError, match='data folder not found'): D.find_cases(tmp_path/'nope')


# ---------------------------------------------------------------- bad input
def _case(d, i=0): return D.find_cases(d)[i]


def test_truncated_nifti(covid_dir):
    c = _case(covid_dir); raw = Path(c.image).read_bytes(); Path(c.image).write_bytes(raw[:len(raw)//3])
    with pytest.raises(DataError, match=r'volume-covid19-A-0000_ct\.nii\.gz: cannot read NIfTI'):
        D.preprocess_case(c, 32)


def test_shape_mismatch(covid_dir):
    c = _case(covid_dir); write_nii(c.label, np.zeros((6, 60, 64)), dtype=np.uint8)
    with pytest.raises(DataError, match=r'_seg\.nii\.gz: shape \(6, 60, 64\) does not match'):
        D.preprocess_case(c, 32)


def test_affine_mismatch(covid_dir):
    c = _case(covid_dir); _, lab = toy_chest()
    write_nii(c.label, lab, spacing=(3., .8, .8), dtype=np.uint8)
    with pytest.raises(DataError, match='affine does not match'):
        D.preprocess_case(c, 32)


def test_nan_voxels(covid_dir):
    c = _case(covid_dir); hu, _ = toy_chest(); hu[2, 3, 4] = np.nan
    write_nii(c.image, hu, dtype=np.float32)
    with pytest.raises(DataError, match=r'_ct\.nii\.gz: 1 NaN/inf voxels'):
        D.preprocess_case(c, 32)


def test_non_binary_mask(covid_dir):
    c = _case(covid_dir); _, lab = toy_chest(); lab[lab > 0] = 2
    write_nii(c.label, lab, dtype=np.uint8)
    with pytest.raises(DataError, match=r'_seg\.nii\.gz: mask values outside \{0, 1\}: \[2\]'):
        D.preprocess_case(c, 32)


def test_no_lungs(tmp_path):
    hu = np.full((4, 32, 32), 40, np.float32)
    write_nii(tmp_path/'volume-covid19-A-0009_ct.nii.gz', hu)
    with pytest.raises(DataError, match=r'volume-covid19-A-0009_ct\.nii\.gz: no lungs found'):
        D.preprocess_case(_case(tmp_path), 32)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r'x_ct\.nii\.gz: file not found'):
        D.load_nifti(tmp_path/'x_ct.nii.gz')


def test_bad_parameters(covid_dir):
    with pytest.raises(ValueError, match='ratio'): D.make_split(D.find_cases(covid_dir), 0)
    with pytest.raises(ValueError, match='unknown profile'): D.get_profile('big')
    with pytest.raises(ValueError, match='unknown dataset'): D.prepare_data('kaggle', covid_dir)


# ---------------------------------------------------------------- preprocessing + cache
def test_preprocess_and_cache(covid_dir, tmp_path, monkeypatch):
    c = _case(covid_dir); cache = tmp_path/'cache'
    v = D.preprocess_case(c, 32, cache)
    assert v.image.shape[1:] == (32, 32) and v.image.min() >= 0 and v.image.max() <= 1
    assert set(np.unique(v.lung)) == {0, 1, 2} and v.label.sum() > 0
    assert (v.label > 0).sum() <= ((v.lung > 0) | (v.label > 0)).sum()
    assert len(v.z) == 6 and v.shape == (6, 64, 64)
    files = os.listdir(cache); assert len(files) == 1 and files[0].endswith('.npz')
    monkeypatch.setattr(D, 'lung_masks', lambda *a, **k: (_ for _ in ()).throw(AssertionError('recomputed')))
    v2 = D.preprocess_case(c, 32, cache)       # second run: from the cache
    np.testing.assert_array_equal(v.image, v2.image); assert v2.box == v.box


def test_cache_write_is_atomic(covid_dir, tmp_path, monkeypatch):
    def boom(f, **kw): f.write(b'partial'); raise KeyboardInterrupt
    monkeypatch.setattr(np, 'savez_compressed', boom)
    with pytest.raises(KeyboardInterrupt): D.preprocess_case(_case(covid_dir), 32, tmp_path/'c')
    assert os.listdir(tmp_path/'c') == []


def test_semantic_is_new_array():
    lung = np.array([[0, 1, 2, 2]], np.uint8); lab = np.array([[1, 0, 1, 0]])
    sem = D.semantic(lung, lab)
    assert sem.tolist() == [[3, 1, 3, 2]] and lung.tolist() == [[0, 1, 2, 2]]


# ---------------------------------------------------------------- lung masks
@pytest.mark.parametrize('flip', [False, True])
def test_lung_masks_left_right_from_affine(flip):
    hu, _ = toy_chest(Z=4)
    aff = np.diag([-.8, -.8, 2.5, 1.])
    if flip:  # store x running toward the patient's right: array flipped, affine says so
        hu = hu[:, :, ::-1].copy(); aff = np.diag([.8, -.8, 2.5, 1.])
    m = D.lung_masks(hu, (2.5, .8, .8), aff)
    left_x = np.nonzero(m == 1)[2].mean(); right_x = np.nonzero(m == 2)[2].mean()
    assert (left_x < right_x) if flip else (left_x > right_x)


def test_lung_masks_thin_volume():
    hu, _ = toy_chest(Z=2)
    m = D.lung_masks(hu, (5., .8, .8))
    truth = np.zeros_like(m); truth[:, 16:48, 36:54] = 1; truth[:, 16:48, 10:28] = 2
    for k in (1, 2):
        inter = ((m == k) & (truth == k)).sum(); assert 2*inter/((m == k).sum() + (truth == k).sum()) > .9


def test_lung_masks_on_phantom():
    from sapl.phantom import phantom_volume
    ph = phantom_volume(3, matrix=96)
    m = D.lung_masks(ph['hu'], ph['spacing'], ph['affine'])
    for k in (1, 2):
        a, b = m == k, ph['lung'] == k
        assert 2*(a & b).sum()/(a.sum() + b.sum()) > .85, k


def test_lungmask_weights_path(tmp_path, caplog):
    "The lungmask route loads a local R231-format weights file (random weights here: only the plumbing is tested)."
    lm = pytest.importorskip('lungmask.mask')
    from lungmask.resunet import UNet
    torch.manual_seed(0)
    net = UNet(n_classes=3, padding=True, depth=5, up_mode='upsample', batch_norm=True, residual=False)
    w = tmp_path/'unet_r231-d5d2fc3d.pth'; torch.save(net.state_dict(), w)
    hu, _ = toy_chest(Z=2)
    with caplog.at_level(logging.INFO, logger='sapl'):
        m = D.lung_masks(hu, (2.5, .8, .8), weights=str(w))
    assert m.shape == hu.shape and set(np.unique(m)) <= {0, 1, 2}
    assert 'lungmask R231' in caplog.text
    with pytest.raises(DataError, match='weights file not found'):
        D.lung_masks(hu, (2.5, .8, .8), weights=str(tmp_path/'none.pth'))



# ---------------------------------------------------------------- lung masks in severe disease (sapl.lungs)
def _chest(Z=16, sp=(5., 1.5, 1.5)):
    "A 96-px toy chest at 1.5 mm: body at 40 HU, two aerated lungs at -850 HU with noise; truth 1 left (high x), 2 right."
    r = np.random.default_rng(1)
    hu = np.full((Z, 96, 96), -1000, np.float32); hu[:, 10:86, 4:92] = 40
    truth = np.zeros(hu.shape, np.uint8); truth[:, 20:74, 56:84] = 1; truth[:, 20:74, 12:40] = 2
    hu[truth > 0] = -850
    return hu + r.normal(0, 10, hu.shape).astype(np.float32), truth, sp

def _dice(a, b): return 2*(a & b).sum()/(a.sum() + b.sum())

def test_filled_keeps_a_lung_cut_in_two():
    "A dense band cuts the right lung into an upper and a lower piece: the threshold fallback drops one, the filled one keeps both."
    hu, truth, sp = _chest()
    hu[7:9][truth[7:9] == 2] = 10
    t, f = D.lung_masks(hu, sp, fallback='threshold'), D.lung_masks(hu, sp, fallback='filled')
    rows = (truth == 2).any((1, 2))
    assert ((t == 2).any((1, 2)) < rows).sum() >= 6        # the threshold fallback loses a whole piece
    assert ((f == 2).any((1, 2)) == rows).all()              # the filled one has the right lung on every slice
    assert _dice(f == 2, truth == 2) > .95 and _dice(f == 1, truth == 1) > .95

def test_filled_puts_back_subpleural_consolidation():
    "Consolidation (+20 HU) against the chest wall over 4 slices: outside the threshold mask, inside the filled one."
    hu, truth, sp = _chest()
    les = np.zeros_like(truth, bool); les[6:10, 30:60, 74:84] = True
    hu[les] = 20
    t, f = D.lung_masks(hu, sp, fallback='threshold'), D.lung_masks(hu, sp, fallback='filled')
    assert (t[les] == 1).mean() < .5 and (f[les] == 1).mean() > .95
    assert _dice(f == 1, truth == 1) > .99 > _dice(t == 1, truth == 1)

def test_filled_recovers_a_lung_tip_cut_off_by_ground_glass(monkeypatch):
    "The right lung's top two slices are a small aerated tip above a ground-glass slice: stages 1-3 drop it, Eq. L3 puts it back."
    from sapl import lungs as L
    hu, truth, sp = _chest()
    zs = np.nonzero((truth == 2).any((1, 2)))[0]; z0 = zs[0]
    tip = np.zeros_like(truth, bool); tip[z0:z0 + 2] = truth[z0:z0 + 2] == 2
    ys, xs = np.nonzero(tip[z0]); cy, cx = int(ys.mean()), int(xs.mean())
    keep = np.zeros_like(tip); keep[z0:z0 + 2, cy - 3:cy + 3, cx - 3:cx + 3] = True
    hu[tip & ~keep] = 40; hu[z0 + 2][truth[z0 + 2] == 2] = -300     # a 6x6 tip on two slices, ground glass below it
    f = D.lung_masks(hu, sp, fallback='filled')
    assert (f[z0:z0 + 2][keep[z0:z0 + 2]] == 2).all()
    monkeypatch.setattr(L, 'recover_pieces', lambda lung, *a, **k: lung)   # without Eq. L3
    g = D.lung_masks(hu, sp, fallback='filled')
    assert not (g[z0:z0 + 2] == 2).any()

def _slab(z=12):
    "A 64 x 64 body with both lungs' region set to soft tissue, 5 x 2 x 2 mm voxels, for hand-drawn lung pieces."
    hu = np.full((z, 64, 64), -1000, np.float32); hu[:, 8:56, 4:60] = 40
    return hu, (5., 2., 2.)

def test_filled_splits_lungs_that_meet_behind_the_heart(monkeypatch):
    "A medial column holding both lungs on the lowest slices, joined to the left lung only higher up: split at the midline (Eq. L1 per piece)."
    from sapl import lungs as L
    hu, sp = _slab()
    hu[:, 16:40, 10:28] = -850; hu[:, 16:40, 36:54] = -850; hu[:, 42:54, 26:38] = -850; hu[11, 40:42, 36:38] = -850
    f = L.filled_lung_masks(hu, sp)
    assert (f[:11, 46:50, 27:30] == 2).all() and (f[:11, 46:50, 33:36] == 1).all()
    monkeypatch.setattr(L, '_split_straddling', lambda left, right, *a: (left, right))   # Eq. L1 per 3D component only
    assert not (L.filled_lung_masks(hu, sp)[:11, 46:50, 27:30] == 2).any()

def test_filled_joins_a_base_piece_that_touches_one_lung(monkeypatch):
    "A base piece medial to the right lung, linked to it through a central piece the tube rule drops: Eq. L3b puts it back, gas stays out."
    from sapl import lungs as L
    hu, sp = _slab()
    hu[6:, 16:48, 10:28] = -850; hu[5, 16:46, 10:28] = -850; hu[5:, 16:48, 36:54] = -850
    hu[:5, 50:53, 24:30] = -850; hu[5, 47:51, 24:30] = -850
    gas = hu.copy(); gas[:5, 50:53, 24:30] = -1000; gas[5, 47:51, 24:30] = -1000
    assert (L.filled_lung_masks(hu, sp)[:5, 51, 27] == 2).all()
    assert not L.filled_lung_masks(gas, sp)[:5, 51, 27].any()
    monkeypatch.setattr(L, '_join_touching', lambda lung, *a: lung)   # without Eq. L3b
    assert not L.filled_lung_masks(hu, sp)[:5, 51, 27].any()

def test_fingerprint_follows_only_the_chosen_fallback(monkeypatch):
    "Editing the filled fallback's code changes the 'filled' cache key, not the 'threshold' one."
    from sapl import lungs as L
    before = {fb: D.preprocess_fingerprint(fb) for fb in D.FALLBACKS}
    monkeypatch.setattr(L, 'LUNG_CODE', L.LUNG_CODE[:-1]); D.preprocess_fingerprint.cache_clear()
    try: after = {fb: D.preprocess_fingerprint(fb) for fb in D.FALLBACKS}
    finally: D.preprocess_fingerprint.cache_clear()
    assert after['threshold'] == before['threshold'] and after['filled'] != before['filled']

def test_check_flags_a_lung_removed_from_slices():
    from sapl.lungs import check_lungs
    from sapl.phantom import phantom_volume
    ph = phantom_volume(3, matrix=96)
    assert check_lungs(ph['lung'], ph['spacing'], ph['hu']) == []      # the true lungs pass
    lung = ph['lung'].copy(); zs = np.nonzero((lung == 2).any((1, 2)))[0]; cut = zs[len(zs)//2:len(zs)//2 + 3]
    lung[cut][lung[cut] == 2] = 0
    lung[cut] = np.where(lung[cut] == 2, 0, lung[cut])
    found = check_lungs(lung, ph['spacing'], ph['hu'])
    assert any(f.startswith('right lung absent on slices') and f'{cut[0]}-{cut[-1]}' in f for f in found), found

def test_findings_logged_cached_and_fallback_in_key(covid_dir, tmp_path, caplog, monkeypatch):
    "The findings of a volume are logged with its file, stored in the cache and read back; the fallback is part of the cache key."
    c = _case(covid_dir)
    assert D.cache_key(c, 32, 5., None, 'filled') != D.cache_key(c, 32, 5., None, 'threshold')
    one_sided = lambda hu, *a, **k: np.where(np.arange(hu.shape[2])[None, None, :] >= hu.shape[2]//2, (hu < -400).astype(np.uint8), 0).astype(np.uint8)
    monkeypatch.setattr(D, 'lung_masks', one_sided)       # a mask with the right lung missing
    with caplog.at_level(logging.WARNING, logger='sapl'):
        v = D.preprocess_case(c, 32, tmp_path)
    assert 'no right lung' in v.lung_findings and c.image in caplog.text and 'no right lung' in caplog.text
    monkeypatch.setattr(D, 'lung_masks', lambda *a, **k: (_ for _ in ()).throw(AssertionError('recomputed')))
    assert D.preprocess_case(c, 32, tmp_path).lung_findings == v.lung_findings

def test_benchmark_phantom_keeps_threshold_fallback():
    "The committed benchmark's data set keeps the fallback its tables were made with; everything else gets the filled one."
    assert D.lung_fallback_for('phantom') == 'threshold' and D.lung_fallback_for('phantom', 'filled') == 'filled'
    assert D.lung_fallback_for('covid19-20') == 'filled' and D.lung_fallback_for('phantom-mosmed') == 'filled'
    with pytest.raises(ValueError, match='fallback'): D.lung_fallback_for('phantom', 'convex')

# ---------------------------------------------------------------- splits
def test_make_split_nested_and_disjoint(covid_dir):
    cases = [D.Case(f'v{i:03d}', 'i', 'l') for i in range(50)] + [D.Case(f'u{i:03d}', 'i') for i in range(5)]
    s = {r: D.make_split(cases, r, seed=0) for r in (.1, .2, .3)}
    assert set(s[.1].train_l) < set(s[.2].train_l) < set(s[.3].train_l)
    assert s[.1].test == s[.3].test and s[.1].val == s[.3].val
    for sp in s.values():
        parts = [set(sp.train_l), set(sp.train_u), set(sp.val), set(sp.test)]
        assert sum(map(len, parts)) == 55 and len(set.union(*parts)) == 55
        assert all(u.startswith('v') or u in sp.train_u for u in set.union(*parts))
    assert D.make_split(cases, .1, seed=1).test != s[.1].test


SPLITS = SHARED/'splits'/'sassl'


@pytest.mark.skipif(not SPLITS.is_dir(), reason='published split lists not available')
def test_paper_split_covid249():
    for r, (nl, nu) in {0.1: (18, 162), 0.2: (36, 144), 0.3: (54, 126)}.items():
        s = D.paper_split(SPLITS/'COVID249', r)
        assert (len(s.train_l), len(s.train_u), len(s.val), len(s.test)) == (nl, nu, 19, 50)
        assert not (set(s.train_l) | set(s.train_u)) & (set(s.val) | set(s.test))
    s1, s2 = D.paper_split(SPLITS/'COVID249', .1), D.paper_split(SPLITS/'COVID249', .2)
    assert set(s1.train_l) <= set(s2.train_l)
    sl = D.read_split_list(SPLITS/'COVID249'/'test_slice.xlsx')
    assert 'volume-covid19-A-0318_0' in sl and sl['volume-covid19-A-0318_0'][-1] == 60
    assert sl['volume-covid19-A-0301'][:2] == [0, 1]


@pytest.mark.skipif(not SPLITS.is_dir(), reason='published split lists not available')
def test_paper_split_mosmed():
    s = D.paper_split(SPLITS/'MOS1000')
    assert (len(s.train_l), len(s.train_u), len(s.val), len(s.test)) == (40, 1060, 10, 32)
    assert s.train_l[0] == 'study_0255' and all(t.endswith('_rot') for t in s.test)
    z = s.slices['study_0255']; assert z == list(range(z[0], z[-1] + 1))  # contiguous sub-range


# ---------------------------------------------------------------- datasets
def test_augmentation_is_identical_for_image_and_masks():
    img = np.zeros((1, 32, 32), np.float32); img[0, 5:15, 8:20] = 1
    v = D.Volume('a', img, (img > .5).astype(np.uint8), (img > .5).astype(np.uint8), np.array([0]), (0, 32, 0, 32), (1, 32, 32), (1, 1, 1), np.eye(4))
    ds = D.LabeledSlices([v], augment=True, seed=0)
    for e in range(6):
        ds.set_epoch(e); it = ds[0]
        agree = ((it['image'][0] > .5) == (it['label'][0] > .5)).float().mean()
        assert agree > .97 and torch.equal(it['label'][0] > .5, it['lung'] > 0)
    ds.set_epoch(0); a = ds[0]['image']; ds.set_epoch(1); b = ds[0]['image']; ds.set_epoch(0)
    assert torch.equal(a, ds[0]['image'])


def test_prepare_data(covid_dir, tmp_path):
    b = D.prepare_data('covid19-20', covid_dir, .5, 'smoke', cache_dir=tmp_path/'c', progress=False)
    assert len(b.train_l) + len(b.train_u) + len(b.val) + len(b.test) == 3
    assert b.train_l[0].image.shape[1:] == (32, 32)
