# %% [markdown]
# # Beyond the paper: BCP, UniMatch and synthesis assistance as a plug-in
#
# > BCP (Bai et al., CVPR 2023) and UniMatch (Yang et al., CVPR 2023) as `Method`s of the shared trainer, and the
# > paper's synthetic term (Eq. 12) as a switch that any pseudo-label method can turn on.

# %%
#| default_exp modern

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import tempfile

# %%
#| export
from __future__ import annotations
import copy, math, sys
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sapl.train import RunConfig, Method, Trainer, register, VARIANTS
from sapl.unet import l_seg
from sapl.style_pool import synthesize_pseudo
from sapl.sacps import SynthesisSetup
from sapl.baselines import MeanTeacher, ramp_weight, ema_update, spatial_dropout


# %% [markdown]
# The competitors of the paper date from 2017-2021. Two later methods are the usual reference points in
# semi-supervised medical segmentation today, and both have official code for 2D slices of cardiac MRI (ACDC):
#
# * **BCP**, *Bidirectional Copy-Paste for Semi-Supervised Medical Image Segmentation* (Bai, Chen, Li, Shen,
#   Wang; CVPR 2023). Source of every default below: `DeepMed-Lab-ECNU/BCP`, `code/ACDC_BCP_train.py`.
# * **UniMatch**, *Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic Segmentation* (Yang, Qi,
#   Feng, Zhang, Shi; CVPR 2023). Source: `LiheYoung/UniMatch`, folder `more-scenarios/medical`
#   (`unimatch.py`, `configs/acdc.yaml`, `dataset/acdc.py`, `dataset/transform.py`, `model/unet.py`,
#   `util/utils.py`).
#
# Both run here on the one trainer of `sapl.train` with the same 2D U-Net, data, batches ($B$ labeled + $B$
# unlabeled slices per iteration), SGD with polynomial decay, iteration budget $T$ (`tr.total`), validation and
# checkpoints as every other method. Notation as in `07_baselines`: $f_\theta$ a U-Net giving logits, $\sigma$
# the sigmoid, $\mathcal{L}_{Seg} = \mathcal{L}_{BCE} + \mathcal{L}_{Dice}$ (Eq. 6), $t$ the iteration
# (`tr.sched.last_epoch`), $\odot$ the pixel-wise product. Equations of this notebook are numbered M1-M11.
#
# **Departures common to both** (the official scripts are 4-class softmax models of cardiac MRI): one sigmoid
# output and $\mathcal{L}_{Seg}$ = BCE + soft Dice on the infection channel instead of cross-entropy + Dice over
# 4 classes; the trainer's schedule (poly decay of the learning rate over $T$, the profile's batch size and
# iterations) instead of each script's own; model selection on the validation volumes every epoch, as for
# every other method here.
#
# ## A pixel-masked segmentation loss
#
# Both methods supervise only part of the pixels of an image with a given target (BCP: inside or outside the
# pasted box; UniMatch: where the weak-view prediction is confident). With $m_i \in \{0, 1\}$ selecting pixels,
#
# $$\mathcal{L}^{m}_{Seg}(z, y) = \frac{\sum_i m_i\,\ell_{BCE}(z_i, y_i)}{\sum_i m_i + 10^{-16}}
# + 1 - \frac{2\sum_i m_i\,\sigma(z_i)\,y_i}{\sum_i m_i\,\sigma(z_i) + \sum_i m_i\,y_i + 1} \tag{M1}$$
#
# over all pixels $i$ of a batch, with $z$ logits, $y \in \{0,1\}$ targets and $\ell_{BCE}$ the binary
# cross-entropy of Eq. 7. With $m \equiv 1$ it is $\mathcal{L}_{Seg}$ of Eq. 6 exactly; pixels with $m_i = 0$
# get no gradient.

# %%
#| export
def l_seg_masked(z: torch.Tensor, # [B,1,H,W] logits
                 y: torch.Tensor, # [B,1,H,W] targets in {0,1}
                 m: torch.Tensor, # [B,1,H,W] or broadcastable, pixels that count in {0,1}
                 eps: float = 1.) -> torch.Tensor:
    "L_Seg over the pixels with m = 1 (Eq. M1)."
    m, y = m.float().expand_as(z), y.float()
    bce = (F.binary_cross_entropy_with_logits(z, y, reduction='none')*m).sum()/(m.sum() + 1e-16)
    p, y = torch.sigmoid(z)*m, y*m
    return bce + 1 - 2*(p*y).sum()/(p.sum() + y.sum() + eps)


# %%
_z, _y = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > .5).float()
test_close(l_seg_masked(_z, _y, torch.ones(1)), l_seg(_z, _y))
_zz = _z.clone().requires_grad_(); _m = torch.zeros(2, 1, 8, 8); _m[..., :4] = 1
l_seg_masked(_zz, _y, _m).backward(); test_eq(float(_zz.grad[..., 4:].abs().sum()), 0.)


