# %% [markdown]
# # Procedural chest-CT phantom
#
# > An embedded, deterministic chest-CT generator with COVID-19 lesions: the default data set of every notebook, so everything runs on a fresh machine with no download.
#
# The paper evaluates on COVID-19-20 and MosMedData, which have to be downloaded by hand. This module writes a stand-in data set
# in the COVID-19-20 layout (`volume-covid19-A-XXXX_ct.nii.gz` int16 HU and `volume-covid19-A-XXXX_seg.nii.gz` uint8 infection
# masks), so the whole pipeline (lung extraction, windowing to $[-1250, 250]$ HU, slicing, SEAN synthesis, SA-CPS/SA-ST) can be
# exercised end to end. It is a *phantom*: anatomy and lesions follow simple generative rules chosen so that the task is not
# trivial (a HU threshold does not solve it), not a substitute for the real data when reporting numbers.

# %%
#| default_exp phantom

# %%
#| export
from __future__ import annotations
import json, os, time
from pathlib import Path
import numpy as np
from scipy import ndimage as ndi

# %%
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# ## Conventions
#
# Arrays are in $(z, y, x)$ index order. In **patient coordinates** (mm) a voxel $(k, j, i)$ sits at
#
# $$u = \big(i - \tfrac{X-1}{2}\big)s_x - u_c,\qquad v = \big(j - \tfrac{Y-1}{2}\big)s_y - v_c,\qquad w = w_0 + k\,s_z \tag{1}$$
#
# with $u$ toward the patient's **left** (the radiological convention of DICOM/LPS: the image's right side shows the patient's left),
# $v$ toward posterior, $w$ toward superior (the lowest point of the lungs is $w=0$); $(u_c, v_c)$ is the patient's off-centre shift.
# The NIfTI affine is for the transposed array (index order $x, y, z$) and maps to RAS world millimetres (RAS $x$ grows toward the
# patient's right, so it is $-u$):
#
# $$\mathbf A = \begin{pmatrix}-s_x & 0 & 0 & s_x\frac{X-1}{2}\\ 0 & -s_y & 0 & s_y\frac{Y-1}{2}\\ 0 & 0 & s_z & o_z\\ 0&0&0&1\end{pmatrix},\qquad
# \mathbf A^{\text{flip}} = \begin{pmatrix}+s_x & 0 & 0 & -s_x\frac{X-1}{2}\\ 0 & -s_y & 0 & s_y\frac{Y-1}{2}\\ 0 & 0 & s_z & o_z\\ 0&0&0&1\end{pmatrix} \tag{2}$$
#
# About 10 % of the volumes (`p_flip`) are stored with the $x$ axis reversed ($x$ toward the patient's right) and $\mathbf A^{\text{flip}}$,
# recorded as `meta['flip_x']`: readers must take left and right from the affine, as with real scanners. The lung labels are always
# anatomical: `lung` is 1 for the **left** lung and 2 for the **right** lung.
#
# ## Severity bands and seeds
#
# Each volume gets a CT severity band $b\in\{0,\dots,4\}$ (CT-0 none, CT-1 $<25\,\%$, CT-2 $25$–$50\,\%$, CT-3 $50$–$75\,\%$,
# CT-4 $>75\,\%$ of the lung volume involved, as in MosMedData) with probabilities $(0, 0.50, 0.30, 0.12, 0.08)$: every phantom volume
# carries a mask and stands in for the annotated volumes of COVID-19-20 and MosMedData, which all show lesions (MosMedData's lesion-free
# CT-0 scans have no masks and only enter as unlabelled data), so most volumes are CT-1/CT-2 and the default set has no lesion-free
# volume. `band_probs` or `severity=0` make lesion-free volumes (which score DSC 0 when anything is predicted). The target involvement $f^\star$ is uniform in a sub-interval of the band
# (CT-1 $[0.01, 0.22]$, CT-2 $[0.28, 0.47]$, CT-3 $[0.53, 0.72]$, CT-4 $[0.78, 0.92]$). Volume $i$ of a data set built with
# `seed` uses the seed `phantom_seed(seed, i)` (a `numpy.random.SeedSequence` of `(salt, seed, i)`), so a volume does not depend on
# how many volumes are built.

# %%
#| export
PHANTOM_VERSION = 2
BANDS = ('CT-0', 'CT-1', 'CT-2', 'CT-3', 'CT-4')
BAND_LIMITS = ((0.0, 0.0), (0.0, 0.25), (0.25, 0.50), (0.50, 0.75), (0.75, 1.0))
BAND_PROBS = (0.0, 0.50, 0.30, 0.12, 0.08)
THICKNESS_MM = (1.25, 2.0, 2.5, 3.0, 5.0)
THICKNESS_PROBS = (0.10, 0.10, 0.20, 0.15, 0.45)
_TARGET = ((0.0, 0.0), (0.01, 0.22), (0.28, 0.47), (0.53, 0.72), (0.78, 0.92))  # sampled involvement, inside the bands
_SALT = 0x5A91
PATTERNS = ('patchy', 'rounded', 'band', 'mixed')   # dominant lesion shape of a patient
PATTERN_PROBS = (0.5, 0.2, 0.2, 0.1)

def severity_band(fraction: float) -> int:
    "CT severity band 0..4 (CT-0 none, CT-1 <25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 >75 %) of an involvement `fraction`."
    if fraction <= 0: return 0
    return int(min(4, 1 + np.floor(fraction / 0.25)))

def phantom_seed(seed: int, i: int) -> int:
    "Seed of volume `i` of a data set built with `seed` (independent of the number of volumes)."
    return int(np.random.SeedSequence([_SALT, int(seed), int(i)]).generate_state(1, np.uint32)[0])


# %%
test_eq([severity_band(f) for f in (0, 0.1, 0.25, 0.6, 0.8, 1.0)], [0, 1, 2, 3, 4, 4])
test_eq(phantom_seed(0, 3), phantom_seed(0, 3)); assert phantom_seed(0, 3) != phantom_seed(0, 4) != phantom_seed(1, 3)
test_close(sum(BAND_PROBS), 1.0); test_close(sum(THICKNESS_PROBS), 1.0)


# %% [markdown]
# ## Building blocks
#
# **Random fields.** Smooth textures and shape perturbations are standardised Gaussian random fields on a coarse grid $\mathcal G$
# (spacing $c = \max(3\,\text{mm}, 1.5\,s_x)$): i.i.d. standard normal noise $\varepsilon$ smoothed by a Gaussian $G_\sigma$ of width
# $\sigma$ (mm),
#
# $$N_\sigma = \frac{G_\sigma * \varepsilon - \operatorname{mean}(G_\sigma*\varepsilon)}{\operatorname{sd}(G_\sigma * \varepsilon)} \tag{3}$$
#
# Large $\sigma$ are drawn on a grid a further factor coarser. Coarse fields reach the voxel grid by separable linear interpolation
# (`_Lerp`, the same as `scipy.ndimage.zoom(order=1)` but on an arbitrary box of voxel centres, so only the box around the lungs is
# evaluated at full resolution).

# %%
#| export
def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)

def _grf(rng, shape, sigma):
    "Standardised Gaussian random field: white noise smoothed by a Gaussian of `sigma` voxels."
    a = rng.standard_normal(shape, dtype=np.float32)
    a = ndi.gaussian_filter(a, sigma, mode='reflect')
    a -= a.mean(); a /= a.std() + 1e-8
    return a

