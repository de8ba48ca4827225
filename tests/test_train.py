import json
import numpy as np, pytest, torch
from sapl.data import Volume, DataBundle, get_profile, Split
from sapl.train import RunConfig, Trainer, run, load_checkpoint, METHODS


def _vol(i, n=4, S=32):
    r = np.random.default_rng(i)
    img = r.random((n, S, S)).astype(np.float32)*.3
    lab = np.zeros((n, S, S), np.uint8); lab[:, 8 + i % 5:18, 6:16 + i % 7] = 1
    img[lab > 0] += .5
    lung = np.ones((n, S, S), np.uint8)
    return Volume(f'v{i}', img.clip(0, 1), lab, lung, np.arange(n), (0, S, 0, S), (n, S, S), (1., 1., 1.), np.eye(4))


def bundle():
    vs = [_vol(i) for i in range(6)]
    return DataBundle(vs[:2], vs[2:4], vs[4:5], vs[5:], get_profile('smoke'), Split((), (), (), ()), '')


def cfg(tmp_path, **kw):
    return RunConfig(**{**dict(profile='smoke', epochs=3, iters_per_epoch=3, out_dir=str(tmp_path)), **kw})


def weights(tr): return torch.cat([p.detach().flatten() for p in tr.models.parameters()])


def test_same_seed_same_numbers(tmp_path):
    a = Trainer(cfg(tmp_path/'a'), bundle(), progress=False).fit()
    b = Trainer(cfg(tmp_path/'b'), bundle(), progress=False).fit()
    c = Trainer(cfg(tmp_path/'c', seed=1), bundle(), progress=False).fit()
    assert [r['loss'] for r in a.history] == [r['loss'] for r in b.history]
    assert torch.equal(weights(a), weights(b))
    assert [r['loss'] for r in a.history] != [r['loss'] for r in c.history]


def test_killed_run_resumes_to_same_weights(tmp_path, monkeypatch):
    ref = Trainer(cfg(tmp_path/'ref'), bundle(), progress=False)
    ref.fit(); ref.load(load_checkpoint(ref.run_dir/'last.pt'), weights_only_models=True)
    c = cfg(tmp_path/'kill')
    tr = Trainer(c, bundle(), progress=False)
    calls = {'n': 0}; orig = Trainer.validate
    def dying(self, vols=None):
        calls['n'] += 1
        if calls['n'] == 2: raise KeyboardInterrupt   # killed during epoch 2
        return orig(self, vols)
    monkeypatch.setattr(Trainer, 'validate', dying)
    with pytest.raises(KeyboardInterrupt): tr.fit()
    monkeypatch.setattr(Trainer, 'validate', orig)
    assert load_checkpoint(c.run_dir/'last.pt')['epoch'] == 1
    torch.manual_seed(123); np.random.seed(5)      # a fresh process has other RNG states
    tr2 = Trainer(c, bundle(), progress=False); tr2.fit()
    tr2.load(load_checkpoint(c.run_dir/'last.pt'), weights_only_models=True)
    assert torch.equal(weights(ref), weights(tr2))
    assert [r['loss'] for r in ref.history] == [r['loss'] for r in tr2.history]


def test_checkpoint_contents_and_no_redo(tmp_path, monkeypatch):
    c = cfg(tmp_path)
    tr = Trainer(c, bundle(), progress=False).fit()
    ck = torch.load(c.run_dir/'last.pt', weights_only=True)
    assert {'models', 'optimizer', 'scheduler', 'rng', 'epoch', 'config', 'git_sha', 'history'} <= set(ck)
    assert ck['epoch'] == 3 and ck['config']['seed'] == 0
    assert (c.run_dir/'best.pt').exists() and (c.run_dir/'metrics.csv').read_text().count('\n') == 4
    monkeypatch.setattr(Trainer, 'validate', lambda *a, **k: (_ for _ in ()).throw(AssertionError('retrained')))
    Trainer(c, bundle(), progress=False).fit()   # finished: loads, does not train


def test_lr_follows_poly_schedule(tmp_path):
    tr = Trainer(cfg(tmp_path), bundle(), progress=False).fit()
    lrs = [r['lr'] for r in tr.history]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[0] == pytest.approx(1e-2*(1 - 3/9)**.9)


def test_other_config_in_same_folder_is_refused(tmp_path):
    Trainer(cfg(tmp_path), bundle(), progress=False).fit()
    with pytest.raises(RuntimeError, match='different configuration'):
        Trainer(cfg(tmp_path, lr=.1), bundle(), progress=False).fit()


def test_full_supervision_uses_all_training_volumes(tmp_path):
    tr = run(cfg(tmp_path, method='full', epochs=1), data=bundle(), progress=False)
    assert len(tr.labeled) == 16 and tr.unlabeled is None


def test_bad_parameters():
    with pytest.raises(ValueError, match='ratio'): RunConfig(ratio=1.5)
    with pytest.raises(ValueError, match='unknown profile'): RunConfig(profile='xl')
    with pytest.raises(ValueError, match='iters_per_epoch'): RunConfig(iters_per_epoch=0)
    with pytest.raises(ValueError, match='unknown method'): Trainer(RunConfig(method='nope'), bundle())
