"BCP, UniMatch and the synthesis plug-in (sapl.modern): defining properties on tiny data, kill + resume."
import numpy as np, pytest, torch
import torch.nn as nn
from dataclasses import replace
from sapl.data import Volume, DataBundle, get_profile, Split
from sapl.train import RunConfig, Trainer, METHODS, VARIANTS, load_checkpoint
from sapl.style_pool import ensure_sean
from sapl.sacps import SACPS, SynthesisSetup
from sapl import modern as Mo

torch.set_num_threads(1)
NEW = ['bcp', 'unimatch', 'sa-mt', 'sa-bcp', 'sa-unimatch']


def _vol(i, n=4, S=32):
    r = np.random.default_rng(i)
    lung = np.zeros((n, S, S), np.uint8); lung[:, 4:28, 3:14] = 2; lung[:, 4:28, 18:29] = 1
    img = np.where(lung > 0, .15, .55).astype(np.float32) + r.normal(0, .03, (n, S, S)).astype(np.float32)
    lab = np.zeros((n, S, S), np.uint8); lab[1:, 8 + i % 4:16, 20:26] = 1
    img[lab > 0] = .45
    return Volume(f'v{i}', img.clip(0, 1), lab, lung, np.arange(n), (0, S, 0, S), (n, S, S), (1., 1., 1.), np.eye(4))


def bundle():
    vs = [_vol(i) for i in range(7)]
    return DataBundle(vs[:2], vs[2:5], vs[5:6], vs[6:], get_profile('smoke'), Split((), (), (), ()), '')


@pytest.fixture(scope='module')
def out(tmp_path_factory):
    "A runs folder holding the smoke synthesizer of the toy split (1 epoch)."
    d = tmp_path_factory.mktemp('runs')
    ensure_sean(bundle().train_l, d, 'phantom', 'smoke', 0.1, epochs=1, verbose=False)
    return d


def cfg(out, variant, opts=None, **kw):
    "A smoke configuration of a named variant (or of a bare method name), its options updated by `opts`."
    c = RunConfig(**{**dict(profile='smoke', epochs=1, iters_per_epoch=2, out_dir=str(out)), **kw})
    c = c.variant(variant) if variant in VARIANTS else replace(c, method=variant, tag=variant)
    return replace(c, opts={**c.opts, **(opts or {})})


class Threshold(nn.Module):
    "A stand-in U-Net: logits a*(x - 0.4), so the pseudo-label of an image is known (x >= 0.4)."
    def __init__(self, a=40.):
        super().__init__(); self.a = nn.Parameter(torch.tensor(a))
    def encoder(self, x): return [x]
    def decoder(self, feats): return self.a*(feats[0] - .4)
    def forward(self, x): return self.decoder(self.encoder(x))


def batches(tr):
    tr.models.train()
    return tr.next_batch('labeled', tr.labeled), tr.next_batch('unlabeled', tr.unlabeled)


def spy(monkeypatch, module, name):
    calls, f = [], getattr(module, name)
    def rec(*a, **k):
        calls.append(a); return f(*a, **k)
    monkeypatch.setattr(module, name, rec)
    return calls


def test_registered():
    assert {'bcp', 'unimatch', 'samt'} <= set(METHODS) and set(NEW) <= set(VARIANTS)
    assert VARIANTS['sa-bcp'] == ('bcp', {'synthetic': True}) and VARIANTS['bcp'] == ('bcp', {})


def test_bcp_mixed_label_is_ground_truth_in_the_pasted_region_and_pseudo_label_outside(tmp_path, monkeypatch):
    tr = Trainer(cfg(tmp_path, 'bcp', opts={'pre_frac': 0.0}), bundle(), progress=False)
    bl, bu = batches(tr)
    tr.method.ready = True; tr.models[1] = Threshold()          # a teacher whose pseudo-label is (x >= 0.4)
    calls = spy(monkeypatch, Mo, 'bcp_loss')
    out = tr.method.train_step(tr, bl, bu)
    (z_in, y_in, M, *w_in), (z_out, y_out, M2, *w_out) = calls
    h = len(bl['image'])//2
    yl, yu = bl['label'].float(), (bu['image'] >= .4).float()
    M = M.view(1, 1, 32, 32).bool(); assert torch.equal(M, M2.view(1, 1, 32, 32).bool())
    assert int(M.sum()) == 21*21                                  # one 2/3-side box
    inside, outside = M.expand(h, 1, 32, 32), ~M.expand(h, 1, 32, 32)
    # labeled patch pasted into an unlabeled image: ground truth inside, teacher pseudo-label outside
    assert torch.equal(y_in[inside], yl[:h][inside]) and torch.equal(y_in[outside], yu[:h][outside])
    # unlabeled patch pasted into a labeled image: pseudo-label inside, ground truth outside
    assert torch.equal(y_out[inside], yu[h:2*h][inside]) and torch.equal(y_out[outside], yl[h:2*h][outside])
    assert not torch.equal(yu[:h], yl[:h])                        # the two sources really differ
    assert w_in == [1., .5] and w_out == [.5, 1.]                 # pseudo-labeled pixels weigh beta
    assert torch.allclose(out['loss'], .5*(out['l_in'] + out['l_out']))
    assert torch.equal(tr.method.yp, yu)


