# %% [markdown]
# # U-Net and segmentation losses
#
# > The 2D U-Net segmenter shared by every method, and the losses of Eq. 5-8.

# %%
#| default_exp unet

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail

# %%
#| export
from __future__ import annotations
import torch
import torch.nn as nn
import torch.nn.functional as F
from sapl.parallel import batch_sum


# %% [markdown]
# ## Architecture
#
# A standard 2D U-Net (as in the paper, §IV-A4, and SSL4MIS): each level is two 3×3 conv → BatchNorm → LeakyReLU
# blocks, 2×2 max-pooling down, bilinear ×2 upsampling + 1×1 conv + skip concatenation up, and one logit channel;
# $p = \sigma(z)$ is the infection probability. Widths are configurable: `(16, 32, 64, 128, 256)` is the paper
# scale, `(8, 16, 32, 64)` the quick CPU profile. The encoder and decoder are separate modules so that methods
# with auxiliary decoders (CCT, UDC) can hang them on the same encoder.

# %%
#| export
class ConvBlock(nn.Sequential):
    "Two (3x3 conv, BatchNorm, LeakyReLU) layers, with optional dropout between them."
    def __init__(self, cin, cout, p_drop: float = 0.):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01),
                         nn.Dropout(p_drop), nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01))

class Encoder(nn.Module):
    "U-Net encoder: returns the feature map of every level, finest first."
    def __init__(self, widths=(8, 16, 32, 64), in_ch: int = 1):
        super().__init__()
        chans = (in_ch,) + tuple(widths)
        self.blocks = nn.ModuleList([ConvBlock(chans[i], chans[i+1]) for i in range(len(widths))])
    def forward(self, x: torch.Tensor) -> list: # x: [B,C,H,W]
        feats = []
        for i, b in enumerate(self.blocks):
            x = b(x if i == 0 else F.max_pool2d(x, 2)); feats.append(x)
        return feats

class Decoder(nn.Module):
    "U-Net decoder: upsample, concatenate the skip, convolve; ends in `out_ch` logits."
    def __init__(self, widths=(8, 16, 32, 64), out_ch: int = 1):
        super().__init__()
        w = tuple(widths)
        self.reduce = nn.ModuleList([nn.Conv2d(w[i+1], w[i], 1) for i in range(len(w) - 1)])
        self.blocks = nn.ModuleList([ConvBlock(2*w[i], w[i]) for i in range(len(w) - 1)])
        self.head = nn.Conv2d(w[0], out_ch, 1)
    def forward(self, feats: list) -> torch.Tensor: # -> [B,out_ch,H,W] logits
        x = feats[-1]
        for i in reversed(range(len(feats) - 1)):
            x = self.reduce[i](F.interpolate(x, size=feats[i].shape[-2:], mode='bilinear', align_corners=False))
            x = self.blocks[i](torch.cat([feats[i], x], 1))
        return self.head(x)

class UNet(nn.Module):
    "2D U-Net: `forward(x [B,1,H,W]) -> logits [B,1,H,W]`."
    def __init__(self, widths=(8, 16, 32, 64), in_ch: int = 1, out_ch: int = 1):
        super().__init__()
        self.widths = tuple(widths)
        self.encoder, self.decoder = Encoder(widths, in_ch), Decoder(widths, out_ch)
    def forward(self, x: torch.Tensor) -> torch.Tensor: return self.decoder(self.encoder(x))


# %%
_net = UNet((4, 8, 16))
test_eq(_net(torch.rand(2, 1, 32, 32)).shape, (2, 1, 32, 32))
test_eq(len(_net.encoder(torch.rand(1, 1, 32, 32))), 3)


# %% [markdown]
# ## Losses
#
# All losses take **logits** $z$ and binary targets $y \in \{0, 1\}$ of shape [B,1,H,W]; $p = \sigma(z)$ and sums run
# over the $n = B \cdot H \cdot W$ pixels of the batch.
#
# Binary cross-entropy (Eq. 7). The paper writes the sum without its minus sign; we use the usual negative
# log-likelihood, averaged over pixels (computed from logits for numerical stability):
#
# $$\mathcal{L}_{BCE}(p, y) = -\frac{1}{n}\sum_{j=1}^{n} \big(y_j \log p_j + (1 - y_j) \log(1 - p_j)\big) \tag{7}$$

# %%
#| export
def l_bce(z: torch.Tensor, # [B,1,H,W] logits
          y: torch.Tensor, # [B,1,H,W] targets in {0,1}
         ) -> torch.Tensor:
    "Binary cross-entropy of Eq. 7, mean over pixels (in fp32 under mixed precision)."
    return F.binary_cross_entropy_with_logits(z.float(), y.float())


# %%
test_close(l_bce(torch.zeros(1, 1, 1, 2), torch.tensor([[[[0., 1.]]]])), 0.6931, eps=1e-4)  # log 2


# %% [markdown]
# Soft Dice loss (Eq. 8) with the set sizes replaced by sums of probabilities, over the whole batch, and the
# smoothing $\epsilon$ in the denominator as the paper writes it ($\epsilon = 1$ keeps slices without infection
# from producing 0/0):
#
# $$\mathcal{L}_{DICE}(p, y) = 1 - \frac{2\sum_j p_j y_j}{\sum_j p_j + \sum_j y_j + \epsilon} \tag{8}$$

# %%
#| export
def l_dice(z: torch.Tensor, # [B,1,H,W] logits
           y: torch.Tensor, # [B,1,H,W] targets in {0,1}
           eps: float = 1.,
          ) -> torch.Tensor:
    "Soft Dice loss of Eq. 8 over the batch (the global batch under torchrun, see `sapl.parallel.batch_sum`)."
    p, y = torch.sigmoid(z.float()), y.float()
    s = batch_sum(torch.stack([(p*y).sum(), p.sum() + y.sum()]))
    return 1 - 2*s[0]/(s[1] + eps)