# %% [markdown]
# ## BCP: bidirectional copy-paste
#
# A teacher $f_{\theta'}$ (EMA of the student $f_\theta$) labels the unlabeled slices,
# $\hat{y}^u = \mathbb{1}\big[\sigma(f_{\theta'}(x^u)) \ge \tau\big]$ with $\tau = 0.5$. Each iteration draws one
# box $M \in \{0,1\}^{H\times W}$ shared by the batch: ones on an axis-aligned rectangle of
# $\lfloor\tfrac{2}{3}H\rfloor \times \lfloor\tfrac{2}{3}W\rfloor$ pixels at a uniformly random position
# (`generate_mask` of the official script), zeros elsewhere. Copy-paste of $a$ into $b$:
#
# $$\mathrm{mix}(a, b; M) = M \odot a + (1 - M) \odot b \tag{M2}$$

# %%
#| export
def bcp_box(S: int, # slice side in pixels
            frac: float = 2/3, # side of the box as a fraction of S
           ) -> torch.Tensor: # [S,S] {0,1}, the box M (torch RNG)
    "The copy-paste box of BCP: one frac*S square at a random position."
    p = int(S*frac); M = torch.zeros(S, S)
    i, j = torch.randint(0, S - p, (2,)).tolist() if S > p else (0, 0)
    M[i:i+p, j:j+p] = 1
    return M

