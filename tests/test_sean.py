import os, sys
from dataclasses import replace
from pathlib import Path
import pytest, torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

from sapl.sean import (SEAN, SEAN_PROFILES, StyleEncoder, MultiScaleDiscriminator, ToySlices, VGG19Features,
                       region_mean, one_hot_mask, semantic_mask, encode_style, synthesize, region_control, toy_mask,
                       hinge_d_loss, hinge_g_loss, feature_matching_loss, l1_loss, train_sean, load_sean)

SMOKE = SEAN_PROFILES['smoke']


def _gen(name='smoke', seed=0):
    torch.manual_seed(seed)
    return SEAN(SEAN_PROFILES[name]).eval()


# --- style encoder -------------------------------------------------------------------------------

def test_region_mean_hand_computed():
    f = torch.tensor([[1., 2.], [3., 4.]]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    f[:, 1] *= 10
    w = torch.stack([torch.tensor([[1., 1.], [1., 0.]]),   # mean of 1, 2, 3
                     torch.tensor([[0., 0.], [0., 1.]]),   # 4
                     torch.tensor([[.5, 0.], [0., .5]]),   # weighted: (1 + 4) / 2
                     torch.zeros(2, 2)])[None]             # absent
    sc = region_mean(f, w)
    assert sc.shape == (1, 4, 2)
    torch.testing.assert_close(sc[0, :, 0], torch.tensor([2., 4., 2.5, 0.]))
    torch.testing.assert_close(sc[0, :, 1], torch.tensor([20., 40., 25., 0.]))


def test_encoder_absent_class_zero_row_and_shape():
    enc = StyleEncoder(4, 16, ngf=4)
    m = torch.randint(0, 3, (3, 16, 16)); m[1] = 0; m[1, :4, :4] = 3   # sample 1: classes 0 and 3 only
    sc = enc(torch.rand(3, 1, 16, 16) * 2 - 1, m)
    assert sc.shape == (3, 4, 16)
    assert sc[0, 3].abs().sum() == 0 and sc[2, 3].abs().sum() == 0
    assert sc[1, 1].abs().sum() == 0 and sc[1, 2].abs().sum() == 0
    assert sc[1, 3].abs().sum() > 0 and sc[0, 1].abs().sum() > 0


def test_encoder_masked_mean_matches_full_resolution_mean():
    enc = StyleEncoder(4, 8, ngf=4)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    m = torch.randint(0, 4, (2, 16, 16))
    feat = torch.nn.functional.interpolate(enc.features(x), scale_factor=2, mode='nearest')  # [B,d,H,W]
    oh = one_hot_mask(m)
    ref = torch.stack([torch.stack([feat[b][:, oh[b, k] > 0].mean(1) if oh[b, k].any() else torch.zeros(8)
                                    for k in range(4)]) for b in range(2)])
    torch.testing.assert_close(enc(x, m), ref, atol=1e-5, rtol=1e-5)


def test_semantic_mask_is_new_tensor():
    lung = torch.tensor([[[0, 1], [2, 2]]]); lab = torch.tensor([[[[0., 1.], [1., 0.]]]])
    sem = semantic_mask(lung, lab)
    assert sem.tolist() == [[[0, 3], [3, 2]]] and lung.tolist() == [[[0, 1], [2, 2]]]


# --- decoder -------------------------------------------------------------------------------------

def test_decoder_shape_range():
    G = _gen()
    m = torch.randint(0, 4, (3, 32, 32))
    with torch.no_grad(): y = G.dec(m, torch.randn(3, 4, SMOKE.style_dim))
    assert y.shape == (3, 1, 32, 32) and y.abs().max() <= 1
    out = synthesize(G, m, torch.randn(1, 4, SMOKE.style_dim))
    assert out.shape == (3, 1, 32, 32) and out.min() >= 0 and out.max() <= 1


def test_style_conv_factorisation_equals_direct_form():
    G = _gen()
    ace = G.dec.blocks[0].norm_0
    M = one_hot_mask(torch.randint(0, 4, (2, 8, 8))); st = torch.randn(2, 4, SMOKE.style_dim)
    g, b = ace.style_convs(M, st)
    S = ace.style_map(M, st)
    torch.testing.assert_close(g, ace.style_gamma(S), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b, ace.style_beta(S), atol=1e-5, rtol=1e-4)


def test_region_wise_control():
    G = _gen('quick')
    m = toy_mask(64)
    sc = encode_style(G, torch.rand(1, 1, 64, 64), m)
    for r in (1, 2):
        rc = region_control(G, m, sc, region=r)
        assert rc['contrast'] > 3, (r, rc)


# --- synthesize ----------------------------------------------------------------------------------

def test_synthesize_deterministic_and_batched_equals_looped():
    G = _gen()
    m = torch.randint(0, 4, (4, 32, 32)); st = torch.randn(4, 4, SMOKE.style_dim)
    a = synthesize(G, m, st)
    assert torch.equal(a, synthesize(G, m, st))
    b = torch.cat([synthesize(G, m[i:i+1], st[i:i+1]) for i in range(4)])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    g1 = synthesize(G, m, st, generator=torch.Generator().manual_seed(3))
    g2 = synthesize(G, m, st, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g1, g2)
    assert G.training is False


def test_synthesize_keeps_training_mode_and_no_grad():
    G = _gen().train()
    out = synthesize(G, torch.zeros(1, 32, 32, dtype=torch.long), torch.zeros(1, 4, SMOKE.style_dim))
    assert G.training and not out.requires_grad



# --- losses --------------------------------------------------------------------------------------

def test_hinge_losses_hand_computed():
    real, fake = torch.tensor([2., 0.]), torch.tensor([-2., 1.])
    # D: mean(relu(1 - [2, 0])) = 0.5, mean(relu(1 + [-2, 1])) = 1
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(1.5))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(0.5))
    # two scales are averaged: second scale D = 0 + 0, G = 1
    torch.testing.assert_close(hinge_d_loss([real, torch.ones(3)], [fake, -torch.ones(3)]), torch.tensor(0.75))
    torch.testing.assert_close(hinge_g_loss([fake, -torch.ones(3)]), torch.tensor(0.75))