def test_bcp_pretraining_inside_the_budget(tmp_path):
    tr = Trainer(cfg(tmp_path, 'bcp', epochs=2, opts={'pre_frac': 0.5}), bundle(), progress=False)
    assert tr.total == 4
    S, Te = tr.models
    for t in range(4):
        bl, bu = batches(tr)
        out = tr.method.train_step(tr, bl, bu)
        assert ('l_pre' in out) == (t < 2) and tr.method.ready == (t >= 2)
        if t == 2: assert all(torch.equal(a, b) for a, b in zip(Te.parameters(), S.parameters()))   # teacher := student
        tr.opt.zero_grad(); out['loss'].backward(); tr.opt.step(); tr.sched.step()
        before = [p.detach().clone() for p in Te.parameters()]
        tr.method.after_step(tr)
        if t >= 2:
            for p, pb, ps in zip(Te.parameters(), before, S.parameters()): assert torch.allclose(p, .99*pb + .01*ps.detach(), atol=1e-6)
    with pytest.raises(ValueError, match='pre_frac'): Trainer(cfg(tmp_path, 'bcp', opts={'pre_frac': 1.0}), bundle())


def test_unimatch_views_learn_the_thresholded_weak_pseudo_label(tmp_path, monkeypatch):
    tr = Trainer(cfg(tmp_path, 'unimatch', opts={'cutmix': 1.0, 'blur_p': 1.0, 'jitter_p': 1.0}), bundle(), progress=False)
    tr.models[0] = Threshold()
    bl, bu = batches(tr)
    views = []
    sv = tr.method.strong_views
    monkeypatch.setattr(tr.method, 'strong_views', lambda x: views.append(sv(x)) or views[-1])
    calls = spy(monkeypatch, Mo, 'l_seg_masked')
    out = tr.method.train_step(tr, bl, bu)
    xw = bu['image']; s1, s2, b1, b2 = views[0]
    yw = (xw >= .4).float()                                               # thresholded weak-view prediction
    p = torch.sigmoid(40*(xw - .4)); mw = (torch.maximum(p, 1 - p) >= .95).float()
    assert 0 < mw.mean() < 1 and b1.sum() > 0 and b2.sum() > 0
    (z1, y1, m1), (z2, y2, m2), (zfp, yfp, mfp) = calls
    for z, s, y, m, b in ((z1, s1, y1, m1, b1), (z2, s2, y2, m2, b2)):
        assert torch.allclose(z, 40*(s - .4), atol=1e-5) and not torch.allclose(s, xw)    # predictions on a strong view
        assert torch.equal(y, b*yw.roll(1, 0) + (1 - b)*yw) and torch.equal(m, b*mw.roll(1, 0) + (1 - b)*mw)
        inside = b.bool()
        assert torch.equal(y[inside], yw.roll(1, 0)[inside])             # CutMix box: the partner's pseudo-label
    assert torch.equal(yfp, yw) and torch.equal(mfp, mw)                  # feature-perturbed view: the weak targets
    assert not torch.allclose(zfp, 40*(xw - .4))                          # ... on dropped-out features
    o = tr.method.o
    assert torch.allclose(out['loss'], .5*(out['l_s'] + o['w_s']*(out['l_s1'] + out['l_s2']) + o['w_fp']*out['l_fp']))


def test_plugin_shares_one_synthesis_setup():
    for cls in (Mo.BCP, Mo.UniMatch, Mo.SAMT, SACPS):
        assert issubclass(cls, SynthesisSetup)
        assert cls.reference is SynthesisSetup.reference and cls.setup_synthesis is SynthesisSetup.setup_synthesis


