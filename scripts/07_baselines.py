# %% [markdown]
# # Competing semi-supervised methods
#
# > Mean Teacher, UA-MT, CCT, UDC, Self-Ensembling and Semi-Inf-Net as `Method`s of the shared trainer,
# > all on the same 2D U-Net (the competitors of Tables IV and V, §IV-C).

# %%
#| default_exp baselines

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import tempfile

# %%
#| export
from __future__ import annotations
import copy, math
from dataclasses import replace
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sapl.data import DataBundle, Volume, LabeledSlices, sample_aug, apply_aug
from sapl.train import RunConfig, Method, Trainer, register, VARIANTS
from sapl.unet import Decoder, l_seg


# %% [markdown]
# §IV-C compares SA-CPS and SA-ST with single-stage methods (UA-MT, CCT, UDC, Self-Ensembling, CPS) and
# multi-stage methods (SemiInfNet, Self-Training), and states that *the same 2D U-Net architecture is adopted
# for all the methods*. Here every competitor is a small `Method` of `sapl.train`: the shared `Trainer` does the
# batching ($B$ labeled + $B$ unlabeled slices per iteration, $B = 8$ in the paper), SGD with polynomial decay,
# validation and checkpoints; a method only says which networks exist (`build`), what the loss of one iteration
# is (`train_step`), and what happens after the optimiser step (`after_step`). Prediction always uses the main
# U-Net (`tr.models[0]`) alone. Mean Teacher is not in the tables but is the base of UA-MT, so it is here too.
# CPS and Self-Training are the ablations of SA-CPS and SA-ST and live in those notebooks.
#
# Notation used throughout: $x^l, y$ a labeled batch, $x^u$ an unlabeled batch, $f_\theta$ a U-Net with weights
# $\theta$ giving logits, $\sigma$ the logistic sigmoid (so $p = \sigma(f_\theta(x))$ is the infection
# probability per pixel), $\mathcal{L}_{Seg} = \mathcal{L}_{BCE} + \mathcal{L}_{Dice}$ the supervised loss of
# Eq. 6, $\mathrm{MSE}(a, b) = \frac{1}{|\Omega|}\sum_{i\in\Omega}(a_i - b_i)^2$ the mean squared error over the
# set $\Omega$ of pixels of a batch, $\mathrm{sg}[\cdot]$ stop-gradient (the value is used as a fixed target),
# $t$ the iteration counter (`tr.sched.last_epoch`) and $T$ the number of iterations of the run (`tr.total`).
#
# Every hyperparameter below is a key of `cfg.opts` (`Method.defaults`, overridden into `self.o`) with the default of the
# method's reference implementation; unknown keys are refused so that a typo cannot silently fall back to a default.

# %% [markdown]
# ## Shared pieces
#
# ### Sigmoid ramp-up
#
# Consistency weights start near zero and grow to their final value $w_{\max}$ over the first $T_r$ iterations
# (Laine & Aila's ramp-up, used by all consistency methods below):
#
# $$w(t) = w_{\max}\; r(t; T_r),\qquad r(t; T_r) = \exp\!\Big(-5\,\big(1 - \tfrac{\min(t,\,T_r)}{T_r}\big)^2\Big),
# \quad r(t; 0) = 1 \tag{B1}$$
#
# with $t$ the iteration, $T_r$ the ramp-up length in iterations and $w_{\max}$ the final weight. Each method sets
# $T_r$ as a fraction (`rampup`) of the run length $T$, so the schedule has the same shape in a smoke run, in the
# quick profile and at paper scale.

# %%
#| export
def sigmoid_rampup(t: float, # current iteration
                   length: float, # ramp-up length T_r in iterations
                  ) -> float:
    "Ramp-up factor r(t; T_r) of Eq. B1, in (0, 1]."
    if length <= 0: return 1.
    x = min(max(float(t), 0.), float(length))/float(length)
    return math.exp(-5.*(1. - x)**2)

def ramp_weight(tr, w_max: float, frac: float) -> float:
    "w(t) of Eq. B1 at the trainer's current iteration, with T_r = frac * (iterations of the run)."
    return w_max*sigmoid_rampup(tr.sched.last_epoch, frac*tr.total)


# %%
test_close(sigmoid_rampup(0, 100), math.exp(-5)); test_close(sigmoid_rampup(50, 100), math.exp(-1.25))
test_eq(sigmoid_rampup(100, 100), 1.); test_eq(sigmoid_rampup(500, 100), 1.); test_eq(sigmoid_rampup(3, 0), 1.)


# %% [markdown]
# ### Exponential moving average of weights
#
# A teacher network with weights $\theta'$ follows the student weights $\theta$ after every optimiser step:
#
# $$\theta'_t = \alpha_t\,\theta'_{t-1} + (1 - \alpha_t)\,\theta_t,\qquad \alpha_t = \min\!\big(1 - \tfrac{1}{t+1},\ \alpha\big)
# \tag{B2}$$
#
# with $\alpha$ the EMA decay and $t = 0, 1, \dots$ the number of the step just taken. The cap $1 - 1/(t+1)$ makes
# the teacher the true running mean of the student weights during the first $1/(1-\alpha)$ steps (at $t = 0$ the
# teacher becomes a copy of the student), as in the reference implementations. Only parameters are averaged;
# the teacher's BatchNorm statistics come from its own forward passes in training mode, as in the references.

# %%
#| export
@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float, step: int) -> float:
    "Move `teacher`'s parameters towards `student`'s (Eq. B2); returns the decay used."
    a = min(1. - 1./(step + 1), alpha)
    for pt, ps in zip(teacher.parameters(), student.parameters()): pt.mul_(a).add_(ps.detach(), alpha=1. - a)
    return a


# %%
_t, _s = nn.Linear(2, 1), nn.Linear(2, 1)
nn.init.constant_(_t.weight, 0.); nn.init.constant_(_s.weight, 1.)
test_eq(ema_update(_t, _s, .99, 0), 0.); test_eq(_t.weight.detach(), torch.ones(1, 2))            # first step: copy
nn.init.constant_(_t.weight, 0.); test_close(ema_update(_t, _s, .99, 4), .8)              # min(1 - 1/5, .99)
test_close(_t.weight.detach(), torch.full((1, 2), .2)); test_close(ema_update(_t, _s, .99, 10**4), .99)


# %% [markdown]
# Small utilities: Gaussian input noise clipped to $\pm c$, $\xi = \mathrm{clip}(\mathcal{N}(0, s^2), -c, c)$, used
# on the teacher's input by Mean Teacher and UA-MT; a seeded module constructor (so that auxiliary decoders get
# the same initial weights for the same run seed); and the masked mean squared error
#
# $$\mathrm{MSE}_m(p, q) = \frac{\sum_i m_i\,(p_i - q_i)^2}{\sum_i m_i + 10^{-16}} \tag{B3}$$
#
# with $m_i \in \{0, 1\}$ a per-pixel mask (zero when the mask is empty).

