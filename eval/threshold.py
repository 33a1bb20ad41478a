"""Which validation predictions choose the decision threshold, and how well each choice transfers.

Issue 11: the threshold chosen on the carved validation split (same hospitals, same machines as training)
does not survive acquisition shift: on the official test split specificity fell from 0.993 to 0.801 at the
val-chosen threshold while sensitivity stayed 0.99. Shifted NORMAL images score higher, so a threshold
fitted where the classes separate cleanly sits too low for them. The choices (`--threshold-on`):

    val               Youden's J (or a target sensitivity) on the clean validation predictions
    val-shifted       the same on validation under the shift proxy (pipelines/shift.py)
    val+val-shifted   the same on both pooled: every validation image counted once clean and once
                      shifted, i.e. the operating point that is best on average over "our scanners" and
                      "other scanners" (the default: docs/benchmarks.md, "Choosing the threshold")

`transfer_table` is the evidence for the choice, computed in every `eval.run` report: each rule picks its
threshold on a random half of the validation *patients* and is scored on the other half, clean and
shifted, over `repeats` random halvings (both halves take a turn). A rule is judged on images and
patients it did not see, so the table does not reward fitting the validation split itself. It cannot
promise what a real site will do: the proxy is one family of shifts, and the rules are ranked under it.
"""

from __future__ import annotations

import numpy as np

from eval import metrics as M

RULES = ("val", "val-shifted", "val+val-shifted")
DEFAULT_RULE = "val+val-shifted"
TRANSFER_REPEATS = 50


def pooled(on: str, labels, clean, shifted) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) the rule `on` chooses from: clean, shifted or both concatenated."""
    y = np.asarray(labels)
    if on == "val":
        return y, np.asarray(clean, dtype=np.float64)
    if shifted is None:
        raise ValueError(f"threshold rule {on!r} needs the val-shifted predictions")
    if on == "val-shifted":
        return y, np.asarray(shifted, dtype=np.float64)
    if on == "val+val-shifted":
        return np.r_[y, y], np.r_[np.asarray(clean, dtype=np.float64), np.asarray(shifted, dtype=np.float64)]
    raise ValueError(f"unknown threshold rule {on!r}; use one of {', '.join(RULES)}")


def choose(on: str, labels, clean, shifted=None, method: str = "youden", target_sensitivity: float = 0.95) -> dict:
    """`eval.metrics.select_threshold` on the predictions rule `on` names; adds `chosen_on`."""
    y, p = pooled(on, labels, clean, shifted)
    return {**M.select_threshold(y, p, method, target_sensitivity), "chosen_on": on}


def _rates(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(sensitivity, specificity, accuracy) at `p >= threshold`; NaN for a class that is absent."""
    r = M.rates_from_counts(**M.confusion_counts(y, p, threshold))
    return r["recall"], r["specificity"], r["accuracy"]


def transfer_table(labels, clean, shifted, groups, *, method: str = "youden", target_sensitivity: float = 0.95,
                   repeats: int = TRANSFER_REPEATS, seed: int = 0) -> dict:
    """Each rule's threshold chosen on half of the patients, scored on the other half (clean and shifted).

    `groups`: one patient id per sample (samples of one patient fall in the same half). Returns
    `{rules: {rule: {threshold, clean: {sensitivity, specificity, accuracy}, shifted: {...}} (means, with
    `*_sd` standard deviations over the 2 x repeats fits)}, repeats, patients, samples, method}`.
    A halving that leaves one class out of the fitting half is skipped (counted in `skipped`).
    """
    y = np.asarray(labels).astype(np.int64)
    pc, ps = np.asarray(clean, dtype=np.float64), np.asarray(shifted, dtype=np.float64)
    g = np.asarray(groups)
    if not (y.shape == pc.shape == ps.shape == g.shape):
        raise ValueError(f"transfer_table needs one label, clean and shifted probability and group per sample, got "
                         f"{y.shape}, {pc.shape}, {ps.shape}, {g.shape}")
    patients = np.unique(g)
    if patients.size < 2:
        raise ValueError("transfer_table needs at least 2 patients to split")
    rng = np.random.default_rng(seed)
    rows: dict[str, list[tuple[float, ...]]] = {rule: [] for rule in RULES}
    skipped = 0
    for _ in range(repeats):
        half = np.isin(g, rng.permutation(patients)[: patients.size // 2])
        for fit, held in ((half, ~half), (~half, half)):
            if np.unique(y[fit]).size < 2:
                skipped += 1
                continue
            for rule in RULES:
                t = choose(rule, y[fit], pc[fit], ps[fit], method, target_sensitivity)["threshold"]
                rows[rule].append((t, *_rates(y[held], pc[held], t), *_rates(y[held], ps[held], t)))
    out = {}
    for rule, values in rows.items():
        if not values:
            continue
        v = np.asarray(values)
        mean, sd = np.nanmean(v, axis=0), np.nanstd(v, axis=0)
        names = ("sensitivity", "specificity", "accuracy")
        out[rule] = {
            "threshold": float(mean[0]), "threshold_sd": float(sd[0]),
            "clean": {**{n: float(mean[1 + i]) for i, n in enumerate(names)},
                      **{f"{n}_sd": float(sd[1 + i]) for i, n in enumerate(names)}},
            "shifted": {**{n: float(mean[4 + i]) for i, n in enumerate(names)},
                        **{f"{n}_sd": float(sd[4 + i]) for i, n in enumerate(names)}},
        }
    return {"rules": out, "repeats": repeats, "fits": 2 * repeats - skipped, "skipped": skipped,
            "patients": int(patients.size), "samples": int(y.size), "method": method,
            **({"target_sensitivity": target_sensitivity} if method == "sensitivity" else {})}


def transfer_markdown(table: dict, chosen_on: str) -> list[str]:
    """report.md lines: the transfer table, the rule in use marked."""
    lines = [f"Threshold transfer (each rule fitted on half of the {table['patients']} validation patients, scored "
             f"on the other half; mean over {table['fits']} fits; `{table['method']}`): how each choice of "
             "`--threshold-on` holds up under the shift proxy.", "",
             "| threshold chosen on | threshold | clean sens | clean spec | clean acc | shifted sens | shifted spec | shifted acc |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for rule, r in table["rules"].items():
        mark = " (used)" if rule == chosen_on else ""
        c, s = r["clean"], r["shifted"]
        lines.append(f"| {rule}{mark} | {r['threshold']:.3f} | {c['sensitivity']:.3f} | {c['specificity']:.3f} | "
                     f"{c['accuracy']:.3f} | {s['sensitivity']:.3f} | {s['specificity']:.3f} | {s['accuracy']:.3f} |")
    return lines
