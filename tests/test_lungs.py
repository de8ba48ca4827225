import logging
import numpy as np
from sapl import lungs as L, data as D


def _missing(mask, truth, k):
    return int(((truth == k).any((1, 2)) & ~(mask == k).any((1, 2))).sum())


def test_lung_cut_by_dense_band_keeps_both_pieces():
    hu, truth, sp = L.toy_chest(band=True)
    thr = D.classical_lung_masks(hu, sp)
    assert _missing(thr, truth, 2) > 0                     # the threshold masks lose a piece of the right lung
    m = D.lung_masks(hu, sp)                                # the fallback route
    assert _missing(m, truth, 2) == 0 and _missing(m, truth, 1) == 0
    s = L.score_lungs(m, truth)
    assert s['dice_right'] >= 0.95 and s['dice_left'] >= 0.95


def test_subpleural_consolidation_is_inside_the_lung():
    hu, truth, sp = L.toy_chest(subpleural=True)
    hu0, _, _ = L.toy_chest()
    lens = (truth == 1) & (hu > -300) & (hu0 < -300)       # the consolidation against the left lateral wall
    assert lens.sum() > 100
    thr = D.classical_lung_masks(hu, sp)
    cav = L.cavity_lung_masks(hu, sp)
    assert (thr[lens] == 1).mean() < 0.5                     # the threshold masks cut it out
    assert (cav[lens] == 1).mean() >= 0.9
    assert L.score_lungs(cav, truth)['dice_left'] >= 0.95


def test_check_flags_a_lung_removed_from_slices(caplog):
    hu, truth, sp = L.toy_chest()
    assert L.check_lungs(truth, sp, hu, log_it=False) == []
    bad = truth.copy(); bad[10:13][bad[10:13] == 2] = 0
    with caplog.at_level(logging.WARNING, logger='sapl'):
        f = L.check_lungs(bad, sp, hu, source='case-7.nii.gz')
    checks = {x['check'] for x in f}
    assert {'slice_runs', 'vanishes'} <= checks
    assert all(x['lung'] == 'right' for x in f if x['check'] in ('slice_runs', 'vanishes'))
    assert [x for x in f if x['check'] == 'slice_runs'][0]['slices'] == [10, 11, 12]
    lines = [r.getMessage() for r in caplog.records if 'implausible' in r.getMessage()]
    assert len(lines) == 1 and 'case-7.nii.gz' in lines[0] and '10-12' in lines[0]


def test_lung_masks_logs_findings_once_naming_the_file(caplog):
    hu, truth, sp = L.toy_chest()
    hu[:, :, :48][(truth[:, :, :48] == 2)] = 40.            # the right lung fully consolidated: no aerated lung on that side
    with caplog.at_level(logging.WARNING, logger='sapl'):
        D.lung_masks(hu, sp, source='sick.nii.gz')
    lines = [r.getMessage() for r in caplog.records if 'implausible' in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith('sick.nii.gz')


def test_cache_key_follows_the_lung_code():
    assert set(D._LUNG_CODE) <= set(dir(L))
    assert len(D.preprocess_fingerprint()) == 12