# %%
#| export
def input_noise(x: torch.Tensor, std: float = 0.1, clip: float = 0.2) -> torch.Tensor:
    "x + clip(N(0, std^2), -clip, clip), elementwise."
    return x + torch.clamp(torch.randn_like(x)*std, -clip, clip)

def masked_mse(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    "Mean squared error over the pixels where `mask` is 1 (Eq. B3)."
    return (mask*(p - q)**2).sum()/(mask.sum() + 1e-16)

def seeded(fn, seed: int):
    "Call `fn()` under torch RNG seed `seed` without disturbing the global RNG state."
    with torch.random.fork_rng():
        torch.manual_seed(seed); return fn()


# %%
_p, _q = torch.tensor([.2, .9, .5]), torch.tensor([.4, .1, .5])
test_close(masked_mse(_p, _q, torch.tensor([1., 0., 1.])), .02); test_eq(masked_mse(_p, _q, torch.zeros(3)), 0.)
_x = torch.zeros(1000); test_eq(float((input_noise(_x) - _x).abs().max()) <= .2 + 1e-6, True)

# %% [markdown]
# A toy data bundle (not exported) for the examples: six 4-slice volumes of 32×32 pixels with a bright square
# "lesion", split 2 labeled / 2 unlabeled / 1 validation / 1 test.

# %%
#| hide
from sapl.data import Split, get_profile
def _toy_vol(i, n=4, S=32):
    r = np.random.default_rng(i)
    img = r.random((n, S, S)).astype(np.float32)*.3
    lab = np.zeros((n, S, S), np.uint8); lab[:, 8 + i % 5:18, 6:16 + i % 7] = 1
    img[lab > 0] += .5
    return Volume(f'v{i}', img.clip(0, 1), lab, np.ones((n, S, S), np.uint8), np.arange(n), (0, S, 0, S),
                  (n, S, S), (1., 1., 1.), np.eye(4))

def _toy_bundle():
    vs = [_toy_vol(i) for i in range(6)]
    return DataBundle(vs[:2], vs[2:4], vs[4:5], vs[5:], get_profile('smoke'), Split((), (), (), ()), '')

def _toy_trainer(method, d, **opts):
    cfg = RunConfig(method=method, profile='smoke', epochs=1, iters_per_epoch=2, out_dir=d, opts=opts)
    return Trainer(cfg, _toy_bundle(), progress=False)

def _one_step(tr):
    tr.models.train()
    bl, bu = tr.next_batch('labeled', tr.labeled), (tr.next_batch('unlabeled', tr.unlabeled) if tr.unlabeled else None)
    return tr.method.train_step(tr, bl, bu)

torch.set_num_threads(1)


# %% [markdown]
# ## Mean Teacher
#
# Tarvainen & Valpola (NeurIPS 2017). A student $f_\theta$ is trained; a teacher $f_{\theta'}$ is the EMA of the
# student (Eq. B2). On unlabeled slices the student's probabilities are pulled towards the teacher's
# probabilities on a noisy copy of the same input:
#
# $$\mathcal{L}_{MT} = \mathcal{L}_{Seg}\big(f_\theta(x^l), y\big)
# + w(t)\,\mathrm{MSE}\Big(\sigma\big(f_\theta(x^u)\big),\ \mathrm{sg}\big[\sigma\big(f_{\theta'}(x^u + \xi)\big)\big]\Big)
# \tag{B4}$$
#
# with $\xi = \mathrm{clip}(\mathcal{N}(0, 0.1^2), \pm 0.2)$ and $w(t)$ from Eq. B1. The student sees the labeled
# and unlabeled slices in one batch (shared BatchNorm statistics); the student is the network that predicts.
#
# | option | symbol | default | source |
# |---|---|---|---|
# | `ema` | $\alpha$ | 0.99 | SSL4MIS `train_mean_teacher_2D.py` (`ema_decay`) |
# | `consistency` | $w_{\max}$ | 0.1 | same (`consistency`) |
# | `rampup` | $T_r / T$ | 1.0 | same: ramp-up of 200 units of 150 iterations = 30 000 = the whole run (`max_iterations`) |
# | `noise`, `noise_clip` | $s, c$ | 0.1, 0.2 | same (teacher input noise) |
#
# Source: HiLab-git/SSL4MIS, `code/train_mean_teacher_2D.py`. Departures: one sigmoid output instead of a 2-class
# softmax (for two classes the softmax MSE equals the squared difference of the foreground probabilities, so the
# loss scale is unchanged); the reference additionally switches the consistency term off for the first 1000
# iterations, which the ramp-up already makes negligible and which is not scale-free, so it is not reproduced.

# %%
#| export
@register
class MeanTeacher(Method):
    "Mean Teacher: EMA teacher, MSE consistency of probabilities on unlabeled slices (Eq. B4)."
    name, unlabeled = 'mt', True
    defaults = dict(consistency=0.1, rampup=1.0, ema=0.99, noise=0.1, noise_clip=0.2)

    def build(self, tr) -> list:
        student = tr.new_unet(0)
        teacher = copy.deepcopy(student).requires_grad_(False)   # not optimised; follows the student by EMA
        return [student, teacher]

    def noisy(self, x): return input_noise(x, self.o['noise'], self.o['noise_clip'])

    @torch.no_grad()
    def teacher_prob(self, tr, xu: torch.Tensor) -> torch.Tensor: # [B,1,H,W] teacher probabilities on a noisy xu
        return torch.sigmoid(tr.models[1](self.noisy(xu)))

    def consistency(self, tr, pu: torch.Tensor, xu: torch.Tensor) -> tuple:
        "Consistency loss of student probabilities `pu` on `xu`, and extra values to log."
        return F.mse_loss(pu, self.teacher_prob(tr, xu)), {}

    def train_step(self, tr, bl: dict, bu: dict) -> dict:
        B = len(bl['image'])
        z = tr.models[0](torch.cat([bl['image'], bu['image']]))
        sup = l_seg(z[:B], bl['label'])
        cons, extra = self.consistency(tr, torch.sigmoid(z[B:]), bu['image'])
        w = ramp_weight(tr, self.o['consistency'], self.o['rampup'])
        return {'loss': sup + w*cons, 'sup': sup.detach(), 'cons': cons.detach(), 'w_cons': w, **extra}

    def after_step(self, tr): ema_update(tr.models[1], tr.models[0], self.o['ema'], tr.sched.last_epoch - 1)


# %%
with tempfile.TemporaryDirectory() as _d:
    _tr = _toy_trainer('mt', _d)
    test_eq([p.requires_grad for p in _tr.models[1].parameters()][0], False)
    test_eq(sum(p.numel() for g in _tr.opt.param_groups for p in g['params']), sum(p.numel() for p in _tr.models[0].parameters()))
    _l = _one_step(_tr); test_eq(bool(torch.isfinite(_l['loss'])), True)


# %% [markdown]
# ## UA-MT
#
# Yu et al., *Uncertainty-aware self-ensembling model for semi-supervised 3D left atrium segmentation*
# (MICCAI 2019) [46]. Mean Teacher where the consistency is only applied where the teacher is certain. The
# teacher runs $T$ times with independent input noise $\xi_k$; the uncertainty is the predictive entropy of the
# mean probability,
#
# $$\bar{p} = \frac{1}{T}\sum_{k=1}^{T}\sigma\big(f_{\theta'}(x^u + \xi_k)\big),\qquad
# u = -\bar{p}\ln\bar{p} - (1 - \bar{p})\ln(1 - \bar{p}), \tag{B5}$$
#
# and a pixel $i$ takes part in the consistency loss when $u_i$ is below a threshold that rises from
# $\tfrac34\ln 2$ to $\ln 2$ (the maximal entropy of two classes) over the run:
#
# $$H(t) = \Big(\tfrac34 + \tfrac14\, r(t; T_H)\Big)\ln 2,\qquad
# \mathcal{L}_{UA\text{-}MT} = \mathcal{L}_{Seg}\big(f_\theta(x^l), y\big) + w(t)\,\mathrm{MSE}_{m}\big(\sigma(f_\theta(x^u)),\ q\big),\quad
# m_i = \mathbb{1}[u_i < H(t)] \tag{B6}$$
#
# with $q = \mathrm{sg}[\sigma(f_{\theta'}(x^u + \xi))]$ the teacher target of Eq. B4 (a separate noisy pass),
# $r$ the ramp of Eq. B1 with length $T_H$, and $\mathrm{MSE}_m$ of Eq. B3.
#
# | option | symbol | default | source |
# |---|---|---|---|
# | `T` | $T$ | 8 | yulequan/UA-MT `train_LA_meanteacher_certainty_unlabel.py` |
# | `threshold_rampup` | $T_H / T_{run}$ | 1.0 | same: threshold ramp over `max_iterations` |
# | `ema`, `consistency` | $\alpha, w_{\max}$ | 0.99, 0.1 | same |
# | `rampup` | $T_r / T$ | 1.0 | same: 40 units of 150 iterations = 6000 = `max_iterations` |
# | `noise`, `noise_clip` | $s, c$ | 0.1, 0.2 | same |
#
# Departures: the original is 3D (V-Net with dropout in the teacher, so its $T$ passes differ by dropout and
# noise); here the 2D U-Net has no dropout and the passes differ by the input noise and by the batch statistics of
# BatchNorm in training mode. The noise level 0.1 was set for z-scored MR intensities; our CT slices are in
# $[0, 1]$, so the same noise is relatively stronger. Sigmoid instead of 2-class softmax (same entropy and MSE).

# %%
#| export
def binary_entropy(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    "Entropy (nats) of a Bernoulli probability map (Eq. B5)."
    return -(p*torch.log(p + eps) + (1 - p)*torch.log(1 - p + eps))

def uamt_threshold(t: float, length: float) -> float:
    "H(t) of Eq. B6: from 3/4 ln 2 to ln 2 along the sigmoid ramp."
    return (0.75 + 0.25*sigmoid_rampup(t, length))*math.log(2)

def uncertainty_mask(probs: torch.Tensor, # [T,B,1,H,W] probabilities of T stochastic teacher passes
                     threshold: float) -> torch.Tensor:
    "1 where the entropy of the mean probability is below `threshold` (Eq. B5-B6)."
    return (binary_entropy(probs.mean(0)) < threshold).float()


# %%
_pr = torch.tensor([.5, .9, .99]).view(1, 1, 1, 1, 3).expand(4, 1, 1, 1, 3)      # T=4 identical passes
test_eq(uncertainty_mask(_pr, uamt_threshold(0, 100))[0, 0, 0], torch.tensor([0., 1., 1.]))
test_close(uamt_threshold(0, 100), (.75 + .25*math.exp(-5))*math.log(2)); test_close(uamt_threshold(100, 100), math.log(2))


# %%
#| export
@register
class UAMT(MeanTeacher):
    "UA-MT: Mean Teacher with the consistency restricted to pixels of low teacher uncertainty (Eq. B5-B6)."
    name = 'uamt'
    defaults = {**MeanTeacher.defaults, 'T': 8, 'threshold_rampup': 1.0}

    @torch.no_grad()
    def mc_probs(self, tr, xu: torch.Tensor) -> torch.Tensor: # [T,B,1,H,W]
        return torch.stack([self.teacher_prob(tr, xu) for _ in range(int(self.o['T']))])

    def consistency(self, tr, pu, xu):
        thr = uamt_threshold(tr.sched.last_epoch, self.o['threshold_rampup']*tr.total)
        mask = uncertainty_mask(self.mc_probs(tr, xu), thr)
        return masked_mse(pu, self.teacher_prob(tr, xu), mask), {'certain': float(mask.mean())}


# %%
with tempfile.TemporaryDirectory() as _d:
    _l = _one_step(_toy_trainer('uamt', _d, T=2)); test_eq(0 <= _l['certain'] <= 1, True)


# %% [markdown]
# ## CCT
#
# Ouali et al., *Semi-supervised semantic segmentation with cross-consistency training* (CVPR 2020) [17]. One
# shared encoder $h$, the main decoder $g$ and $K$ auxiliary decoders $g_k$. The main decoder is trained on labeled
# slices only; each auxiliary decoder sees a perturbed version $\pi_k$ of the encoder features of the unlabeled
# slices and must agree with the main decoder's (fixed) prediction:
#
# $$\mathcal{L}_{CCT} = \mathcal{L}_{Seg}\big(g(h(x^l)), y\big) + w(t)\,\frac{1}{K}\sum_{k=1}^{K}
# \mathrm{MSE}\Big(\sigma\big(g_k(\pi_k(h(x^u)))\big),\ \mathrm{sg}\big[\sigma\big(g(h(x^u))\big)\big]\Big) \tag{B7}$$
#
# The encoder is updated by the auxiliary losses (through $h(x^u)$), which is how the unlabeled data shape the
# representation. With the U-Net, $h(x)$ is the list of feature maps of all encoder levels (the skips), and the
# perturbation is applied to each of them. The three feature perturbations, for a feature map $z$ of $C$ channels:
#
# * feature noise: $\pi(z) = z + z \odot N$, $N \sim \mathcal{U}(-0.3, 0.3)^{C\times H\times W}$ drawn once per
#   batch;
# * spatial dropout: whole channels zeroed with probability 0.5 (and the rest rescaled by 2);
# * feature dropout: $\pi(z) = z \odot \mathbb{1}\big[a < \gamma \max a\big]$ with $a = \frac1C\sum_c z_c$ the
#   channel-mean activation map and $\gamma \sim \mathcal{U}(0.6, 0.9)$, i.e. the most active regions are erased.
#
# | option | symbol | default | source |
# |---|---|---|---|
# | `consistency` | $w_{\max}$ | 30 | yassouali/CCT `configs/config.json` (`unsupervised_w`) |
# | `rampup` | $T_r / T$ | 0.1 | same (`ramp_up` × epochs, sigmoid ramp in `utils/losses.py`) |
# | `perturbations` | $\pi_k$ | `noise,dropout,featdrop` | decoder types of `models/decoders.py` |
# | `noise_range` | | 0.3 | `uniform_range` |
# | `drop_rate` | | 0.5 | `drop_rate`, `spatial: true` |
# | `featdrop_lo`, `featdrop_hi` | $\gamma$ range | 0.6, 0.9 | `FeatureDropDecoder` |
#
# Departures: the original has a ResNet/PSP encoder with 2 VAT, 6 dropout, 6 cutout, 2 context-masking,
# 2 object-masking, 6 feature-dropout and 6 feature-noise decoders (light upsampling heads). Here the auxiliary
# decoders are full U-Net decoders (as in the SSL4MIS 2D port), one per perturbation type, and the
# prediction-guided perturbations (VAT, cutout, context/object masking) are left out, as in SSL4MIS; more
# decoders can be asked for by repeating names in `perturbations`. Sigmoid instead of softmax.

# %%
#| export
def feature_noise(z: torch.Tensor, r: float = 0.3) -> torch.Tensor:
    "z + z * N with N ~ U(-r, r) of shape [C,H,W], shared over the batch."
    n = (torch.rand(z.shape[1:], device=z.device, dtype=z.dtype)*2 - 1)*r
    return z + z*n[None]

def spatial_dropout(z: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    "Channel-wise dropout (always active: it is a perturbation, not a regulariser)."
    return F.dropout2d(z, p, training=True)

def feature_dropout(z: torch.Tensor, lo: float = 0.6, hi: float = 0.9) -> torch.Tensor:
    "Erase the regions whose channel-mean activation exceeds gamma * its maximum, gamma ~ U(lo, hi)."
    a = z.mean(1, keepdim=True)
    mx = a.flatten(1).max(1).values.view(-1, 1, 1, 1)
    g = lo + (hi - lo)*torch.rand((), device=z.device)
    return z*(a < g*mx).to(z.dtype)


# %%
_z = torch.rand(2, 3, 8, 8)
test_eq(feature_noise(_z).shape, _z.shape); test_eq(bool((feature_dropout(_z) == 0).any()), True)
test_eq(bool((feature_dropout(_z) == _z).any()), True)             # the rest is kept unchanged


# %%
#| export
@register
class CCT(Method):
    "Cross-consistency training: auxiliary decoders on perturbed encoder features agree with the main decoder (Eq. B7)."
    name, unlabeled = 'cct', True
    defaults = dict(consistency=30., rampup=0.1, perturbations='noise,dropout,featdrop', noise_range=0.3,
                    drop_rate=0.5, featdrop_lo=0.6, featdrop_hi=0.9)

    def kinds(self) -> list: return [k.strip() for k in self.o['perturbations'].split(',') if k.strip()]

    def build(self, tr) -> list:
        unet = tr.new_unet(0)
        aux = nn.ModuleList([seeded(lambda: Decoder(unet.widths), tr.cfg.seed*1000 + 501 + k) for k in range(len(self.kinds()))])
        return [unet, aux]   # the optimiser covers both; `predict` uses the U-Net only

    def perturb(self, kind: str, z: torch.Tensor) -> torch.Tensor:
        if kind == 'noise': return feature_noise(z, self.o['noise_range'])
        if kind == 'dropout': return spatial_dropout(z, self.o['drop_rate'])
        if kind == 'featdrop': return feature_dropout(z, self.o['featdrop_lo'], self.o['featdrop_hi'])
        raise ValueError(f"unknown perturbation {kind!r}; use noise, dropout or featdrop")

    def aux_features(self, feats: list) -> list:
        "One perturbed copy of the encoder features per auxiliary decoder."
        return [[self.perturb(k, f) for f in feats] for k in self.kinds()]

    def aux_probs(self, tr, feats: list) -> list:
        return [torch.sigmoid(g(pf)) for g, pf in zip(tr.models[1], self.aux_features(feats))]

    def train_step(self, tr, bl: dict, bu: dict) -> dict:
        unet = tr.models[0]
        sup = l_seg(unet(bl['image']), bl['label'])
        fu = unet.encoder(bu['image'])
        target = torch.sigmoid(unet.decoder(fu)).detach()
        aux = self.aux_probs(tr, fu)
        cons = sum(F.mse_loss(p, target) for p in aux)/len(aux)
        w = ramp_weight(tr, self.o['consistency'], self.o['rampup'])
        return {'loss': sup + w*cons, 'sup': sup.detach(), 'cons': cons.detach(), 'w_cons': w}


# %%
with tempfile.TemporaryDirectory() as _d:
    _tr = _toy_trainer('cct', _d)
    _f = _tr.models[0].encoder(torch.rand(2, 1, 32, 32))
    for _pf in _tr.method.aux_features(_f): test_eq(all(not torch.equal(a, b) for a, b in zip(_pf, _f)), True)
    test_eq(len(_tr.models[1]), 3); test_eq(bool(torch.isfinite(_one_step(_tr)['loss'])), True)

# %% [markdown]
# ## UDC
#
# Li et al., *Dual-consistency semi-supervised learning with uncertainty quantification for COVID-19 lesion
# segmentation from CT images* (MICCAI 2021) [18]. CCT plus a second consistency: **transformation
# equivalence** — the prediction of a transformed input must be the transformed prediction. For a transformation
# $\mathcal{T}$ drawn at random each iteration (a flip along one image axis), on labeled and unlabeled slices,
#
# $$\mathcal{L}_{tr} = \mathrm{MSE}\Big(\sigma\big(\mathcal{T}^{-1}(f(\mathcal{T}(x)))\big),\ \mathrm{sg}\big[\sigma(f(x))\big]\Big),
# \quad x = [x^l; x^u] \tag{B8}$$
#
# (zero when $f$ commutes with $\mathcal{T}$). The feature-perturbation consistency of CCT is weighted by
# **uncertainty**: with $p_0$ the main prediction and $p_1..p_K$ the auxiliary predictions on $x^u$, the
# per-pixel variance across the $K+1$ predictions
#
# $$U = \frac{1}{K+1}\sum_{k=0}^{K}\big(p_k - \bar{p}\big)^2,\qquad \bar{p} = \frac{1}{K+1}\sum_{k=0}^{K} p_k \tag{B9}$$
#
# keeps only pixels with $U < \eta$:
#
# $$\mathcal{L}_{fp} = \frac{1}{K}\sum_{k=1}^{K}\mathrm{MSE}_{m}\big(p_k,\ \mathrm{sg}[p_0]\big),\quad m_i = \mathbb{1}[U_i < \eta],
# \qquad \mathcal{L}_{UDC} = \mathcal{L}_{Seg}\big(f(x^l), y\big) + w_{fp}(t)\,\mathcal{L}_{fp} + w_{tr}(t)\,\mathcal{L}_{tr} \tag{B10}$$
#
# with $w_{fp}, w_{tr}$ ramped by Eq. B1.
#
# | option | symbol | default | source |
# |---|---|---|---|
# | `consistency` | $w_{fp,\max}$ | 30 | poiuohke/UDC-Net `configs/config.json` (`unsupervised_w`) |
# | `transform_weight` | $w_{tr,\max}$ | 50 | same (`flip_loss_w`) |
# | `rampup` | $T_r / T$ | 0.1 | same (`ramp_up`; both weights, `train.py`) |
# | `u_max` | $\eta$ | 0.13 | `utils/losses.py` (mask of the consistency loss) |
# | `transforms` | $\mathcal{T}$ | `flip_h,flip_w` | `trainer.py` (random flip axis per iteration) |
# | `perturbations`, `noise_range`, `drop_rate` | | as CCT | `configs/config.json`, `models/decoders.py` |
# | `featdrop_lo`, `featdrop_hi` | $\gamma$ range | 0.7, 0.9 | `models/decoders.py` |
#
# Departures: UDC is 3D (V-Net-like, one auxiliary decoder of each of seven perturbation types, perturbing the
# deepest features, Dice loss, Adam); here it is the 2D U-Net with the three feature perturbations of CCT on all
# encoder levels, $\mathcal{L}_{Seg}$ and the shared SGD schedule. `rot90`, `rot180`, `rot270` can be added to
# `transforms`. The reference counts the main prediction twice in the variance average; Eq. B9 counts it once.

# %%
#| export
TRANSFORMS = {   # name -> (T, T^-1) on [..., H, W] tensors
    'flip_h': (lambda x: x.flip(-2), lambda x: x.flip(-2)),
    'flip_w': (lambda x: x.flip(-1), lambda x: x.flip(-1)),
    'rot90': (lambda x: torch.rot90(x, 1, (-2, -1)), lambda x: torch.rot90(x, -1, (-2, -1))),
    'rot180': (lambda x: torch.rot90(x, 2, (-2, -1)), lambda x: torch.rot90(x, -2, (-2, -1))),
    'rot270': (lambda x: torch.rot90(x, 3, (-2, -1)), lambda x: torch.rot90(x, -3, (-2, -1))),
}

def transform_consistency(f, # callable: [B,1,H,W] -> logits [B,1,H,W]
                          x: torch.Tensor, # [B,1,H,W]
                          t: str, # key of TRANSFORMS
                          target: torch.Tensor|None = None, # sg[sigma(f(x))] when already computed
                         ) -> torch.Tensor:
    "Transformation-equivalence loss of Eq. B8."
    fwd, inv = TRANSFORMS[t]
    if target is None:
        with torch.no_grad(): target = torch.sigmoid(f(x))
    return F.mse_loss(torch.sigmoid(inv(f(fwd(x)))), target)

def prediction_variance(probs: list) -> torch.Tensor:
    "Per-pixel variance across predictions (Eq. B9)."
    P = torch.stack(probs)
    return ((P - P.mean(0))**2).mean(0)


# %%
_k = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]).view(1, 1, 3, 3)/16   # symmetric kernel: equivariant
_eq = lambda x: F.conv2d(x, _k, padding=1)*8 - 2
_x = torch.rand(2, 1, 16, 16)
for _t in TRANSFORMS: test_close(transform_consistency(_eq, _x, _t), 0., eps=1e-10)
_ramp = torch.linspace(-3, 3, 16).view(1, 1, 1, 16)
test_eq(float(transform_consistency(lambda x: x*_ramp, _x, 'flip_w')) > 1e-3, True)      # not equivariant
test_close(prediction_variance([torch.zeros(3), torch.ones(3)]), torch.full((3,), .25))


# %%
#| export
@register
class UDC(CCT):
    "Uncertainty-guided dual consistency: transformation equivalence + uncertainty-masked CCT consistency (Eq. B8-B10)."
    name = 'udc'
    defaults = {**CCT.defaults, 'featdrop_lo': 0.7, 'transform_weight': 50., 'u_max': 0.13, 'transforms': 'flip_h,flip_w'}

    def pick_transform(self) -> str:
        names = [t.strip() for t in self.o['transforms'].split(',') if t.strip()]
        bad = [t for t in names if t not in TRANSFORMS]
        if bad or not names: raise ValueError(f"transforms must be a non-empty subset of {list(TRANSFORMS)}, got {names}")
        return names[int(torch.randint(len(names), ()))]

    def train_step(self, tr, bl: dict, bu: dict) -> dict:
        unet, B = tr.models[0], len(bl['image'])
        x = torch.cat([bl['image'], bu['image']])
        feats = unet.encoder(x)
        z = unet.decoder(feats)
        sup = l_seg(z[:B], bl['label'])
        p = torch.sigmoid(z).detach()
        # feature-perturbation invariance on unlabeled slices, masked by the variance of the predictions
        aux = self.aux_probs(tr, [f[B:] for f in feats])
        mask = (prediction_variance([p[B:]] + [a.detach() for a in aux]) < self.o['u_max']).float()
        l_fp = sum(masked_mse(a, p[B:], mask) for a in aux)/len(aux)
        # transformation equivalence on labeled and unlabeled slices
        l_tr = transform_consistency(unet, x, self.pick_transform(), target=p)
        w_fp = ramp_weight(tr, self.o['consistency'], self.o['rampup'])
        w_tr = ramp_weight(tr, self.o['transform_weight'], self.o['rampup'])
        return {'loss': sup + w_fp*l_fp + w_tr*l_tr, 'sup': sup.detach(), 'fp': l_fp.detach(), 'tr': l_tr.detach(),
                'w_fp': w_fp, 'w_tr': w_tr, 'certain': float(mask.mean())}


# %%
with tempfile.TemporaryDirectory() as _d:
    _l = _one_step(_toy_trainer('udc', _d)); test_eq(bool(torch.isfinite(_l['loss'])), True)
    test_fail(lambda: _toy_trainer('udc', _d, transforms='shear').method.pick_transform(), contains='transforms')


# %% [markdown]
# ## Self-Ensembling
#
# Li et al., *Self-ensembling co-training framework for semi-supervised COVID-19 CT segmentation* (JBHI 2021)
# [19]. Two U-Nets $f_1, f_2$ with different initial weights, trained together (co-training):
#
# * **cross pseudo supervision**: each network learns from the other's hard pseudo-labels on unlabeled slices,
#
#   $$\mathcal{L}^{a}_{cps} = \mathcal{L}_{Seg}\Big(f_a(x^u),\ \mathbb{1}\big[\sigma(f_b(x^u)) \ge \tau\big]\Big),
#   \quad (a, b) \in \{(1, 2), (2, 1)\}; \tag{B11}$$
#
# * **temporal ensembling** (self-ensembling): for every unlabeled slice $j$, each network keeps an exponential
#   moving average of its own past predictions, updated once per epoch over the whole unlabeled set and
#   bias-corrected,
#
#   $$Z^{(n)}_{a,j} = \alpha\,Z^{(n-1)}_{a,j} + (1 - \alpha)\,\sigma\big(f_a(x^u_j)\big),\quad Z^{(0)} = 0,\qquad
#   \hat{Z}_{a,j} = \frac{Z^{(n)}_{a,j}}{1 - \alpha^{n}}, \tag{B12}$$
#
#   with $n$ the number of updates so far; the current prediction $p_a = \sigma(f_a(x^u))$ is pulled to the
#   ensemble blended with itself,
#
#   $$\mathcal{L}^{a}_{te} = \mathrm{MSE}\Big(p_a,\ \alpha\,\hat{Z}_a + (1 - \alpha)\,\mathrm{sg}[p_a]\Big) \quad (n \ge 1); \tag{B13}$$
#
# $$\mathcal{L}_{SE} = \sum_{a=1}^{2}\Big[\mathcal{L}_{Seg}\big(f_a(x^l), y\big) + w(t)\big(\mathcal{L}^a_{cps} + \mathcal{L}^a_{te}\big)\Big]. \tag{B14}$$
#
# The unlabeled slices are augmented by the shared loader; the stored ensemble (in the un-augmented frame) is
# moved into the frame of the batch with the very augmentation that produced it (`sample_aug` with the
# dataset's seed, epoch and slice index). $f_1$ is the network that predicts.
#
# | option | symbol | default | source |
# |---|---|---|---|
# | `consistency` | $w_{\max}$ | 0.1 | CaiziLee/SECT `nnUNetTrainerV2_SECT.py` (`consistency`) |
# | `rampup` | $T_r / T$ | 0.2 | same: `consistency_rampup` 40 of `max_num_epochs` 200 |
# | `alpha` | $\alpha$ | 0.6 | same (`alpha`) |
# | `tau` | $\tau$ | 0.5 | argmax of two classes |
# | `te_size` | | 128 | storage side of $Z$ (memory), not in the original |
#
# Departures: the original is built on nnU-Net (2D nnU-Net networks, Dice+CE, Adam at $10^{-2}$ with gradient
# clipping at 12, 200 epochs of 100 batches, unlabeled slices not augmented, ensemble of L2-normalised logits
# passed through a softmax); here the shared U-Net, $\mathcal{L}_{Seg}$, the shared SGD schedule, augmented
# unlabeled slices with the aligned targets described above, and an ensemble of probabilities (Laine & Aila's
# form). The reference starts ensembling after 3 of its 200 epochs; here the ensemble is updated at the end of
# every epoch and used from the first update on. $Z$ is kept as 8-bit probabilities at most `te_size`² pixels
# per slice so that paper-size runs fit in memory (bilinear resampling to the slice size when used).

# %%
#| export
def te_update(Z: torch.Tensor, p: torch.Tensor, alpha: float) -> torch.Tensor:
    "One temporal-ensembling step of Eq. B12."
    return alpha*Z + (1 - alpha)*p

def te_target(Z: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    "Bias-corrected ensemble Z / (1 - alpha^n) of Eq. B12."
    return Z/(1 - alpha**n)


# %%
_Z, _pc = torch.zeros(3), torch.tensor([.1, .5, .8])
for _n in range(1, 5): _Z = te_update(_Z, _pc, .6); test_close(te_target(_Z, _n, .6), _pc)   # constant predictions
test_close(te_update(torch.tensor([1.]), torch.tensor([0.]), .6), torch.tensor([.6]))


# %%
#| export
@register
class SelfEnsembling(Method):
    "Two U-Nets with cross pseudo supervision and per-network temporal ensembling of predictions (Eq. B11-B14)."
    name, n_models, unlabeled = 'selfens', 2, True
    defaults = dict(consistency=0.1, rampup=0.2, alpha=0.6, tau=0.5, te_size=128)

    def setup(self, tr):
        N, S = tr.unlabeled.image.shape[0], tr.unlabeled.image.shape[-1]
        self.s = min(S, int(self.o['te_size']))
        self.Z = torch.zeros(2, N, self.s, self.s, dtype=torch.uint8)   # accumulator of Eq. B12, 8-bit
        self.n = 0

    def state(self) -> dict: return {'Z': self.Z, 'n': self.n}
    def load_state(self, s: dict): self.Z, self.n = s['Z'], int(s['n'])

    def targets(self, tr, k: int, idx: torch.Tensor) -> torch.Tensor: # -> [B,1,S,S], in the frame of the batch
        "Bias-corrected ensemble of network k for unlabeled slices `idx`, resized and augmented like the batch."
        ds, S = tr.unlabeled, tr.unlabeled.image.shape[-1]
        Zh = te_target(self.Z[k, idx].float()/255., self.n, self.o['alpha'])[:, None]
        if self.s != S: Zh = F.interpolate(Zh, size=(S, S), mode='bilinear', align_corners=False)
        if ds.augment: Zh = torch.stack([apply_aug(Zh[i], sample_aug(ds.seed, ds.epoch, int(j))) for i, j in enumerate(idx)])
        return Zh.clamp(0, 1).to(tr.device)

    @torch.no_grad()
    def update_ensemble(self, tr, batch: int = 32):
        "Eq. B12 over all unlabeled slices (not augmented), networks in eval mode."
        X, a = tr.unlabeled.image, self.o['alpha']
        tr.models.eval()
        for k in range(2):
            Zk = self.Z[k].float()/255.
            for i in range(0, len(X), batch):
                p = torch.sigmoid(tr.models[k](X[i:i+batch, None].to(tr.device))).float().cpu()
                if self.s != p.shape[-1]: p = F.interpolate(p, size=(self.s, self.s), mode='area')
                Zk[i:i+batch] = te_update(Zk[i:i+batch], p[:, 0], a)
            self.Z[k] = (Zk*255).round().clamp(0, 255).to(torch.uint8)
        self.n += 1
        tr.models.train()

    def train_step(self, tr, bl: dict, bu: dict) -> dict:
        B, a, tau = len(bl['image']), self.o['alpha'], self.o['tau']
        x = torch.cat([bl['image'], bu['image']])
        z1, z2 = tr.models[0](x), tr.models[1](x)
        sup = l_seg(z1[:B], bl['label']) + l_seg(z2[:B], bl['label'])
        p1, p2 = torch.sigmoid(z1[B:]), torch.sigmoid(z2[B:])
        cps = l_seg(z1[B:], (p2.detach() >= tau).float()) + l_seg(z2[B:], (p1.detach() >= tau).float())
        te = torch.zeros((), device=x.device)
        if self.n > 0:
            idx = bu['idx'].cpu()
            for k, p in ((0, p1), (1, p2)): te = te + F.mse_loss(p, a*self.targets(tr, k, idx) + (1 - a)*p.detach())
        w = ramp_weight(tr, self.o['consistency'], self.o['rampup'])
        return {'loss': sup + w*(cps + te), 'sup': sup.detach(), 'cps': cps.detach(), 'te': te.detach(), 'w_cons': w}

    def after_step(self, tr):
        if tr.sched.last_epoch % tr.iters == 0: self.update_ensemble(tr)   # end of an epoch


# %%
with tempfile.TemporaryDirectory() as _d:
    _tr = _toy_trainer('selfens', _d)
    test_eq(_tr.method.Z.shape, (2, 8, 32, 32)); _one_step(_tr)
    _tr.method.update_ensemble(_tr); test_eq(_tr.method.n, 1)
    _l = _one_step(_tr); test_eq(float(_l['te']) > 0, True)
    # a stored ensemble is moved into the frame of the augmented batch: store the images themselves as "predictions"
    _tr.method.Z[0] = (_tr.unlabeled.image*(1 - .6)*255).round().to(torch.uint8); _tr.method.n = 1
    _i = torch.tensor([3, 5]); _aug = torch.stack([_tr.unlabeled[int(j)]['image'] for j in _i])
    test_close(_tr.method.targets(_tr, 0, _i), _aug, eps=.02)


# %% [markdown]
# ## Semi-Inf-Net
#
# Fan et al., *Inf-Net: automatic COVID-19 lung infection segmentation from CT images* (TMI 2020) [36]:
# semi-supervised Inf-Net grows the training set progressively with pseudo-labels, chunk by randomly chosen
# chunk ("randomly selected propagation"). The unlabeled slices are split at random into $K$ disjoint chunks
# $C_0, \dots, C_{K-1}$. With $f^{(0)}$ trained on the labeled set $\mathcal{D}_L$ only, stage $k$ labels chunk
# $C_k$ with the latest model and fine-tunes on everything labeled so far:
#
# $$\mathcal{P}_k = \Big\{\big(x, \mathbb{1}[\sigma(f^{(k)}(x)) \ge \tau]\big) : x \in C_k\Big\},\qquad
# f^{(k+1)} = \arg\min_{f \,\leftarrow\, f^{(k)}} \sum_{(x, y)\,\in\,\mathcal{D}_L \cup \mathcal{P}_0 \cup \dots \cup \mathcal{P}_k}
# \mathcal{L}_{Seg}\big(f(x), y\big), \tag{B15}$$
#
# where $f \leftarrow f^{(k)}$ means training starts from the weights of $f^{(k)}$ (its best validation epoch);
# the result is $f^{(K)}$, trained on $\mathcal{D}_L$ and all $K$ pseudo-labeled chunks.
#
# On the shared trainer: `SemiInfNet.setup` runs stages $0..K-1$ as separate `Trainer` fits (each in its own run
# folder `<name>-stage<k>`, resumable, with the method `PseudoStage`: plain $\mathcal{L}_{Seg}$ on labeled +
# pseudo-labeled slices, started from the previous stage's best weights), keeps the pseudo-labeled chunks in memory
# as `Volume`s (the source volume's slices of the chunk, with the pseudo-label as `label`), and then lets the run's
# own trainer be stage $K$: its labeled set becomes $\mathcal{D}_L \cup \mathcal{P}_0 \cup \dots \cup \mathcal{P}_{K-1}$
# and its U-Net starts from $f^{(K-1)}$'s best weights.
#
# | option | symbol | default | source |
# |---|---|---|---|
# | `stages` | $K$ | 5 | original: 320 chunks of 5 slices (1600 unlabeled), `Code/utils/split_1600.py` |
# | `stage_epochs` | | ⌈0.1 × epochs⌉ | original: 100 epochs for Inf-Net on labeled data, then ~10 per stage (`PseudoGenerator.py`) |
# | `tau` | $\tau$ | 0.5 | the paper's binarisation threshold (§IV-A4) |
#
# Stage 0 and the final stage train for the run's `epochs`; the intermediate stages for `stage_epochs`.
# Departures: Semi-Inf-Net has its own backbone (Res2Net Inf-Net with reverse attention and edge supervision,
# weighted BCE + IoU losses, multi-scale training at 352 px, Adam $3\cdot10^{-4}$, batch 16) and 320 stages of 5
# slices; here the shared U-Net, $\mathcal{L}_{Seg}$, the shared SGD schedule and $K$ = 5 chunks by default
# (320 full trainings are out of reach). The original keeps soft, min–max-normalised probability maps as
# pseudo-labels; here they are binarised at $\tau$ like every pseudo-label in this paper.

# %%
#| export
def semiinfnet_chunks(n: int, # number of unlabeled slices
                      k: int, # number of chunks (stages)
                      seed: int = 0) -> list:
    "A seeded random partition of range(n) into k chunks of (almost) equal size."
    if not 1 <= k <= n: raise ValueError(f"need 1 <= stages <= unlabeled slices, got stages={k} for {n} slices")
    perm = np.random.default_rng([seed, 36]).permutation(n)
    return [np.sort(c) for c in np.array_split(perm, k)]


# %%
_c = semiinfnet_chunks(23, 5, seed=1)
test_eq(np.sort(np.concatenate(_c)), np.arange(23)); test_eq(sorted(len(c) for c in _c), [4, 4, 5, 5, 5])
test_eq([c.tolist() for c in semiinfnet_chunks(23, 5, seed=1)], [c.tolist() for c in _c])
test_fail(lambda: semiinfnet_chunks(3, 4), contains='stages')


# %%
#| export
@torch.no_grad()
def pseudo_label_volumes(vols: list, # unlabeled Volumes, in the order of UnlabeledSlices
                         idx, # slice indices into the concatenation of `vols`
                         predict, # callable: FloatTensor [B,1,S,S] -> probabilities [B,1,S,S]
                         tau: float = 0.5, tag: str = '', batch: int = 32) -> list:
    "Volumes holding the slices `idx` of `vols`, labeled with the binarised prediction."
    idx, out, off = np.asarray(idx), [], 0
    for v in vols:
        sel = np.sort(idx[(idx >= off) & (idx < off + len(v.image))] - off); off += len(v.image)
        if len(sel) == 0: continue
        img = v.image[sel]
        prob = torch.cat([predict(torch.from_numpy(np.ascontiguousarray(img[i:i+batch]))[:, None]) for i in range(0, len(img), batch)])
        out.append(replace(v, id=f'{v.id}{tag}', image=img, label=(prob[:, 0].numpy() >= tau).astype(np.uint8),
                           lung=v.lung[sel], z=v.z[sel]))
    return out


# %%
_vs = [_toy_vol(0), _toy_vol(1)]
_pv = pseudo_label_volumes(_vs, [1, 6, 7], lambda x: x, tau=.5, tag='#p')
test_eq([v.id for v in _pv], ['v0#p', 'v1#p']); test_eq(_pv[1].z.tolist(), [2, 3])
test_eq(_pv[1].label, (_vs[1].image[2:] >= .5).astype(np.uint8))


# %%
#| export
class PseudoStage(Method):
    "One Semi-Inf-Net stage: L_Seg on labeled + pseudo-labeled slices, starting from given U-Net weights."
    name = 'semiinfnet-stage'
    def __init__(self, cfg: RunConfig, init: dict|None = None): super().__init__(cfg); self.init = init
    def setup(self, tr):
        if self.init is not None: tr.models[0].load_state_dict(self.init)

def semiinfnet_stages(cfg: RunConfig, data: DataBundle, stages: int, stage_epochs: int, tau: float = 0.5,
                      progress: bool = True) -> tuple:
    "Stages 0..K-1 of Eq. B15: returns (pseudo-labeled Volumes of all K chunks, best U-Net weights of stage K-1)."
    chunks = semiinfnet_chunks(sum(len(v.image) for v in data.train_u), stages, cfg.seed)
    pseudo, init = [], None
    for k in range(stages):
        scfg = replace(cfg, tag=f'{cfg.name}-stage{k}', epochs=cfg.n_epochs if k == 0 else stage_epochs, opts={})
        sdata = replace(data, train_l=list(data.train_l) + pseudo, train_u=[])
        st = Trainer(scfg, sdata, method=PseudoStage(scfg, init), progress=progress).fit()   # best weights loaded
        pseudo = pseudo + pseudo_label_volumes(data.train_u, chunks[k], st.predict, tau, tag=f'@p{k}')
        init = copy.deepcopy(st.models[0].state_dict())
    return pseudo, init

@register
class SemiInfNet(Method):
    "Semi-Inf-Net's progressive pseudo-labelling of random chunks (Eq. B15); the run itself is the last stage."
    name = 'semiinfnet'
    defaults = dict(stages=5, stage_epochs=None, tau=0.5)

    def setup(self, tr):
        cfg = tr.cfg
        if not tr.data.train_u: raise ValueError("semiinfnet needs unlabeled volumes, the split has none")
        se = self.o['stage_epochs'] or max(1, math.ceil(0.1*cfg.n_epochs))
        pseudo, init = semiinfnet_stages(cfg, tr.data, int(self.o['stages']), int(se), self.o['tau'], tr.progress)
        tr.labeled = LabeledSlices(list(tr.data.train_l) + pseudo, augment=True, seed=cfg.seed)   # epochs count these
        tr.models[0].load_state_dict(init)
        self.n_pseudo = sum(len(v.image) for v in pseudo)


# %%
with tempfile.TemporaryDirectory() as _d:
    _tr = _toy_trainer('semiinfnet', _d, stages=2)
    test_eq(_tr.method.n_pseudo, 8); test_eq(len(_tr.labeled), 16)
    test_eq(sorted(p.name for p in (_tr.run_dir.parent).iterdir()), ['semiinfnet-stage0', 'semiinfnet-stage1'])
    _ck = torch.load(_tr.run_dir.parent/'semiinfnet-stage1'/'best.pt', weights_only=True)['models'][0]
    test_eq(all(torch.equal(_ck[k], v) for k, v in _tr.models[0].state_dict().items()), True)

# %% [markdown]
# Each method is also a named variant of `sapl.train` (same name, default options), so that
# `RunConfig(...).variant('udc')` and the reproduction driver find it.

# %%
#| export
VARIANTS.update({m: (m, {}) for m in ('mt', 'uamt', 'cct', 'udc', 'selfens', 'semiinfnet')})

# %%
test_eq(RunConfig().variant('udc').method, 'udc'); test_eq(RunConfig(seed=2).variant('selfens').run_dir.name, 'selfens')

# %% [markdown]
# The newer methods of `sapl.modern` (BCP, UniMatch and the synthesis-assisted variants SA-MT, SA-BCP,
# SA-UniMatch) register themselves on import; importing them here makes every competitor known wherever
# `sapl.baselines` is imported (the run section below, the reproduction driver).

# %%
#| export
from sapl import modern as _modern  # registers bcp, unimatch, sa-mt, sa-bcp, sa-unimatch

# %%
test_eq(RunConfig().variant('sa-bcp').method, 'bcp')

# %% [markdown]
# ## Run: train and evaluate every competitor
#
# | registered name | method | networks trained | extra cost per iteration |
# |---|---|---|---|
# | `mt` | Mean Teacher | U-Net (+ EMA teacher) | 1 teacher pass |
# | `uamt` | UA-MT | U-Net (+ EMA teacher) | $T + 1$ teacher passes |
# | `cct` | CCT | U-Net + 3 auxiliary decoders | 3 decoder passes |
# | `udc` | UDC | U-Net + 3 auxiliary decoders | 3 decoder passes + 1 U-Net pass |
# | `selfens` | Self-Ensembling | 2 U-Nets | one pass over the unlabeled slices per epoch |
# | `semiinfnet` | Semi-Inf-Net | U-Net, $K + 1$ successive fits | $K$ extra trainings |
#
# One configuration per method on the same data split; each run is trained (or resumed, or loaded when finished)
# by `sapl.train.run` and evaluated by `sapl.eval.evaluate` (per-volume DSC and NSD on the original CT grid,
# averaged over the test volumes). Under test (`IN_TEST`) every method runs the smoke configuration in a
# temporary folder (Semi-Inf-Net with 2 stages).
#
# The methods of `07a_modern` train and evaluate here too: `-p methods bcp,unimatch,sa-mt,sa-bcp,sa-unimatch`
# (the SA- variants load, or first train, the synthesizer of the split).

# %% tags=["parameters"]
dataset = 'phantom'
data_dir = 'data/phantom'
ratio = 0.1
profile = 'quick'
epochs = None
seed = 0
split_dir = None
out_dir = 'runs'
device = 'cpu'
methods = 'mt,uamt,cct,udc,selfens,semiinfnet'

# %%
import os, time
from pathlib import Path
import pandas as pd
from sapl.train import run, evaluate_run
from sapl.data import prepare_data
from sapl.eval import summarize

IN_TEST = bool(os.environ.get('IN_TEST'))
names = [m.strip() for m in methods.split(',') if m.strip()]
base = RunConfig(dataset=dataset, data_dir=data_dir, ratio=ratio, profile=profile, epochs=epochs, seed=seed,
                 split_dir=split_dir, out_dir=out_dir, device=device)
if IN_TEST:   # tiny smoke configuration when the notebook runs as a test
    base = base.smoke(out_dir=tempfile.mkdtemp())
cfgs = {m: base.variant(m) for m in names}
if IN_TEST and 'semiinfnet' in cfgs: cfgs['semiinfnet'] = replace(cfgs['semiinfnet'], opts={'stages': 2})
data = prepare_data(base.dataset, base.data_dir, base.ratio, base.profile, base.split_seed, base.split_dir, progress=False)
print(data.summary())

# %% [markdown]
# Each run writes its per-volume test table to `<run folder>/test.csv` (`evaluate_run`), where the reproduction
# driver collects it; the summary below is the mean (± std) over the test volumes.

# %%
rows = []
for m, cfg in cfgs.items():
    t0 = time.time()
    tr = run(cfg, data, progress=not IN_TEST)
    s = summarize(evaluate_run(tr, data))
    rows.append({'method': m, 'DSC (%)': 100*s['dsc_mean'], 'NSD (%)': 100*s['nsd_mean'], 'test volumes': s['n'],
                 'seconds': round(time.time() - t0, 1), 'run folder': str(tr.run_dir)})
results = pd.DataFrame(rows).set_index('method')
results