# %%
_z = torch.tensor([[[[20., -20., 20., -20.]]]]); _y = torch.tensor([[[[1., 0., 1., 1.]]]])
test_close(l_dice(_z, _y), 1 - 2*2/(2 + 3 + 1), eps=1e-5)  # p = (1,0,1,0): overlap 2, |p| 2, |y| 3


# %% [markdown]
# The segmentation loss is their sum (Eq. 6); the supervised loss of a set of networks $s_1, \dots$ on a labeled
# batch sums it over the networks (Eq. 5; Eq. 15 for a single student):
#
# $$\mathcal{L}_{Seg}(p, y) = \mathcal{L}_{BCE}(p, y) + \mathcal{L}_{DICE}(p, y) \tag{6}$$
#
# $$\mathcal{L}_s = \mathcal{L}_{Seg}(f_{s1}(x^l), y) + \mathcal{L}_{Seg}(f_{s2}(x^l), y) \tag{5}$$

# %%
#| export
def l_seg(z: torch.Tensor, # [B,1,H,W] logits
          y: torch.Tensor, # [B,1,H,W] targets in {0,1}
         ) -> torch.Tensor:
    "L_Seg = L_BCE + L_DICE (Eq. 6)."
    return l_bce(z, y) + l_dice(z, y)

def l_sup(logits: list, # one [B,1,H,W] logit map per network
          y: torch.Tensor, # [B,1,H,W]
         ) -> torch.Tensor:
    "Supervised loss of Eq. 5: L_Seg summed over the networks."
    return sum(l_seg(z, y) for z in logits)


# %%
test_close(l_seg(_z, _y), l_bce(_z, _y) + l_dice(_z, _y))
test_close(l_sup([_z, _z], _y), 2*l_seg(_z, _y))

# %% [markdown]
# ## Run: Baseline and Full Supervision (Table IV)
#
# The supervised baseline is trained on the labeled subset only; full supervision on every training volume with its
# label (the upper bound). Both use the shared trainer (`sapl.train`) and are evaluated per volume on the original grid
# of the test volumes (`sapl.eval`). Run under papermill, e.g.
# `papermill nbs/01_unet.ipynb reports/runs/01_unet_r0.1.ipynb -p ratio 0.1`; the phantom is generated when missing.

# %% tags=["parameters"]
dataset = 'phantom'        # 'phantom' | 'covid19-20' | 'mosmed' | 'nnunet'
data_dir = 'data/phantom'
ratio = 0.1                # labeled fraction of the training volumes
profile = 'quick'          # 'quick' (CPU, 64 px) | 'paper' (512 px)
epochs = None              # None: the profile's
seed = 0
split_dir = None           # folder of the paper's published split lists (xlsx), optional
out_dir = 'runs'           # checkpoints and logs
report_dir = 'reports'     # tables and figures
device = 'cpu'
methods = 'baseline,full'  # which of the two to train here

# %%
import os, tempfile
from dataclasses import replace
from pathlib import Path
from sapl.data import prepare_data, resolve
from sapl.train import RunConfig, run, evaluate_run, git_sha
from sapl.eval import results_markdown, plot_predictions, predict_volume

IN_TEST = bool(os.environ.get('IN_TEST'))
cfg = RunConfig(method='baseline', dataset=dataset, data_dir=data_dir, ratio=ratio, profile=profile, epochs=epochs,
                seed=seed, split_dir=split_dir, out_dir=out_dir, device=device)
if IN_TEST:  # tiny smoke configuration when the notebook runs as a test
    report_dir = tempfile.mkdtemp(); cfg = cfg.smoke(out_dir=report_dir)
cfg

# %%
data = prepare_data(cfg.dataset, cfg.data_dir, cfg.ratio, cfg.profile, cfg.split_seed, cfg.split_dir)
print(data.summary())

# %%
names = {'baseline': 'Baseline', 'full': 'Full Supervision'}
todo = [m.strip() for m in methods.split(',') if m.strip()]
if not todo or set(todo) - set(names): raise ValueError(f"methods must be a comma-separated subset of {list(names)}, got {methods!r}")
if 'full' in todo and any(v.label is None for v in data.train_u):
    print("full supervision needs a label for every training volume and this data set has unlabeled ones: skipped")
    todo.remove('full')
trainers = {names[m]: run(cfg.variant(m), data) for m in todo}

# %%
results = {name: evaluate_run(tr, data) for name, tr in trainers.items()}
stem = f'baseline_full_{cfg.dataset}_{cfg.profile}_r{cfg.ratio:g}_s{cfg.seed}'
meta = {'dataset': cfg.dataset, 'profile': cfg.profile, 'ratio': cfg.ratio, 'seed': cfg.seed, 'epochs': cfg.n_epochs,
        'git SHA': git_sha(), 'data hash': data.fingerprint(), 'split': data.summary()}
md = results_markdown(results, f'Baseline vs Full Supervision ({cfg.dataset}, {cfg.ratio:.0%} labeled)', meta)
out = resolve(report_dir); out.mkdir(parents=True, exist_ok=True)
for name, df in results.items(): df.to_csv(out/f"{stem}_{name.lower().replace(' ', '_')}.csv", index=False)
(out/f'{stem}.md').write_text(md)
print(md)

# %%
preds = {name: [predict_volume(tr.predict, v) for v in data.test] for name, tr in trainers.items()}
fig = plot_predictions(data.test, preds, out/'figures'/f'{stem}.png', n=4)
from IPython.display import Image; Image(filename=str(fig))