def bcp_mix(a: torch.Tensor, b: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    "mix(a, b; M) of Eq. M2: a inside the box, b outside."
    return M*a + (1 - M)*b


# %%
torch.manual_seed(0); _M = bcp_box(30); test_eq(int(_M.sum()), 20*20); test_eq(set(_M.unique().tolist()), {0., 1.})
test_eq(bcp_mix(torch.ones(30, 30), torch.zeros(30, 30), _M), _M)


# %% [markdown]
# The labeled batch and the unlabeled batch are each split into halves $a, b$. The two mixed images and their
# labels are
#
# $$x^{in} = \mathrm{mix}(x^l_a, x^u_a),\quad y^{in} = \mathrm{mix}(y_a, \hat{y}^u_a),\qquad
# x^{out} = \mathrm{mix}(x^u_b, x^l_b),\quad y^{out} = \mathrm{mix}(\hat{y}^u_b, y_b) \tag{M3}$$
#
# (labeled patch into an unlabeled image, and unlabeled patch into a labeled image), so a mixed label is the
# ground truth on the labeled part of the image and the teacher's pseudo-label on the unlabeled part. Pixels
# supervised by a pseudo-label count with weight $\beta = 0.5$ (`u_weight`), ground-truth pixels with 1:
#
# $$\mathcal{L}_{BCP} = \tfrac{1}{2}\Big[\mathcal{L}^{M}_{Seg}(f_\theta(x^{in}), y^{in})
# + \beta\,\mathcal{L}^{1-M}_{Seg}(f_\theta(x^{in}), y^{in})
# + \beta\,\mathcal{L}^{M}_{Seg}(f_\theta(x^{out}), y^{out})
# + \mathcal{L}^{1-M}_{Seg}(f_\theta(x^{out}), y^{out})\Big] \tag{M4}$$
#
# (the official `mix_loss` with `(dice + ce)/2`). `bcp_loss` is one image's pair of terms,
# $w_M\,\mathcal{L}^{M}_{Seg} + w_{1-M}\,\mathcal{L}^{1-M}_{Seg}$.

# %%
#| export
def bcp_loss(z: torch.Tensor, # [B,1,H,W] logits on a mixed image
             y: torch.Tensor, # [B,1,H,W] its mixed label
             M: torch.Tensor, # [H,W] or [1,1,H,W] the box
             w_box: float, w_rest: float) -> torch.Tensor:
    "w_box L_Seg^M + w_rest L_Seg^(1-M): one image's part of Eq. M4."
    M = M.view(1, 1, *M.shape[-2:])
    return w_box*l_seg_masked(z, y, M) + w_rest*l_seg_masked(z, y, 1 - M)


# %%
_z, _y, _M = torch.randn(2, 1, 6, 6), (torch.rand(2, 1, 6, 6) > .5).float(), torch.zeros(6, 6); _M[:3] = 1
test_close(bcp_loss(_z, _y, _M, 1., .5), l_seg_masked(_z, _y, _M[None, None]) + .5*l_seg_masked(_z, _y, 1 - _M[None, None]))


# %% [markdown]
# **Pre-training inside the budget.** BCP first trains the student on labeled slices only, with the same
# copy-paste between two labeled halves ($\mathcal{L}_{pre}$ = Eq. M4's first image with
# $x^l_b$ pasted into $x^l_a$, weights 1 and 1), then initialises teacher and student from that model. Here the
# first $T_{pre} = \rho\,T$ iterations of the run are that stage ($\rho$ = `pre_frac`), and the remaining
# $T - T_{pre}$ the bidirectional stage, so BCP uses exactly the iteration budget of every other method:
#
# $$\mathcal{L}(t) = \begin{cases} \tfrac{1}{2}\big[\mathcal{L}^{M}_{Seg} + \mathcal{L}^{1-M}_{Seg}\big]
# \big(f_\theta(\mathrm{mix}(x^l_b, x^l_a)), \mathrm{mix}(y_b, y_a)\big) & t < T_{pre} \\
# \mathcal{L}_{BCP} & t \ge T_{pre} \end{cases},\qquad \theta'_{T_{pre}} = \theta_{T_{pre}},\quad
# \theta'_{t+1} = \alpha\,\theta'_t + (1 - \alpha)\,\theta_{t+1} \tag{M5}$$
#
# with $\alpha = 0.99$ constant (the teacher starts as a copy of the pre-trained student; Eq. B2 without its
# warm-up cap). $\rho = 0.25$: the script declares 10 000 pre-training and 30 000 self-training iterations
# (`--pre_iterations`, `--max_iterations`). As published it actually runs `max_iterations` in both stages (its
# `pre_train` reads `args.max_iterations`), i.e. $\rho = 0.5$; `opts={'pre_frac': 0.5}` reproduces that.
#
# | option | default | official (`ACDC_BCP_train.py`) | note |
# |---|---|---|---|
# | `pre_frac` | 0.25 | 10 000 of 10 000 + 30 000 iterations | inside the run's budget $T$ (see above) |
# | `box` | 2/3 | `generate_mask`: $\tfrac23$ of each side | one box per iteration |
# | `beta` | 0.5 | `u_weight` 0.5 | weight of pseudo-labeled pixels |
# | `ema` | 0.99 | `update_model_ema(..., 0.99)` | parameters only (BN buffers: teacher's own, train mode as in the script) |
# | `tau` | 0.5 | argmax of the softmax | binary: sigmoid $\ge 0.5$ |
# | `largest_cc` | False | `get_ACDC_masks(nms=1)`: largest component per class | off: infection is multifocal, keeping the largest lesion would erase the others |
#
# Other departures: the script uses a constant learning rate 0.01 and keeps the pre-training model with the best
# validation Dice as initialisation; here the learning rate follows the trainer's poly decay over all $T$
# iterations and the bidirectional stage starts from the last pre-training weights (checkpoint selection is the
# trainer's, over the whole run). The script's batch is 12 + 12 slices of 256 px; here the profile's $B$ + $B$.

# %%
#| export
@torch.no_grad()
def largest_component(y: torch.Tensor) -> torch.Tensor: # [B,1,H,W] {0,1} -> same, largest 8-connected blob per image
    "Keep the largest connected component of each binary map (BCP's post-processing of pseudo-labels)."
    from scipy import ndimage as ndi
    out = y.clone()
    for i in range(len(y)):
        lab, n = ndi.label(y[i, 0].cpu().numpy() > 0, structure=np.ones((3, 3)))
        if n > 1: out[i, 0] = torch.from_numpy(lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1).to(y)
    return out


# %%
_y = torch.zeros(1, 1, 8, 8); _y[0, 0, :2, :2] = 1; _y[0, 0, 5:, 5:] = 1
test_eq(largest_component(_y)[0, 0].sum(), 9.); test_eq(largest_component(torch.zeros(1, 1, 4, 4)).sum(), 0.)

# %% [markdown]
# ## Synthesis assistance as a plug-in
#
# The paper's idea, training on an image synthesized to match a pseudo-label, needs nothing from CPS but the
# pseudo-label. For a method whose unlabeled term at iteration $t$ carries weight $w_u(t)$ and which produces a
# pseudo-label $y^p$ for its unlabeled batch, the plug-in adds Eq. 12's pattern for its (student) network
# $f_\theta$:
#
# $$\hat{x} = Dec\big(y^p, \mathcal{SC}_{ref}(t)\big),\qquad
# \mathcal{L}_{syn} = \mathcal{L}_{Seg}\big(f_\theta(\hat{x}),\ y^p\big),\qquad
# \mathcal{L} = \mathcal{L}_{method} + w_u(t)\,\mathcal{L}_{syn} \tag{M6}$$
#
# with $Dec$ the split's synthesizer (Eq. 3, the lungs of the unlabeled slice with $y^p$ painted as infection) and
# $\mathcal{SC}_{ref}(t)$ the reference style of Eq. 2, both from the one `SynthesisSetup` of `sapl.sacps` that
# SA-CPS uses. Weighting it like the method's own unlabeled loss is what SA-CPS does ($\lambda$ multiplies
# $\mathcal{L}_{pseudo} + \mathcal{L}_{synthetic}$, Eq. 13-14). Options: `synthetic` (off by default), `K`,
# `style` (`'pos'`, `'all'`, `'self'`) and `sean_seed`, as for SA-CPS. SA-CPS keeps its own cross form (Eq. 10-12).
#
# A host method sets `self.yp` (its pseudo-label of `bu['image']`, $[B,1,H,W]$ in $\{0,1\}$, or `None` when it has
# none this iteration) in `train_step`, ends it with `return self.with_synthesis(tr, bu, out)`, and says what
# $w_u(t)$ is:
#
# | method | $y^p$ | $w_u(t)$ |
# |---|---|---|
# | Mean Teacher (`samt`) | $\mathbb{1}[\sigma(f_{\theta'}(x^u + \xi)) \ge 0.5]$, the teacher's target binarised | consistency weight $w(t)$ of Eq. B1 |
# | BCP | teacher pseudo-label $\hat{y}^u$ (M3) | $\tfrac{1}{2}\beta$, the weight of pseudo-labeled pixels in M4; 0 during pre-training |
# | UniMatch | weak-view pseudo-label $\hat{y}$ (M8) | $\tfrac{1}{2}$, the factor of its unlabeled terms in M10 |

# %%
#| export
SYNTH_DEFAULTS = dict(synthetic=False, K=10, style='pos', sean_seed=0, sean=None, composite=True)  # the plug-in's options, off by default

def l_synthetic_plugin(f, # the method's (student) network: [B,1,H,W] -> logits
                       gen, # the split's synthesizer
                       lung: torch.Tensor, # [B,H,W] lungs of the unlabeled batch
                       yp: torch.Tensor, # [B,1,H,W] {0,1} the method's pseudo-labels
                       sc: torch.Tensor, # [1,s,d] SC_ref or [B,s,d] Self Style codes
                       background: torch.Tensor|None = None, # [B,1,H,W] real slices kept outside the lungs (Eq. 3b)
                       generator: torch.Generator|None = None, # source of the noise of Eq. 3c
                      ) -> torch.Tensor:
    "L_Seg(f(Dec(y^p, SC_ref)), y^p) of Eq. M6."
    return l_seg(f(synthesize_pseudo(gen, lung, yp, sc, background, generator)), yp)

class SynthesisPlugin(SynthesisSetup):
    "Mixin for a pseudo-label `Method`: option `synthetic` adds w_u(t) L_syn (Eq. M6) to its loss."
    yp = None   # set by the host's train_step
    def __init__(self, cfg):
        super().__init__(cfg)
        if self.o['style'] not in ('pos', 'all', 'self'): raise ValueError(f"style must be 'pos', 'all' or 'self', got {self.o['style']!r}")
        self.gen = self.pool = self.last_draw = None

    def setup(self, tr):
        super().setup(tr)
        if self.o['synthetic']: self.setup_synthesis(tr)

    def unlabeled_weight(self, tr) -> float: raise NotImplementedError  # w_u(t) of the host method

    def with_synthesis(self, tr, bu: dict, out: dict) -> dict:
        "The host's step result `out`, plus w_u(t) L_syn of its pseudo-label `self.yp` when option `synthetic` is on."
        if not self.o['synthetic']: return out
        w = float(self.unlabeled_weight(tr))
        if self.yp is None or w == 0: return {**out, 'l_synthetic': torch.zeros(()), 'w_synthetic': w}
        sc = self.reference(tr, bu['image'], bu['lung'], self.yp)
        ls = l_synthetic_plugin(tr.models[0], self.gen, bu['lung'], self.yp, sc, self.background(bu['image']), self.noise_generator(tr))
        return {**out, 'loss': out['loss'] + w*ls, 'l_synthetic': ls.detach(), 'w_synthetic': w}


# %%
_keep, _yp = synthesize_pseudo, (torch.rand(2, 1, 8, 8) > .5).float()
synthesize_pseudo = lambda gen, lung, yp, sc, bg=None, g=None: .2 + .6*yp      # stand-in synthesizer: infection bright where y^p = 1
_f = lambda x: 20*(x - .5)
test_close(l_synthetic_plugin(_f, None, None, _yp, None), l_seg(_f(.2 + .6*_yp), _yp)); synthesize_pseudo = _keep


# %% [markdown]
# ### The BCP method

# %%
#| export
@register
class BCP(SynthesisPlugin, Method):
    "Bidirectional copy-paste (Eq. M2-M5): pre-training then mean-teacher copy-paste, within the run's budget."
    name, unlabeled = 'bcp', True
    defaults = dict(pre_frac=0.25, box=2/3, beta=0.5, ema=0.99, tau=0.5, largest_cc=False, **SYNTH_DEFAULTS)

    def __init__(self, cfg):
        super().__init__(cfg)
        if not 0 <= self.o['pre_frac'] < 1: raise ValueError(f"pre_frac must be in [0, 1), got {self.o['pre_frac']}")
        self.ready = False   # teacher initialised from the pre-trained student

    def build(self, tr) -> list:
        student = tr.new_unet(0)
        return [student, copy.deepcopy(student).requires_grad_(False)]

    def pretraining(self, tr) -> bool: return tr.sched.last_epoch < round(self.o['pre_frac']*tr.total)
    def unlabeled_weight(self, tr) -> float: return 0. if self.pretraining(tr) else .5*self.o['beta']
    def state(self) -> dict: return {'ready': self.ready}
    def load_state(self, s: dict): self.ready = bool(s['ready'])

    @torch.no_grad()
    def teacher_labels(self, tr, xu: torch.Tensor) -> torch.Tensor: # [B,1,H,W] {0,1}
        y = (torch.sigmoid(tr.models[1](xu)) >= self.o['tau']).float()
        return largest_component(y) if self.o['largest_cc'] else y

    def train_step(self, tr, bl: dict, bu: dict) -> dict:
        f, o = tr.models[0], self.o
        xl, yl = bl['image'], bl['label'].float()
        h, self.yp = len(xl)//2, None
        if h == 0: raise ValueError("bcp needs a batch of at least 2 slices")
        M = bcp_box(xl.shape[-1], o['box']).to(xl)
        if self.pretraining(tr):                                                      # Eq. M5, t < T_pre
            l = bcp_loss(f(bcp_mix(xl[h:2*h], xl[:h], M)), bcp_mix(yl[h:2*h], yl[:h], M), M, 1., 1.)
            return self.with_synthesis(tr, bu, {'loss': .5*l, 'l_pre': l.detach()})
        if not self.ready: tr.models[1].load_state_dict(f.state_dict()); self.ready = True
        xu = bu['image']
        self.yp = yu = self.teacher_labels(tr, xu)
        l_in = bcp_loss(f(bcp_mix(xl[:h], xu[:h], M)), bcp_mix(yl[:h], yu[:h], M), M, 1., o['beta'])                 # Eq. M3-M4
        l_out = bcp_loss(f(bcp_mix(xu[h:2*h], xl[h:2*h], M)), bcp_mix(yu[h:2*h], yl[h:2*h], M), M, o['beta'], 1.)
        return self.with_synthesis(tr, bu, {'loss': .5*(l_in + l_out), 'l_in': l_in.detach(), 'l_out': l_out.detach()})

    def after_step(self, tr):
        if self.ready: ema_update(tr.models[1], tr.models[0], self.o['ema'], step=sys.maxsize)   # constant decay


# %% [markdown]
# A toy data bundle (not exported) for the examples: seven 4-slice volumes of 32×32 pixels with two lungs and a
# square "lesion", split 2 labeled / 3 unlabeled / 1 validation / 1 test.

# %%
#| hide
from sapl.data import Volume, DataBundle, Split, get_profile
def _toy_vol(i, n=4, S=32):
    r = np.random.default_rng(i)
    lung = np.zeros((n, S, S), np.uint8); lung[:, 4:28, 3:14] = 2; lung[:, 4:28, 18:29] = 1
    img = np.where(lung > 0, .15, .55).astype(np.float32) + r.normal(0, .03, (n, S, S)).astype(np.float32)
    lab = np.zeros((n, S, S), np.uint8); lab[1:, 8 + i % 4:16, 20:26] = 1
    img[lab > 0] = .45
    return Volume(f'v{i}', img.clip(0, 1), lab, lung, np.arange(n), (0, S, 0, S), (n, S, S), (1., 1., 1.), np.eye(4))

def _toy_bundle():
    vs = [_toy_vol(i) for i in range(7)]
    return DataBundle(vs[:2], vs[2:5], vs[5:6], vs[6:], get_profile('smoke'), Split((), (), (), ()), '')

def _toy_trainer(method, d, epochs=1, **opts):
    cfg = RunConfig(method=method, profile='smoke', epochs=epochs, iters_per_epoch=2, out_dir=d, opts=opts)
    return Trainer(cfg, _toy_bundle(), progress=False)

def _one_step(tr):
    tr.models.train()
    bl, bu = tr.next_batch('labeled', tr.labeled), tr.next_batch('unlabeled', tr.unlabeled)
    out = tr.method.train_step(tr, bl, bu)
    tr.opt.zero_grad(); out['loss'].backward(); tr.opt.step(); tr.sched.step(); tr.method.after_step(tr)
    return out

torch.set_num_threads(1)

# %%
with tempfile.TemporaryDirectory() as _d:
    _tr = _toy_trainer('bcp', _d, epochs=2, pre_frac=0.5)              # T = 4, T_pre = 2
    test_eq([('l_pre' in _one_step(_tr), _tr.method.ready) for _ in range(4)], [(True, False), (True, False), (False, True), (False, True)])


# %% [markdown]
# ## UniMatch: unified dual-stream perturbations
#
# One network $f = g \circ h$ (encoder $h$, decoder $g$). For an unlabeled batch $x^w$ (the trainer's weakly
# augmented slices: flips, rotations), two **strong views** $x^{s_1}, x^{s_2}$ are drawn independently: with
# probability 0.8 a colour jitter (brightness and contrast factors from $U[0.5, 1.5]$, in random order:
# `ColorJitter(0.5, 0.5, 0.5, 0.25)`, whose saturation and hue do nothing to a one-channel image), with probability
# 0.5 a Gaussian blur with $\sigma \sim U[0.1, 2.0]$ (pixels of a 256-px slice, scaled to the profile's size), and
# with probability 0.5 **CutMix**: a box $B$ of area $U[0.02, 0.4]\cdot S^2$ and aspect ratio
# $U[0.3, 1/0.3]$ is replaced by the same box of another image's strong view:
#
# $$x^{s_k} \leftarrow B_k \odot \pi(x^{s_k}) + (1 - B_k) \odot x^{s_k} \tag{M7}$$
#
# with $\pi$ the partner of each image (here: the previous image of the batch, cyclically: `roll` by one).

# %%
#| export
def color_jitter(x: torch.Tensor, # [B,1,H,W] in [0,1]
                 s: float = 0.5, p: float = 0.8) -> torch.Tensor:
    "Per image, with probability p: brightness and contrast factors from U[1-s, 1+s] in random order, clipped to [0,1]."
    out = x.clone()
    for i in range(len(x)):
        if float(torch.rand(())) >= p: continue
        b, c = (1 + s*(2*torch.rand(2) - 1)).tolist()
        ops = [lambda v: (b*v).clamp(0, 1), lambda v: (c*v + (1 - c)*v.mean()).clamp(0, 1)]
        for k in torch.randperm(2).tolist(): out[i] = ops[k](out[i])
    return out

def gaussian_blur(x: torch.Tensor, # [B,1,H,W]
                  p: float = 0.5, sigma=(0.1, 2.0), scale: float = 1.) -> torch.Tensor:
    "Per image, with probability p: Gaussian blur with sigma ~ U[sigma] * scale (pixels), reflect padding."
    out = x.clone()
    for i in range(len(x)):
        if float(torch.rand(())) >= p: continue
        sg = float(sigma[0] + (sigma[1] - sigma[0])*torch.rand(()))*scale
        r = max(1, math.ceil(3*sg)); t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-t**2/(2*sg**2)); k = k/k.sum()
        v = F.conv2d(F.pad(out[i:i+1], (r, r, 0, 0), mode='reflect'), k.view(1, 1, 1, -1))
        out[i:i+1] = F.conv2d(F.pad(v, (0, 0, r, r), mode='reflect'), k.view(1, 1, -1, 1))
    return out

