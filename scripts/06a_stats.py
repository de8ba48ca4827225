# %% [markdown]
# # Statistics that decide
#
# > Mean ± 95 % interval over seeds, paired differences between methods over seeds and over test volumes, and a verdict per claim.
#
# A comparison between two methods is **paired**: both are trained with the same seeds on the same split and tested on the
# same volumes, so each seed (and each test volume) gives one difference, and the spread that the two methods share (an
# easy split, a lucky initialisation, a hard volume) cancels. Two views of the same comparison:
#
# * **over seeds** (the primary one): $d_s = \bar m^A_s - \bar m^B_s$, the difference of the mean test DSC of seed $s$;
#   its interval says how much a new training seed could move the gap;
# * **over test volumes**: $d_v = \tfrac1S\sum_s (m^A_{s,v} - m^B_{s,v})$, the seed-averaged difference on volume $v$;
#   its interval says how much a new test set could move it.
#
# "A is better than B" means the 95 % interval of the paired difference lies above 0.

# %%
#| default_exp stats

# %%
#| export
from __future__ import annotations
import math
import numpy as np
import pandas as pd
from scipy import stats as _st

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail


# %% [markdown]
# ## Mean and its t-interval
#
# For $n$ values $x_1..x_n$ with mean $\bar x$ and sample standard deviation $s$ (divisor $n-1$),
#
# $$\bar x \pm t_{0.975,\,n-1}\,\frac{s}{\sqrt n} \tag{S1}$$
#
# is the 95 % interval of the mean (Student's $t$ quantile with $n-1$ degrees of freedom). NaN values (a volume
# without infection in prediction and truth has no DSC) are left out; fewer than two values give a NaN half-width.

# %%
#| export
def mean_ci(x,                    # values (NaN ignored)
            level: float = 0.95,  # confidence level
           ) -> tuple:            # (mean, half-width of the t-interval)
    "Mean and half-width of its Student-t confidence interval (Eq. S1)."
    x = np.asarray([v for v in np.ravel(np.asarray(x, dtype=float)) if v == v])
    if not 0 < level < 1: raise ValueError(f"level must be in (0, 1), got {level}")
    if len(x) == 0: return float('nan'), float('nan')
    if len(x) < 2: return float(x.mean()), float('nan')
    return float(x.mean()), float(_st.t.ppf(.5 + level/2, len(x) - 1)*x.std(ddof=1)/math.sqrt(len(x)))


# %%
_x = np.array([.61, .58, .64, .60, .59])
_m, _h = mean_ci(_x); _lo, _hi = _st.t.interval(.95, 4, loc=_x.mean(), scale=_st.sem(_x))
test_close(_m, _x.mean()); test_close(_h, (_hi - _lo)/2); test_eq(mean_ci([1.])[0], 1.)


# %% [markdown]
# ## Paired difference over seeds
#
# With $d_s = a_s - b_s$ for the $n$ seeds both methods finished, the paired $t$ statistic and interval are
#
# $$t = \frac{\bar d}{s_d/\sqrt n}, \qquad \bar d \pm t_{0.975,\,n-1}\,\frac{s_d}{\sqrt n}, \qquad p = 2\,\big(1 - F_{t,\,n-1}(|t|)\big) \tag{S2}$$
#
# ($s_d$ the standard deviation of the differences, $F_{t,\,n-1}$ the $t$ distribution function).

# %%
#| export
def paired_t(a, b,               # paired values, same order (e.g. one per seed)
             level: float = 0.95,
            ) -> dict:           # mean difference a-b, interval (lo, hi), half-width, t, p, n
    "Paired t-interval and two-sided p-value of the mean of a - b (Eq. S2)."
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape: raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    d = (a - b)[np.isfinite(a - b)]; n = len(d)
    m, h = mean_ci(d, level)
    if n < 2: return dict(diff=m, lo=float('nan'), hi=float('nan'), half=float('nan'), t=float('nan'), p=float('nan'), n=n)
    sd = d.std(ddof=1)
    t = m/(sd/math.sqrt(n)) if sd > 0 else (math.copysign(math.inf, m) if m else float('nan'))
    p = float(2*_st.t.sf(abs(t), n - 1)) if t == t else float('nan')
    return dict(diff=m, lo=m - h, hi=m + h, half=h, t=float(t), p=p, n=n)


# %%
_a, _b = np.array([.62, .60, .66, .61, .63]), np.array([.60, .59, .63, .61, .60])
_r, _s = paired_t(_a, _b), _st.ttest_rel(_a, _b)
test_close(_r['t'], _s.statistic); test_close(_r['p'], _s.pvalue); test_close((_r['lo'], _r['hi']), tuple(_s.confidence_interval(.95)))


# %% [markdown]
# ## Paired differences over test volumes
#
# Per-volume scores are first averaged over the seeds both methods share, then $d_v = \bar a_v - \bar b_v$.
# The **paired bootstrap** resamples the $V$ volumes with replacement $R$ times (seeded) and takes the percentile interval of
# the resampled means:
#
# $$\bar d^{*(r)} = \frac1V\sum_{j=1}^{V} d_{v^{(r)}_j}, \qquad \big[q_{0.025}(\bar d^{*}),\; q_{0.975}(\bar d^{*})\big] \tag{S3}$$
#
# The **Wilcoxon signed-rank** test ranks $|d_v|$ (zeros dropped, ties given their mean rank), sums the ranks of the positive
# differences, $W^+ = \sum_{d_v > 0} R_v$, and compares it with its null distribution through the normal approximation
#
# $$z = \frac{W^+ - n(n+1)/4}{\sqrt{n(n+1)(2n+1)/24 - \sum_g (t_g^3 - t_g)/48}} \tag{S4}$$
#
# ($n$ non-zero differences, $t_g$ the size of tie group $g$), two-sided $p = 2(1-\Phi(|z|))$.