def test_plugin_off_is_the_method_itself(tmp_path):
    a, b = Trainer(cfg(tmp_path, 'mt'), bundle(), progress=False), Trainer(cfg(tmp_path, 'samt'), bundle(), progress=False)
    assert b.method.gen is None and not b.method.o['synthetic']
    bl, bu = batches(a)
    torch.manual_seed(3); la = a.method.train_step(a, bl, bu)
    torch.manual_seed(3); lb = b.method.train_step(b, bl, bu)
    assert torch.equal(la['loss'], lb['loss']) and 'l_synthetic' not in lb
    for v in ('bcp', 'unimatch'):
        assert 'l_synthetic' not in Trainer(cfg(tmp_path, v), bundle(), progress=False).fit().history[0]


@pytest.mark.parametrize('variant', ['sa-unimatch', 'sa-bcp', 'sa-mt'])
def test_plugin_synthesizes_from_the_methods_own_pseudo_labels(out, monkeypatch, variant):
    setups = spy(monkeypatch, SynthesisSetup, 'setup_synthesis')
    c = cfg(out, variant, opts={'pre_frac': 0.0} if variant == 'sa-bcp' else None)
    tr = Trainer(c, bundle(), progress=False)
    assert len(setups) == 1 and tr.method.gen is not None and len(tr.method.pool) > 0
    tr.models[0 if variant == 'sa-unimatch' else 1] = Threshold()           # known pseudo-labels: (x >= 0.4)
    if variant == 'sa-bcp': tr.method.ready = True
    bl, bu = batches(tr)
    refs, synth = spy(monkeypatch, SynthesisSetup, 'reference'), spy(monkeypatch, Mo, 'synthesize_pseudo')
    state = torch.get_rng_state()
    on = tr.method.train_step(tr, bl, bu)
    assert len(refs) == 1 and len(synth) == 1
    gen, lung, yp, sc = synth[0][:4]
    assert gen is tr.method.gen and torch.equal(lung, bu['lung']) and sc.shape[0] == 1
    assert torch.equal(yp, tr.method.yp) and torch.equal(synth[0][4], bu['image'])   # lungs pasted into the real slice (Eq. 3b)
    if variant != 'sa-mt': assert torch.equal(yp, (bu['image'] >= .4).float())   # the method's own pseudo-label
    else: assert set(yp.unique().tolist()) <= {0., 1.}
    w = tr.method.unlabeled_weight(tr)
    assert on['w_synthetic'] == w == {'sa-unimatch': .5, 'sa-bcp': .25}.get(variant, w) and w > 0
    assert float(on['l_synthetic']) > 0
    tr.method.o['synthetic'] = False; torch.set_rng_state(state)            # same step without the plug-in
    off = tr.method.train_step(tr, bl, bu)
    assert torch.allclose(on['loss'], off['loss'] + w*on['l_synthetic'], atol=1e-5)


@pytest.mark.parametrize('variant', ['bcp', 'unimatch', 'sa-unimatch'])
def test_killed_run_resumes_to_same_weights(out, tmp_path, monkeypatch, variant):
    "Teacher, its initialisation flag (BCP) and the per-iteration style draw (plug-in) survive a kill + resume."
    weights = lambda tr: torch.cat([p.detach().flatten() for p in tr.models.parameters()])
    base = cfg(out, variant, {'pre_frac': 0.25} if variant == 'bcp' else None, epochs=3, iters_per_epoch=3)   # BCP: T = 9, T_pre = 2
    ref = Trainer(replace(base, tag=f'{variant}-ref'), bundle(), progress=False).fit()
    ref.load(load_checkpoint(ref.run_dir/'last.pt'), weights_only_models=True)
    c = replace(base, tag=f'{variant}-kill')
    orig = Trainer.validate
    def dying(self, vols=None):
        if self.epoch == 3: raise KeyboardInterrupt
        return orig(self, vols)
    monkeypatch.setattr(Trainer, 'validate', dying)
    with pytest.raises(KeyboardInterrupt): Trainer(c, bundle(), progress=False).fit()
    monkeypatch.setattr(Trainer, 'validate', orig)
    torch.manual_seed(123); np.random.seed(5)
    tr = Trainer(c, bundle(), progress=False).fit()
    tr.load(load_checkpoint(c.run_dir/'last.pt'), weights_only_models=True)
    assert torch.equal(weights(ref), weights(tr))
    assert [r['loss'] for r in ref.history] == [r['loss'] for r in tr.history]
    if variant == 'bcp': assert tr.method.ready and load_checkpoint(c.run_dir/'last.pt')['method'] == {'ready': True}