def cutmix_box(S: int, p: float = 0.5, area=(0.02, 0.4), ratio=(0.3, 1/0.3)) -> torch.Tensor: # [S,S] {0,1}
    "UniMatch's CutMix box: with probability p, a box of area U[area]*S^2 and aspect U[ratio] inside the image."
    M = torch.zeros(S, S)
    if float(torch.rand(())) >= p: return M
    a = float(area[0] + (area[1] - area[0])*torch.rand(()))*S*S
    while True:
        r = float(ratio[0] + (ratio[1] - ratio[0])*torch.rand(()))
        w, h = int(math.sqrt(a/r)), int(math.sqrt(a*r))
        x, y = torch.randint(0, S, (2,)).tolist()
        if x + w <= S and y + h <= S: break
    M[y:y+h, x:x+w] = 1
    return M

def paste_partner(a: torch.Tensor, # [B,...] images, labels or masks
                  box: torch.Tensor, # [B,1,H,W] {0,1}
                 ) -> torch.Tensor:
    "B ⊙ π(a) + (1 - B) ⊙ a with π(a)_i = a_(i-1), the previous image of the batch, cyclically (Eq. M7)."
    return box*a.roll(1, 0) + (1 - box)*a


# %%
torch.manual_seed(0); _x = torch.rand(3, 1, 16, 16)
test_eq(color_jitter(_x, p=0.), _x); test_eq(gaussian_blur(_x, p=0.), _x); test_eq(cutmix_box(16, p=0.).sum(), 0.)
test_close(gaussian_blur(torch.full((1, 1, 9, 9), .3), p=1.), torch.full((1, 1, 9, 9), .3))     # blur keeps constants
_b = cutmix_box(64, p=1.); test_eq(0.02*64*64*.8 <= float(_b.sum()) <= .4*64*64, True)
_B = torch.zeros(3, 1, 16, 16); _B[:, :, :4] = 1; test_eq(paste_partner(_x, _B)[1, :, :4], _x[0, :, :4])