def test_feature_matching_and_l1():
    ff = [[torch.ones(2), torch.full((1,), 5.)]]; rf = [[torch.zeros(2), torch.zeros(1)]]   # logits excluded
    torch.testing.assert_close(feature_matching_loss(ff, rf), torch.tensor(1.))
    torch.testing.assert_close(l1_loss(torch.tensor([1., -1.]), torch.zeros(2)), torch.tensor(1.))


def test_discriminator_outputs():
    D = MultiScaleDiscriminator(SMOKE)
    out = D(one_hot_mask(torch.randint(0, 4, (2, 32, 32))), torch.rand(2, 1, 32, 32))
    assert len(out) == SMOKE.num_d and all(len(o) == SMOKE.n_layers_d + 1 for o in out)
    assert out[0][-1].shape[1] == 1


def test_vgg_weights_file_loads(tmp_path):
    net = VGG19Features()
    sd = {f'features.{k}': v for k, v in net.features.state_dict().items()}
    sd['classifier.0.weight'] = torch.zeros(1)           # ignored
    torch.save(sd, tmp_path / 'vgg.pth')
    net2 = VGG19Features.from_file(tmp_path / 'vgg.pth')
    torch.testing.assert_close(net2.features[0].weight, net.features[0].weight)
    assert len(net2(torch.zeros(1, 1, 32, 32))) == 5


# --- training / checkpoints ----------------------------------------------------------------------

def test_resume_equals_uninterrupted(tmp_path):
    ds = ToySlices(8, 32, seed=0)
    full = train_sean(SMOKE, ds, tmp_path / 'a', seed=1, epochs=2, verbose=False)
    train_sean(SMOKE, ds, tmp_path / 'b', seed=1, epochs=1, verbose=False)      # "killed" after epoch 1
    res = train_sean(SMOKE, ds, tmp_path / 'b', seed=1, epochs=2, verbose=False)
    for (k, v), w in zip(full.state_dict().items(), res.state_dict().values()):
        assert torch.equal(v, w), k
    ck_a = torch.load(tmp_path / 'a' / 'last.pt', weights_only=True)
    ck_b = torch.load(tmp_path / 'b' / 'last.pt', weights_only=True)
    for (k, v), w in zip(ck_a['D'].items(), ck_b['D'].values()): assert torch.equal(v, w), k
    assert ck_a['epoch'] == ck_b['epoch'] == 2
    assert (tmp_path / 'b' / 'log.csv').read_text().count('\n') == 3
    # a finished run is not redone
    t = os.path.getmtime(tmp_path / 'b' / 'last.pt')
    again = train_sean(SMOKE, ds, tmp_path / 'b', seed=1, epochs=2, verbose=False)
    assert os.path.getmtime(tmp_path / 'b' / 'last.pt') == t
    assert torch.equal(again.dec.fc.weight, res.dec.fc.weight)
    assert torch.equal(load_sean(tmp_path / 'b' / 'last.pt').dec.fc.weight, res.dec.fc.weight)
    # another config or seed in the same folder is refused
    with pytest.raises(ValueError): train_sean(replace(SMOKE, ngf=8), ds, tmp_path / 'b', seed=1, epochs=3, verbose=False)
    with pytest.raises(ValueError): train_sean(SMOKE, ds, tmp_path / 'b', seed=2, epochs=3, verbose=False)


def test_same_seed_same_weights(tmp_path):
    ds = ToySlices(4, 32, seed=0)
    cfg = replace(SMOKE, batch=2, epochs=1)
    a = train_sean(cfg, ds, tmp_path / 'a', seed=0, verbose=False)
    b = train_sean(cfg, ds, tmp_path / 'b', seed=0, verbose=False)
    assert all(torch.equal(v, w) for v, w in zip(a.state_dict().values(), b.state_dict().values()))
