"""select-aux: classify the synthetic set and resample it per class into the aux fine-tuning set (shift).

Runs after generate and before finetune-aux when the config has a shift section. The selecting classifier
(shift/classifiers.py) labels every synthetic sample; their histogram is the base's measured class histogram
pi_base; shift/selection.py derives the aux histogram whose guidance at shift.w (times the calibrated gain)
turns pi_base into the target, rounds it to per-class counts of shift.aux_samples, and picks those samples
(seeded; repeats only where a class is short). The set is written as WebDataset shards whose manifest records
the histograms and counts; finetune-aux then trains on it. One process: it holds the synthetic set in memory.
A rerun makes the same selection and writes only the shards not yet committed.
"""

from __future__ import annotations

from sims_platform.data import ShardWriter, read_shards
from sims_platform.shift.classifiers import classify, shift_classifier
from sims_platform.shift.selection import aux_histogram, class_histogram, stratified_counts, stratified_indices
from sims_platform.stages.context import StageContext

# Offset of the resampling seed from the run's seed, per iteration (disjoint from the sample seed streams).
_SELECT_SALT = 524_287


def select_aux(ctx: StageContext, run_id: str) -> dict:
    """The shift's aux set: the synthetic samples of iteration k resampled to the designed class histogram."""
    if ctx.cfg.shift is None:
        raise ValueError("select-aux needs a shift section in the config (it is only in the plan when shift is "
                         "set)")
    if ctx.parts != 1:
        raise ValueError(f"select-aux runs as one process, got --count {ctx.parts}")
    k, layout, sh, g = ctx.iteration, ctx.layout, ctx.cfg.shift, ctx.cfg.generate
    num_classes = ctx.cfg.data.num_classes
    syn_uri, out = layout.shards(k, "generate"), layout.shards(k, "select-aux")
    ctx.lineage.log_params(run_id, {"shift.w": sh.w, "shift.gain": sh.gain, "shift.aux_samples": sh.aux_samples,
                                    "shift.classifier": sh.classifier})
    ctx.lineage.link(run_id, inputs={"synthetic": syn_uri}, outputs={"aux_set": out})

    x, _, seeds = read_shards(syn_uri)
    clf = shift_classifier(ctx.cfg, ctx.layout.features, ctx.data.labelled, ctx.device, "select")
    predicted = classify(clf, ctx.data.encoder.decode(x), g.batch_size)
    base = class_histogram(predicted, num_classes)
    target = sh.target_probs(num_classes)
    aux = aux_histogram(base, target, sh.w, sh.gain)
    counts = stratified_counts(aux, sh.aux_samples)
    idx, repeats = stratified_indices(predicted, counts, ctx.cfg.seed + _SELECT_SALT + k)

    meta = {"source": syn_uri, "iteration": k, "classifier": sh.classifier, "classifier_fingerprint":
            clf.fingerprint, "w": sh.w, "gain": sh.gain, "base_histogram": base.tolist(), "target": target,
            "aux_histogram": aux.tolist(), "counts": counts, "repeats": repeats}
    writer = ShardWriter(out, shard_size=g.shard_size, total=sh.aux_samples, meta=meta)
    for j in writer.missing_shards():
        rows = writer.shard_range(j)
        pick = idx[rows.start:rows.stop]
        # Labels are the selecting classifier's; keys are positions in the set (a repeated sample keeps its seed).
        writer.write_shard(j, x[pick], predicted[pick], seeds[pick], keys=pick.new_tensor(list(rows)))
    manifest = writer.finalize()
    ctx.lineage.log_metrics(run_id, {f"base_histogram.{c}": float(p) for c, p in enumerate(base)}
                            | {f"aux_histogram.{c}": float(p) for c, p in enumerate(aux)}
                            | {"repeats": float(repeats)}, step=0)
    print(f"[iter {k} select-aux] base histogram {[round(float(p), 3) for p in base]} -> aux counts {counts} "
          f"({repeats} repeats)", flush=True)
    return {"aux_set": out, "samples": manifest["total"], "base_histogram": meta["base_histogram"],
            "aux_histogram": meta["aux_histogram"], "counts": counts, "repeats": repeats}