# %% [markdown]
# The weak-view prediction gives the pseudo-label and its confidence mask,
#
# $$p^w = \sigma(f(x^w)),\qquad \hat{y} = \mathbb{1}[p^w \ge 0.5],\qquad
# m = \mathbb{1}\big[\max(p^w, 1 - p^w) \ge \gamma\big],\quad \gamma = 0.95 \tag{M8}$$
#
# (a binary softmax's maximum is $\max(p, 1-p)$), and the CutMix'ed views are trained against the correspondingly
# pasted targets $\hat{y}_k = B_k \odot \pi(\hat{y}) + (1 - B_k)\odot\hat{y}$, $m_k$ likewise. The
# **feature-perturbed** view decodes the weak view's encoder features after channel dropout
# $\mathcal{D}$ (`Dropout2d(0.5)` on every level):
#
# $$z^{fp} = g\big(\mathcal{D}(h(x^w))\big) \tag{M9}$$
#
# and the loss of one iteration is
#
# $$\mathcal{L}_{UM} = \tfrac{1}{2}\Big[\mathcal{L}_{Seg}(f(x^l), y)
# + \tfrac{1}{4}\,\mathcal{L}^{m_1}_{Seg}(f(x^{s_1}), \hat{y}_1) + \tfrac{1}{4}\,\mathcal{L}^{m_2}_{Seg}(f(x^{s_2}), \hat{y}_2)
# + \tfrac{1}{2}\,\mathcal{L}^{m}_{Seg}(z^{fp}, \hat{y})\Big] \tag{M10}$$
#
# with $\hat{y}, m$ fixed targets (no gradient).
#
# | option | default | official (`more-scenarios/medical`) | note |
# |---|---|---|---|
# | `conf` | 0.95 | `conf_thresh: 0.95` (`configs/acdc.yaml`) | $\gamma$ |
# | `w_s`, `w_fp` | 0.25, 0.5 | `loss_u_s1*0.25 + loss_u_s2*0.25 + loss_u_w_fp*0.5`, all `/2` | |
# | `fp_drop` | 0.5 | `nn.Dropout2d(0.5)` in `UNet.forward(need_fp=True)` | |
# | `jitter`, `jitter_p` | 0.5, 0.8 | `ColorJitter(0.5, 0.5, 0.5, 0.25)` with p 0.8 | brightness + contrast (grey image) |
# | `blur_p` | 0.5 | `blur(p=0.5)`, $\sigma \in [0.1, 2]$ | $\sigma$ scaled by $S/256$ |
# | `cutmix` | 0.5 | `obtain_cutmix_box(p=0.5)` | area $[0.02, 0.4]$, ratio $[0.3, 1/0.3]$ |
#
# Departures: the unlabeled terms use $\mathcal{L}^{m}_{Seg}$ (BCE + Dice on confident pixels) where the official
# code uses a masked Dice averaged over 4 classes including background (with one foreground channel the BCE
# plays the part of the background classes); the supervised term is $\mathcal{L}_{Seg}$ (the official
# $(CE + Dice)/2$). The CutMix partner is the next image of the same unlabeled batch with its pseudo-label from
# the same weak pass, where the official code draws a second unlabeled batch and predicts it in eval mode (one
# extra forward pass per iteration saved). The feature perturbation is applied to the unlabeled part of the batch
# only (the official code decodes the perturbed features of the labeled slices too and discards them).

