"""Synthetic CT from MRI by a Gaussian mixture (pixel tier).

Model (DESIGN.md, "Pixel tier")::

    p(CT | MRI) = Σ_k π_k(MRI) · N(CT; μ_k, σ_k²),
    π_k(x) ∝ w_k · N(x; m_k, S_k)                  (x: the 4 z-scored contrasts)

The K components are fitted by EM over brain-voxel MRI features once per dataset
(:func:`fit_ct_mixture`, :func:`fit_ct_from_samples`). Without paired CT each
component is named by its mean contrast profile (nearest tissue of
:data:`trifuse.physics.tissues.DEFAULT_TISSUE_MODEL`) and gets that tissue's HU
(mean, sd) from :data:`trifuse.physics.tissues.TISSUES`. With paired CT the
Johansson Gaussian-mixture-regression form is fitted instead
(:func:`fit_ct_gmr`; J. Johansson, M. Karlsson, T. Nyholm, "CT substitute derived
from MRI sequences with ultrashort echo time", Med. Phys. 38(5):2708, 2011, and
Med. Phys. 39(3):1518, 2012)::

    E[CT | x] = Σ_k π_k(x) · (μ_CT,k + Σ_CT,x,k Σ_xx,k⁻¹ (x − m_k)).

:func:`synthesize_ct` fills brain voxels from the mixture (conditional expectation
or a sample), then adds a CSF gap, a skull shell (dilation ring of the brain mask,
thickness in mm, diploë darker than the inner/outer tables), scalp and air, so the
result reads as a head CT. Output is encoded in the windows of
:data:`trifuse.keys.CT_WINDOWS` (:func:`encode_ct`), one channel each in [0, 1]: a brain
window (0-80 HU: brain tissues fill about half of it) and a wide bone window
(-1000-2200 HU: air 0, skull 0.56-0.88, never saturated). HU/1000 in one channel left
the brain tissues 2 % of the range and a network could not see into them.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from trifuse import keys
from trifuse.io.nifti import atomic_write_text
from trifuse.physics.tissues import (
    DEFAULT_TISSUE_MODEL,
    TISSUES,
    HeadConfig,
    TissueModel,
    coarse_distance_mm,
    upsample,
    voxel_chunk,
)

__all__ = [
    "CTMixtureModel",
    "fit_gmm",
    "fit_ct_mixture",
    "fit_ct_gmr",
    "fit_ct_from_samples",
    "synthesize_ct",
    "synthesize_ct_hu",
    "encode_ct",
    "decode_ct",
    "outside_hu",
    "name_components",
    "UNASSIGNED",
    "FORMAT",
    "VERSION",
]

FORMAT = "trifuse.ct_mixture"
VERSION = 1
_LOG2PI = math.log(2 * math.pi)

#: HU of the inner/outer tables and of the diploë of the skull shell
SKULL_CORTICAL_HU = 1800.0
SKULL_DIPLOE_HU = 800.0


# ---------------------------------------------------------------------------------
# EM for a Gaussian mixture (torch, float64)
# ---------------------------------------------------------------------------------
def _gauss_logpdf(x: torch.Tensor, means: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
    """log N(x; m_k, S_k) for x (N, F), means (K, F), covs (K, F, F) -> (N, K)."""
    chol = torch.linalg.cholesky(covs)  # (K, F, F)
    diff = x[None] - means[:, None]  # (K, N, F)
    sol = torch.linalg.solve_triangular(chol, diff.transpose(1, 2), upper=False)  # (K, F, N)
    maha = (sol**2).sum(1)  # (K, N)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
    return (-0.5 * (maha + logdet[:, None] + x.shape[1] * _LOG2PI)).T


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator, existing: torch.Tensor | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007); keeps ``existing`` centres."""
    centres = [] if existing is None else list(existing)
    if not centres:
        centres.append(x[torch.randint(len(x), (1,), generator=generator).item()])
    while len(centres) < k:
        c = torch.stack(centres)
        d2 = torch.cdist(x, c).min(1).values ** 2
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / len(d2))
        centres.append(x[torch.multinomial(p.float(), 1, generator=generator).item()])
    return torch.stack(centres)


@dataclass
class GMMFit:
    """Result of :func:`fit_gmm`: weights (K,), means (K,F), covariances (K,F,F).

    ``events`` lists what happened to dead components: ``("reseed", k, weight)`` and
    ``("prune", k, weight)`` (k = index at the time).
    """

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    log_likelihood: float
    n_iter: int
    converged: bool
    events: list = field(default_factory=list)


