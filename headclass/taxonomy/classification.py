""":func:`classify`: score and label every attention head of a model.

It builds the probe set once (:func:`headclass.probes.build_probe_set`), hands each part to
the score that reads it (pattern scores, weight scores, optionally ablation), labels the heads
with :func:`~headclass.taxonomy.labelling.label_heads` and returns a
:class:`~headclass.taxonomy.result.HeadTaxonomy` that keeps no reference to the model.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Optional

from headclass.config import ConfigSource, HeadclassConfig, load_config
from headclass.probes import Probe, ProbeSet, build_probe_set
from headclass.taxonomy.labelling import label_heads
from headclass.taxonomy.result import HeadTaxonomy

__all__ = ["classify"]


def classify(
    model: Any,
    config: ConfigSource = None,
    *,
    probes: Any = None,
    ablation: bool = False,
    evidence: bool = True,
    progress: bool = True,
) -> HeadTaxonomy:
    """Score and label every attention head of ``model``.

    Parameters
    ----------
    model
        A :class:`~headclass.HeadModel` (from :func:`headclass.load_model`) or anything with
        its interface; anything else (an alias, hub name, path, ``transformers`` model) is
        first loaded with :func:`headclass.load_model` defaults.
    config
        ``None`` (shipped defaults), a YAML path, a partial mapping, or a
        :class:`~headclass.HeadclassConfig`; see ``configs/default.yaml``. Validated here, once.
    probes
        The pattern scores' probe batches: a :class:`~headclass.probes.ProbeSet`, or one
        :class:`~headclass.probes.Probe` / a list of them (the weight and ablation inputs are
        then built from the config). Default: :func:`~headclass.probes.build_probe_set`.
        ``config.uncertainty.bootstrap`` resamples of the probe sequences (from the sums the
        pattern pass already reduced: no extra forward) give each head's ``confidence``.
    ablation
        Also measure each head's effect on loss by ablating it
        (:func:`headclass.scores.ablation.ablation_scores`; slow): adds the
        ``ablation_induction_dloss`` and ``ablation_text_dloss`` columns.
    evidence
        Also keep what each head's card shows (:mod:`headclass.scores.examples`): its
        strongest attention examples (a bounded top-k kept inside the same hooked pass), the
        tokens its OV circuit raises and lowers, its composition partners (when affordable)
        and a pattern sample; :meth:`HeadTaxonomy.card` shows them. A few seconds more.
    progress
        Show progress bars.

    Returns
    -------
    HeadTaxonomy
        The labelled heads; it keeps no reference to ``model``.

    Examples
    --------
    >>> model = headclass.load_model("smollm2-135m")
    >>> tax = headclass.classify(model)
    >>> tax.summary()
    """
    cfg = load_config(config)
    if not hasattr(model, "run_with_patterns"):  # a name, path or model object: load it here
        from headclass.loading import load_model

        model = load_model(model)
    from headclass.scores.examples import ExampleCollector, head_evidence
    from headclass.scores.patterns import pattern_measurement
    from headclass.scores.weights import weight_scores

    probe_set, pattern_probes = _probe_inputs(model, cfg, probes, ablation)
    collector = ExampleCollector(pattern_probes, model.n_layers, model.n_heads) if evidence else None
    measured = pattern_measurement(
        model,
        config=cfg,
        probes=pattern_probes,
        progress=progress,
        observers=(collector,) if collector is not None else (),
    )
    n_boot = cfg.uncertainty.bootstrap
    replicates = measured.bootstrap(n_boot, seed=cfg.uncertainty.seed) if n_boot else None
    scores: dict[str, Any] = dict(measured.scores)
    scores.update(weight_scores(model, config=cfg, tokens=probe_set.copy_tokens, progress=progress))
    if ablation:
        from headclass.scores.ablation import ablation_scores

        scores.update(ablation_scores(model, config=cfg, probes=probe_set.ablation_probes, progress=progress))
    metadata = _model_metadata(model, cfg)
    metadata["ablation"] = bool(ablation)
    table = label_heads(
        scores,
        cfg.thresholds,
        model=metadata["model"],
        replicates=replicates,
        borderline_se=cfg.uncertainty.borderline_se,
    )
    cards = head_evidence(model, collector, local_window=cfg.patterns.local_window) if collector is not None else None
    return HeadTaxonomy(table, metadata, replicates=replicates, evidence=cards)


def _probe_inputs(model: Any, cfg: HeadclassConfig, probes: Any, ablation: bool) -> tuple[ProbeSet, list[Probe]]:
    """The probe set, and the probes of the pattern scores (the caller's, when given)."""
    if isinstance(probes, ProbeSet) and (probes.ablation_induction is not None or not ablation):
        return probes, probes.pattern_probes
    probe_set = build_probe_set(model, cfg, ablation=ablation)
    if isinstance(probes, ProbeSet):
        return probe_set, probes.pattern_probes
    if probes is None:
        return probe_set, probe_set.pattern_probes
    return probe_set, [probes] if isinstance(probes, Probe) else list(probes)


def _versions() -> dict[str, Optional[str]]:
    from importlib import metadata as md

    out: dict[str, Optional[str]] = {}
    for name in ("headclass", "torch", "transformer_lens", "transformers", "pandas"):
        try:
            out[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _model_metadata(model: Any, cfg: HeadclassConfig) -> dict[str, Any]:
    def get(attr: str) -> Any:
        try:
            return getattr(model, attr)
        except Exception:  # a fake model may lack parameters() etc.
            return None

    return {
        "model": str(get("name")),
        "n_layers": int(model.n_layers),
        "n_heads": int(model.n_heads),
        "n_params": get("n_params"),
        "backend": get("backend"),
        "architecture": get("architecture"),
        "config": cfg.model_dump(mode="json"),
        "probe_seed": int(cfg.probes.seed),
        "versions": _versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
