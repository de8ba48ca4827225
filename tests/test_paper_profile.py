"""The paper profile on the CPU: every registered method at the paper's widths with the paper's SEAN, the 512-px grid,
mixed precision (bf16 numerics, fp16 loss scaling) and channels_last. Every method at 512 px is marked `slow` (minutes,
about 14 GB of memory for SA-CPS with the paper's SEAN): `make test` runs it, `make test-fast` leaves it out."""
import math
import pytest, torch
from sapl.data import get_profile
from sapl.paper_profile import registered_methods, paper_iterations, paper_sean, paper_config, synthetic_bundle
from sapl.sean import SEAN, SEAN_PROFILES
from sapl.train import RunConfig, Trainer, load_checkpoint, save_checkpoint
from sapl.unet import UNet

METHODS = registered_methods()
PAPER = get_profile('paper')
slow = pytest.mark.slow


@pytest.fixture(scope='module')
def sean(): return paper_sean()


def check(r, S):
    assert r['iterations'] == 2
    assert all(math.isfinite(v) for v in r['history'][-1].values()), r['history']
    assert r['pred_shape'] == (1, 1, S, S) and r['pred_finite'] and 0 <= r['pred_range'][0] <= r['pred_range'][1] <= 1
    assert r['weights_finite'] and r['widths'] == PAPER.widths


@pytest.mark.parametrize('method', METHODS)
def test_two_iterations_paper_widths(method, sean, tmp_path):
    "Paper widths and the paper's SEAN; 64 px keeps every U-Net level (4 px bottleneck) and SEAN stage (2 px start)."
    r = paper_iterations(method, 64, tmp_path, gen=sean)
    check(r, 64)
    assert not r['channels_last']       # the CPU default: contiguous


def test_baseline_at_512(tmp_path):
    check(paper_iterations('baseline', PAPER.size, tmp_path), PAPER.size)


def test_paper_grid_512_shapes():
    "The 512-px grid through the paper's U-Net (forward and backward) and SEAN (encoder and decoder), shapes only (meta device)."
    S = PAPER.size
    with torch.device('meta'):
        u, g = UNet(PAPER.widths), SEAN(SEAN_PROFILES['paper'])
        z = u(torch.empty(2, 1, S, S)); z.sum().backward()
        m = torch.zeros(2, S, S, dtype=torch.long)
        style = g.enc(torch.empty(2, 1, S, S), m)
        x = g.dec(torch.nn.functional.one_hot(m, 4).permute(0, 3, 1, 2).float(), style)
    assert z.shape == x.shape == (2, 1, S, S) and style.shape == (2, 4, SEAN_PROFILES['paper'].style_dim)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in u.parameters())


@slow
@pytest.mark.parametrize('method', METHODS)
def test_two_iterations_paper_resolution(method, sean, tmp_path):
    "512 px, batch 2, in the channels_last layout the paper profile uses on a GPU (on the CPU it also spends less time in the SEAN decoder)."
    r = paper_iterations(method, PAPER.size, tmp_path, gen=sean, channels_last=True)
    check(r, PAPER.size)
    assert r['channels_last']


BF16_RTOL = 0.01   # stated tolerance: bf16 autocast losses within 1 % of fp32 over 4 iterations (measured: <= 0.07 %)


def _losses(cfg, n=4):
    tr = Trainer(cfg, synthetic_bundle(64, 2), progress=False); out = []
    for _ in range(n):
        bl = tr.next_batch('labeled', tr.labeled)
        bu = tr.next_batch('unlabeled', tr.unlabeled) if tr.unlabeled is not None else None
        tr.models.train(); l = tr.train_step(bl, bu); tr.optimizer_step(l['loss']); out.append(float(l['loss'].detach()))
    return tr, out


@pytest.mark.parametrize('method', ['baseline', 'cps'])
def test_bf16_autocast_close_to_fp32(method, tmp_path):
    t32, a = _losses(paper_config(method, tmp_path/'fp32', iters=4, amp='off'))
    t16, b = _losses(paper_config(method, tmp_path/'bf16', iters=4, amp='bf16'))
    assert (t32.amp, t16.amp) == ('off', 'bf16') and a != b                  # autocast really changed the arithmetic
    assert all(abs(x - y) <= BF16_RTOL*abs(x) for x, y in zip(a, b)), (a, b)
    assert all(p.dtype == torch.float32 for p in t16.models.parameters())   # master weights stay fp32


def test_amp_auto_is_off_on_cpu():
    assert Trainer(paper_config('baseline', 'runs'), synthetic_bundle(32, 2), progress=False).amp == 'off'
    with pytest.raises(ValueError, match='amp must be'): RunConfig(amp='fp8')


def test_fp16_scaler_checkpointed_and_resumed(tmp_path):
    cfg = RunConfig(profile='smoke', epochs=1, iters_per_epoch=2, batch=2, amp='fp16', out_dir=str(tmp_path))
    tr = Trainer(cfg, synthetic_bundle(32, 2, 'smoke'), progress=False).fit()
    assert tr.scaler is not None and math.isfinite(tr.history[0]['loss'])
    ck = load_checkpoint(cfg.run_dir/'last.pt')
    assert ck['scaler']['scale'] == tr.scaler.get_scale() > 0
    ck['scaler']['scale'] = 1024.
    tr2 = Trainer(cfg, synthetic_bundle(32, 2, 'smoke'), progress=False).load(ck)
    assert tr2.scaler.get_scale() == 1024.


def test_checkpoint_without_new_fields_resumes(tmp_path):
    "A last.pt written before `amp` and `channels_last` existed is the same configuration (their defaults)."
    cfg = RunConfig(profile='smoke', epochs=2, iters_per_epoch=2, out_dir=str(tmp_path))
    tr = Trainer(cfg, synthetic_bundle(32, 2, 'smoke'), progress=False)
    ck = tr.checkpoint(); ck['epoch'] = 1
    for k in ('amp', 'channels_last'): del ck['config'][k]
    save_checkpoint(cfg.run_dir/'last.pt', ck)
    assert not Trainer(cfg, synthetic_bundle(32, 2, 'smoke'), progress=False).resume()


def test_channels_last_same_numbers(tmp_path):
    runs = [Trainer(RunConfig(profile='smoke', epochs=1, iters_per_epoch=3, batch=2, channels_last=c, out_dir=str(tmp_path/str(c))),
                    synthetic_bundle(32, 2, 'smoke'), progress=False).fit() for c in (False, True)]
    w = runs[1].models[0].encoder.blocks[1][0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    for a, b in zip(runs[0].models.parameters(), runs[1].models.parameters()): assert torch.allclose(a, b, atol=1e-5)