# %%
#| export
def paired_bootstrap(a, b,                # paired per-volume values, same order
                     n_boot: int = 10000, # resamples R
                     level: float = 0.95,
                     seed: int = 0,       # seeds the resampling
                    ) -> dict:            # mean difference, percentile interval (lo, hi), n
    "Percentile interval of the mean paired difference a - b by resampling the pairs (Eq. S3)."
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape: raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    d = (a - b)[np.isfinite(a - b)]; n = len(d)
    if n < 2: return dict(diff=float(d.mean()) if n else float('nan'), lo=float('nan'), hi=float('nan'), n=n)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    means = d[idx].mean(1)
    lo, hi = np.quantile(means, [.5 - level/2, .5 + level/2])
    return dict(diff=float(d.mean()), lo=float(lo), hi=float(hi), n=n)

def wilcoxon(a, b) -> dict:  # W+ (sum of ranks of positive differences), z, two-sided p, n non-zero pairs
    "Wilcoxon signed-rank test of a - b, normal approximation with tie correction, zeros dropped (Eq. S4)."
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d) & (d != 0)]; n = len(d)
    if n == 0: return dict(w=float('nan'), z=float('nan'), p=float('nan'), n=0)
    r = _st.rankdata(np.abs(d))
    w = float(r[d > 0].sum())
    _, t = np.unique(np.abs(d), return_counts=True)
    var = n*(n + 1)*(2*n + 1)/24 - float((t**3 - t).sum())/48
    z = (w - n*(n + 1)/4)/math.sqrt(var) if var > 0 else float('nan')
    return dict(w=w, z=z, p=float(2*_st.norm.sf(abs(z))) if z == z else float('nan'), n=n)


# %%
_r = np.random.default_rng(1); _a = _r.normal(.6, .1, 50); _b = _a - .01 + _r.normal(0, .02, 50); _b[3] = _a[3]
_s = _st.bootstrap((_a - _b,), np.mean, n_resamples=10000, method='percentile', random_state=0).confidence_interval
_m = paired_bootstrap(_a, _b); test_close(_m['lo'], _s.low, eps=2e-3); test_close(_m['hi'], _s.high, eps=2e-3)
_w, _sw = wilcoxon(_a, _b), _st.wilcoxon(_a, _b, zero_method='wilcox', correction=False, method='approx')
test_close(_w['p'], _sw.pvalue); test_eq(_w['n'], 49)


# %% [markdown]
# ## Verdicts
#
# A claim "A beats B" **holds** when the 95 % interval of the paired difference A − B lies above 0, is **reversed** when
# it lies below 0, and is **undecided** when it contains 0 (or fewer than two pairs exist). The verdict of a table row is taken
# from the interval over seeds (S2), the primary comparison; the interval over volumes (S3) is shown beside it.

# %%
#| export
def verdict(lo: float, hi: float) -> str:
    "'holds' if the interval (lo, hi) lies above 0, 'reversed' if below, else 'undecided'."
    if not (lo == lo and hi == hi): return 'undecided'
    return 'holds' if lo > 0 else 'reversed' if hi < 0 else 'undecided'

def compare(per_volume: pd.DataFrame, # columns variant, seed, volume, metric
            a: str, b: str,            # variants: the claim is "a beats b"
            metric: str = 'dsc', n_boot: int = 10000) -> dict:
    "Paired comparison of variants a and b on the seeds both finished: over seeds (S2), over volumes (S3, S4), verdict."
    pa = per_volume[per_volume.variant == a].pivot_table(index='seed', columns='volume', values=metric, dropna=False)
    pb = per_volume[per_volume.variant == b].pivot_table(index='seed', columns='volume', values=metric, dropna=False)
    seeds = sorted(set(pa.index) & set(pb.index)); vols = sorted(set(pa.columns) & set(pb.columns))
    if not seeds: return dict(a=a, b=b, seeds=0, diff=float('nan'), lo=float('nan'), hi=float('nan'), half=float('nan'),
                              vol_lo=float('nan'), vol_hi=float('nan'), wilcoxon_p=float('nan'), verdict='undecided')
    pa, pb = pa.loc[seeds, vols], pb.loc[seeds, vols]
    s = paired_t(pa.mean(axis=1).to_numpy(), pb.mean(axis=1).to_numpy())
    va, vb = pa.mean(axis=0).to_numpy(), pb.mean(axis=0).to_numpy()
    v, w = paired_bootstrap(va, vb, n_boot), wilcoxon(va, vb)
    return dict(a=a, b=b, seeds=len(seeds), diff=s['diff'], lo=s['lo'], hi=s['hi'], half=s['half'],
                vol_lo=v['lo'], vol_hi=v['hi'], wilcoxon_p=w['p'], verdict=verdict(s['lo'], s['hi']))


# %%
test_eq([verdict(.1, .3), verdict(-.3, -.1), verdict(-.1, .2), verdict(float('nan'), 1)], ['holds', 'reversed', 'undecided', 'undecided'])
_pv = pd.DataFrame([dict(variant=m, seed=s, volume=v, dsc=.6 + .01*s + .02*(m == 'a') + .001*v) for m in 'ab' for s in range(5) for v in range(8)])
_c = compare(_pv, 'a', 'b'); test_close(_c['diff'], .02); test_eq((_c['verdict'], _c['seeds']), ('holds', 5))
