"Lung masks (sapl.lungs): the two failure modes of the first fallback on small generated volumes, and the plausibility check."
import json, logging
import numpy as np, pytest
from sapl import lungs as L
from sapl import data as D
from conftest import write_nii

SP = (2.5, 1., 1.)


def chest(Z=10, seed=0):
    "An elliptical chest in LPS (z,y,x) at 1 mm: 40 HU body, 10 mm wall, two D-shaped lungs at -850 HU, mediastinum between."
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:128, 0:160]
    body = ((yy - 64)/52.)**2 + ((xx - 80)/72.)**2 <= 1
    cav = ((yy - 64)/42.)**2 + ((xx - 80)/62.)**2 <= 1
    lung2 = cav & (np.abs(xx - 80) > 14)
    hu = np.full((Z, 128, 160), -1000, np.float32); hu[:, body] = 40; hu[:, lung2] = -850
    truth = np.zeros(hu.shape, np.uint8); truth[:, lung2 & (xx > 80)] = 1; truth[:, lung2 & (xx < 80)] = 2
    return hu + r.normal(0, 10, hu.shape).astype(np.float32), truth


def dice(a, b): return 2*(a & b).sum()/(a.sum() + b.sum())


def test_lung_cut_in_two_keeps_both_pieces():
    hu, truth = chest()
    hu[:, 60:66, 10:66] = 30  # a dense band across the whole right lung, on every slice: two 3D pieces
    m = L.classical_lung_masks(hu, SP)
    upper, lower = truth[:, :60] == 2, truth[:, 66:] == 2
    assert (m[:, :60][upper] == 2).mean() > .95 and (m[:, 66:][lower] == 2).mean() > .95  # both pieces, right side
    assert dice(m == 2, truth == 2) > .95 and dice(m == 1, truth == 1) > .95
    old = L._classical_lung_masks_v1(hu, SP)                                           # the first fallback drops one
    assert min((old[:, :60][upper] == 2).mean(), (old[:, 66:][lower] == 2).mean()) < .05


def test_subpleural_consolidation_included():
    hu, truth = chest()
    yy, xx = np.mgrid[0:128, 0:160]
    cons = (truth[0] == 1) & (((yy - 64)/42.)**2 + ((xx - 80)/62.)**2 > .55) & (np.abs(yy - 64) < 10)  # lateral, against the wall
    hu[:, cons] = 20
    m = L.classical_lung_masks(hu, SP)
    assert (m[:, cons] == 1).mean() > .9                        # the consolidation is in the left lung
    assert dice(m == 1, truth == 1) > .95
    assert (L._classical_lung_masks_v1(hu, SP)[:, cons] == 1).mean() < .5   # the first fallback cut it out
    wall = (truth[0] == 0) & (((yy - 64)/52.)**2 + ((xx - 80)/72.)**2 <= 1) & (xx > 130)
    assert (m[:, wall] > 0).mean() < .05                        # not the chest wall beside it


def test_check_flags_lung_removed_from_slices(caplog):
    hu, truth = chest(Z=12)
    assert L.check_lungs(truth, SP, hu, log_it=False) == []
    bad = truth.copy(); bad[5:7][bad[5:7] == 2] = 0
    with caplog.at_level(logging.WARNING, logger='sapl'):
        f = L.check_lungs(bad, SP, hu, source='x_ct.nii.gz')
    checks = {d['check']: d for d in f}
    assert checks['slice_runs']['slices'] == [5, 6] and checks['slice_runs']['lung'] == 'right'
    assert checks['vanishes']['slices'] == [5, 6]
    assert caplog.text.count('x_ct.nii.gz: lung mask implausible') == 1 and '5-6' in caplog.text
    half = truth.copy(); half[half == 1] = 0; half[:, :, 125:][truth[:, :, 125:] == 1] = 1  # left lung mostly gone
    assert 'volume_ratio' in {d['check'] for d in L.check_lungs(half, SP, log_it=False)}


def test_findings_stored_with_cached_volume(tmp_path):
    hu, truth = chest(Z=8)
    hu[3][truth[3] == 2] = 40        # the right lung vanishes on slice 3 (a mask problem the check must report)
    write_nii(tmp_path/'volume-covid19-A-0000_ct.nii.gz', hu, spacing=SP, affine=np.diag([-1., -1., 2.5, 1.]))
    c = D.find_cases(tmp_path)[0]
    v = D.preprocess_case(c, 32, tmp_path/'cache')
    assert any(f['check'] == 'slice_runs' and f['slices'] == [3] for f in v.findings)
    (npz,) = (tmp_path/'cache').glob('*.npz')
    assert L.mask_findings(npz) == v.findings == D.preprocess_case(c, 32, tmp_path/'cache').findings
    assert L.lungs_fingerprint() in json.dumps([L.lungs_fingerprint()])
