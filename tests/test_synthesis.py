"Region-wise modulation, iteration budget, generator EMA, synthesizer folders, fidelity measures (tiny, CPU, seconds)."
from dataclasses import replace
import numpy as np, pandas as pd, pytest, torch

from sapl.sean import SEAN, SEAN_PROFILES, ACENorm, ToySlices, one_hot_mask, synthesize, train_sean, load_sean
from sapl.style_pool import (sean_tag, sean_dir, roc_auc, pooled_dsc, region_wasserstein, c2st_auc, gain_vs_fidelity,
                             update_fidelity_report)
from sapl.train import RunConfig
import sapl.sacps

torch.set_num_threads(1)
SMOKE = SEAN_PROFILES['smoke']
CLASS = replace(SMOKE, modulation='class')


def test_class_modulation_equals_direct_form_train_and_eval():
    torch.manual_seed(0)
    ace = ACENorm(6, 4, 8, 0, modulation='class'); ace.blend_beta.data.fill_(-.4)
    M = one_hot_mask(torch.randint(0, 4, (3, 8, 8))); a = torch.randn(3, 6, 8, 8); st = torch.randn(3, 4, 8)
    for train in (True, False):
        ace.train(train)
        for s in (st, st[:1]):
            t = ace.class_table(s); gb = torch.einsum('bks,bshw->bkhw', t.expand(3, -1, -1), M)
            ref = torch.nn.functional.batch_norm(a, ace.norm.running_mean.clone(), ace.norm.running_var.clone(), training=train)
            torch.testing.assert_close(ace(a, M, s), ref * (1 + gb[:, :6]) + gb[:, 6:], atol=1e-5, rtol=1e-4)


def test_shared_code_equals_expanded_code():
    torch.manual_seed(0)
    for cfg in (SMOKE, CLASS):
        G = SEAN(cfg).eval(); m = torch.randint(0, 4, (3, 32, 32)); st = torch.randn(1, 4, cfg.style_dim)
        torch.testing.assert_close(synthesize(G, m, st), synthesize(G, m, st.expand(3, -1, -1)), atol=1e-5, rtol=0)


def test_iteration_budget_does_not_depend_on_dataset_size(tmp_path):
    cfg = replace(CLASS, epochs=1, iters_per_epoch=3)
    for n in (3, 17):
        train_sean(cfg, ToySlices(n, 32), tmp_path/f'n{n}', seed=0, verbose=False)
        assert int(pd.read_csv(tmp_path/f'n{n}'/'log.csv').iters.sum()) == 3


def test_ema_resume_equals_uninterrupted_and_is_what_loads(tmp_path):
    cfg = replace(CLASS, epochs=2, iters_per_epoch=2, ema=0.5); ds = ToySlices(6, 32)
    full = train_sean(cfg, ds, tmp_path/'a', seed=1, verbose=False)
    train_sean(cfg, ds, tmp_path/'b', seed=1, epochs=1, verbose=False)
    res = train_sean(cfg, ds, tmp_path/'b', seed=1, verbose=False)
    assert all(torch.equal(v, w) for v, w in zip(full.state_dict().values(), res.state_dict().values()))
    st = torch.load(tmp_path/'b'/'last.pt', weights_only=True)
    assert not torch.equal(st['G']['dec.fc.weight'], st['G_ema']['dec.fc.weight'])   # the average differs from the last weights
    assert torch.equal(load_sean(tmp_path/'b'/'last.pt').dec.fc.weight, st['G_ema']['dec.fc.weight'])


def test_synthesizer_folder_follows_configuration(tmp_path):
    q = SEAN_PROFILES['quick']
    assert sean_tag(q) == sean_tag(replace(q)) and sean_tag(q) != sean_tag(replace(q, epochs=q.epochs + 1))
    assert sean_dir(tmp_path, 'phantom', 'quick', .1) != sean_dir(tmp_path, 'phantom', 'quick', .1, cfg=SEAN_PROFILES['quick-b250'])


def test_sacps_sean_option_is_validated():
    with pytest.raises(ValueError, match='sean must be'): sapl.sacps.SACPS(RunConfig(method='sacps', opts={'sean': 'nope'}))
    assert sapl.sacps.SACPS(RunConfig(method='sacps').variant('sacps-b250')).o['sean'] == 'quick-b250'


def test_fidelity_measures_on_known_cases(tmp_path):
    assert roc_auc([.1, .2, .8, .9], [0, 0, 1, 1]) == 1.0 and roc_auc([.3, .3], [0, 1]) == .5
    y = torch.zeros(2, 1, 4, 4); y[0, 0, :2] = 1
    assert pooled_dsc(y > 0, y) == 1.0
    fs = {'image': torch.zeros(1, 1, 2, 2), 'synthetic': torch.full((1, 1, 2, 2), .2), 'sem': torch.tensor([[[0, 3], [1, 2]]])}
    w = region_wasserstein(fs)
    assert abs(w['w1_infection_hu'] - 300.) < 1e-3 and abs(w['w1_lungs_hu'] - 300.) < 1e-3
    # identical real and synthetic sets cannot be told apart; very different ones can
    r = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(0)); grp = torch.arange(40) % 4
    same = c2st_auc({'image': r, 'synthetic': r.clone(), 'group': grp}, iters=30)
    diff = c2st_auc({'image': r, 'synthetic': (r * .2 + .8), 'group': grp}, iters=60)
    assert abs(same - .5) < 1e-6 and diff > .9
    df = update_fidelity_report({'synthesizer': 'x', 'dsc_gap': .1}, tmp_path/'f.md')
    assert list(df.synthesizer) == ['x'] and '| x |' in (tmp_path/'f.md').read_text()


def test_gain_vs_fidelity_pairs_seeds_and_needs_five(tmp_path):
    ps = pd.DataFrame([{'variant': v, 'seed': s, 'dsc': .5 + .01 * s + d} for s in range(5) for v, d in (('cps', 0), ('a', .03))])
    fid = pd.DataFrame({'synthesizer': ['A'], 'dsc_gap': [.05]})
    s = gain_vs_fidelity(ps, {'a': 'A'}, fid, tmp_path/'g.png')
    assert abs(float(s['mean'].iloc[0]) - .03) < 1e-9 and (tmp_path/'g.png').stat().st_size > 0
    with pytest.raises(ValueError, match='need >= 5'): gain_vs_fidelity(ps[ps.seed < 4], {'a': 'A'}, fid)

