"SA-CPS, SA-ST and the style pool on tiny synthetic data (smoke profile; SEAN trained for 1 epoch)."
import numpy as np, pytest, torch
from sapl.data import Volume, DataBundle, get_profile, Split
from sapl.train import RunConfig, Trainer, run, VARIANTS
from sapl.style_pool import StylePool, reference_code, sample_reference, pseudo_layout, ensure_sean
from sapl.sacps import SACPS, CPS, pseudo_labels, cross_synthesize
import sapl.sast
from sapl.sast import pseudo_volumes, synthetic_volumes


def _vol(i, n=4, S=32, lesion=True):
    r = np.random.default_rng(i)
    lung = np.zeros((n, S, S), np.uint8); lung[:, 4:28, 3:14] = 2; lung[:, 4:28, 18:29] = 1
    img = np.where(lung > 0, .15, .55).astype(np.float32) + r.normal(0, .03, (n, S, S)).astype(np.float32)
    lab = np.zeros((n, S, S), np.uint8)
    if lesion: lab[1:, 8 + i % 4:16, 20:26] = 1
    img[lab > 0] = .45
    return Volume(f'v{i}', img.clip(0, 1), lab, lung, np.arange(n), (0, S, 0, S), (n, S, S), (1., 1., 1.), np.eye(4))


def bundle():
    vs = [_vol(i, lesion=i != 3) for i in range(7)]
    return DataBundle(vs[:2], vs[2:5], vs[5:6], vs[6:], get_profile('smoke'), Split((), (), (), ()), '')


@pytest.fixture(scope='module')
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp('runs')
    ensure_sean(bundle().train_l, d, 'phantom', 'smoke', 0.1, epochs=1, verbose=False)
    return d


def cfg(out, variant, **kw):
    return RunConfig(**{**dict(profile='smoke', epochs=1, iters_per_epoch=2, out_dir=str(out)), **kw}).variant(variant)


def test_style_pool_kinds_and_masked_mean(out):
    gen = ensure_sean(bundle().train_l, out, 'phantom', 'smoke', 0.1, epochs=1, verbose=False)
    vols = bundle().train_l
    pos, allp = StylePool.build(gen, vols, 'pos'), StylePool.build(gen, vols, 'all')
    assert len(allp) == 8 and len(pos) == 6                         # slice 0 of each volume has no infection
    assert pos.present[:, 3].all() and not allp.present[:, 3].all()
    assert torch.all(allp.codes[~allp.present[:, 3], 3] == 0)        # absent region -> zero row
    sc = reference_code(allp.codes, allp.present)
    assert torch.allclose(sc[3], pos.codes[:, 3].mean(0), atol=1e-6)  # zero rows do not dilute the infection row
    g = lambda: torch.Generator().manual_seed(3)
    a, ia = sample_reference(pos, 4, g()); b, ib = sample_reference(pos, 4, g())
    assert torch.equal(a, b) and torch.equal(ia, ib)


def test_cross_synthesis_swaps_pseudo_labels(out):
    gen = ensure_sean(bundle().train_l, out, 'phantom', 'smoke', 0.1, epochs=1, verbose=False)
    lung = torch.from_numpy(_vol(0).lung[:2]).long(); lung0 = lung.clone()
    y1 = torch.zeros(2, 1, 32, 32); y2 = torch.zeros(2, 1, 32, 32); y2[:, :, 8:16, 20:26] = 1
    sc = StylePool.build(gen, bundle().train_l).codes[:1]
    x1, x2 = cross_synthesize(gen, lung, y1, y2, sc)
    x2b, x1b = cross_synthesize(gen, lung, y2, y1, sc)
    assert torch.allclose(x1, x1b, atol=1e-5) and torch.allclose(x2, x2b, atol=1e-5)
    assert not torch.allclose(x1, x2)                                # different layouts, different images
    assert torch.equal(lung, lung0)                                   # lung mask never modified in place
    assert int(pseudo_layout(lung, y2)[0, 10, 22]) == 3


def test_sacps_and_cps_steps(out):
    data = bundle()
    sa = Trainer(cfg(out, 'sacps'), data, progress=False); cps = Trainer(cfg(out, 'cps'), data, progress=False)
    assert isinstance(cps.method, CPS) and cps.method.gen is None
    bl, bu = sa.next_batch('labeled', sa.labeled), sa.next_batch('unlabeled', sa.unlabeled)
    lung0 = bu['lung'].clone()
    l_sa, l_cps = sa.method.train_step(sa, bl, bu), cps.method.train_step(cps, bl, bu)
    assert torch.equal(bu['lung'], lung0)
    assert float(l_sa["l_synthetic"].detach()) > 0 and float(l_cps["l_synthetic"]) == 0
    assert all(torch.isfinite(v).all() for v in l_sa.values())
    o = sa.method.o
    assert torch.allclose(l_sa['loss'], l_sa['l_s'] + o['lam']*(l_sa['l_pseudo'] + l_sa['l_synthetic']))
    assert len(sa.method.last_draw) == 4 or len(sa.method.last_draw) == o['K']


def test_pseudo_labels_threshold():
    z = torch.tensor([-3., -0.01, 0., 5.]).view(1, 1, 1, 4)
    assert pseudo_labels(z).flatten().tolist() == [0., 0., 1., 1.]


def test_sast_builds_teacher_pseudo_and_synthetic_sets(out, capfd):
    data = bundle()
    tr = run(cfg(out, 'sast'), data, progress=False)
    assert 'training it first' in capfd.readouterr().err          # teacher (baseline) was missing
    m = tr.method
    assert len(m.pseudo_ds) == len(m.synth_ds) == sum(len(v.z) for v in data.train_u)
    for p, s in zip(m.pseudo, m.synth):
        assert np.array_equal(p.label, s.label) and not np.allclose(p.image, s.image)
        bg = (p.lung == 0) & (p.label == 0)                           # outside the layout: the real slice (Eq. 3b)
        assert np.array_equal(s.image[bg], p.image[bg])
    st = run(cfg(out, 'st'), data, progress=False)
    assert not hasattr(st.method, 'synth_ds')
    assert VARIANTS['sast+sacps'] == ('sast', {'teacher': 'sacps'})


def test_bad_options():
    with pytest.raises(ValueError, match='unknown sacps options'): SACPS(RunConfig(method='sacps', opts={'lamda': 1}))
    with pytest.raises(ValueError, match='style must be'): SACPS(RunConfig(method='sacps', opts={'style': 'x'}))
    with pytest.raises(ValueError, match='unknown variant'): RunConfig().variant('sa-cps')


def test_option_sean_selects_the_synthesizer_folder(out, monkeypatch):
    "Option `sean` trains and loads that configuration in its own folder; without it, the run profile's synthesizer."
    from dataclasses import replace
    from sapl.sean import SEAN_PROFILES
    from sapl.style_pool import split_synthesizer, sean_dir
    other = replace(SEAN_PROFILES['smoke'], name='smoke-other', epochs=1)
    monkeypatch.setitem(SEAN_PROFILES, 'smoke-other', other)
    c = cfg(out, 'sacps')
    g = split_synthesizer(bundle().train_l, c, 0, 'smoke-other', verbose=False)
    assert g.cfg.name == 'smoke-other' and (sean_dir(out, 'phantom', 'smoke', .1, cfg=other)/'last.pt').exists()
    assert split_synthesizer(bundle().train_l, c, 0, None, verbose=False).cfg.name == 'smoke'
    with pytest.raises(ValueError, match='sean must be'): split_synthesizer(bundle().train_l, c, 0, 'nope')
