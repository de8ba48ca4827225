"Competing semi-supervised methods (sapl.baselines): defining properties on tiny tensors + a 1-epoch smoke run each."
import math, time
import numpy as np, pytest, torch
import torch.nn as nn
import torch.nn.functional as F
from sapl.data import Volume, DataBundle, get_profile, Split
from sapl.train import RunConfig, Trainer, METHODS
from sapl import baselines as B

torch.set_num_threads(1)
NAMES = ['mt', 'uamt', 'cct', 'udc', 'selfens', 'semiinfnet']


def _vol(i, n=4, S=32):
    r = np.random.default_rng(i)
    img = r.random((n, S, S)).astype(np.float32)*.3
    lab = np.zeros((n, S, S), np.uint8); lab[:, 8 + i % 5:18, 6:16 + i % 7] = 1
    img[lab > 0] += .5
    return Volume(f'v{i}', img.clip(0, 1), lab, np.ones((n, S, S), np.uint8), np.arange(n), (0, S, 0, S), (n, S, S),
                  (1., 1., 1.), np.eye(4))


def bundle():
    vs = [_vol(i) for i in range(6)]
    return DataBundle(vs[:2], vs[2:4], vs[4:5], vs[5:], get_profile('smoke'), Split((), (), (), ()), '')


def cfg(tmp_path, **kw):
    return RunConfig(**{**dict(profile='smoke', epochs=1, iters_per_epoch=3, out_dir=str(tmp_path)), **kw})


def test_registered():
    assert set(NAMES) <= set(METHODS)


def test_ramp_values():
    L = 200
    assert B.sigmoid_rampup(0, L) == pytest.approx(math.exp(-5))
    assert B.sigmoid_rampup(L/2, L) == pytest.approx(math.exp(-1.25))
    assert B.sigmoid_rampup(L, L) == 1. and B.sigmoid_rampup(3*L, L) == 1.
    assert B.uamt_threshold(0, L) == pytest.approx((.75 + .25*math.exp(-5))*math.log(2))
    assert B.uamt_threshold(L, L) == pytest.approx(math.log(2))


def test_ramp_weight_follows_trainer_iteration(tmp_path):
    tr = Trainer(cfg(tmp_path, method='mt', epochs=2), bundle(), progress=False)
    assert tr.total == 6
    for t, r in [(0, math.exp(-5)), (3, math.exp(-1.25)), (6, 1.)]:
        tr.sched.last_epoch = t
        assert B.ramp_weight(tr, 0.1, 1.0) == pytest.approx(0.1*r)


def test_ema_rule_numerically():
    torch.manual_seed(0)
    t, s = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in t.parameters()]
    a = B.ema_update(t, s, 0.99, step=9)            # min(1 - 1/10, 0.99) = 0.9
    assert a == pytest.approx(0.9)
    for p, p0, ps in zip(t.parameters(), t0, s.parameters()):
        assert torch.allclose(p, 0.9*p0 + 0.1*ps.detach())
    assert B.ema_update(t, s, 0.99, step=0) == 0.0   # first step: teacher := student
    assert all(torch.equal(p, q) for p, q in zip(t.parameters(), s.parameters()))
    assert B.ema_update(t, s, 0.99, step=10**5) == pytest.approx(0.99)


def test_mt_teacher_follows_student_by_ema(tmp_path):
    tr = Trainer(cfg(tmp_path, method='mt'), bundle(), progress=False)
    teacher0 = [p.detach().clone() for p in tr.models[1].parameters()]
    assert not any(p.requires_grad for p in tr.models[1].parameters())
    bl, bu = tr.next_batch('labeled', tr.labeled), tr.next_batch('unlabeled', tr.unlabeled)
    for _ in range(2):   # two optimiser steps, as the trainer does them
        tr.models.train(); loss = tr.method.train_step(tr, bl, bu)['loss']
        tr.opt.zero_grad(); loss.backward(); tr.opt.step(); tr.sched.step()
        before = [p.detach().clone() for p in tr.models[1].parameters()]
        tr.method.after_step(tr)
    a = min(1 - 1/2, 0.99)   # second step: step index 1
    for p, pb, ps in zip(tr.models[1].parameters(), before, tr.models[0].parameters()):
        assert torch.allclose(p, a*pb + (1 - a)*ps.detach(), atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(tr.models[1].parameters(), teacher0))


