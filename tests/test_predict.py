"`sapl-predict` on tiny volumes: NIfTI and DICOM input, averaging, bad inputs, failing cases, old and foreign checkpoints."
import json, os, re, subprocess, sys
from dataclasses import asdict
from pathlib import Path
import numpy as np, nibabel as nib, pandas as pd, pytest, torch
from conftest import toy_chest, write_nii, ROOT
import sapl.predict as P
from sapl.train import RunConfig, predict_meta, save_checkpoint
from sapl.unet import UNet

CFG = RunConfig(profile='smoke')


def ckpt(path, bias=None, seed=0, new_style=True, n_models=1, cfg=CFG):
    "A checkpoint of smoke-profile U-Nets; `bias` makes the network output that constant logit everywhere."
    torch.manual_seed(seed)
    nets = [UNet(cfg.prof.widths) for _ in range(n_models)]
    if bias is not None:
        with torch.no_grad(): nets[0].decoder.head.weight.zero_(); nets[0].decoder.head.bias.fill_(bias)
    ck = {'models': [n.state_dict() for n in nets], 'config': json.loads(json.dumps(asdict(cfg)))}
    if new_style: ck['predict'] = predict_meta(cfg)
    save_checkpoint(path, ck)
    return str(path)


def write_dicom(folder, hu, spacing=(2.5, .8, .8)):
    "Write a (z,y,x) HU volume as a CT DICOM series whose geometry matches `write_nii`'s affine (identity LPS directions)."
    import SimpleITK as sitk
    folder.mkdir(parents=True)
    w = sitk.ImageFileWriter(); w.KeepOriginalImageUIDOn()
    uid = '1.2.826.0.1.3680043.2.1125.1.42'
    for z in range(len(hu)):
        im = sitk.GetImageFromArray(hu[z].astype(np.int16)); im.SetSpacing((spacing[2], spacing[1]))
        for k, v in {'0008|0060': 'CT', '0020|000d': uid + '.1', '0020|000e': uid + '.2', '0008|0018': f'{uid}.3.{z}',
                     '0020|0013': str(z + 1), '0020|0037': '1\\0\\0\\0\\1\\0', '0020|0032': f'0\\0\\{z*spacing[0]}',
                     '0028|0030': f'{spacing[1]}\\{spacing[2]}', '0018|0050': str(spacing[0]),
                     '0028|1052': '0', '0028|1053': '1'}.items():
            im.SetMetaData(k, v)
        w.SetFileName(str(folder/f'slice{z:03d}.dcm')); w.Execute(im)
    return folder


@pytest.fixture
def toy(tmp_path):
    hu, _ = toy_chest(Z=8)
    return hu, write_nii(tmp_path/'toy_ct.nii.gz', hu)


def test_nifti_and_dicom(toy, tmp_path, capsys):
    hu, nii = toy
    dcm = write_dicom(tmp_path/'series', hu)
    c = ckpt(tmp_path/'a.pt', bias=-8.)
    assert P.main([str(nii), str(dcm), '-c', c, '--out', str(tmp_path/'out'), '--overlay', '-q']) == 0
    rep = pd.read_csv(tmp_path/'out/report.csv').set_index('id')
    assert set(rep.index) == {'toy', 'series'}
    ref = nib.load(nii)
    for cid in ('toy', 'series'):
        inf, lungs = (nib.load(tmp_path/f'out/{cid}_{k}.nii.gz') for k in ('infection', 'lungs'))
        assert inf.shape == lungs.shape == ref.shape
        np.testing.assert_allclose(lungs.affine, ref.affine, atol=1e-4)   # DICOM geometry -> the same NIfTI affine (Eq. P1)
        assert set(np.unique(np.asarray(lungs.dataobj))) == {0, 1, 2}
        assert (tmp_path/f'out/{cid}_overlay.png').stat().st_size > 0
    assert rep.loc['toy', 'category'] == 'CT-0' and rep.loc['toy', 'involvement_pct'] == 0
    assert rep.loc['toy', 'lung_left_ml'] > 0 and rep.loc['toy', 'lung_right_ml'] > 0
    for k in ('lung_left_ml', 'lung_right_ml'): assert rep.loc['series', k] == pytest.approx(rep.loc['toy', k], rel=1e-6)
    js = json.loads((tmp_path/'out/report.json').read_text())
    assert js['failed'] == [] and js['checkpoints'][0]['config_hash'] == rep.loc['toy', 'config_hashes']


def test_averaging(toy, tmp_path):
    "Probabilities are averaged (Eq. P2): sigma(6) and sigma(-2) average to 0.56 >= 0.5; with sigma(-2) twice to 0.41 < 0.5."
    _, nii = toy
    hi, lo = ckpt(tmp_path/'hi.pt', bias=6.), ckpt(tmp_path/'lo.pt', bias=-2., seed=1)
    inv = {}
    for name, cs in {'hi_lo': [hi, lo], 'lo': [lo], 'hi_lo_lo': [hi, lo, lo]}.items():
        assert P.main([str(nii), '-c', *cs, '--out', str(tmp_path/name), '-q']) == 0
        r = pd.read_csv(tmp_path/name/'report.csv').iloc[0]
        inv[name] = r.involvement_pct; assert r.checkpoints.count(';') == len(cs) - 1
    assert inv['hi_lo'] == 100 and inv['lo'] == 0 and inv['hi_lo_lo'] == 0