def _m_step(x: torch.Tensor, resp: torch.Tensor, covariance_type: str, reg_covar: float):
    n, f = x.shape
    nk = resp.sum(0) + 1e-10  # (K,)
    weights = nk / n
    means = (resp.T @ x) / nk[:, None]
    diff = x[None] - means[:, None]  # (K, N, F)
    if covariance_type == "full":
        covs = torch.einsum("kn,knf,kng->kfg", resp.T, diff, diff) / nk[:, None, None]
    else:
        covs = torch.diag_embed(torch.einsum("kn,knf->kf", resp.T, diff**2) / nk[:, None])
    covs = covs + reg_covar * torch.eye(f, dtype=x.dtype, device=x.device)
    return weights, means, covs


def fit_gmm(
    x: torch.Tensor,
    n_components: int,
    *,
    covariance_type: str = "full",
    init_means: torch.Tensor | None = None,
    seed: int = 0,
    max_iter: int = 200,
    tol: float = 1e-4,
    reg_covar: float = 1e-3,
    min_weight: float = 1e-3,
    n_reseed: int = 2,
) -> GMMFit:
    """Fit a Gaussian mixture by expectation-maximisation (Dempster et al. 1977).

    Written in torch (not scikit-learn) so it runs on the device next to the data and
    needs no extra dependency; it is the textbook EM with a covariance floor, plus
    the usual handling of dead components: a component whose weight falls below
    ``min_weight`` after EM converges is re-seeded at the worst-explained voxels (at
    most ``n_reseed`` rounds) and, if it dies again, pruned; EM then runs on. The
    result has no component below ``min_weight`` (K may be smaller than asked).

    Args:
        x: (N, F) features.
        n_components: K.
        covariance_type: ``"full"`` or ``"diag"``.
        init_means: optional (K0, F) initial means, K0 <= K; the rest come from
            k-means++ seeding.
        seed: seeds the k-means++ draws and re-seeding.
        max_iter: EM iterations at most per round.
        tol: stop when the mean log-likelihood improves by less than this.
        reg_covar: added to covariance diagonals (z-score units squared).
        min_weight: smallest weight a component may end with (default 0.1 %: a small
            enhancing rim is about 1 % of the brain voxels and must survive).
        n_reseed: re-seeding rounds before dead components are pruned.

    Returns:
        :class:`GMMFit` in float64.
    """
    if covariance_type not in ("full", "diag"):
        raise ValueError(f"covariance_type must be 'full' or 'diag', got {covariance_type!r}")
    x = x.to(torch.float64)
    n, f = x.shape
    if n < n_components:
        raise ValueError(f"need at least {n_components} samples to fit {n_components} components, got {n}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    xc = x.cpu()
    init = None if init_means is None else init_means.to(torch.float64).cpu()[:n_components]
    means = _kmeans_pp(xc, n_components, gen, init).to(x.device)
    # initial responsibilities: hard nearest-centre assignment, then one M-step
    resp = torch.nn.functional.one_hot(torch.cdist(x, means).argmin(1), n_components).to(x.dtype)
    weights, means, covs = _m_step(x, resp, covariance_type, reg_covar)
    events: list = []
    total_it = 0
    converged = False
    ll = -math.inf
    for rnd in range(n_reseed + 2):
        prev = -math.inf
        converged = False
        for _ in range(max_iter):
            total_it += 1
            # E-step
            logp = _gauss_logpdf(x, means, covs) + torch.log(weights.clamp_min(1e-300))[None]
            lse = torch.logsumexp(logp, 1, keepdim=True)
            resp = torch.exp(logp - lse)
            ll = lse.mean().item()
            # M-step
            weights, means, covs = _m_step(x, resp, covariance_type, reg_covar)
            if abs(ll - prev) < tol:
                converged = True
                break
            prev = ll
        dead = (weights < min_weight).nonzero().flatten().tolist()
        if not dead:
            break
        if rnd < n_reseed:
            # re-seed at the voxels the mixture explains worst (lowest log-likelihood)
            worst = lse[:, 0].argsort()[: max(len(dead) * 50, n // 100)]
            pick = worst[torch.randperm(len(worst), generator=gen)[: len(dead)].to(worst.device)]
            live_cov = covs[weights >= min_weight].mean(0) if bool((weights >= min_weight).any()) else covs.mean(0)
            for j, k in enumerate(dead):
                events.append(("reseed", int(k), float(weights[k])))
                means[k] = x[pick[j]]
                covs[k] = live_cov * 0.25 + reg_covar * torch.eye(f, dtype=x.dtype, device=x.device)
                weights[k] = min_weight
            weights = weights / weights.sum()
        else:
            keep = weights >= min_weight
            for k in dead:
                events.append(("prune", int(k), float(weights[k])))
            weights, means, covs = weights[keep] / weights[keep].sum(), means[keep], covs[keep]
            if rnd == n_reseed + 1:
                break
    return GMMFit(weights, means, covs, ll, total_it, converged, events)


#: name of a component that matches no tissue profile one to one (``unassigned_<k>``)
UNASSIGNED = "unassigned"


def name_components(means: torch.Tensor, model: TissueModel = DEFAULT_TISSUE_MODEL, max_distance: float = 3.0,
                    max_gap: float = 4.0) -> list[str]:
    """Name components one to one by their mean contrast profile (Hungarian assignment).

    The cost of giving tissue t to component k is the profile's negative
    log-likelihood of the component mean; the optimal one-to-one assignment is
    :func:`scipy.optimize.linear_sum_assignment` (Kuhn-Munkres). A component is
    ``"unassigned_<k>"`` when it is left over (K > tissues), when its assigned profile
    is further than ``max_distance`` profile standard deviations (RMS over the
    contrasts), or when the assignment had to give it a tissue more than ``max_gap``
    nats less likely than its nearest one (a split piece of a tissue another
    component already holds). Names are unique, and no tissue is claimed by a
    component that does not look like it.

    Args:
        means: (K, 4) component means in z-score space (T1, T1ce, T2, FLAIR).
        model: tissue contrast profiles.
        max_distance: gate in profile standard deviations.
        max_gap: gate on the log-likelihood lost against the nearest profile.

    Returns:
        K unique names: tissue names from ``model.names`` or ``unassigned_<k>``.
    """
    from scipy.optimize import linear_sum_assignment

    m = means.to(torch.float64).cpu()
    pm, ps, _ = model.tensors(dtype=torch.float64)
    z2 = (((m[:, None, :] - pm[None]) / ps[None]) ** 2).mean(-1)  # (K, T) mean squared z-distance
    cost = -model.log_likelihood_of(m).numpy()
    rows, cols = linear_sum_assignment(cost)
    names = [f"{UNASSIGNED}_{k}" for k in range(len(m))]
    best = cost.min(1)
    for r, c in zip(rows.tolist(), cols.tolist()):
        if float(z2[r, c]) <= max_distance**2 and float(cost[r, c] - best[r]) <= max_gap:
            names[r] = model.names[c]
    return names


def _tissue_hu(names: list[str], means: torch.Tensor, model: TissueModel = DEFAULT_TISSUE_MODEL) -> tuple[torch.Tensor, torch.Tensor]:
    """(hu_mean, hu_sd) per component: the tissue's table HU; an unassigned component gets the
    HU of the profile nearest its mean (it is still brain tissue, just not one named uniquely)."""
    ll = model.log_likelihood_of(means.to(torch.float32).cpu())
    hm, hs = [], []
    for k, nme in enumerate(names):
        t = nme if nme in TISSUES else model.names[int(ll[k].argmax())]
        hm.append(TISSUES[t].hu_mean)
        hs.append(TISSUES[t].hu_sd)
    return torch.tensor(hm, dtype=torch.float64), torch.tensor(hs, dtype=torch.float64)


# ---------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------
@dataclass
class CTMixtureModel:
    """Fitted mixture for ``p(CT | MRI)``.

    Attributes:
        weights: (K,) mixing weights w_k.
        means: (K, F) feature means m_k (z-score units).
        covariances: (K, F, F) feature covariances S_k.
        tissues: K tissue names.
        hu_mean: (K,) CT mean μ_CT,k in HU.
        hu_sd: (K,) CT standard deviation σ_k in HU (conditional, for GMR).
        coef: (K, F) regression coefficients Σ_CT,x Σ_xx⁻¹ (HU per z-unit); zeros for
            the table-based (unpaired) model.
        feature_names: names of the F features (default: the 4 MRI contrasts).
        covariance_type: ``"full"`` or ``"diag"``.
        meta: provenance (seed, voxels, log-likelihood, iterations, form).
    """

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    tissues: list[str]
    hu_mean: torch.Tensor
    hu_sd: torch.Tensor
    coef: torch.Tensor | None = None
    feature_names: tuple[str, ...] = keys.MODALITIES
    covariance_type: str = "full"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        k, f = self.means.shape
        if self.coef is None:
            self.coef = torch.zeros(k, f, dtype=torch.float64)
        self._cache: dict = {}

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def n_features(self) -> int:
        return self.means.shape[1]

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_tissue_model(cls, model: TissueModel = DEFAULT_TISSUE_MODEL) -> "CTMixtureModel":
        """Unfitted default: one diagonal component per brain tissue profile.

        Used when no dataset-specific fit exists yet (e.g. the first demo run).
        """
        m, s, logp = model.tensors(dtype=torch.float64)
        return cls(
            weights=torch.exp(logp),
            means=m,
            covariances=torch.diag_embed(s**2),
            tissues=list(model.names),
            hu_mean=torch.tensor([TISSUES[t].hu_mean for t in model.names], dtype=torch.float64),
            hu_sd=torch.tensor([TISSUES[t].hu_sd for t in model.names], dtype=torch.float64),
            covariance_type="diag",
            meta={"form": "tissue_table", "fitted": False},
        )

    # -- inference ---------------------------------------------------------------
    def _terms(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            prec = torch.linalg.inv(self.covariances)  # (K, F, F)
            logdet = torch.logdet(self.covariances)
            f = self.n_features
            iu = torch.triu_indices(f, f)
            if self.covariance_type == "diag":  # no cross terms: squares only
                iu = torch.arange(f).repeat(2, 1)
            # quadratic form x^T P x = sum_{i<=j} a_ij x_i x_j with a_ij = (2 - δ_ij) P_ij
            a = prec[:, iu[0], iu[1]] * torch.where(iu[0] == iu[1], 1.0, 2.0).to(prec.dtype)
            if self.covariance_type == "diag":
                a = torch.diagonal(prec, dim1=-2, dim2=-1)
            b = torch.einsum("kfg,kg->kf", prec, self.means)  # P m
            c = -0.5 * (torch.einsum("kf,kf->k", self.means, b) + logdet + f * _LOG2PI) + torch.log(self.weights)
            cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
            self._cache[key] = (cast(a), cast(b), cast(c), iu, cast(self.means), cast(self.coef),
                                cast(self.hu_mean), cast(self.hu_sd))
        return self._cache[key]

    def _unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        """exp(log(w_k N(x; m_k, S_k)) − max_k) as (B, K, V), built in place.

        log(w_k N(x)) = −0.5 (xᵀP_k x − 2 (P_k m_k)ᵀx + c_k) is two batched matrix products
        over the F(F+1)/2 products x_i x_j and the F features, so no (B, K, F, V) tensor
        is ever built; max-subtraction and exp run in place (the whole-brain case has
        millions of voxels).
        """
        a, b, c, iu, *_ = self._terms(x.device, x.dtype)
        bsz, f, v = x.shape
        pairs = list(zip(iu[0].tolist(), iu[1].tolist()))  # python ints: no device syncs below
        xx = torch.empty(bsz, len(pairs), v, device=x.device, dtype=x.dtype)
        for q, (i, j) in enumerate(pairs):  # F(F+1)/2 channel products (10 for 4 contrasts)
            torch.mul(x[:, i], x[:, j], out=xx[:, q])
        k = self.n_components
        logits = torch.baddbmm(c.view(1, k, 1).expand(bsz, k, v), (-0.5 * a).expand(bsz, *a.shape), xx)
        logits.baddbmm_(b.expand(bsz, *b.shape), x)
        logits.sub_(logits.amax(1, keepdim=True)).exp_()
        return logits

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior component weights π_k(x).

        Args:
            x: (B, F, V) features (F = :attr:`n_features`), any float dtype.

        Returns:
            (B, K, V) responsibilities summing to 1 over K.
        """
        e = self._unnormalised(x)
        return e / e.sum(1, keepdim=True)

    def predict_hu(self, x: torch.Tensor, mode: str = "expectation", generator: torch.Generator | None = None) -> torch.Tensor:
        """CT number of each feature vector.

        Args:
            x: (B, F, V) features.
            mode: ``"expectation"`` (E[CT|x], default) or ``"sample"`` (draw a component
                from π(x), then CT from its Gaussian).
            generator: torch.Generator on x's device, for ``"sample"``.

        Returns:
            (B, V) HU.
        """
        *_, m, coef, hu_m, hu_s = self._terms(x.device, x.dtype)
        e = self._unnormalised(x)  # (B, K, V), unnormalised responsibilities
        den = e.sum(1)
        regress = bool(self.coef.abs().max() > 0)
        # component-wise conditional means μ_k(x) = μ_CT,k + coef_k · (x − m_k) (GMR form)
        mu = torch.matmul(coef, x) + (hu_m - (coef * m).sum(1))[None, :, None] if regress else None
        if mode == "expectation":
            num = (e * mu).sum(1) if regress else torch.matmul(hu_m[None, None, :], e)[:, 0]
            return num / den
        if mode != "sample":
            raise ValueError(f"mode must be 'expectation' or 'sample', got {mode!r}")
        u = torch.rand(e.shape[0], 1, e.shape[2], generator=generator, device=x.device, dtype=x.dtype) * den[:, None]
        k = (u > e.cumsum(1)).sum(1, keepdim=True).clamp(max=self.n_components - 1)  # inverse CDF
        noise = torch.randn(e.shape[0], e.shape[2], generator=generator, device=x.device, dtype=x.dtype)
        mean = mu.gather(1, k)[:, 0] if regress else hu_m[k[:, 0]]
        return mean + hu_s[k[:, 0]] * noise

    def summary(self) -> str:
        """One line per component: weight, tissue, mean contrast profile, HU mean ± sd."""
        names = ", ".join(self.feature_names)
        lines = [f"CT mixture: {self.n_components} components ({self.covariance_type} covariance, "
                 f"form {self.meta.get('form', '?')}), features ({names})"]
        for k in range(self.n_components):
            prof = " ".join(f"{v:+.2f}" for v in self.means[k].tolist())
            lines.append(f"  {k}: w={float(self.weights[k]):.3f}  {self.tissues[k]:<12s} [{prof}]  "
                         f"HU {float(self.hu_mean[k]):6.1f} ± {float(self.hu_sd[k]):.1f}")
        return "\n".join(lines)

    # -- persistence -------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable dict (format :data:`FORMAT`, version :data:`VERSION`)."""
        tl = lambda t: t.detach().cpu().double().tolist()  # noqa: E731
        return {
            "format": FORMAT,
            "version": VERSION,
            "n_components": self.n_components,
            "feature_names": list(self.feature_names),
            "covariance_type": self.covariance_type,
            "weights": tl(self.weights),
            "means": tl(self.means),
            "covariances": tl(self.covariances),
            "tissues": list(self.tissues),
            "hu_mean": tl(self.hu_mean),
            "hu_sd": tl(self.hu_sd),
            "coef": tl(self.coef),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "CTMixtureModel":
        """Inverse of :meth:`to_dict`; validates format and version."""
        if d.get("format") != FORMAT:
            raise ValueError(f"{source}: not a CT mixture file (format={d.get('format')!r}, expected {FORMAT!r})")
        if int(d.get("version", -1)) > VERSION:
            raise ValueError(f"{source}: CT mixture version {d.get('version')} is newer than supported {VERSION}")
        t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        model = cls(
            weights=t(d["weights"]),
            means=t(d["means"]),
            covariances=t(d["covariances"]),
            tissues=list(d["tissues"]),
            hu_mean=t(d["hu_mean"]),
            hu_sd=t(d["hu_sd"]),
            coef=t(d["coef"]) if d.get("coef") is not None else None,
            feature_names=tuple(d.get("feature_names", keys.MODALITIES)),
            covariance_type=d.get("covariance_type", "full"),
            meta=dict(d.get("meta", {})),
        )
        k = model.n_components
        if not (model.weights.shape == (k,) and model.covariances.shape == (k, model.n_features, model.n_features)
                and len(model.tissues) == k and model.hu_mean.shape == (k,)):
            raise ValueError(f"{source}: inconsistent CT mixture shapes")
        if not all(torch.isfinite(v).all() for v in (model.weights, model.means, model.covariances, model.hu_mean)):
            raise ValueError(f"{source}: CT mixture contains NaN/Inf")
        return model

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as small versioned JSON, atomically (writer-tagged temp file + rename;
        a full disk raises :class:`~trifuse.io.nifti.OutOfSpaceError` naming the folder)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CTMixtureModel":
        """Read a model written by :meth:`save`.

        Raises:
            FileNotFoundError: if the file does not exist.
            ValueError: if it is not valid JSON of the expected format/version.
        """
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: corrupt CT mixture file ({e})") from None
        return cls.from_dict(d, source=str(path))


# ---------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------
def _features_from(features) -> torch.Tensor:
    if isinstance(features, torch.Tensor):
        return features
    return torch.cat([torch.as_tensor(f) for f in features], 0)


def _log_fit(model: "CTMixtureModel") -> None:
    import logging

    log = logging.getLogger(__name__)
    for ev in model.meta.get("events", []):
        log.info("CT mixture EM: %s component %d (weight %.2e)", *ev)
    log.info("%s", model.summary())


def fit_ct_mixture(
    features: torch.Tensor | Iterable[torch.Tensor],
    n_components: int = 6,
    *,
    seed: int = 0,
    covariance_type: str = "full",
    max_voxels: int = 200_000,
    init: str = "tissue",
    max_iter: int = 200,
    tissue_model: TissueModel = DEFAULT_TISSUE_MODEL,
    min_weight: float = 1e-3,
) -> CTMixtureModel:
    """Fit the unpaired CT mixture on brain-voxel MRI features.

    Args:
        features: (N, F) tensor of brain-voxel features (F = 4 z-scored contrasts) or
            an iterable of such chunks.
        n_components: K.
        seed: seeds voxel subsampling and k-means++ initialisation.
        covariance_type: ``"full"`` (default) or ``"diag"``.
        max_voxels: random subsample size for EM.
        init: ``"tissue"`` starts from the tissue contrast profiles (then k-means++ for
            K > 6), ``"kmeans++"`` uses seeding only.
        max_iter: EM iterations at most.
        tissue_model: profiles used for initialisation and naming.
        min_weight: dead components below this weight are re-seeded, then pruned
            (:func:`fit_gmm`).

    Returns:
        :class:`CTMixtureModel` whose components carry unique tissue names
        (:func:`name_components`) and table HU; ``meta["events"]`` lists re-seeded and
        pruned components. The weights and names are logged.
    """
    x = _features_from(features).to(torch.float64)
    if x.dim() != 2:
        raise ValueError(f"features must be (N, F), got shape {tuple(x.shape)}")
    x = x[torch.isfinite(x).all(1)]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if len(x) > max_voxels:
        x = x[torch.randperm(len(x), generator=gen)[:max_voxels].to(x.device)]
    init_means = None
    if init == "tissue" and x.shape[1] == len(tissue_model.means[0]):
        init_means = torch.tensor(tissue_model.means, dtype=torch.float64)
    elif init not in ("tissue", "kmeans++"):
        raise ValueError(f"init must be 'tissue' or 'kmeans++', got {init!r}")
    fit = fit_gmm(x, n_components, covariance_type=covariance_type, init_means=init_means, seed=seed, max_iter=max_iter,
                  min_weight=min_weight)
    if x.shape[1] != len(tissue_model.means[0]):
        raise ValueError(f"features have {x.shape[1]} columns; naming needs the {len(tissue_model.means[0])} MRI contrasts")
    names = name_components(fit.means, tissue_model)
    hu_m, hu_s = _tissue_hu(names, fit.means, tissue_model)
    model = CTMixtureModel(
        weights=fit.weights.cpu(),
        means=fit.means.cpu(),
        covariances=fit.covariances.cpu(),
        tissues=names,
        hu_mean=hu_m,
        hu_sd=hu_s,
        covariance_type=covariance_type,
        meta={"form": "tissue_table", "fitted": True, "seed": int(seed), "n_voxels": int(len(x)),
              "log_likelihood": fit.log_likelihood, "n_iter": fit.n_iter, "converged": fit.converged,
              "min_weight": float(min_weight), "events": [list(e) for e in fit.events]},
    )
    _log_fit(model)
    return model


def fit_ct_gmr(
    features: torch.Tensor,
    ct_hu: torch.Tensor,
    n_components: int = 6,
    *,
    seed: int = 0,
    max_voxels: int = 200_000,
    max_iter: int = 200,
    tissue_model: TissueModel = DEFAULT_TISSUE_MODEL,
) -> CTMixtureModel:
    """Fit the Johansson GMR form on paired (MRI features, CT) voxels.

    A full-covariance GMM is fitted on the joint vector [x, CT/100] (the scaling only
    balances units for EM); each component is then conditioned on x:
    μ_CT|x,k = μ_CT,k + Σ_CT,x Σ_xx⁻¹ (x − m_k), σ²_k = Σ_CT,CT − Σ_CT,x Σ_xx⁻¹ Σ_x,CT.

    Args:
        features: (N, F) MRI features of voxels with known CT.
        ct_hu: (N,) CT numbers in HU.
        n_components, seed, max_voxels, max_iter, tissue_model: as
            :func:`fit_ct_mixture`.

    Returns:
        :class:`CTMixtureModel` with non-zero ``coef`` (meta form ``"gmr"``).
    """
    x = torch.as_tensor(features).to(torch.float64)
    y = torch.as_tensor(ct_hu).to(torch.float64).reshape(-1, 1)
    if len(x) != len(y):
        raise ValueError(f"features ({len(x)}) and ct_hu ({len(y)}) differ in length")
    scale = 100.0
    joint = torch.cat([x, y / scale], 1)
    joint = joint[torch.isfinite(joint).all(1)]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if len(joint) > max_voxels:
        joint = joint[torch.randperm(len(joint), generator=gen)[:max_voxels]]
    fit = fit_gmm(joint, n_components, covariance_type="full", seed=seed, max_iter=max_iter)
    f = x.shape[1]
    s = fit.covariances
    sxx, sxy, syy = s[:, :f, :f], s[:, :f, f:] * scale, s[:, f:, f:] * scale**2
    coef = torch.linalg.solve(sxx, sxy)[..., 0]  # (K, F): Σ_xx⁻¹ Σ_x,CT (Σ symmetric)
    cond_var = (syy[:, 0, 0] - (coef * sxy[..., 0]).sum(1)).clamp_min(1.0)
    means_x = fit.means[:, :f]
    k_fit = len(fit.weights)
    names = name_components(means_x, tissue_model) if f == len(tissue_model.means[0]) else [f"component_{k}" for k in range(k_fit)]
    return CTMixtureModel(
        weights=fit.weights, means=means_x, covariances=sxx, tissues=names,
        hu_mean=fit.means[:, f] * scale, hu_sd=cond_var.sqrt(), coef=coef, covariance_type="full",
        meta={"form": "gmr", "fitted": True, "seed": int(seed), "n_voxels": int(len(joint)),
              "log_likelihood": fit.log_likelihood, "n_iter": fit.n_iter, "converged": fit.converged,
              "events": [list(e) for e in fit.events]},
    )


def fit_ct_from_samples(
    samples: Iterable[dict],
    n_components: int = 6,
    max_voxels: int = 200_000,
    seed: int = 0,
    **kwargs,
) -> CTMixtureModel:
    """Fit :class:`CTMixtureModel` over the brain voxels of a stream of samples.

    Voxels are subsampled uniformly over the whole stream in one pass (each voxel gets
    a random key; the ``max_voxels`` smallest keys are kept), so memory stays bounded
    whatever the number of cases.

    Args:
        samples: iterable of sample dicts with ``keys.MRI`` (4, D, H, W) and
            ``keys.BRAIN`` (1, D, H, W).
        n_components: K.
        max_voxels: voxels used for EM.
        seed: seeds subsampling and EM initialisation.
        **kwargs: forwarded to :func:`fit_ct_mixture`.

    Returns:
        The fitted model; ``meta["n_cases"]`` counts the samples seen.

    Raises:
        ValueError: if no sample has brain voxels.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    kept_x = torch.empty(0, 4, dtype=torch.float32)
    kept_k = torch.empty(0, dtype=torch.float32)
    n_cases = 0
    for s in samples:
        mri = torch.as_tensor(s[keys.MRI]).float().cpu()
        brain = torch.as_tensor(s[keys.BRAIN]).bool().cpu()[0]
        x = mri[:, brain].T  # (N, 4)
        n_cases += 1
        if len(x) == 0:
            continue
        k = torch.rand(len(x), generator=gen)
        kept_x, kept_k = torch.cat([kept_x, x]), torch.cat([kept_k, k])
        if len(kept_k) > max_voxels:
            idx = torch.topk(kept_k, max_voxels, largest=False).indices
            kept_x, kept_k = kept_x[idx], kept_k[idx]
    if len(kept_x) == 0:
        raise ValueError(f"no brain voxels in {n_cases} samples: cannot fit the CT mixture")
    model = fit_ct_mixture(kept_x, n_components, seed=seed, max_voxels=max_voxels, **kwargs)
    model.meta["n_cases"] = n_cases
    return model


# ---------------------------------------------------------------------------------
# Synthesis
# ---------------------------------------------------------------------------------
def outside_hu(distance_mm: torch.Tensor, head: HeadConfig = HeadConfig()) -> torch.Tensor:
    """HU of the geometric layers as a function of the distance outside the brain.

    CSF gap (d <= csf_mm), skull (bright inner/outer tables, darker diploë across the
    thickness), scalp, then air; inside the brain (d = 0) the CSF value.
    """
    g, s = head.csf_mm, head.skull_mm
    u = ((distance_mm - g) / max(s, 1e-6)).clamp(0, 1)
    skull = SKULL_DIPLOE_HU + (SKULL_CORTICAL_HU - SKULL_DIPLOE_HU) * (2 * u - 1).abs()
    hu = torch.where(distance_mm <= g + s, skull, torch.where(distance_mm <= head.total_mm, TISSUES["scalp"].hu_mean, TISSUES["air"].hu_mean))
    return torch.where(distance_mm <= g, TISSUES["csf"].hu_mean, hu)


def encode_ct(hu: torch.Tensor, windows=keys.CT_WINDOWS) -> torch.Tensor:
    """HU -> the network encoding of :data:`trifuse.keys.CT_WINDOWS`.

    Args:
        hu: (B, 1, D, H, W) (or (1, D, H, W)) CT numbers in HU.

    Returns:
        (B, C, D, H, W) (or (C, D, H, W)) float32, channel c = clip((HU − low_c) / (high_c − low_c), 0, 1).
    """
    ch = 1 if hu.dim() == 5 else 0
    return torch.cat([((hu - lo) / (hi - lo)).clamp(0.0, 1.0) for _, lo, hi in windows], ch).float()


def decode_ct(ct: torch.Tensor, windows=keys.CT_WINDOWS) -> torch.Tensor:
    """Approximate HU back from the encoding: the brain window where it is not clipped, else the widest window.

    Args:
        ct: (B, C, D, H, W) or (C, D, H, W) from :func:`encode_ct`.

    Returns:
        (B, 1, …) or (1, …) HU.
    """
    ch = 1 if ct.dim() == 5 else 0
    wide = max(range(len(windows)), key=lambda i: windows[i][2] - windows[i][1])
    hu = None
    for i in sorted(range(len(windows)), key=lambda i: -(windows[i][2] - windows[i][1])):  # widest first
        _, lo, hi = windows[i]
        c = ct.narrow(ch, i, 1)
        v = lo + c * (hi - lo)
        hu = v if i == wide else torch.where((c > 0) & (c < 1), v, hu)
    return hu


def synthesize_ct(*args, **kwargs) -> torch.Tensor:
    """Synthetic head CT in the network encoding (:func:`encode_ct` of :func:`synthesize_ct_hu`).

    Same arguments as :func:`synthesize_ct_hu`. Returns (B, C, D, H, W) (or (C, D, H, W))
    float32 with C = :data:`trifuse.keys.CT_CHANNELS`, each channel in [0, 1].
    """
    return encode_ct(synthesize_ct_hu(*args, **kwargs))


def outside_hu_map(brain: torch.Tensor, spacing: Sequence[float], head: HeadConfig = HeadConfig()) -> torch.Tensor:
    """HU of the head layers (:func:`outside_hu`) over a grid, from its brain mask (B, 1, D, H, W) -> (B, 1, D, H, W).

    Evaluated on the ~2 mm grid of the distance (``head.coarse_mm``, pooled from voxel 0
    of the grid) and trilinearly upsampled, which gives the shell partial-volume edges.
    """
    dist_c, fac = coarse_distance_mm(brain.bool(), spacing, head.total_mm, head.coarse_mm)
    return upsample(outside_hu(dist_c, head), fac, brain.shape[2:]).contiguous()


def synthesize_ct_hu(
    mri: torch.Tensor,
    brain: torch.Tensor,
    model: CTMixtureModel | None = None,
    mode: str = "expectation",
    generator: torch.Generator | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    head: HeadConfig = HeadConfig(),
    outside: torch.Tensor | None = None,
) -> torch.Tensor:
    """Synthetic head CT in HU from z-scored MRI.

    Brain voxels get the mixture's CT (only brain voxels are evaluated). Outside the
    brain the HU is a function of the distance to it (:func:`outside_hu`), evaluated
    on the ~2 mm grid of the distance (``head.coarse_mm``) and trilinearly upsampled,
    which also gives the shell partial-volume edges.

    Args:
        mri: (B, 4, D, H, W) or (4, D, H, W) z-scored MRI (0 outside the brain).
        brain: (B, 1, D, H, W) or (1, D, H, W) bool brain mask.
        model: fitted mixture; ``None`` uses :meth:`CTMixtureModel.from_tissue_model`.
        mode: ``"expectation"`` (deterministic) or ``"sample"``.
        generator: torch.Generator on mri's device (``"sample"`` mode).
        spacing: voxel size in mm (D, H, W), for the shell thicknesses.
        head: thickness of CSF gap, skull and scalp in mm.
        outside: optional (B, 1, D, H, W) HU of the head layers (:func:`outside_hu_map`)
            computed in a larger frame (the whole case of a training patch), so that
            brain outside the patch still puts its skull into the patch.

    Returns:
        (B, 1, D, H, W) (or (1, D, H, W)) float32 CT in HU (air −1000).
    """
    if mode not in ("expectation", "sample"):
        raise ValueError(f"mode must be 'expectation' or 'sample', got {mode!r}")
    unbatched = mri.dim() == 4
    if unbatched:
        mri, brain = mri[None], brain[None]
    model = CTMixtureModel.from_tissue_model() if model is None else model
    if mri.shape[1] != model.n_features:
        raise ValueError(f"mri has {mri.shape[1]} channels, the CT model expects {model.n_features} ({model.feature_names})")
    brain = brain.bool()
    b, c = mri.shape[:2]
    if outside is None:
        out = outside_hu_map(brain, spacing, head)
    else:
        if unbatched and outside.dim() == 4:
            outside = outside[None]
        if outside.shape != brain.shape:
            raise ValueError(f"outside HU map {tuple(outside.shape)} must have the brain mask's shape {tuple(brain.shape)}")
        out = outside.to(device=mri.device, dtype=torch.float32).clone()
    if mode == "sample":
        # texture of bone and soft tissue (brain voxels are overwritten below)
        out = out + 0.5 * TISSUES["skull"].hu_sd * torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype) \
            * (out > 500)
    flat = out.view(b, -1)
    n = voxel_chunk(mri.device)
    for i in range(b):  # brain voxels only: per item (masks differ), never per voxel
        idx = brain[i].reshape(-1).nonzero().squeeze(1)
        src = mri[i].reshape(c, -1)
        for sel in idx.split(n):  # chunks: cache-resident intermediates (see voxel_chunk)
            x = src.index_select(1, sel).float()[None]
            flat[i].index_copy_(0, sel, model.predict_hu(x, mode, generator)[0].to(flat.dtype))
    out = out.float()
    return out[0] if unbatched else out