def test_uncertainty_mask_vs_threshold():
    # T=4 stochastic passes; pixel probabilities with known entropies of the mean
    p = torch.tensor([0.5, 0.7, 0.9, 0.99, 0.01])
    passes = p.view(1, 1, 1, 1, 5).repeat(4, 1, 1, 1, 1)
    H = B.binary_entropy(p)
    for thr in [0.1, 0.3, 0.65, math.log(2) + 1e-3]:
        m = B.uncertainty_mask(passes, thr)[0, 0, 0]
        assert torch.equal(m, (H < thr).float())
    # passes that disagree are uncertain even when each pass is confident
    dis = torch.tensor([0.01, 0.99, 0.01, 0.99]).view(4, 1, 1, 1, 1)
    assert B.uncertainty_mask(dis, B.uamt_threshold(0, 10)).item() == 0.
    assert B.masked_mse(torch.ones(4), torch.zeros(4), torch.tensor([1., 0., 0., 0.])) == pytest.approx(1.)


def test_cct_aux_decoders_see_perturbed_features(tmp_path):
    tr = Trainer(cfg(tmp_path, method='cct'), bundle(), progress=False)
    unet, aux = tr.models
    assert len(aux) == 3 and all(isinstance(d, nn.Module) for d in aux)
    n_opt = sum(p.numel() for g in tr.opt.param_groups for p in g['params'])
    assert n_opt == sum(p.numel() for p in tr.models.parameters())        # aux decoders are optimised
    torch.manual_seed(0)
    feats = unet.encoder(torch.rand(2, 1, 32, 32))
    for kind, pf in zip(tr.method.kinds(), tr.method.aux_features(feats)):
        assert len(pf) == len(feats)
        for a, f in zip(pf, feats):
            assert a.shape == f.shape and not torch.equal(a, f), kind
    # predict uses the main network only
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad(): ref = torch.sigmoid(unet.eval()(x))
    nn.init.constant_(aux[0].head.weight, 123.)
    assert torch.allclose(tr.predict(x), ref)


def test_transformation_equivalence_zero_for_equivariant_function():
    k = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]).view(1, 1, 3, 3)/16
    f = lambda x: F.conv2d(x, k, padding=1)*6 - 3        # symmetric kernel: commutes with flips and rot90
    x = torch.rand(3, 1, 12, 12)
    for t in B.TRANSFORMS:
        assert B.transform_consistency(f, x, t).item() == pytest.approx(0., abs=1e-12)
    g = lambda x: x*torch.linspace(-4, 4, 12).view(1, 1, 1, 12)   # position-dependent: not equivariant
    assert B.transform_consistency(g, x, 'flip_w').item() > 1e-3
    for t, (fwd, inv) in B.TRANSFORMS.items(): assert torch.equal(inv(fwd(x)), x), t


def test_udc_uncertainty_and_transform_choice(tmp_path):
    v = B.prediction_variance([torch.tensor([0., .5]), torch.tensor([1., .5])])
    assert torch.allclose(v, torch.tensor([.25, 0.]))
    tr = Trainer(cfg(tmp_path, method='udc', opts={'transforms': 'rot90'}), bundle(), progress=False)
    assert tr.method.pick_transform() == 'rot90'
    with pytest.raises(ValueError, match='unknown udc options'): Trainer(cfg(tmp_path, method='udc', opts={'tranforms': 'x'}), bundle())


def test_selfens_temporal_ensemble_rule():
    Z, p = torch.zeros(5), torch.rand(5)
    for n in range(1, 6):
        Z = B.te_update(Z, p, 0.6)
        assert torch.allclose(B.te_target(Z, n, 0.6), p, atol=1e-6)   # bias correction recovers constant predictions
    Z1 = B.te_update(torch.tensor([0.2]), torch.tensor([1.0]), 0.6)
    assert Z1.item() == pytest.approx(0.6*0.2 + 0.4)