def _grf_fast(rng, shape, sigma):
    "Like `_grf`, for large `sigma`: drawn on a grid `f` times coarser and linearly upsampled."
    f = int(sigma // 1.5)
    if f < 2: return _grf(rng, shape, sigma)
    cs = tuple(int(np.ceil((n - 1) / f)) + 2 for n in shape)
    g = _grf(rng, cs, sigma / f)
    return _Lerp([np.arange(n) / f for n in shape], cs)(g)

class _Lerp:
    "Separable linear interpolation from a regular coarse 3D grid onto a box of voxel centres."
    def __init__(self, pos, shape):  # pos: 3 arrays of fractional coarse indices (z, y, x)
        self.ax = []
        for p, n in zip(pos, shape):
            p = np.clip(np.asarray(p, np.float64), 0, n - 1.0)
            i0 = np.minimum(np.floor(p).astype(np.intp), n - 2)
            self.ax.append((i0, (p - i0).astype(np.float32)))
    def __call__(self, g):
        a = g
        for axis, (i0, w) in enumerate(self.ax):
            shp = [1, 1, 1]; shp[axis] = -1
            a0 = np.take(a, i0, axis=axis); a1 = np.take(a, i0 + 1, axis=axis)
            a1 -= a0; a1 *= w.reshape(shp); a0 += a1
            a = a0
        return a

def _box(coords, lo, hi):
    "Index range [i0, i1) of increasing `coords` inside [lo, hi]."
    return int(np.searchsorted(coords, lo)), int(np.searchsorted(coords, hi, 'right'))


# %%
_r = np.random.default_rng(0); _f = _grf(_r, (20, 20, 20), 2.0)
test_close(_f.mean(), 0, eps=1e-4); test_close(_f.std(), 1, eps=1e-3)
_g = np.arange(5.)[:, None, None] + 10 * np.arange(4.)[None, :, None] + 100 * np.arange(3.)[None, None, :]
test_close(_Lerp([[0.5, 3.25], [1.5], [0, 2]], _g.shape)(_g), np.array([[[15.5, 215.5]], [[18.25, 218.25]]]))


# %% [markdown]
# **Shapes** are signed distances in mm, positive inside: capsules (segment $\mathbf a\to\mathbf b$ of radius $r$,
# $f = r - \lVert \mathbf x - \mathbf a - t^\star(\mathbf b-\mathbf a)\rVert$ with $t^\star$ the clipped projection), ellipsoids
# (first-order distance $f \approx (1-k)\,k/\lVert\nabla k\rVert$ with $k$ the normalised radius), unions by $\max$, intersections by
# $\min$. A signed distance becomes a **partial-volume occupancy** by a linear ramp one voxel wide:
#
# $$\alpha = \operatorname{clip}\!\Big(\tfrac12 + \tfrac{f}{h},\, 0,\, 1\Big), \qquad h = s_x \tag{4}$$
#
# The body wall is layered by depth below the skin, with thicknesses that depend on the polar angle $\varphi$ around the body axis
# ($\varphi = 0$ posterior): skin, subcutaneous fat (thicker laterally), muscle (thicker next to the spine and at the pectorals),
# then the rib layer, then the pleural cavity.

# %%
#| export
def _capsule_sdf(W, V, U, a, b, r):
    "Signed distance (mm, positive inside) of a capsule a->b of radius r, on broadcastable coordinate arrays."
    a = np.asarray(a, np.float64); d = np.asarray(b, np.float64) - a
    L2 = max(float(d @ d), 1e-9)
    Z, Y, X = W - a[0], V - a[1], U - a[2]
    t = np.clip((Z * d[0] + Y * d[1] + X * d[2]) / L2, 0, 1)
    return r - np.sqrt((Z - t * d[0]) ** 2 + (Y - t * d[1]) ** 2 + (X - t * d[2]) ** 2)

def _ellipsoid_sdf(W, V, U, c, ax, theta=0.0):
    "Approximate signed distance (mm, positive inside) of an ellipsoid, centre c=(w,v,u), semi-axes ax, rotated by theta about w."
    Z, Y, X = W - c[0], V - c[1], U - c[2]
    ct, st = np.cos(theta), np.sin(theta)
    X, Y = ct * X + st * Y, -st * X + ct * Y
    q = [Z / ax[0], Y / ax[1], X / ax[2]]
    k = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    g = np.sqrt((q[0] / ax[0]) ** 2 + (q[1] / ax[1]) ** 2 + (q[2] / ax[2]) ** 2)
    return (1 - k) * k / np.maximum(g, 1e-6) + (1 - k) * min(ax) * (k < 1e-3)

def _union_capsule(f, G, a, b, r, margin=45.0):
    "f = max(f, sdf(capsule)) on the coarse grid G=(w, v, u) inside the capsule's box (+margin)."
    a = np.asarray(a, float); b = np.asarray(b, float)
    lo = np.minimum(a, b) - r - margin; hi = np.maximum(a, b) + r + margin
    sl = tuple(slice(*_box(g, l, h)) for g, l, h in zip(G, lo, hi))
    if any(s.stop <= s.start for s in sl): return None
    sdf = _capsule_sdf(G[0][sl[0], None, None], G[1][None, sl[1], None], G[2][None, None, sl[2]], a, b, r)
    np.maximum(f[sl], sdf, out=f[sl])
    return sl, sdf

def _wall_layers(phi, P):
    "Body-wall layer depths (mm from the skin) as functions of the polar angle phi (0 posterior, +-pi anterior)."
    b1 = P['skin_t'] + 0 * phi
    b2 = b1 + P['fat_t'] * (0.8 + 0.4 * np.abs(np.sin(phi)))
    mus = P['mus_t'] * (1 + 1.2 * np.exp(-(phi / 0.45) ** 2) + 0.6 * np.exp(-((np.abs(phi) - 2.4) / 0.35) ** 2))
    b3 = b2 + mus
    return b1, b2, b3, b3 + P['rib_t'], mus


# %%
test_close(_capsule_sdf(0., 0., np.array([0., 7., 10.]), (0, 0, 0), (0, 0, 5), 2.0), np.array([2., 0., -3.]))
test_close(_ellipsoid_sdf(np.zeros(1), np.zeros(1), np.array([0., 9.]), (0, 0, 0), (5, 5, 10)), np.array([5., 1.]), eps=1e-6)
_b = _wall_layers(np.array([0., np.pi / 2, np.pi]), dict(skin_t=2, fat_t=10, mus_t=8, rib_t=6))
assert (np.diff(np.stack(_b[:4]), axis=0) > 0).all()


# %% [markdown]
# **Tubes** (vessels, airways, nodules) are tapered capsules rendered straight onto the voxel grid, each inside its own bounding box.
# Thick slices are handled as slabs: the axial distance is reduced by $s_z/2$ (a tube is seen in every slice whose slab it crosses)
# and the occupancy is scaled by the fraction of the slab the tube fills,
#
# $$\omega = \min\!\Big(1, \frac{2\bar r}{s_z\sqrt{1-\hat d_z^2}}\Big)\,\min\!\Big(1, \frac{2\bar r}{h}\Big) \tag{5}$$
#
# with $\hat d$ the unit axis of the tube and $\bar r$ its mean radius: a 1 mm vessel running in-plane is faint on a 5 mm slice, as on
# a scanner. **Thin sheets** (fissures, plate atelectasis) with unit normal $\mathbf n$, thickness $t$ and signed distance $d$ get
#
# $$\alpha_{\text{sheet}} = \min\!\Big(1, \frac tW\Big)\max\!\Big(0, 1-\frac{|d|}W\Big), \qquad W = |n_w|\,s_z + (|n_v| + |n_u|)\,s_x \tag{6}$$
#
# (the projected voxel width). `_filter_gain` is the noise gain $\lVert K\rVert = (\sum K^2)^{1/2}$ of the discrete in-plane reconstruction
# filter (Gaussian blur, then unsharp masking), used to calibrate the noise (Eq. 15); for a plain Gaussian it is $\sum_i k_i^2$ of the
# 1-D kernel (`_gauss_kernel_power`).

# %%
#| export
def _render_tubes(out, zc, yc, xc, segs, h, sz, pad=1.0):
    """Max-composite the occupancy of tapered capsules into `out` [len(zc),len(yc),len(xc)].
    segs: (a [N,3], b [N,3], ra [N], rb [N]) in mm, points as (w, v, u); zc/yc/xc increasing voxel centres (mm).
    Slab partial volume: the axial distance is reduced by half the slice thickness and the
    occupancy scaled by the fraction of the slab the tube fills."""
    a, b, ra, rb = (np.asarray(s, np.float64) for s in segs)
    if len(a) == 0: return out
    d = b - a; L2 = np.maximum((d * d).sum(1), 1e-9)
    rm = np.maximum(ra, rb)
    sin_z = np.sqrt(np.clip(1 - d[:, 0] ** 2 / L2, 0, 1))
    sin_z[(d * d).sum(1) < 1e-9] = 1.0  # spheres
    wseg = np.minimum(1.0, 2 * 0.5 * (ra + rb) / np.maximum(sz * sin_z, 1e-6)) * np.minimum(1.0, (ra + rb) / h)
    lo = np.minimum(a, b) - (rm + h)[:, None]; hi = np.maximum(a, b) + (rm + h)[:, None]
    lo[:, 0] -= sz / 2; hi[:, 0] += sz / 2
    k0 = np.searchsorted(zc, lo[:, 0]); k1 = np.searchsorted(zc, hi[:, 0], 'right')
    j0 = np.searchsorted(yc, lo[:, 1]); j1 = np.searchsorted(yc, hi[:, 1], 'right')
    i0 = np.searchsorted(xc, lo[:, 2]); i1 = np.searchsorted(xc, hi[:, 2], 'right')
    ok = (k1 > k0) & (j1 > j0) & (i1 > i0) & (wseg > 0.02)
    hz = sz / 2
    for n in np.flatnonzero(ok):
        Z = (zc[k0[n]:k1[n]] - a[n, 0]).astype(np.float32)[:, None, None]
        Y = (yc[j0[n]:j1[n]] - a[n, 1]).astype(np.float32)[None, :, None]
        X = (xc[i0[n]:i1[n]] - a[n, 2]).astype(np.float32)[None, None, :]
        dz, dy, dx = d[n]
        t = (Z * np.float32(dz / L2[n]) + Y * np.float32(dy / L2[n])) + X * np.float32(dx / L2[n])
        np.clip(t, 0, 1, out=t)
        cz = np.maximum(np.abs(Z - t * np.float32(dz)) - np.float32(hz), 0)
        cy = Y - t * np.float32(dy); cx = X - t * np.float32(dx)
        dist = np.sqrt(cz * cz + cy * cy + cx * cx)
        occ = (np.float32(ra[n]) + t * np.float32(rb[n] - ra[n]) - dist) * np.float32(1 / h) + np.float32(0.5)
        np.clip(occ, 0, 1, out=occ); occ *= np.float32(wseg[n])
        sub = out[k0[n]:k1[n], j0[n]:j1[n], i0[n]:i1[n]]
        np.maximum(sub, occ, out=sub)
    return out

def _filter_gain(sig_px, sharpen=0.0, sig_u=1.0):
    "Noise standard-deviation factor sqrt(sum h^2) of the in-plane reconstruction filter h: Gaussian blur, then unsharp masking."
    R = int(4 * (sig_px + sig_u)) + 4
    h = np.zeros((2 * R + 1, 2 * R + 1)); h[R, R] = 1.0
    h = ndi.gaussian_filter1d(ndi.gaussian_filter1d(h, sig_px, axis=1), sig_px, axis=0)
    if sharpen > 0: h = h + sharpen * (h - ndi.gaussian_filter1d(ndi.gaussian_filter1d(h, sig_u, axis=1), sig_u, axis=0))
    return float(np.sqrt((h ** 2).sum()))

def _gauss_kernel_power(sigma):
    "Sum of squares of scipy's 1D Gaussian kernel (noise variance factor of one smoothing pass)."
    if sigma <= 0: return 1.0
    rad = int(4.0 * sigma + 0.5); x = np.arange(-rad, rad + 1)
    k = np.exp(-0.5 * x ** 2 / sigma ** 2); k /= k.sum()
    return float((k ** 2).sum())


# %%
_c = (np.arange(21) - 10) * 1.0; _o = np.zeros((21, 21, 21), np.float32)   # 1 mm voxels, tube along z of radius 3
_render_tubes(_o, _c, _c, _c, (np.array([[-20., 0, 0]]), np.array([[20., 0, 0]]), [3.], [3.]), 1.0, 1.0)
test_eq(_o[10, 10, 10], 1.0); test_eq(_o[10, 10, 16], 0.0); test_close(_o[10, 10, 13], 0.5)
_o5 = np.zeros((3, 21, 21), np.float32)  # the same 1 mm vessel in-plane on 5 mm slices: faint (2r/s_z = 0.2)
_render_tubes(_o5, np.array([-5., 0, 5]), _c, _c, (np.array([[0., 0, -20]]), np.array([[0., 0, 20]]), [.5], [.5]), 1.0, 5.0)
test_close(_o5[1].max(), 0.2, eps=1e-6); test_close(_gauss_kernel_power(1e-3), 1.0)
test_close(_filter_gain(1.3), _gauss_kernel_power(1.3), eps=1e-9); assert _filter_gain(0.5, 1.0) > _filter_gain(0.5) > _filter_gain(1.0)


# %% [markdown]
# **Vessel and airway trees** grow by recursive space partitioning of $n$ attractor points drawn uniformly inside a lung (one per
# $11.5^3$ mm$^3$ for the vessels, one per $42^3$ mm$^3$ for the airways). A node at $\mathbf p$ owning the point set $S$ splits
# $S$ at the median along its principal axis; each half $S_i$ gets a branch from $\mathbf p$ a random fraction $(0.45$–$0.7)$ of the way to
# its centroid, with a radius by Murray's law (flow proportional to the territory):
#
# $$r_i = r\,\Big(\frac{|S_i|}{|S|}\Big)^{1/3} \tag{7}$$
#
# Leaves end in a short twig tapering to 0.3 mm. Per lung an arterial and a venous tree start at the hilum (radius 6–6.5 mm scaled
# with the patient), so vessels branch, taper and fill the lung down to sub-millimetre calibre; an airway tree (lumen 5.5–6.2 mm at
# the main bronchus, wall $0.2r+0.6$ mm) starts at the end of each main bronchus. With slab partial volume, vessels look like
# dots and short lines on thick slices and like branches on thin ones.

# %%
#| export
def _grow_tree(rng, root, pts, r0, rmin=0.45, frac=(0.45, 0.7), twig=(6.0, 14.0)):
    """Space-filling binary tree: the attractor set of a node is split in two by a plane through its
    centroid, normal to its principal axis; each child steps a fraction of the way to its half's
    centroid with radius r*(n_i/n)^(1/3) (Murray's law, flow ~ territory)."""
    A, B, RA, RB = [], [], [], []
    root = np.asarray(root, np.float64)
    c = pts.mean(0); p1 = root + 0.35 * (c - root)
    A.append(root); B.append(p1); RA.append(r0); RB.append(r0 * 0.97)
    stack = [(p1, pts, r0 * 0.97, (p1 - root) / (np.linalg.norm(p1 - root) + 1e-9))]
    while stack:
        p, S, r, dprev = stack.pop()
        if len(S) <= 1 or r < rmin:
            q = S.mean(0)
            A.append(p); B.append(q); RA.append(r); RB.append(max(0.8 * r, 0.35))
            v = q - p; nv = np.linalg.norm(v)
            v = v / nv if nv > 1e-6 else dprev
            L = rng.uniform(*twig)
            A.append(q); B.append(q + L * v); RA.append(max(0.8 * r, 0.35)); RB.append(0.3)
            continue
        X = S - S.mean(0)
        _, vecs = np.linalg.eigh(X.T @ X)
        proj = X @ vecs[:, -1]
        m = np.median(proj)
        for sel in (proj <= m, proj > m):
            Si = S[sel]
            if len(Si) == 0: continue
            ri = r * (len(Si) / len(S)) ** (1 / 3)
            ci = Si.mean(0)
            q = p + rng.uniform(*frac) * (ci - p)
            A.append(p); B.append(q); RA.append(ri); RB.append(ri * 0.95)
            v = q - p
            stack.append((q, Si, ri * 0.95, v / (np.linalg.norm(v) + 1e-9)))
    return np.array(A), np.array(B), np.array(RA), np.array(RB)


# %%
_a, _b, _ra, _rb = _grow_tree(np.random.default_rng(0), (0, 0, 0), np.random.default_rng(1).uniform(10, 60, (64, 3)), 5.0)
assert len(_a) > 64 and _ra.max() == 5.0 and (_rb <= _ra + 1e-9).all() and _rb.min() >= 0.3 - 1e-9


# %% [markdown]
# ## Parameters of one volume
#
# All scalar parameters are drawn first, in a fixed order, from the first child of `SeedSequence([salt, seed])`; the random fields
# use further children (anatomy, lesions, vessels, scanner noise). The scalars therefore do not depend on `matrix`: the same seed
# gives the same patient, severity, spacing and scanner at any resolution (the in-plane spacing is
# $s_x = s_{384}\cdot 384/\text{matrix}$ with $s_{384}\sim U(0.6, 0.9)$ mm, so the field of view, 230–346 mm, is the same).
#
# | group | parameter | range |
# |---|---|---|
# | acquisition | pixel spacing at matrix 384 | $U(0.6, 0.9)$ mm |
# | | slice thickness = spacing $s_z$ | 1.25, 2, 2.5, 3, 5 mm with probabilities 0.10, 0.10, 0.20, 0.15, 0.45 |
# | | stored with flipped $x$ | probability `p_flip` = 0.1 |
# | body | half width $A$ | $(0.84$–$0.95)\times$ FOV/2; AP half depth $(0.64$–$0.80)A$, flatter posteriorly |
# | | skin, fat, muscle, rib layer | 1.5–2.5, 3–18, 5–9 (×2.2 paraspinal), 5–8 mm ($\times A/125$ mm) |
# | lungs | height $H$ | $(1.55$–$1.95)A$; diaphragm domes $0.22$–$0.32H$ (left 3–10 % lower) |
# | | deformation | $a\,N_{20}$, $a\sim U(2, 5)$ mm |
# | parenchyma | density (inspiration level) | $\mu_{\text{lung}}\sim U(-900,-760)$ HU, + dependent gradient $g\sim U(50,150)$ HU posteriorly, texture $U(8,22)$ HU |
# | | emphysema | 12 % of patients: a share $f_e\sim U(0.04, 0.25)$ of the lung, upper-lobe predominant, ≈ −975 HU |
# | lesions | number of foci $K$ | CT-1 1–6, CT-2 3–12, CT-3 6–18, CT-4 10–26 |
# | | focus size | $U(7,20)$ mm per patient, × log-normal per focus (sd 0.4) and per axis (sd 0.25) |
# | | distribution | pleural pull $\lambda_c\sim U(8,40)$ mm, posterior exponent $p_v\sim U(0,3)$, basal exponent $p_z\sim U(0,1.5)$; one lung only in 30 % of CT-1 and 10 % of CT-2 |
# | | shape | dominant pattern patchy / rounded / band-like / mixed with probabilities 0.5 / 0.2 / 0.2 / 0.1, followed by 70 % of the foci; reverse halo 4 % of the foci (CT-2 and above); irregularity $\beta\sim U(0.3,0.8)$ |
# | | density | GGO $\mu_g\sim U(\max(-750,\ \mu_{\text{lung}}+g/2+100),\ -300)$ HU; per-focus offset sd $s_f\sim U(0,120)$ HU; heterogeneity $h\sim U(20,110)$ HU; texture $U(25,80)$ HU; consolidation $\mu_c\sim U(-80,40)$ HU, share CT-1 0–0.2, CT-2 0–0.35, CT-3 0.05–0.5, CT-4 0.1–0.6 |
# | | margins | fuzziness $m\sim U(0.15,0.6)$; boundary visibility $v\sim U(50,90)$ HU |
# | | crazy paving | 40 % of patients, strength $U(0.3,1)$, septal lines $+U(100,300)$ HU |
# | distractors | dependent density / atelectasis | 70 % of patients, $U(-650,-100)$ HU, depth $U(3,12)$ mm, posterior-basal up to $U(0.1,0.5)H$ |
# | | plate atelectasis, nodules, fissures | 0–3 plates (−150 HU), Poisson(0.8) nodules (2–5 mm), fissures with probability 0.75 (right horizontal 0.5) |
# | | fibrotic scars | 25 % of patients: $1+$Poisson(1.5) (≤ 6) kinked bands of 2–3 pieces, radius 0.6–1.8 mm, $U(-150, 0)$ HU |
# | | bronchial wall thickening | 25 % of patients: wall $+t(0.3r + 0.8\,\text{mm})$, $t\sim U(0.3,1)$ |
# | scanner | kernel | sharp (50 %): blur $\sigma_b\sim U(0.3,0.55)$ mm, unsharp masking $k\sim U(0.4,1.2)$; soft: $\sigma_b\sim U(0.6,1.2)$ mm |
# | | noise $\sigma_n$ (final image) | sharp kernel log-uniform 25–80 HU, soft kernel 10–40 HU |
# | | gain $\gamma$, offset $\delta$ | $U(0.97,1.03)$, $U(-30,30)$ HU |
# | | motion | 15 % of scans: ghost of $U(2,8)$ mm at the bases, fading up to $U(0.3,0.6)H$ |
# | | streaks | 10 % of scans: 3–8 roughly lateral streaks of $\pm U(30,100)$ HU over 30–100 % of the slices |

# %%
#| export
def _draw_params(seed, matrix, severity=None, thickness=None, flip_x=None, p_flip=0.1, band_probs=BAND_PROBS):
    "All scalar parameters of one volume, drawn in a fixed order from the seed (independent of `matrix`)."
    ss = np.random.SeedSequence([_SALT, int(seed)])
    r = np.random.default_rng(ss.spawn(1)[0])
    u = r.uniform
    bp = np.asarray(band_probs, np.float64); bp = bp / bp.sum()
    P = dict(seed=int(seed), matrix=int(matrix))
    band, fpos = int(r.choice(5, p=bp)), u()
    s384, thick, flip = u(0.6, 0.9), float(r.choice(THICKNESS_MM, p=THICKNESS_PROBS)), bool(u() < p_flip)
    if severity is not None: band = int(severity)
    if thickness is not None: thick = float(thickness)
    if flip_x is not None: flip = bool(flip_x)
    lo, hi = _TARGET[band]
    P.update(band=band, f_target=lo + fpos * (hi - lo), thickness=thick, flip_x=flip)
    fov = round(s384 * 384, 3)                                # field of view (mm), the same at every matrix
    s = fov / matrix
    P.update(pixel_mm=s, fov_mm=fov)
    # body (patient coordinates: u to the patient's left, v posterior, w superior; mm)
    A = 0.5 * fov * u(0.84, 0.95)
    B = A * u(0.64, 0.80)
    P.update(A=A, B_ant=B * u(0.95, 1.05), B_post=B * u(0.95, 1.05), p_ant=u(2.0, 2.5), p_post=u(2.8, 4.0),
             u_c=0.5 * fov * u(-0.02, 0.02), v_c=-0.5 * fov * u(0.0, 0.05))
    k = A / 125.0
    P.update(skin_t=u(1.5, 2.5), fat_t=u(3, 18) * k, mus_t=u(5, 9) * k, rib_t=u(5, 8), fat_hu=u(-115, -85),
             mus_hu=u(35, 55), skin_hu=u(20, 40))
    P.update(H=A * u(1.55, 1.95), m_below=u(6, 16), m_above=u(6, 16), z_table=-u(50, 350))
    P.update(dome_R=u(0.22, 0.32), dome_drop=u(0.03, 0.10), apex_u=u(0.40, 0.55), apex_v=u(-0.05, 0.2),
             heart=u(0.88, 1.12), heart_rot=np.deg2rad(u(20, 40)), heart_left=u(0.05, 0.18), med_w=u(0.11, 0.17),
             r_vb=u(15, 20) * k, spine_pitch=u(24, 29), spine_phase=u(0, 30), rib_pitch=u(21, 27) * k,
             rib_h=u(9, 13), rib_drop=u(50, 90), rib_phase=u(0, 30), table_gap=u(3, 20), w_arch=u(0.72, 0.80),
             carina_drop=u(12, 25), hilum_drop=u(12, 28), gastric=bool(u() < 0.5), bone=u(0.85, 1.15),
             lung_amp=u(2.0, 5.0))
    # parenchyma: inspiration level, dependent (posterior) density gradient, emphysema in some patients
    P.update(mu_lung=u(-900, -760), gravity=u(50, 150), tex_lung=u(8, 22), emph=(u(0.04, 0.25) if u() < 0.12 else 0.0))
    # lesions: extent, number, size, distribution, shape, density, margins
    nf_range = ((0, 0), (1, 6), (3, 12), (6, 18), (10, 26))[band]
    uni, side = u(), (1 if u() < 0.5 else -1)
    P.update(n_foci=int(r.integers(nf_range[0], nf_range[1] + 1)), focus_r=u(7, 20), pattern=PATTERNS[int(r.choice(4, p=PATTERN_PROBS))],
             periph=u(8, 40), post_bias=u(0.0, 3.0), base_bias=u(0.0, 1.5),
             unilateral=int(side if uni < (0, 0.3, 0.1, 0, 0)[band] else 0), deform=u(0.3, 0.8), subpleural=u(6, 40),
             cons=u(*((0, 0), (0.0, 0.2), (0.0, 0.35), (0.05, 0.5), (0.1, 0.6))[band]),
             mu_ggo=u(), mu_cons=u(-80, 40), ggo_het=u(20, 110), focus_sd=u(0, 120), tex_ggo=u(25, 80),
             margin=u(0.15, 0.6), vis_hu=u(50, 90), crazy=(u(0.3, 1.0) if u() < 0.4 else 0.0), crazy_hu=u(100, 300))
    g_lo = max(-750.0, P['mu_lung'] + 0.5 * P['gravity'] + 100)   # GGO in -750..-300 HU, >= 100 HU above the mean parenchyma
    P['mu_ggo'] = g_lo + P['mu_ggo'] * (-300.0 - g_lo)
    # distractors (not labelled)
    P.update(atel=(u(0.6, 1.4) if u() < 0.7 else 0.0), atel_lambda=u(3, 12), atel_zeta=u(0.10, 0.50),
             atel_hu=u(-650, -100), n_plates=int(r.integers(0, 4)), n_nodules=int(min(4, r.poisson(0.8))),
             n_scars=(int(min(6, 1 + r.poisson(1.5))) if u() < 0.25 else 0), scar_hu=u(-150, 0),
             bronchial_wall=(u(0.3, 1.0) if u() < 0.25 else 0.0),
             fissure_L=bool(u() < 0.75), fissure_R=bool(u() < 0.75), fissure_h=bool(u() < 0.5))
    # scanner: kernel (sharp: edge enhancement and fine-grained noise; soft: smooth), dose (noise), calibration, artefacts
    sharp = bool(u() < 0.5)
    P.update(kernel='sharp' if sharp else 'soft', blur_mm=(u(0.3, 0.55) if sharp else u(0.6, 1.2)),
             sharpen=(u(0.4, 1.2) if sharp else 0.0),
             noise_hu=float(np.exp(u(np.log(25), np.log(80)) if sharp else u(np.log(10), np.log(40)))),
             hu_offset=u(-30, 30), hu_gain=u(0.97, 1.03))
    P.update(motion_mm=(u(2, 8) if u() < 0.15 else 0.0), motion_dir=u(0, np.pi), motion_zeta=u(0.3, 0.6),
             n_streaks=(int(r.integers(3, 9)) if u() < 0.1 else 0), streak_hu=u(30, 100))
    return {k_: (float(v) if isinstance(v, (np.floating,)) else v) for k_, v in P.items()}


# %%
_p1, _p2 = _draw_params(5, 384), _draw_params(5, 64)
test_eq({k: v for k, v in _p1.items() if k not in ('matrix', 'pixel_mm')}, {k: v for k, v in _p2.items() if k not in ('matrix', 'pixel_mm')})
test_close(_p1['pixel_mm'] * 384, _p2['pixel_mm'] * 64, eps=1e-2); test_eq(_draw_params(5, 64, severity=0)['f_target'], 0.0)


# %% [markdown]
# ## The generative model
#
# **Anatomy.** The body outline is a superellipse $(|u/A|^{p} + |v/B|^{p})^{1/p} < 1$ (exponent $p\approx 2$–$2.5$ anteriorly,
# $3$–$4$ posteriorly: the back lies flat on the table), filled by depth below the skin with skin (20–40 HU), fat (−115…−85 HU) and
# muscle (35–55 HU). The spine (vertebral body with cortical rim ≈ 800 HU and marrow ≈ 220 HU, intervertebral discs at 90 HU every
# 24–29 mm, canal, pedicles, spinous and transverse processes), the sternum and the ribs are bone. Ribs are a helical band pattern in
# the rib layer: the rib at posterior height $z_k$ is at height $z_k - g\,(|\varphi|/\pi)^{1.3}$ at polar angle $\varphi$ (it descends
# anteriorly by $g$ = 50–90 mm), which gives long arcs posteriorly and short ovals laterally, with costal cartilage (130 HU)
# anteriorly. A curved table plate lies under the patient. Inside the cavity: the mediastinum (heart as a rotated ellipsoid with
# epicardial fat, central column narrowing anteriorly, ascending/descending aorta and arch, great vessels, SVC, pulmonary trunk and
# arteries, pulmonary veins to the left atrium, oesophagus, trachea and main bronchi; all 30–40 HU in mediastinal fat), and below the
# diaphragm domes the liver (right, 60 HU), spleen/stomach (left, 45 HU), sometimes a gastric air bubble. Each lung is the implicit
# region $f_\sigma > 0$ ($\sigma = +1$ left, $-1$ right) of
#
# $$f_\sigma = \min\Big(f_{\text{cav}} - 0.5,\ \min\big(-f_{\text{med}},\ w - D_\sigma(u,v),\ W_\sigma^{\text{apex}}(u,v) - w,\ \sigma u - 2\big) + a\,N_{20}\Big) \tag{8}$$
#
# with $f_{\text{cav}}$ the depth inside the rib cage, $f_{\text{med}}$ the mediastinum (union of the structures above), $D_\sigma$ the
# diaphragm dome (right higher than left), $W^{\text{apex}}_\sigma = H\,(1 - q_\sigma^2)$ a rounded (paraboloid) apex ($q_\sigma$ the normalised
# in-plane distance to the apex axis) and $N_{20}$ a 20 mm random field; so lungs differ in size and shape between patients and
# between sides. The trachea (8.5 mm lumen) reaches the top slice. The $z$ extent is the lungs plus 6–16 mm above and below.
#
# **Parenchyma.** The lung background is $\mu_{\text{lung}} + g\,\text{post} + \sigma_p T$ ($T = N_3$ the texture, post $\in[0,1]$ the
# posterior position): the inspiration level sets $\mu_{\text{lung}}$ and the dependent gradient $g$ makes the posterior lung denser.
# In emphysematous patients lobular low-attenuation areas, $\alpha_e = \operatorname{clip}\big((E - e_\star)/0.3 + \tfrac12, 0, 1\big)$
# with $E = N_3' + 1.2\,\zeta$ (upper-lobe predominant) and $e_\star$ the quantile that leaves the share $f_e$ of the lung above it, are
# mixed toward −975 HU.
#
# **Lesions.** $K$ foci with centres $\boldsymbol\mu_k$ are drawn inside the lungs (inside one lung for unilateral disease) with probability
# $\propto e^{-d_{pl}/\lambda_c}\,(0.3 + \text{post})^{p_v}\,(1.25 - \zeta)^{p_z}$ ($d_{pl}$ the distance to the pleura, $\zeta = w/H$); the three
# exponents are drawn per patient, from the typical peripheral, posterior, basal distribution to a diffuse one. Each focus has a radius
# $r_{k,c}$ per axis, an amplitude $a_k\sim U(0.6, 1.2)$ and a profile in $q_k = \sum_c (x_c-\mu_{k,c})^2/r_{k,c}^2$, made irregular by the
# 8 mm field $N_8$ with the patient's irregularity $\beta$:
#
# $$\varphi_k = \begin{cases} e^{-q_k/2}\, e^{\beta N_8} & \text{patchy}\\ \exp\big(-\tfrac12\, q_k^2\, e^{-0.3\beta N_8}\big) & \text{rounded: flat top, steep edge}\\
# \exp\big(-\tfrac12\,((d_{pl} - d_k)/w_k)^2 - \tfrac12 q_k\big)\, e^{\beta N_8} & \text{band-like: radii} \times 1.8,\ d_k\sim U(2,9),\ w_k\sim U(2.5,5)\text{ mm}\\
# e^{-q_k/2}\, e^{\beta N_8} + 0.8\,\rho_k,\quad \rho_k = e^{-\frac12\left((\sqrt{q_k} - 1.4)/0.25\right)^2} & \text{reverse halo}\end{cases} \tag{9}$$
#
# The band-like profile is a curvilinear band at depth $d_k$ under the pleura (subpleural bands, perilobular opacities); the reverse
# halo is ground glass surrounded by a ring $\rho_k$ of consolidation. The lesion field is
#
# $$\Lambda = \Big[\sum_{k=1}^{K} a_k\,\varphi_k\Big]\big(0.3 + 0.7\,e^{-d_{pl}/\lambda_s}\big) \;+\; \kappa_b \max(\Lambda_0)\, e^{-d_{pl}/25}\,e^{0.5 N_8} \tag{10}$$
#
# ($\lambda_s$ pulls the density toward the pleura, $\kappa_b = 0, 0.02, 0.08, 0.2, 0.35$ adds a diffuse peripheral component in the severe
# bands, $\Lambda_0$ the bracket). The **label** is the top $f^\star$ quantile of $\Lambda$ inside the lungs,
#
# $$y = \mathbb 1[\Lambda \ge \tau]\;\mathbb 1[\text{lung}], \qquad \tau = Q_{1-f^\star}\big(\Lambda\,|\,\text{lung}\big) \tag{11}$$
#
# so the involvement equals $f^\star$ by construction and the label is infection inside the lungs only.
#
# **Lesion density.** Each focus has its own density offset $\delta_k\sim\mathcal N(0, s_f^2)$ (foci of one patient are at different stages),
# spread by the weighted mean $\bar\delta = \sum_k a_k\varphi_k\delta_k / \sum_k a_k\varphi_k$. The density rises from GGO to consolidation
# with $c = \max\big(\text{smoothstep}((\Lambda-\tau_c)/(0.15\tau_c) + \tfrac12),\ \max_k \rho_k\big)$, $\tau_c$ the quantile that makes the
# consolidated share of the lesion volume equal to the drawn share:
#
# $$\text{HU}_{\text{les}} = g_{\text{les}} + (\mu_c - g_{\text{les}})\,c + \sigma_T\,T\,(1 - 0.6c) + A_{cp}\, e^{-(B/0.18)^2}\, P_{cp}\,(1-c),
# \qquad g_{\text{les}} = \mu_g + \bar\delta + h\,N_8 \tag{12}$$
#
# with $h$ the patient's heterogeneity and $B = N_{4.5}$ whose zero set is a polygonal network (interlobular septa, cells of 1–2 cm) that
# makes **crazy paving** where the patchy weight $P_{cp}$ is on.
#
# **Margins.** With $\text{HU}_{\text{lung}}$ the lung the lesion replaces, the excess density $\Delta = \max(\text{HU}_{\text{les}} - \text{HU}_{\text{lung}},\ 1.5v)$
# (a labelled lesion is always visibly denser than its surroundings) enters with the opacity
#
# $$\alpha_{\text{les}} = \operatorname{clip}\Big(\frac{\Lambda/\tau - 1}{m} + \frac{v}{\Delta},\ 0,\ 1\Big), \qquad \text{HU} \leftarrow \text{HU}_{\text{lung}} + \alpha_{\text{les}}\,\Delta \tag{13}$$
#
# At the label boundary ($\Lambda = \tau$) the lesion is exactly $v$ HU above the surrounding lung: the label ends where the opacity fades
# to a just-visible level, as a reader traces it. Outside the label the opacity keeps fading over a width set by the fuzziness $m$
# (well-defined margins for small $m$, ill-defined GGO for large $m$), and inside the label it reaches the full density only $m(1 - v/\Delta)$
# above the threshold, so faint and fuzzy lesions have wide low-contrast rims.
#
# **HU mixing.** Inside the lungs the image is built by successive partial-volume mixing
#
# $$\text{HU} \leftarrow \text{HU} + \alpha\,(\text{HU}_{\text{new}} - \text{HU}) \tag{14}$$
#
# starting from the parenchyma (with emphysema), then the dependent density (a posterior-basal subpleural crescent whose opacity is a
# smoothstep of $\kappa_a e^{-d_{pl}/\lambda_a}\,\text{post}^2 e^{-\zeta/\zeta_a}(1 + 0.3N_6)$, from ground-glass-like −650 HU to atelectatic
# −100 HU, **not** labelled), the lesion (Eq. 13), fissures and plate atelectasis (Eq. 6, 0 HU / −150 HU), fibrotic scars (kinked
# tubes, Eq. 5, −150…0 HU, **not** labelled), and vessels and nodules (Eq. 5, 40 HU), which stay visible through GGO. The lungs are then
# mixed into the body with their occupancy, and the airways last (wall 20 HU, thicker with bronchial wall thickening; lumen −1000 HU:
# air bronchograms inside consolidation). Vessels, airway walls, fissures, dependent density, atelectasis, scars and nodules all sit in
# the lesion HU range, so a threshold does not give the label.
#
# **Scanner.** Per volume a gain $\gamma$ and offset $\delta$ (about air, so air stays at −1000 HU), artefacts $S$, white noise and the
# in-plane reconstruction filter $K = G_{\sigma_b} + k\,(G_{\sigma_b} - G_{\sigma_u} * G_{\sigma_b})$ (Gaussian blur, then unsharp masking with
# $\sigma_u = 1$ mm and $k = 0$ for soft kernels; it also shapes the noise texture):
#
# $$\text{HU}_{\text{out}} = \operatorname{round}\operatorname{clip}\Big(K * \Big[\gamma(\text{HU}+1000) - 1000 + \delta\operatorname{clip}\big(\tfrac{\gamma(\text{HU}+1000)}{1000}, 0, 1\big) + S + \frac{\sigma_n}{\lVert K\rVert}\,\varepsilon\Big],\ -1024,\ 3071\Big) \tag{15}$$
#
# where $\lVert K\rVert = (\sum K^2)^{1/2}$ of the discrete filter (`_filter_gain`) makes the noise standard deviation of the final image
# $\sigma_n$. **Streaks** $S = \sum_i \pm A_i\, e^{-\frac12 (d_i/(0.7\,\text{mm} + s_x))^2}$ inside the body ($d_i$ the distance to a line within
# ±20° of lateral) cover a block of slices. **Motion** (before the noise) replaces each slice $k$ below $\zeta_m H$ by
# $0.6\,\text{HU}_k + 0.25\,\text{HU}_k(\mathbf x - m_k\mathbf e) + 0.15\,\text{HU}_{k+1}$ with $m_k = m\,(1 - \max(w_k, 0)/(\zeta_m H))$: a ghost
# along the direction $\mathbf e$ and a craniocaudal smear that fade upward. Outside the body is air with the same noise. `hu` is rounded
# to integers, so the int16 file and the array agree exactly.
#
# **Speed.** Everything 3D and smooth is computed on the 3 mm grid $\mathcal G$ and interpolated only inside the boxes that need it
# (the cavity, the lungs); tubes are rendered in their own boxes; the 2D body is computed once and broadcast along $z$.
# The slice-thickness mix (mean ≈ 87 slices of $384^2$) and the $z$ extent (lungs + margins) keep the default data set
# (40 volumes, matrix 384) at about 1.6 s per volume on one core including the gzip writing (timings below).
#
# ### Why the patients differ: realism of the variation
#
# A segmentation network trained on three patients fails on a fourth when the fourth looks unlike the three; in real COVID-19 CT that
# comes from the diversity of patients, disease stages, scanners and protocols. Each between-patient variation of the phantom and
# what real CT shows:
#
# - **Inspiration level and dependent gradient** ($\mu_{\text{lung}}$ −900…−760 HU, $g$ 50–150 HU). Normal lung at full inspiration is
#   about −850 to −900 HU; short-of-breath patients often do not reach full inspiration and their lung is denser. Supine, the dependent
#   (posterior) lung is denser than the non-dependent lung because of gravity on blood and gas content. A dense posterior lung is the
#   first mimic of ground glass.
# - **Emphysema** (12 % of patients): low-attenuation areas near −950 to −1000 HU, centrilobular and upper-lobe predominant, frequent in
#   older patients and smokers, who are over-represented among hospitalised COVID-19 patients.
# - **GGO density over −750…−300 HU, at least 100 HU above the mean parenchyma.** Ground glass ranges from faint haze just above the
#   lung (early and mild disease, the findings most often missed) to dense ground glass next to consolidation; the floor keeps a labelled
#   lesion visible.
# - **Per-focus density and heterogeneity** ($s_f$, $h$, texture): lesions of one patient are at different stages (new ground glass next to
#   consolidating or resolving foci), and a single lesion is mottled rather than uniform.
# - **Margins** ($m$, $v$): ground-glass margins are often ill-defined; annotators trace the lesion to where the opacity is no longer
#   distinguishable, and that level differs between readers, so the boundary visibility $v$ is drawn per patient.
# - **Shape and pattern** (patchy / rounded / band-like / mixed, reverse halo): patchy multifocal ground glass is the commonest pattern;
#   rounded ground-glass opacities, subpleural curvilinear bands and perilobular (band-like) opacities of the organising phase, and
#   the reverse-halo (atoll) sign occur in a minority of patients.
# - **Number, size and distribution** ($K$, focus size, $\lambda_c$, $p_v$, $p_z$, unilateral): typically bilateral, peripheral, posterior and
#   basal, but mild disease can be a single small focus or one-sided, and some patients have diffuse or more central involvement.
# - **Consolidation share** grows with severity and disease stage; **crazy paving** (septal thickening over ground glass) is present in a
#   minority of patients and of variable strength.
# - **Distractors that are not infection.** Dependent density (from a faint ground-glass-like band to frank atelectasis at the posterior
#   bases) is very common on supine CT, especially in bedridden patients, and is not labelled as infection; plate (subsegmental)
#   atelectasis, fibrotic scars and parenchymal bands, bronchial wall thickening (smokers, asthma, airway infection), vessels, nodules
#   and fissures all share the lesion HU range.
# - **Scanner and reconstruction.** Both sharp (lung) and soft (mediastinal) kernels are used; sharp kernels enhance edges and give
#   fine-grained noise. Low-dose protocols were common for COVID-19, so the noise reaches 80 HU with sharp kernels (10–40 HU soft).
#   Calibration differs between scanners by a few tens of HU. Dyspnoeic patients often cannot hold their breath (motion ghosts and
#   smearing at the bases, next to the heart), and arms-down acquisitions of intensive-care patients give photon-starvation streaks.
# - **Severity mix.** The annotated volumes of COVID-19-20 and MosMedData all show lesions, so the default set has no lesion-free volume
#   (see *Severity bands*); lesion-free volumes in a 4-volume validation set made the choice of the best epoch depend on whether a
#   checkpoint predicted nothing at all on one volume.

# %%
#| export
def phantom_volume(seed: int, # volume seed (same seed -> bit-identical arrays)
                   matrix: int = 384, # in-plane matrix size (Y = X = matrix)
                   *,
                   severity: int | None = None, # force the CT severity band 0..4 (None: drawn)
                   thickness: float | None = None, # force the slice thickness in mm (None: drawn)
                   flip_x: bool | None = None, # force storing x toward the patient's right (None: drawn)
                   p_flip: float = 0.1, # probability of a flipped x axis when `flip_x` is None
                   band_probs: tuple = BAND_PROBS, # probabilities of CT-0..CT-4
                  ) -> dict: # hu [Z,Y,X] float32, label/lung [Z,Y,X] uint8, spacing (sz,sy,sx), affine 4x4, meta
    "One procedural chest CT with COVID-19 lesions, its infection label and ground-truth lungs, in (z, y, x) order."
    t_start = time.perf_counter()
    P = _draw_params(seed, matrix, severity, thickness, flip_x, p_flip, band_probs)
    kids = np.random.SeedSequence([_SALT, int(seed)]).spawn(5)
    r_ana, r_les, r_ves, r_noise = (np.random.default_rng(k) for k in kids[1:])
    M, s, sz, H, A = P['matrix'], P['pixel_mm'], P['thickness'], P['H'], P['A']
    k_ = A / 125.0
    f32 = np.float32
    # ---- voxel grids (patient coordinates, mm) ----
    uf = (np.arange(M) - (M - 1) / 2) * s - P['u_c']          # x index -> toward the patient's left
    vf = (np.arange(M) - (M - 1) / 2) * s - P['v_c']          # y index -> posterior
    w0 = -P['m_below']; Z = int(np.ceil((H + P['m_above'] - w0) / sz)) + 1
    wf = w0 + np.arange(Z) * sz                               # z index -> superior; lung base at w = 0
    # ---- 2D body on a 1 mm grid: signed distance to the skin, wall layers ----
    g2u = np.arange(uf[0] - 2, uf[-1] + 3, 1.0); g2v = np.arange(vf[0] - 2, vf[-1] + 3, 1.0)
    U2, V2 = g2u[None, :], g2v[:, None]
    Bv = np.where(V2 < 0, P['B_ant'], P['B_post']); pv = np.where(V2 < 0, P['p_ant'], P['p_post'])
    rho = (np.abs(U2 / A) ** pv + np.abs(V2 / Bv) ** pv) ** (1 / pv)
    body = rho < 1
    sd2 = np.where(body, ndi.distance_transform_edt(body) - 0.5, 0.5 - ndi.distance_transform_edt(~body))
    phi2 = np.arctan2(U2, V2)
    b1, b2, b3, b4, mus = _wall_layers(phi2, P)
    _, b2_0, b3_0, b4_0, mus_0 = (float(x) for x in _wall_layers(np.array(0.0), P))
    b4_pi = float(_wall_layers(np.array(np.pi), P)[3]); b2_pi = float(_wall_layers(np.array(np.pi), P)[1])
    b4_lat = float(_wall_layers(np.array(np.pi / 2), P)[3])
    A_c = A - b4_lat; v_front = -P['B_ant'] + b4_pi; v_back = P['B_post'] - b4_0
    r_vb = P['r_vb']; r_c = 7.0 * np.sqrt(k_)
    v_canal = P['B_post'] - b2_0 - 0.6 * mus_0; v_vb = v_canal - r_c - 3 - r_vb
    D_ap = (v_vb - r_vb) - v_front; ap_half = 0.5 * (v_back - v_front); v_mid = 0.5 * (v_back + v_front)
    sd_block = np.maximum(r_vb + 2 - np.hypot(U2, V2 - v_vb), np.minimum(r_vb + 4 - np.abs(U2), V2 - v_vb))
    fcav2 = np.minimum(sd2 - b4, -sd_block)
    def at2(field, vv, uu):  # sample a 1 mm-grid field at (vv, uu) mm (broadcast 2D)
        VV, UU = np.broadcast_arrays((vv - g2v[0])[:, None], (uu - g2u[0])[None, :])
        return ndi.map_coordinates(field, [VV, UU], order=1, mode='nearest').astype(f32)
    # ---- full-resolution 2D base slice: skin, fat, muscle, spine, sternum, table ----
    d = at2(sd2, vf, uf); fcav_f = at2(fcav2, vf, uf)
    uu, vv = uf[None, :].astype(f32), vf[:, None].astype(f32)
    phi = np.arctan2(uu, vv)
    L1, L2_, L3, L4, MU = _wall_layers(phi, P)
    occ = lambda x: np.clip(0.5 + x / s, 0, 1).astype(f32)
    hu2 = np.full((M, M), -1000.0, f32)
    hu2 += (P['skin_hu'] + 1000) * occ(d)
    hu2 += (P['fat_hu'] - P['skin_hu']) * occ(d - L1)
    hu2 += (P['mus_hu'] - P['fat_hu']) * occ(d - L2_)
    hu2 += (P['fat_hu'] - P['mus_hu']) * 0.7 * np.clip(1 - np.abs(d - L2_ - 0.45 * MU) / (0.6 + s / 2), 0, 1)
    # table: a curved plate under the patient
    v_tab = P['B_post'] + P['table_gap'] + 3 - uu ** 2 / (2 * 900.0)
    hu2 += (120 + 1000) * np.clip(1 - np.abs(vv - v_tab) / (2.0 + s / 2), 0, 1) * (np.abs(uu) < 0.9 * A) * (d < 0)
    bone = P['bone']
    sd_vb = r_vb - np.hypot(uu, vv - v_vb)
    dcan = np.hypot(uu, vv - v_canal)
    sd_post = np.minimum(np.minimum(r_c + 4 - dcan, dcan - r_c), vv - (v_canal - 0.5 * r_c))
    for a_, b_, rr in [((0, v_canal + r_c + 2, 0), (0, P['B_post'] - b2_0 - 6, 0), 3.0),
                       ((0, v_canal, 0), (0, v_canal + 6, r_vb + 14), 3.5), ((0, v_canal, 0), (0, v_canal + 6, -r_vb - 14), 3.5)]:
        sd_post = np.maximum(sd_post, _capsule_sdf(0.0, vv, uu, a_, b_, rr))
    hu2 += (15 - hu2) * occ(r_c - dcan)
    hu2 += (550 * bone - hu2) * occ(sd_post)
    hu2_novb = hu2.copy()
    vb_hu = 220 * bone + (800 - 220) * bone * np.clip(1 - sd_vb / 1.5, 0, 1)
    a_vb = occ(sd_vb)
    hu2 += (vb_hu - hu2) * a_vb
    v_st = -P['B_ant'] + b2_pi + 6
    q_st = np.hypot(uu / (14 * k_), (vv - v_st) / 5.5)
    sd_st = (1 - q_st) * 5.5
    hu2 += (300 * bone + 400 * bone * np.clip(1 - sd_st / 1.2, 0, 1) - hu2) * occ(sd_st)
    hu = np.empty((Z, M, M), f32); hu[:] = hu2
    # intervertebral discs
    vb_idx = np.flatnonzero(a_vb > 0)
    disc = ((wf - P['spine_phase']) % P['spine_pitch']) < 0.2 * P['spine_pitch']
    if vb_idx.size:
        hd = hu2_novb.ravel()[vb_idx] + (90 - hu2_novb.ravel()[vb_idx]) * a_vb.ravel()[vb_idx]
        for kk in np.flatnonzero(disc): hu[kk].ravel()[vb_idx] = hd
    # ribs: a helical band pattern in the rib layer, descending anteriorly
    ring = (d > L3 - 1) & (d < L4 + 1) & (np.abs(uu) > r_vb + 10) & ~((vv < 0) & (np.abs(uu) < 22 * k_))
    jj, ii = np.nonzero(ring)
    if jj.size:
        ph = phi[jj, ii]; dr = d[jj, ii]
        e_r = np.minimum(dr - L3[jj, ii], L4[jj, ii] - dr)
        g = P['rib_drop'] * (np.abs(ph) / np.pi) ** 1.3
        t = (wf[:, None] + g[None, :] - P['rib_phase']) % P['rib_pitch']
        h_r = P['rib_h']
        e_z = np.where(t < h_r, np.minimum(t, h_r - t), -np.minimum(t - h_r, P['rib_pitch'] - t))
        a_r = np.clip(0.5 + e_z / max(sz, s), 0, 1) * np.clip(0.5 + e_r / s, 0, 1)[None, :]
        e = np.minimum(e_z, e_r[None, :])
        rib_hu = np.where(np.abs(ph) > 0.8 * np.pi, 130.0, (230 + 620 * np.clip(1 - e / 1.5, 0, 1)) * bone)
        cur = hu[:, jj, ii]
        hu[:, jj, ii] = cur + (rib_hu - cur) * a_r
    # ---- coarse grid G1 (mm) for 3D shapes and random fields ----
    cs = max(3.0, 1.5 * s)
    g1u = uf[0] - cs + np.arange(int(np.ceil((uf[-1] - uf[0]) / cs)) + 3) * cs
    g1v = vf[0] - cs + np.arange(int(np.ceil((vf[-1] - vf[0]) / cs)) + 3) * cs
    g1w = w0 - cs + np.arange(int(np.ceil((wf[-1] - w0) / cs)) + 3) * cs
    G = (g1w, g1v, g1u); shp1 = (len(g1w), len(g1v), len(g1u))
    W, V, U = g1w[:, None, None], g1v[None, :, None], g1u[None, None, :]
    fcav1 = at2(fcav2, g1v, g1u)[None]
    # mediastinum: heart, central column, great vessels, airways (union of signed distances)
    hc = P['heart']
    h_R = P['dome_R'] * H; h_L = h_R - P['dome_drop'] * H
    a_h, b_h, c_h = 0.40 * A_c * hc, 0.45 * D_ap * hc, 0.24 * H * hc
    heart_c = (0.4 * (h_R + h_L) + 0.5 * c_h, v_front + 0.9 * b_h + 3, P['heart_left'] * A_c)
    f_heart = _ellipsoid_sdf(W, V, U, heart_c, (c_h, b_h, a_h), P['heart_rot'])
    u_m, m_w = -0.03 * A_c, P['med_w'] * A_c
    m_v = m_w * (0.35 + 0.65 * np.clip((V - v_front) / (0.5 * D_ap), 0, 1))
    f_med = np.minimum(np.minimum(m_v - np.abs(U - u_m), V - (v_front - 5)), v_vb - V) + 0 * W
    f_med = np.maximum(np.maximum(f_med, f_heart + 2), -45.0).astype(f32)  # clamp: capsules are evaluated within 45 mm
    inner = np.full(shp1, P['fat_hu'] + 10, f32)
    r_ao, r_es, r_tr = 12 * k_, 7 * np.sqrt(k_), 8.5 * np.sqrt(k_)
    v_es = v_vb - r_vb - r_es - 2; u_es = 0.25 * r_vb
    v_tr = v_es - r_es - r_tr - 3; u_tr = -0.04 * A_c
    u_da, v_da = 0.6 * r_vb + r_ao, v_vb - 0.2 * r_vb
    u_as, v_as = -0.12 * A_c, v_front + 0.38 * D_ap
    w_arch = P['w_arch'] * H; w_car = w_arch - P['carina_drop']; w_hil = w_car - P['hilum_drop']
    w_top, w_bot = wf[-1] + 30, w0 - 30
    la = (heart_c[0] + 0.3 * c_h, heart_c[1] + 0.6 * b_h, heart_c[2] - 0.2 * a_h)  # left atrium
    roots = {}
    for sg in (1, -1):
        roots[('art', sg)] = np.array([w_hil, v_tr + 6, sg * (m_w + 6)])
        roots[('vein', sg)] = np.array([w_hil - 25, v_tr + 12, sg * (m_w + 6)])
        roots[('air', sg)] = np.array([w_hil + 6, v_tr + 12, sg * (m_w + 4)])
    bif = (w_car - 10, v_tr - r_tr - 4, 0.06 * A_c)
    caps = [((w_bot, v_da, u_da), (w_arch, v_da, u_da), r_ao, 40),
            ((heart_c[0] + 0.2 * c_h, v_as, u_as), (w_arch, v_as, u_as), r_ao, 40),
            ((w_arch, v_as, u_as), (w_arch, v_da, u_da), r_ao, 40),
            ((heart_c[0] + 0.3 * c_h, v_as + 4, u_as - r_ao - 9), (w_top, v_as + 4, u_as - r_ao - 9), 9 * np.sqrt(k_), 40),
            ((heart_c[0] + 0.45 * c_h, v_front + 0.22 * D_ap, 0.12 * A_c), bif, 12 * k_, 40),
            (bif, roots[('art', 1)], 9 * k_, 40), (bif, roots[('art', -1)], 9 * k_, 40),
            (roots[('vein', 1)], la, 7 * k_, 40), (roots[('vein', -1)], la, 7 * k_, 40),
            ((w_bot, v_es, u_es), (w_top, v_es, u_es), r_es, 35),
            ((w_top, v_tr, u_tr), (w_car, v_tr, u_tr), r_tr + 2, 30),
            ((w_car, v_tr, u_tr), roots[('air', 1)], 6.5 * np.sqrt(k_), 30),
            ((w_car, v_tr, u_tr), roots[('air', -1)], 7.0 * np.sqrt(k_), 30)]
    for fr, du in ((0.15, -0.1), (0.45, 0.02), (0.7, 0.22)):
        p = (w_arch, v_as + fr * (v_da - v_as), u_as + fr * (u_da - u_as))
        caps.append((p, (w_top, p[1], p[2] + du * A_c * 0.5), 6 * np.sqrt(k_), 40))
    # abdomen below the diaphragm domes (liver right, spleen/stomach left)
    def dome(sg, VV, UU):
        q = 1 - ((UU - sg * 0.45 * A_c) / (0.8 * A_c)) ** 2 - ((VV - (v_front + 0.45 * (v_back - v_front))) / (0.8 * ap_half)) ** 2
        return (h_R if sg < 0 else h_L) * np.clip(q, 0, 1) ** 0.7
    D_L, D_R = dome(1, V, U), dome(-1, V, U)
    D_side = np.where(U > 0, D_L, D_R)
    a_abd = np.clip(0.5 + (D_side - W) / cs, 0, 1)
    inner += (np.where(U > 0, 45.0, 60.0) - inner) * a_abd
    if P['gastric']:
        gsd = _ellipsoid_sdf(W, V, U, (h_L - 20, v_front + 0.35 * D_ap, 0.5 * A_c), (12, 20, 24))
        inner += (-1000 - inner) * np.clip(0.5 + gsd / cs, 0, 1) * a_abd
    inner += (40 - inner) * np.clip(0.5 + (f_heart - 3) / cs, 0, 1)
    for a_, b_, rr, hv in caps:
        res = _union_capsule(f_med, G, a_, b_, rr + 2)
        if res is not None:
            sl, sdf = res
            inner[sl] += (hv - inner[sl]) * np.clip(0.5 + (sdf - 2) / cs, 0, 1)
    # lungs: cavity ∩ not mediastinum ∩ above the diaphragm ∩ below the apex dome, + smooth deformation
    N_shape = _grf_fast(r_ana, shp1, 20.0 / cs)
    f_lung = {}
    for sg in (1, -1):
        q2 = ((U - sg * P['apex_u'] * A_c) / (1.2 * A_c)) ** 2 + ((V - (v_mid + P['apex_v'] * ap_half)) / (1.15 * ap_half)) ** 2
        apex = H * (1 - q2)
        g = np.minimum(np.minimum(-f_med, W - (D_L if sg > 0 else D_R)), np.minimum(apex - W, sg * U - 2.0))
        f_lung[sg] = np.minimum(fcav1 - 0.5, g + P['lung_amp'] * N_shape).astype(f32)
    mL, mR = f_lung[1] > 0, f_lung[-1] > 0
    dpl = np.maximum(np.maximum(f_lung[1], f_lung[-1]), 0)
    post = np.clip((V - v_front) / (v_back - v_front), 0, 1)
    zeta = np.clip(W / H, 0, 1)
    # ---- lesion field Λ on G1 ----
    band = P['band']; foci = []; shapes = []
    if band > 0:
        N_les = _grf_fast(r_les, shp1, 8.0 / cs)
        lung1 = {0: mL | mR, 1: mL, -1: mR}[P['unilateral']]
        wgt = (np.exp(-dpl / P['periph']) * (0.3 + post) ** P['post_bias'] * (1.25 - zeta) ** P['base_bias'])[lung1].astype(np.float64)
        idx = np.flatnonzero(lung1)
        pick = r_les.choice(idx, size=P['n_foci'], p=wgt / wgt.sum())
        Lam = np.zeros(shp1, f32); Num = np.zeros(shp1, f32); Ring = np.zeros(shp1, f32)
        dom = PATTERNS.index(P['pattern'])
        for n_ in pick:
            c = np.array([g1w[n_ // (shp1[1] * shp1[2])], g1v[(n_ // shp1[2]) % shp1[1]], g1u[n_ % shp1[2]]])
            c = c + r_les.uniform(-cs / 2, cs / 2, 3)
            rk = P['focus_r'] * np.exp(r_les.normal(0, 0.4)) * np.exp(r_les.normal(0, 0.25, 3))
            amp, dk, x_ = r_les.uniform(0.6, 1.2), r_les.normal(0, 1) * P['focus_sd'], r_les.uniform()
            # focus shape: the patient's dominant pattern 70 % of the time ('mixed': any), reverse halo 4 %
            shp_ = dom if (dom < 3 and x_ < 0.7) else int(r_les.integers(0, 3))
            if x_ > 0.96 and band > 1: shp_ = 3
            if shp_ == 2: rk = rk * np.array([1.8, 1.8, 1.8])        # bands: long, thin, following the pleura
            foci.append(c); shapes.append(PATTERNS[shp_] if shp_ < 3 else 'halo')
            sl = tuple(slice(*_box(gg, cc - 4 * rr, cc + 4 * rr)) for gg, cc, rr in zip(G, c, rk))
            q = (((g1w[sl[0]] - c[0]) / rk[0]) ** 2)[:, None, None] + (((g1v[sl[1]] - c[1]) / rk[1]) ** 2)[None, :, None] \
                + (((g1u[sl[2]] - c[2]) / rk[2]) ** 2)[None, None, :]
            Nk = N_les[sl]
            if shp_ == 1:      # rounded: flat top, steep edge, little irregularity
                g = np.exp(-0.5 * q ** 2 * np.exp(-0.3 * P['deform'] * Nk))
            elif shp_ == 2:    # band-like: a subpleural curvilinear band at depth d0, thickness wb
                d0, wb = r_les.uniform(2, 9), r_les.uniform(2.5, 5.0)
                g = np.exp(-0.5 * ((dpl[sl] - d0) / wb) ** 2 - 0.5 * q) * np.exp(P['deform'] * Nk)
            else:              # patchy (and the GGO centre of a reverse halo)
                g = np.exp(-0.5 * q) * np.exp(P['deform'] * Nk)
            g = (amp * g).astype(f32)
            if shp_ == 3:      # reverse halo: a ring of consolidation around the ground glass
                ring = np.exp(-0.5 * ((np.sqrt(q) - 1.4) / 0.25) ** 2).astype(f32)
                np.maximum(Ring[sl], ring, out=Ring[sl]); g += amp * 0.8 * ring
            Lam[sl] += g; Num[sl] += g * f32(dk)
        Off = Num / np.maximum(Lam, 1e-3 * max(float(Lam.max()), 1e-6)); del Num
        Lam *= (0.3 + 0.7 * np.exp(-dpl / P['subpleural']))
        kappa = (0, 0.02, 0.08, 0.2, 0.35)[band]
        Lam += kappa * Lam.max() * np.exp(-dpl / 25.0) * np.exp(0.5 * N_les)
        T = _grf(r_les, shp1, 1.0)
        if P['crazy'] > 0:
            Bcp = _grf(r_les, shp1, 4.5 / cs)
            CPw = (P['crazy'] * _smoothstep(_grf_fast(r_les, shp1, 15.0 / cs) + 0.5)).astype(f32)
    else:
        T = _grf(r_les, shp1, 1.0)
    A_at = None
    if P['atel'] > 0:
        N_at = _grf_fast(r_ana, shp1, 6.0 / cs)
        A_at = (P['atel'] * np.exp(-dpl / P['atel_lambda']) * post ** 2 * np.exp(-zeta / P['atel_zeta']) * (1 + 0.3 * N_at)).astype(f32)
    E = None
    if P['emph'] > 0:   # emphysema: lobular low-attenuation areas, upper-lobe predominant
        E = (_grf(r_ana, shp1, 1.0) + 1.2 * zeta).astype(f32)
        e_thr = float(np.quantile(E[mL | mR], 1 - P['emph']))
    # ---- full-resolution assembly: cavity contents ----
    a_cav = occ(fcav_f)
    rows, cols = np.flatnonzero(a_cav.any(1)), np.flatnonzero(a_cav.any(0))
    cy0, cy1, cx0, cx1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    pos_z = (wf - g1w[0]) / cs
    lerp = _Lerp([pos_z, (vf[cy0:cy1] - g1v[0]) / cs, (uf[cx0:cx1] - g1u[0]) / cs], shp1)
    hb = hu[:, cy0:cy1, cx0:cx1]
    hb += a_cav[cy0:cy1, cx0:cx1] * (lerp(inner) - hb)
    # ---- lungs (inside their bounding box) ----
    lm = np.flatnonzero((mL | mR).any(0).any(1)); ln = np.flatnonzero((mL | mR).any(0).any(0))
    y0, y1 = _box(vf, g1v[max(lm[0] - 2, 0)], g1v[min(lm[-1] + 2, shp1[1] - 1)])
    x0, x1 = _box(uf, g1u[max(ln[0] - 2, 0)], g1u[min(ln[-1] + 2, shp1[2] - 1)])
    lerp = _Lerp([pos_z, (vf[y0:y1] - g1v[0]) / cs, (uf[x0:x1] - g1u[0]) / cs], shp1)
    aL = occ(lerp(f_lung[1])); aR = occ(lerp(f_lung[-1]))
    lung_b = np.where(aL >= 0.5, 1, np.where(aR >= 0.5, 2, 0)).astype(np.uint8)
    alung = np.minimum(aL + aR, 1)
    vb_ = vf[y0:y1][None, :, None].astype(f32); ub_ = uf[x0:x1][None, None, :].astype(f32)
    wb_ = wf[:, None, None].astype(f32)
    postf = np.clip((vb_ - v_front) / (v_back - v_front), 0, 1)
    Tf = lerp(T)
    hl = (P['mu_lung'] + P['gravity'] * postf + P['tex_lung'] * Tf).astype(f32)
    if E is not None:
        a_e = np.clip((lerp(E) - e_thr) / 0.3 + 0.5, 0, 1)
        hl += a_e * (-975 + 10 * Tf - hl); del a_e
    if A_at is not None:
        a_at = _smoothstep((lerp(A_at) - 0.5) / 0.25 + 0.5)
        hl += a_at * (P['atel_hu'] + 30 * Tf - hl)
    label_b = np.zeros(lung_b.shape, np.uint8); tau = tau_c = 0.0
    if band > 0:
        Lf = lerp(Lam); inl = lung_b > 0
        vals = Lf[inl]
        tau = float(np.quantile(vals, 1 - P['f_target']))
        lab = (Lf >= tau) & inl
        label_b[lab] = 1
        tau_c = float(np.quantile(Lf[lab], 1 - P['cons'])) if P['cons'] > 0 and lab.any() else np.inf
        cf = _smoothstep((Lf - tau_c) / (0.15 * tau_c) + 0.5) if np.isfinite(tau_c) else f32(0)
        if 'halo' in shapes: cf = np.maximum(cf, lerp(Ring))
        g_hu = P['mu_ggo'] + lerp(Off) + P['ggo_het'] * lerp(N_les)
        hles = g_hu + (P['mu_cons'] - g_hu) * cf + P['tex_ggo'] * Tf * (1 - 0.6 * cf)
        del g_hu
        if P['crazy'] > 0:
            hles += P['crazy_hu'] * np.exp(-(lerp(Bcp) / 0.18) ** 2) * lerp(CPw) * (1 - cf)
        np.maximum(hles, hl + 1.5 * P['vis_hu'], out=hles)   # a labelled lesion is visibly denser than the lung it replaces
        hles -= hl                                           # excess density; the label boundary is where it fades to vis_hu
        a_les = np.clip((Lf / tau - 1) / P['margin'] + P['vis_hu'] / hles, 0, 1)
        hl += a_les * hles
        del Lf, a_les, hles
    # fissures (thin sheets) and plate atelectasis: occupancy t/W * tri(d/W), W = projected voxel width
    def sheet(dist, n, thick):
        Wd = abs(n[0]) * sz + (abs(n[1]) + abs(n[2])) * s + 0.3
        return min(1.0, thick / Wd) * np.clip(1 - np.abs(dist) / Wd, 0, 1)
    for sg, w_post, key in ((1, 0.62, 'fissure_L'), (-1, 0.58, 'fissure_R')):
        if not P[key]: continue
        kf = (w_post - 0.04) * H / (v_back - v_front - 0.1 * 2 * ap_half)
        kl = -0.6 * kf * sg                                    # runs antero-lateral in axial slices
        nrm = np.sqrt(1 + kf ** 2 + kl ** 2)
        dist = (wb_ - w_post * H - kf * (vb_ - v_back) - kl * (ub_ - sg * m_w)) / nrm
        hl += sheet(dist, (1 / nrm, kf / nrm, kl / nrm), 0.8) * (aL if sg > 0 else aR) * (0 - hl)
        if sg < 0 and P['fissure_h']:
            w_hf = 0.55 * H
            hl += sheet(wb_ - w_hf, (1, 0, 0), 0.8) * aR * (w_hf > w_post * H + kf * (vb_ - v_back) + kl * (ub_ - sg * m_w)) * (0 - hl)
    lung_idx = np.flatnonzero(mL | mR)
    def lung_point(rng, min_d=5.0, max_zeta=1.0):
        for _ in range(100):
            n_ = lung_idx[rng.integers(len(lung_idx))]
            iz, iy, ix = n_ // (shp1[1] * shp1[2]), (n_ // shp1[2]) % shp1[1], n_ % shp1[2]
            if dpl[iz, iy, ix] >= min_d and zeta[iz, 0, 0] <= max_zeta: break
        return np.array([g1w[iz], g1v[iy], g1u[ix]]) + rng.uniform(-cs / 2, cs / 2, 3)
    for _ in range(P['n_plates']):
        c = lung_point(r_ves, 6.0, 0.45)
        nrm = np.array([1.0, r_ves.normal(0, 0.3), r_ves.normal(0, 0.3)]); nrm /= np.linalg.norm(nrm)
        Rp, tp = r_ves.uniform(15, 35), r_ves.uniform(1.5, 3.0)
        dw, dv, du = wb_ - c[0], vb_ - c[1], ub_ - c[2]
        dist = dw * nrm[0] + dv * nrm[1] + du * nrm[2]
        perp = np.sqrt(np.maximum(dw ** 2 + dv ** 2 + du ** 2 - dist ** 2, 0))
        hl += sheet(dist, nrm, tp) * _smoothstep((Rp - perp) / 5.0) * (-150 - hl)
    if P['n_scars']:   # fibrotic scars: thin, kinked, dense bands (parenchymal bands), not labelled
        sc = [[], [], [], []]
        for _ in range(P['n_scars']):
            p0 = lung_point(r_ves, 3.0); dv = r_ves.normal(0, 1, 3); dv /= np.linalg.norm(dv)
            for _ in range(int(r_ves.integers(2, 4))):
                L = r_ves.uniform(6, 18); rr = r_ves.uniform(0.6, 1.8)
                p1 = p0 + L * dv
                for lst, val in zip(sc, (p0, p1, rr, rr * 0.8)): lst.append(val)
                dv = dv + r_ves.normal(0, 0.5, 3); dv /= np.linalg.norm(dv); p0 = p1
        Socc = np.zeros(hl.shape, f32)
        _render_tubes(Socc, wf, vf[y0:y1], uf[x0:x1], tuple(np.asarray(x, float) for x in sc), s, sz)
        hl += Socc * (P['scar_hu'] - hl); del Socc
    # vessel trees (artery + vein per lung), nodules: occupancy V, mixed toward blood HU
    Vocc = np.zeros(hl.shape, f32)
    segs = [[], [], [], []]
    for sg, m in ((1, mL), (-1, mR)):
        idx = np.flatnonzero(m & (f_lung[sg] > 3))
        if idx.size < 8: continue
        n_att = int(np.clip(round(idx.size * cs ** 3 / 11.5 ** 3), 8, 6000))
        for kind, r0 in (('art', 6.5 * np.sqrt(k_)), ('vein', 6.0 * np.sqrt(k_))):
            sel = r_ves.choice(idx, size=min(n_att, idx.size), replace=False)
            pts = np.stack([g1w[sel // (shp1[1] * shp1[2])], g1v[(sel // shp1[2]) % shp1[1]], g1u[sel % shp1[2]]], 1)
            pts = pts + r_ves.uniform(-cs / 2, cs / 2, pts.shape)
            for lst, arr in zip(segs, _grow_tree(r_ves, roots[(kind, sg)], pts, r0)): lst.append(arr)
    n_nod = P['n_nodules'] if lung_idx.size else 0
    for _ in range(n_nod):
        c = lung_point(r_ves, 8.0); rn = r_ves.uniform(2.0, 5.0)
        for lst, arr in zip(segs, (c[None], c[None], [rn], [rn])): lst.append(np.asarray(arr, float))
    if segs[0]:
        a_, b_, ra, rb = (np.concatenate(x) for x in segs)
        keep = np.maximum(ra, rb) >= 0.12 * s
        _render_tubes(Vocc, wf, vf[y0:y1], uf[x0:x1], (a_[keep], b_[keep], ra[keep], rb[keep]), s, sz)
        n_seg = int(keep.sum())
    else:
        n_seg = 0
    hl += Vocc * (40 - hl)
    del Vocc
    hb = hu[:, y0:y1, x0:x1]
    hb += alung * (hl - hb)
    del hl, aL, aR, alung
    # airways: trachea, main bronchi, a few generations per lung (wall then air lumen)
    aw = [[(w_top, v_tr, u_tr)], [(w_car, v_tr, u_tr)], [r_tr], [r_tr * 0.95]]
    for sg, rb0 in ((1, 5.5), (-1, 6.2)):
        rb0 *= np.sqrt(k_)
        for lst, val in zip(aw, ((w_car, v_tr, u_tr), roots[('air', sg)], rb0, rb0)): lst.append(val)
        idx = np.flatnonzero((mL if sg > 0 else mR) & (f_lung[sg] > 6))
        if idx.size >= 4:
            sel = r_ves.choice(idx, size=min(idx.size, max(4, int(round(idx.size * cs ** 3 / 42.0 ** 3)))), replace=False)
            pts = np.stack([g1w[sel // (shp1[1] * shp1[2])], g1v[(sel // shp1[2]) % shp1[1]], g1u[sel % shp1[2]]], 1)
            A_, B_, RA, RB = _grow_tree(r_ves, roots[('air', sg)], pts, rb0, rmin=1.2, twig=(2.0, 6.0))
            keep = RB > 0.5
            for lst, arr in zip(aw, (A_[keep], B_[keep], RA[keep], RB[keep])): lst.extend(list(arr))
    a_, b_, ra, rb = (np.asarray(x, float) for x in aw)
    lo = np.minimum(a_, b_).min(0) - 12; hi = np.maximum(a_, b_).max(0) + 12
    (k0, k1), (j0, j1), (i0, i1) = _box(wf, lo[0], hi[0]), _box(vf, lo[1], hi[1]), _box(uf, lo[2], hi[2])
    if k1 > k0 and j1 > j0 and i1 > i0:
        wall = np.zeros((k1 - k0, j1 - j0, i1 - i0), f32); lumen = np.zeros_like(wall)
        tw = P['bronchial_wall']          # bronchial wall thickening (airway inflammation, smokers, asthma)
        _render_tubes(wall, wf[k0:k1], vf[j0:j1], uf[i0:i1], (a_, b_, ra * (1.2 + 0.3 * tw) + 0.6 + 0.8 * tw,
                                                              rb * (1.2 + 0.3 * tw) + 0.6 + 0.8 * tw), s, sz)
        _render_tubes(lumen, wf[k0:k1], vf[j0:j1], uf[i0:i1], (a_, b_, ra, rb), s, sz)
        hb = hu[k0:k1, j0:j1, i0:i1]
        hb += wall * (20 - hb); hb += lumen * (-1000 - hb)
        del wall, lumen
    # ---- scanner: gain/offset, correlated noise (blurred with the reconstruction kernel) ----
    sig_px, sig_u, k_sh = P['blur_mm'] / s, 1.0 / s, P['sharpen']
    sig_pre = P['noise_hu'] / _filter_gain(sig_px, k_sh, sig_u)
    hu += 1000; hu *= f32(P['hu_gain'])                       # gain and offset about air: air stays at -1000
    hu += np.clip(hu, 0, 1000) * f32(P['hu_offset'] / 1000); hu -= 1000
    n_mot = 0
    if P['motion_mm'] > 0:   # breathing/cardiac motion at the bases: a ghost and craniocaudal smear, fading upward
        ks = np.flatnonzero(wf < P['motion_zeta'] * H)
        cth, sth = np.cos(P['motion_dir']), np.sin(P['motion_dir'])
        orig = hu[ks].copy(); n_mot = len(ks)
        for n_, kk in enumerate(ks):
            m_ = P['motion_mm'] / s * (1 - max(wf[kk], 0) / (P['motion_zeta'] * H))
            if m_ < 0.3: continue
            sub = orig[n_, y0:y1, x0:x1]
            gh = ndi.shift(sub, (m_ * cth, m_ * sth), order=1, mode='nearest')
            nb = orig[min(n_ + 1, len(ks) - 1), y0:y1, x0:x1] if n_ + 1 < len(ks) else hu[min(kk + 1, Z - 1), y0:y1, x0:x1]
            hu[kk, y0:y1, x0:x1] = 0.6 * sub + 0.25 * gh + 0.15 * nb
        del orig
    n_str = 0
    if P['n_streaks']:   # photon-starvation streaks (arms down, large patients): thin, roughly lateral, bright and dark
        S2 = np.zeros((M, M), f32)
        for _ in range(P['n_streaks']):
            ang, off = r_noise.uniform(-0.35, 0.35), r_noise.uniform(-0.7, 0.7) * P['B_post']
            dist = (vv - off) * np.cos(ang) - uu * np.sin(ang)
            S2 += (1 if r_noise.uniform() < 0.5 else -1) * P['streak_hu'] * r_noise.uniform(0.5, 1) * np.exp(-0.5 * (dist / (0.7 + s)) ** 2)
        S2 *= (d > 0)
        zs = int(r_noise.integers(0, max(Z // 2, 1))); ze = int(min(Z, zs + max(3, r_noise.uniform(0.3, 1.0) * Z)))
        hu[zs:ze] += S2; n_str = ze - zs; del S2
    for z0c in range(0, Z, 16):
        ch = hu[z0c:z0c + 16]
        ch += r_noise.standard_normal(ch.shape, dtype=f32) * f32(sig_pre)
        tmp = ndi.gaussian_filter1d(ch, sig_px, axis=2, mode='nearest')
        ndi.gaussian_filter1d(tmp, sig_px, axis=1, output=ch, mode='nearest')
        if k_sh > 0:   # sharp kernel: unsharp masking (edge overshoot, high-frequency noise)
            ndi.gaussian_filter1d(ch, sig_u, axis=2, output=tmp, mode='nearest')
            bl = ndi.gaussian_filter1d(tmp, sig_u, axis=1, mode='nearest')
            ch += f32(k_sh) * (ch - bl)
    np.clip(hu, -1024, 3071, out=hu); np.rint(hu, out=hu)
    label = np.zeros((Z, M, M), np.uint8); lung = np.zeros((Z, M, M), np.uint8)
    label[:, y0:y1, x0:x1] = label_b; lung[:, y0:y1, x0:x1] = lung_b
    nl = int((lung_b > 0).sum())
    vox_ml = s * s * sz / 1000.0
    spacing = (float(sz), float(s), float(s))
    flip = P['flip_x']
    if flip:
        hu, label, lung = (np.ascontiguousarray(x[:, :, ::-1]) for x in (hu, label, lung))
    aff = np.diag([(s if flip else -s), -s, sz, 1.0])
    aff[0, 3] = (-1 if flip else 1) * s * (M - 1) / 2; aff[1, 3] = s * (M - 1) / 2; aff[2, 3] = w0 + P['z_table']
    invol = float(label_b.sum() / max(nl, 1))
    meta = dict(seed=P['seed'], version=PHANTOM_VERSION, matrix=M, shape=[Z, M, M], spacing=list(spacing),
                thickness_mm=float(sz), pixel_mm=float(s), fov_mm=float(P['fov_mm']), flip_x=flip,
                severity=band, severity_band=BANDS[band], target_fraction=round(P['f_target'], 4),
                involvement=round(invol, 4), realized_band=severity_band(invol),
                involvement_left=round(float(label_b[lung_b == 1].mean()) if (lung_b == 1).any() else 0.0, 4),
                involvement_right=round(float(label_b[lung_b == 2].mean()) if (lung_b == 2).any() else 0.0, 4),
                n_foci=P['n_foci'] if band else 0, consolidation=round(P['cons'], 3),
                crazy_paving=round(P['crazy'], 3) if band else 0.0,
                lung_ml=round(nl * vox_ml, 1), lesion_ml=round(float(label_b.sum()) * vox_ml, 1),
                body_width_mm=round(2 * A, 1), body_ap_mm=round(P['B_ant'] + P['B_post'], 1), lung_height_mm=round(H, 1),
                mu_lung_hu=round(P['mu_lung'], 1), ggo_hu=round(P['mu_ggo'], 1), cons_hu=round(P['mu_cons'], 1),
                atelectasis=round(P['atel'], 3), n_plates=P['n_plates'], n_nodules=n_nod,
                fissures=[k for k in ('fissure_L', 'fissure_R', 'fissure_h') if P[k]], n_vessel_segments=n_seg,
                gravity_hu=round(P['gravity'], 1), emphysema=round(P['emph'], 3),
                pattern=P['pattern'] if band else '', focus_shapes=shapes, unilateral=P['unilateral'] if band else 0,
                ggo_contrast_hu=round(P['mu_ggo'] - P['mu_lung'] - 0.5 * P['gravity'], 1) if band else 0.0,
                margin=round(P['margin'], 3), visible_hu=round(P['vis_hu'], 1), atelectasis_hu=round(P['atel_hu'], 1),
                n_scars=P['n_scars'], bronchial_wall=round(P['bronchial_wall'], 3),
                kernel=P['kernel'], sharpen=round(P['sharpen'], 3), motion_mm=round(P['motion_mm'], 2), motion_slices=n_mot,
                streak_slices=n_str,
                noise_hu=round(P['noise_hu'], 2), blur_mm=round(P['blur_mm'], 3), hu_offset=round(P['hu_offset'], 2),
                hu_gain=round(P['hu_gain'], 4), seconds=round(time.perf_counter() - t_start, 3))
    return dict(hu=hu, label=label, lung=lung, spacing=spacing, affine=aff, meta=meta)


# %%
_v = phantom_volume(11, 48, severity=2, thickness=5.0)
test_eq(_v['hu'].dtype, np.float32); test_eq(_v['hu'].shape, _v['label'].shape); test_eq(_v['lung'].shape, _v['hu'].shape)
test_eq(_v['spacing'], (5.0, _v['meta']['pixel_mm'], _v['meta']['pixel_mm'])); test_eq(_v['meta']['severity_band'], 'CT-2')
assert not (_v['label'].astype(bool) & (_v['lung'] == 0)).any() and set(np.unique(_v['lung'])) == {0, 1, 2}
assert 0.25 <= _v['meta']['involvement'] < 0.5; test_eq(_v['hu'], phantom_volume(11, 48, severity=2, thickness=5.0)['hu'])


# %% [markdown]
# ## Writing the data set
#
# `make_phantom` writes volume $i$ from `phantom_volume(phantom_seed(seed, i), matrix)` as int16 HU and uint8 masks with the affine of
# Eq. 2 (sform and qform, units mm), each file through a temporary name in the same folder and `os.replace`, then `phantom.json`
# (the parameters and each volume's meta) the same way, last: its presence marks a complete data set. Called again with the same
# parameters it returns the existing files without regenerating (and says so); with other parameters it regenerates and removes files
# of the old set that the new one does not have. Besides the COVID-19-20 pair it writes the ground-truth lungs as
# `volume-covid19-A-XXXX_lung.nii.gz` (0 background, 1 left, 2 right), handy for checking a lung segmentation; loaders that look for
# `*_ct.nii.gz` and `*_seg.nii.gz` ignore them. It returns the CT image paths in volume order.

# %%
#| export
def _save_nifti(arr, affine, path, dtype, descrip=''):
    "Write a (z, y, x) array as NIfTI (x, y, z order) atomically: temp file in the same folder, then os.replace."
    import nibabel as nib
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(arr).astype(dtype, copy=False).transpose(2, 1, 0), affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units('mm', 'sec')
    img.set_qform(affine, code=1); img.set_sform(affine, code=1)
    img.header['descrip'] = descrip[:79].encode()
    tmp = path.with_name(f'.{path.name[:-7]}.{os.getpid()}.tmp.nii.gz')
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists(): tmp.unlink()
    return path

def phantom_name(i: int, kind: str = 'ct') -> str:
    "COVID-19-20 style file name of volume `i`: kind 'ct' (image), 'seg' (infection) or 'lung' (ground-truth lungs)."
    return f'volume-covid19-A-{i:04d}_{kind}.nii.gz'

def _write_volume(job) -> dict:
    "Generate volume i and write its files; returns its meta (a process-pool task)."
    out, i, seed, matrix, write_lung, options = job
    vs = phantom_seed(seed, i)
    v = phantom_volume(vs, matrix, **options)
    m = dict(id=f'volume-covid19-A-{i:04d}', index=i, **v['meta'], affine=v['affine'].round(6).tolist())
    desc = f"sapl phantom v{PHANTOM_VERSION} seed {vs}"
    _save_nifti(v['hu'], v['affine'], out / phantom_name(i, 'ct'), np.int16, desc)
    _save_nifti(v['label'], v['affine'], out / phantom_name(i, 'seg'), np.uint8, desc)
    m.update(ct=phantom_name(i, 'ct'), seg=phantom_name(i, 'seg'))
    if write_lung:
        _save_nifti(v['lung'], v['affine'], out / phantom_name(i, 'lung'), np.uint8, desc)
        m['lung'] = phantom_name(i, 'lung')
    return m

class _Serial:
    "A stand-in for a process pool with one worker: maps in this process."
    def __enter__(self): return self
    def __exit__(self, *a): return False
    def map(self, f, xs): return map(f, xs)

def _single_thread():
    import torch; torch.set_num_threads(1)

def process_pool(workers: int):
    """A pool of `workers` single-threaded processes (in-process for one). Forked where the platform allows, so that a
    script calling it needs no `if __name__ == '__main__'` guard; the task must be importable (defined in `sapl`)."""
    if workers <= 1: return _Serial()
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    ctx = mp.get_context('fork' if 'fork' in mp.get_all_start_methods() else 'spawn')
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_single_thread)

def make_phantom(out_dir, # folder for the NIfTI files and phantom.json
                 n_volumes: int = 40, # number of volumes
                 seed: int = 0, # data-set seed; volume i uses phantom_seed(seed, i)
                 matrix: int = 384, # in-plane matrix
                 write_lung: bool = True, # also write the ground-truth lungs as *_lung.nii.gz
                 verbose: bool = True, # print progress
                 workers: int|None = None, # processes (default: one per core); the files do not depend on it
                 **options, # passed to `phantom_volume` (severity, thickness, flip_x, p_flip, band_probs)
                ) -> list[Path]: # CT image paths, volume order (label: same name with _seg)
    "Write the phantom data set in the COVID-19-20 naming; reuse it if phantom.json records the same parameters."
    out = Path(out_dir); out.mkdir(parents=True, exist_ok=True)
    params = dict(generator='sapl.phantom', version=PHANTOM_VERSION, n_volumes=int(n_volumes), seed=int(seed),
                  matrix=int(matrix), write_lung=bool(write_lung),
                  options={k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(options.items())})
    kinds = ('ct', 'seg') + (('lung',) if write_lung else ())
    cts = [out / phantom_name(i, 'ct') for i in range(n_volumes)]
    js = out / 'phantom.json'
    if js.exists():
        try: old = json.loads(js.read_text())
        except (OSError, ValueError): old = {}
        if old.get('params') == params and all((out / phantom_name(i, k)).exists() for i in range(n_volumes) for k in kinds):
            if verbose: print(f'phantom: {n_volumes} volumes in {out} match the requested parameters; not regenerating')
            return cts
        if verbose: print(f'phantom: {js} has other parameters or missing files; regenerating')
        for v in old.get('volumes', []):  # remove files of the old set that the new set does not write
            for k in ('ct', 'seg', 'lung'):
                f = out / v.get(k, '') if v.get(k) else None
                if f is not None and f.exists() and f.name not in {phantom_name(i, kk) for i in range(n_volumes) for kk in kinds}:
                    f.unlink()
        js.unlink()
    t0 = time.perf_counter(); vols = [None]*n_volumes
    todo = [(out, i, seed, matrix, write_lung, options) for i in range(n_volumes)]
    workers = max(1, min(int(workers or os.cpu_count() or 1), n_volumes))
    if verbose: print(f'phantom: writing {n_volumes} volumes to {out} with {workers} process(es) ...', flush=True)
    if workers > 1:  # a process pool pickles the task by reference: take it from the installed module
        from sapl.phantom import _write_volume as task
    else: task = _write_volume
    with process_pool(workers) as ex:
        for k, m in enumerate(ex.map(task, todo)):
            vols[m['index']] = m
            if verbose: print(f"phantom: [{k + 1}/{n_volumes}] {m['id']} {m['severity_band']} involvement {m['involvement']:.3f} "
                              f"shape {m['shape']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    tmp = js.with_name(f'.phantom.json.{os.getpid()}.tmp')
    tmp.write_text(json.dumps(dict(params=params, seconds=round(time.perf_counter() - t0, 1), volumes=vols), indent=1))
    os.replace(tmp, js)
    return cts


# %%
import tempfile, nibabel as nib
with tempfile.TemporaryDirectory() as _d:
    _p = make_phantom(_d, n_volumes=2, seed=3, matrix=40, thickness=5.0, verbose=False)
    test_eq([p.name for p in _p], ['volume-covid19-A-0000_ct.nii.gz', 'volume-covid19-A-0001_ct.nii.gz'])
    _img = nib.load(_p[1]); _m = json.loads((Path(_d) / 'phantom.json').read_text())['volumes'][1]
    test_eq(_img.get_data_dtype(), np.int16); test_close(_img.header.get_zooms(), _m['spacing'][::-1], eps=1e-5)
    test_eq(np.asarray(_img.dataobj).transpose(2, 1, 0), phantom_volume(phantom_seed(3, 1), 40, thickness=5.0)['hu'])
    _t = _p[0].stat().st_mtime_ns; make_phantom(_d, n_volumes=2, seed=3, matrix=40, thickness=5.0, verbose=False)
    test_eq(_p[0].stat().st_mtime_ns, _t)

# %% [markdown]
# ## A look at the phantom
#
# One volume per severity band (forced with `severity=`), axial slice through the most infected level (through the middle of the
# lungs for CT-0), window $[-1250, 250]$ HU as in the paper's pre-processing, label contour in red; the second row is a coronal
# slice through the same volume. Under `IN_TEST` the matrix is tiny so the notebook stays fast.

# %%
import os
IN_TEST = bool(os.environ.get('IN_TEST'))
FIG_MATRIX = 64 if IN_TEST else 384      # in-plane matrix of the pictures
from sapl.data import resolve
FIG_PATH = None if IN_TEST else resolve('reports/figures/phantom_grid.png')

# %%
import matplotlib.pyplot as plt, pandas as pd
_vols = [phantom_volume(phantom_seed(0, 1000 + b), FIG_MATRIX, severity=b) for b in range(5)]
fig, axs = plt.subplots(2, 5, figsize=(17, 7.5), dpi=55, gridspec_kw=dict(height_ratios=(1, 0.8)))  # small inline copy
for b, v in enumerate(_vols):
    hu, lab, m = v['hu'], v['label'], v['meta']
    if m['flip_x']: hu, lab = hu[:, :, ::-1], lab[:, :, ::-1]   # display radiologically: patient's left on the image right
    z = int(np.argmax(lab.sum((1, 2)))) if lab.any() else int(np.argmax((v['lung'] > 0).sum((1, 2))))
    axs[0, b].imshow(hu[z], cmap='gray', vmin=-1250, vmax=250)
    if lab[z].any(): axs[0, b].contour(lab[z], [0.5], colors='r', linewidths=0.7)
    axs[0, b].set_title(f"{m['severity_band']}: {100 * m['involvement']:.0f} % involved" + (f", {m['pattern']}" if m['pattern'] else '') +
                        f"\n{m['thickness_mm']} mm slices, {m['kernel']} kernel, noise {m['noise_hu']:.0f} HU", fontsize=10)
    y = int(np.argmax(lab.sum((0, 2)))) if lab.any() else hu.shape[1] // 2
    sz, sy, sx = v['spacing']
    axs[1, b].imshow(hu[::-1, y], cmap='gray', vmin=-1250, vmax=250, aspect=sz / sx)
    if lab[:, y].any(): axs[1, b].contour(lab[::-1, y], [0.5], colors='r', linewidths=0.7)
for a in axs.ravel(): a.set_axis_off()
plt.tight_layout()
if FIG_PATH is not None: FIG_PATH.parent.mkdir(parents=True, exist_ok=True); fig.savefig(FIG_PATH, dpi=90)
plt.show()

# %% [markdown]
# Generated meta of these volumes (`involvement` is the realised label share of the lung volume, `realized_band` its band):

# %%
_cols = ['severity_band', 'target_fraction', 'involvement', 'realized_band', 'n_foci', 'pattern', 'consolidation', 'crazy_paving',
         'ggo_contrast_hu', 'margin', 'visible_hu', 'mu_lung_hu', 'gravity_hu', 'emphysema', 'atelectasis', 'atelectasis_hu',
         'n_scars', 'shape', 'thickness_mm', 'pixel_mm', 'flip_x', 'lung_ml', 'kernel', 'noise_hu', 'blur_mm', 'hu_offset', 'motion_mm']
_df = pd.DataFrame([v['meta'] for v in _vols])[_cols]
test_eq(list(_df.realized_band), [0, 1, 2, 3, 4])
_df

# %% [markdown]
# ## Timing and size of the default data set
#
# Measured on one core (`OMP_NUM_THREADS=1`) of the development machine (AMD EPYC, shared), writing to local disk:
#
# ```
# OMP_NUM_THREADS=1 time python -c "from sapl.phantom import make_phantom; make_phantom('data/phantom')"
# ```
#
# | | value |
# |---|---|
# | 40 volumes at matrix 384 (`make_phantom` defaults), one core | CPU 62 s (user 50.5 s + sys 11.5 s); wall 64 s on an idle machine, 86 s with the 2 cores shared (load 3): 1.6–2.2 s per volume including gzip |
# | generation alone (`meta['seconds']`) | mean 1.3–1.7 s, max 4.5–5.9 s (188 slices of 1.25 mm) |
# | slices per volume | mean 78 (40–188); thickness 5 mm × 22, 3 mm × 6, 2.5 mm × 8, 2 mm × 2, 1.25 mm × 2 |
# | disk | 521 MB: CT 511 MB (≈ 12.8 MB per volume; the noise does not compress), seg 4.3 MB, lungs 5.6 MB |
# | severity mix of the default set | CT-0 9, CT-1 18, CT-2 9, CT-3 2, CT-4 2 (realised band = drawn band for all); 2 volumes stored with flipped $x$ |