def test_bad_inputs_do_not_stop_the_others(toy, tmp_path, capsys):
    hu, nii = toy
    bad = {'corrupt_ct.nii.gz': b'not a nifti', 'notes.txt': b'x'}
    for n, b in bad.items(): (tmp_path/n).write_bytes(b)
    nan = hu.copy(); nan[1, 2, 3] = np.nan; write_nii(tmp_path/'nan_ct.nii.gz', nan, dtype=np.float32)
    write_nii(tmp_path/'mask_ct.nii.gz', (hu > 0).astype(np.uint8), dtype=np.uint8)
    (tmp_path/'empty').mkdir()
    ins = [tmp_path/'corrupt_ct.nii.gz', tmp_path/'notes.txt', tmp_path/'nan_ct.nii.gz', tmp_path/'mask_ct.nii.gz',
           tmp_path/'missing.nii.gz', tmp_path/'empty', nii]
    rc = P.main([*map(str, ins), '-c', ckpt(tmp_path/'a.pt', bias=-8.), '--out', str(tmp_path/'out'), '-q'])
    err = capsys.readouterr().err
    assert rc == 1
    assert list(pd.read_csv(tmp_path/'out/report.csv').id) == ['toy']
    for p, why in zip(ins, ('cannot read NIfTI', 'not a NIfTI', 'NaN', 'below -500 HU', 'not found', 'unknown layout')):
        assert re.search(re.escape(str(p)) + r'.*' + re.escape(why), err), (p, why, err)
    failed = json.loads((tmp_path/'out/report.json').read_text())['failed']
    assert len(failed) == 6
    assert sorted(f.name for f in (tmp_path/'out').iterdir()) == ['report.csv', 'report.json', 'toy_infection.nii.gz', 'toy_lungs.nii.gz']


def test_failing_case_leaves_nothing(toy, tmp_path, monkeypatch, capsys):
    _, nii = toy
    def boom(*a, **k): raise OSError('disk full')
    monkeypatch.setattr(P, 'overlay_png', boom)
    rc = P.main([str(nii), '-c', ckpt(tmp_path/'a.pt'), '--out', str(tmp_path/'out'), '--overlay', '-q'])
    assert rc == 1 and 'disk full' in capsys.readouterr().err
    assert sorted(f.name for f in (tmp_path/'out').iterdir()) == ['report.csv', 'report.json']   # no half-written case


def test_old_style_checkpoint_accepted(toy, tmp_path):
    _, nii = toy
    c = ckpt(tmp_path/'old.pt', bias=6., new_style=False, n_models=2, cfg=RunConfig(method='cps', profile='smoke'))
    assert P.main([str(nii), '-c', c, '--out', str(tmp_path/'out'), '-q']) == 0
    js = json.loads((tmp_path/'out/report.json').read_text())['checkpoints'][0]
    assert js['derived_metadata'] and js['method'] == 'cps' and js['n_models'] == 2 and js['size'] == 32
    assert pd.read_csv(tmp_path/'out/report.csv').iloc[0].involvement_pct == 100   # s1 = models[0] (the biased one) predicts


def test_unrelated_checkpoints_refused(toy, tmp_path, capsys):
    _, nii = toy
    torch.save(UNet((4, 8, 16)).state_dict(), tmp_path/'state_dict.pt')            # bare weights, no metadata
    torch.save({'models': [{'w': torch.zeros(1)}], 'config': {'method': 'baseline', 'profile': 'smoke'}}, tmp_path/'other.pt')
    (tmp_path/'text.pt').write_text('hello')
    for name, why in (('state_dict.pt', 'not a sapl checkpoint'), ('other.pt', 'do not fit a U-Net'), ('text.pt', 'cannot load checkpoint'),
                      ('missing.pt', 'not found')):
        assert P.main([str(nii), '-c', str(tmp_path/name), '--out', str(tmp_path/'out'), '-q']) == 2
        err = capsys.readouterr().err
        assert str(tmp_path/name) in err and why in err, err
    assert not (tmp_path/'out').exists()


def test_module_and_console_entry(toy, tmp_path):
    _, nii = toy
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'sapl.predict', str(nii), '-c', ckpt(tmp_path/'a.pt', bias=-8.), '--out', str(tmp_path/'out'), '-q'],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'toy: CT-0' in r.stdout and (tmp_path/'out/toy_infection.nii.gz').exists()
    assert "'sapl-predict=sapl.predict:main'" in (ROOT/'setup.py').read_text()