def test_selfens_ensemble_updated_each_epoch(tmp_path):
    tr = Trainer(cfg(tmp_path, method='selfens', epochs=2), bundle(), progress=False).fit()
    assert tr.method.n == 2 and tr.method.Z.dtype == torch.uint8 and int(tr.method.Z.max()) > 0
    assert all(np.isfinite(r['te']) for r in tr.history) and tr.history[-1]['te'] > 0


def test_semiinfnet_chunks_partition_and_seeded():
    for n, k in [(23, 5), (8, 2), (5, 5)]:
        c = B.semiinfnet_chunks(n, k, seed=3)
        assert len(c) == k and np.array_equal(np.sort(np.concatenate(c)), np.arange(n))
        assert max(map(len, c)) - min(map(len, c)) <= 1
    a, b, o = B.semiinfnet_chunks(40, 4, 0), B.semiinfnet_chunks(40, 4, 0), B.semiinfnet_chunks(40, 4, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, o))
    with pytest.raises(ValueError): B.semiinfnet_chunks(3, 0)


def test_semiinfnet_pseudo_volumes_cover_unlabeled_set(tmp_path):
    data = bundle()
    chunks = B.semiinfnet_chunks(8, 2, seed=0)
    vols = [v for c in chunks for v in B.pseudo_label_volumes(data.train_u, c, lambda x: x, tau=.5)]
    assert sum(len(v.image) for v in vols) == 8
    got = sorted((v.id, int(z)) for v in vols for z in v.z)
    assert got == sorted((v.id, int(z)) for v in data.train_u for z in v.z)
    for v in vols:
        src = next(u for u in data.train_u if u.id == v.id)
        assert np.array_equal(v.label, (src.image[v.z] >= .5).astype(np.uint8))


@pytest.mark.parametrize('name', NAMES)
def test_smoke_one_epoch(tmp_path, name):
    opts = {'stages': 2} if name == 'semiinfnet' else {'T': 2} if name == 'uamt' else {}
    t0 = time.time()
    tr = Trainer(cfg(tmp_path, method=name, opts=opts), bundle(), progress=False).fit()
    dt = time.time() - t0
    assert len(tr.history) == 1
    row = tr.history[0]
    assert all(np.isfinite(v) for k, v in row.items() if k not in ('val_dsc',)), row
    p = tr.predict(torch.rand(2, 1, 32, 32))
    assert p.shape == (2, 1, 32, 32) and bool(((p >= 0) & (p <= 1)).all())
    print(f'{name}: one smoke epoch in {dt:.2f}s, loss {row["loss"]:.4f}')


@pytest.mark.parametrize('name', ['mt', 'selfens', 'semiinfnet'])
def test_killed_run_resumes_to_same_weights(tmp_path, monkeypatch, name):
    "Teacher weights, the temporal ensemble and the Semi-Inf-Net stages survive a kill + resume."
    from sapl.train import load_checkpoint
    opts = {'stages': 2} if name == 'semiinfnet' else {}
    weights = lambda tr: torch.cat([p.detach().flatten() for p in tr.models.parameters()])
    ref = Trainer(cfg(tmp_path/'ref', method=name, epochs=2, opts=opts), bundle(), progress=False).fit()
    ref.load(load_checkpoint(ref.run_dir/'last.pt'), weights_only_models=True)
    c = cfg(tmp_path/'kill', method=name, epochs=2, opts=opts)
    orig = Trainer.validate
    def dying(self, vols=None):
        if '-stage' not in self.cfg.tag and self.epoch == 2: raise KeyboardInterrupt   # the run itself, during epoch 2
        return orig(self, vols)
    monkeypatch.setattr(Trainer, 'validate', dying)
    with pytest.raises(KeyboardInterrupt): Trainer(c, bundle(), progress=False).fit()
    monkeypatch.setattr(Trainer, 'validate', orig)
    torch.manual_seed(123); np.random.seed(5)
    tr = Trainer(c, bundle(), progress=False).fit()
    tr.load(load_checkpoint(c.run_dir/'last.pt'), weights_only_models=True)
    assert torch.equal(weights(ref), weights(tr))
    assert [r['loss'] for r in ref.history] == [r['loss'] for r in tr.history]
    if name == 'selfens': assert torch.equal(ref.method.Z, tr.method.Z) and tr.method.n == 2
