"sapl.stats against scipy.stats on hand-made data."
import numpy as np, pandas as pd, pytest
from scipy import stats as st
from sapl.stats import mean_ci, paired_t, paired_bootstrap, wilcoxon, verdict, compare


def test_mean_ci_matches_scipy():
    x = np.array([.55, .61, .58, .66, .60, .57])
    m, h = mean_ci(x)
    lo, hi = st.t.interval(.95, len(x) - 1, loc=x.mean(), scale=st.sem(x))
    assert m == pytest.approx(x.mean()) and h == pytest.approx((hi - lo)/2)
    assert mean_ci([np.nan, .5, .7])[0] == pytest.approx(.6)      # NaN volumes are left out


@pytest.mark.parametrize('seed', range(3))
def test_paired_t_matches_ttest_rel(seed):
    r = np.random.default_rng(seed); a = r.normal(.6, .05, 7); b = a - r.normal(.01, .02, 7)
    got, ref = paired_t(a, b), st.ttest_rel(a, b)
    assert got['t'] == pytest.approx(ref.statistic) and got['p'] == pytest.approx(ref.pvalue)
    assert (got['lo'], got['hi']) == pytest.approx(tuple(ref.confidence_interval(.95)))


def test_bootstrap_matches_scipy_percentile():
    r = np.random.default_rng(5); a = r.normal(.6, .1, 50); b = a - .02 + r.normal(0, .03, 50)
    got = paired_bootstrap(a, b, n_boot=20000)
    ref = st.bootstrap((a - b,), np.mean, n_resamples=20000, method='percentile', random_state=1).confidence_interval
    assert got['lo'] == pytest.approx(ref.low, abs=2e-3) and got['hi'] == pytest.approx(ref.high, abs=2e-3)
    assert got['lo'] < got['diff'] < got['hi']


def test_wilcoxon_matches_scipy_with_ties_and_zeros():
    a = np.array([.5, .6, .7, .8, .55, .65, .75, .61, .52, .9, .3])
    b = np.array([.4, .6, .6, .7, .50, .60, .80, .60, .50, .8, .35])  # one zero difference, tied |d|
    got = wilcoxon(a, b)
    ref = st.wilcoxon(a, b, zero_method='wilcox', correction=False, method='approx')
    assert got['p'] == pytest.approx(ref.pvalue) and got['n'] == 10


def test_compare_pairs_on_shared_seeds_and_gives_verdicts():
    rows = [dict(variant=m, seed=s, volume=v, dsc=.6 + .02*s + .001*v - (.03 if m == 'b' else 0) + .001*((s*v) % 3))
            for m in 'ab' for s in range(5) for v in range(10)]
    rows += [dict(variant='a', seed=9, volume=v, dsc=0.) for v in range(10)]   # a seed b never ran: ignored
    c = compare(pd.DataFrame(rows), 'a', 'b')
    assert c['seeds'] == 5 and c['diff'] == pytest.approx(.03) and c['verdict'] == 'holds'
    assert compare(pd.DataFrame(rows), 'b', 'a')['verdict'] == 'reversed'
    assert verdict(-.01, .02) == 'undecided'