# %%
#| export
@torch.no_grad()
def weak_targets(z: torch.Tensor, # [B,1,H,W] logits on the weak view
                 tau: float = 0.5, conf: float = 0.95) -> tuple: # (ŷ, m), each [B,1,H,W] {0,1}
    "Pseudo-label and confidence mask of Eq. M8."
    p = torch.sigmoid(z.detach())
    return (p >= tau).float(), (torch.maximum(p, 1 - p) >= conf).float()


# %%
_y, _m = weak_targets(torch.tensor([-4., -1., 0., 1., 4.]).view(1, 1, 1, 5))
test_eq(_y.flatten().tolist(), [0., 0., 1., 1., 1.]); test_eq(_m.flatten().tolist(), [1., 0., 0., 0., 1.])


# %%
#| export
@register
class UniMatch(SynthesisPlugin, Method):
    "UniMatch (Eq. M7-M10): two strong views and one feature-perturbed view learn the confident weak-view pseudo-label."
    name, unlabeled = 'unimatch', True
    defaults = dict(tau=0.5, conf=0.95, w_s=0.25, w_fp=0.5, fp_drop=0.5, jitter=0.5, jitter_p=0.8, blur_p=0.5, cutmix=0.5,
                    **SYNTH_DEFAULTS)

    def unlabeled_weight(self, tr) -> float: return 0.5

    @torch.no_grad()
    def strong_views(self, xw: torch.Tensor) -> tuple: # (x^s1, x^s2, B_1, B_2), Eq. M7
        o, (n, _, S, _) = self.o, xw.shape
        views, boxes = [], []
        for _ in range(2):
            s = gaussian_blur(color_jitter(xw, o['jitter'], o['jitter_p']), o['blur_p'], scale=S/256)
            b = torch.stack([cutmix_box(S, o['cutmix']) for _ in range(n)])[:, None].to(xw)
            views.append(paste_partner(s, b)); boxes.append(b)
        return (*views, *boxes)

    def train_step(self, tr, bl: dict, bu: dict) -> dict:
        f, o = tr.models[0], self.o
        xl, y, xw = bl['image'], bl['label'], bu['image']
        B = len(xl)
        s1, s2, b1, b2 = self.strong_views(xw)
        feats = f.encoder(torch.cat([xl, xw]))
        z = f.decoder([torch.cat([h, spatial_dropout(h[B:], o['fp_drop'])]) for h in feats])      # Eq. M9
        zl, zw, zfp = z[:B], z[B:2*B], z[2*B:]
        zs1, zs2 = f(torch.cat([s1, s2])).chunk(2)
        self.yp, m = weak_targets(zw, o['tau'], o['conf'])                                          # Eq. M8
        ls = l_seg(zl, y)
        l1 = l_seg_masked(zs1, paste_partner(self.yp, b1), paste_partner(m, b1))
        l2 = l_seg_masked(zs2, paste_partner(self.yp, b2), paste_partner(m, b2))
        lfp = l_seg_masked(zfp, self.yp, m)
        loss = .5*(ls + o['w_s']*(l1 + l2) + o['w_fp']*lfp)                                          # Eq. M10
        return self.with_synthesis(tr, bu, {'loss': loss, 'l_s': ls.detach(), 'l_s1': l1.detach(), 'l_s2': l2.detach(),
                                            'l_fp': lfp.detach(), 'confident': float(m.mean())})


