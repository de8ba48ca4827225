# %% [markdown]
# # sapl
#
# > Pseudo-label guided image synthesis for semi-supervised COVID-19 pneumonia infection segmentation, as literate notebooks.
#
# This site is built from the notebooks of the repository. Each notebook is one module of the `sapl` package; every
# equation of Lyu et al. (IEEE TMI 2022) is typeset right above the code that implements it, tagged with the paper's number.
#
# | notebook | module | paper |
# |---|---|---|
# | 00 Data | `sapl.data` | §IV-A1, §IV-A3: layouts, splits, windowing, lung masks, lung crop, datasets |
# | 00a Phantom | `sapl.phantom` | the procedural chest-CT phantom used by default |
# | 01 U-Net | `sapl.unet` | Eq. 5-8; Baseline and Full Supervision |
# | 01a Trainer | `sapl.train` | §IV-A4: SGD, poly schedule, checkpoints, one loop for every method |
# | 02 SEAN | `sapl.sean` | §III-B: region-wise style encoder and SEAN decoder |
# | 03 Style pool | `sapl.style_pool` | Eq. 1-3, Fig. 7 |
# | 04 SA-CPS | `sapl.sacps` | Eq. 4-14, Table II |
# | 05 SA-ST | `sapl.sast` | Algorithm 1, Eq. 15-18, Table III |
# | 06 Evaluation | `sapl.eval` | §IV-A2: DSC and NSD |
# | 07 Competitors | `sapl.baselines` | Tables IV and V: MT, UA-MT, CCT, UDC, Self-Ensembling, SemiInfNet |
# | 07a Beyond the paper | `sapl.modern` | BCP, UniMatch (CVPR 2023); synthesis assistance as a plug-in: SA-MT, SA-BCP, SA-UniMatch |
# | 09 Reproduction | `sapl.reproduce` | Tables II-IV, Figs. 5, 6, 8 |
#
# ## Install and run
#
# ```bash
# make demo   # install, build the phantom, train and evaluate on it, write reports/
# make test   # install, run every notebook as a test and the unit tests
# ```
#
# Any run notebook can be executed with papermill, e.g.
# `papermill nbs/04_sacps.ipynb out.ipynb -p ratio 0.2`; see the README for real data sets and the lungmask weights.