# %%
with tempfile.TemporaryDirectory() as _d:
    _tr = _toy_trainer('unimatch', _d); _l = _one_step(_tr)
    test_eq(bool(torch.isfinite(_l['loss'])), True); test_eq(0 <= _l['confident'] <= 1, True)


# %% [markdown]
# ## Mean Teacher with the plug-in
#
# Mean Teacher (Eq. B4) has no hard pseudo-label of its own; its target is the teacher's probability on a noisy
# copy of the unlabeled slice. Binarised at 0.5 it is the pseudo-label that the plug-in synthesizes from. With
# `synthetic` off, `samt` is Mean Teacher exactly (same random numbers, same loss).

# %%
#| export
@register
class SAMT(SynthesisPlugin, MeanTeacher):
    "Mean Teacher whose binarised teacher target is the pseudo-label of the synthesis plug-in."
    name = 'samt'
    defaults = {**MeanTeacher.defaults, 'tau': 0.5, **SYNTH_DEFAULTS}

    def teacher_prob(self, tr, xu: torch.Tensor) -> torch.Tensor:
        q = super().teacher_prob(tr, xu)
        self.yp = (q >= self.o['tau']).float()
        return q

    def train_step(self, tr, bl: dict, bu: dict) -> dict:
        self.yp = None
        return self.with_synthesis(tr, bu, super().train_step(tr, bl, bu))

    def unlabeled_weight(self, tr) -> float: return ramp_weight(tr, self.o['consistency'], self.o['rampup'])


# %%
with tempfile.TemporaryDirectory() as _d:
    _a, _b = _toy_trainer('mt', _d), _toy_trainer('samt', _d)
    torch.manual_seed(1); _la = _one_step(_a); torch.manual_seed(1); _lb = _one_step(_b)
    test_eq(float(_la['loss']), float(_lb['loss'])); test_eq(_b.method.yp.shape, (4, 1, 32, 32))

# %% [markdown]
# ## Registered variants
#
# `bcp` and `unimatch` are the methods as published; `sa-mt`, `sa-bcp`, `sa-unimatch` the same methods with the
# plug-in switched on (`opts={'synthetic': True}`); the run folder is the variant's name. The methods train and
# evaluate from the run section of `07_baselines` (`papermill nbs/07_baselines.ipynb out.ipynb -p methods
# bcp,sa-bcp`), which is also what the reproduction driver executes for them.

# %%
#| export
VARIANTS.update({'bcp': ('bcp', {}), 'unimatch': ('unimatch', {}), 'sa-mt': ('samt', {'synthetic': True}),
                 'sa-bcp': ('bcp', {'synthetic': True}), 'sa-unimatch': ('unimatch', {'synthetic': True})})

# %%
test_eq(RunConfig().variant('sa-bcp').opts, {'synthetic': True}); test_eq(RunConfig().variant('sa-mt').run_dir.name, 'sa-mt')
test_fail(lambda: BCP(RunConfig(method='bcp', opts={'style': 'x'})), contains='style')

# %% [markdown]
# An end-to-end example: SA-UniMatch for one smoke epoch on the toy bundle (the smoke synthesizer of the split is
# trained first, in a temporary folder), with the synthetic term logged beside the method's own terms.

# %%
with tempfile.TemporaryDirectory() as _d:
    _tr = Trainer(RunConfig(profile='smoke', epochs=1, iters_per_epoch=2, out_dir=_d).variant('sa-unimatch'), _toy_bundle(), progress=False).fit()
    test_eq(_tr.history[0]['l_synthetic'] > 0, True); test_eq(_tr.history[0]['w_synthetic'], .5)
