"""The markdown table of all lines, and the issue's goal ratios computed from lines of the same run."""

from __future__ import annotations

from experiments.benchmarks.export_speed import FAST_F32_ORT, PYTORCH
from experiments.benchmarks.prediction import OFFICIAL_STYLE
from experiments.benchmarks.real_images import DEFAULT_RATIO
from experiments.benchmarks.searches import DEFAULT

SKIP = {"stage", "variant", "n", "ratio", "seconds", "items_per_s", "peak_rss_mb", "dim", "study", "seconds_runs"}
EAGER_EMBEDDING = "backbone + patch embedding (eager, 8 images per call)"
PLAIN_LOOP = "plain loop (one pass per centre)"
COLD_FIT = "cold, features streamed to the cache"
IDENTITY = ("auroc_diff", "max_abs_score_diff", "max_abs_map_diff", "max_rel_map_diff")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(lines: list[dict]) -> str:
    head = ("| stage | variant / study | n | ratio | seconds | items/s | peak RSS MB | notes |\n"
            "|---|---|---:|---:|---:|---:|---:|---|")
    rows = []
    for line in lines:
        notes = ", ".join(f"{k}={_short(v)}" for k, v in line.items() if k not in SKIP and v is not None)
        label = line.get("variant") or (f"study: {line['study']}" if line.get("study") else "")
        rows.append(f"| {line['stage']} | {label} | {line['n']} | {line['ratio'] if line['ratio'] is not None else ''} "
                    f"| {line['seconds']} | {line['items_per_s']} | {line['peak_rss_mb']} | {notes} |")
    return "\n".join([head, *rows])


def _find(lines: list[dict], stage: str, variant: str, **keys) -> dict | None:
    """The first line of ``stage`` and ``variant`` whose other ``keys`` match (None: absent)."""
    for line in lines:
        if line["stage"] == stage and line.get("variant") == variant and all(line.get(k) == v for k, v in keys.items()):
            return line
    return None


def _prediction_goal(goal: str, aggregation: str, target: float, now: dict, official: dict) -> dict:
    """The default's prediction line against the official-style one, with the default's identity figures."""
    return {"goal": goal, "aggregation": aggregation, "target": target,
            "ratio": round(now["items_per_s"] / official["items_per_s"], 2),
            "notes": f"{now['items_per_s']} vs {official['items_per_s']} images/s, "
                     + ", ".join(f"{key}={_short(now.get(key))}" for key in IDENTITY)}


def goals(lines: list[dict]) -> list[dict]:
    """The issue's goals, each a ratio of two lines measured side by side in this run (absent lines: skipped).

    The official-style fit is the eager backbone with this embedding on the preloaded training images
    plus the plain coreset loop (extrapolated): it leaves out data loading, which the fit includes, so
    the fit ratio is if anything understated."""
    found = []
    threads = lines[0]["threads"] if lines else None
    for aggregation in ("official", "channel_mean"):
        tag = {"aggregation": aggregation}
        fit, eager = _find(lines, "fit", COLD_FIT, **tag), _find(lines, "backbone_only", EAGER_EMBEDDING, **tag)
        plain = _find(lines, "coreset_reference", PLAIN_LOOP, **tag)
        if fit and eager and plain:
            starting = eager["seconds"] * fit["n"] / eager["n"] + plain["seconds"]
            found.append({"goal": "fit vs official-style (eager backbone + embedding + plain coreset loop)",
                          **tag, "target": 10.0, "ratio": round(starting / fit["seconds"], 2),
                          "notes": f"{starting:.1f} s vs {fit['seconds']:.1f} s"})
        now = _find(lines, "predict", DEFAULT, threads=threads, study=None, **tag)
        official = _find(lines, "predict", OFFICIAL_STYLE, study=None, **tag)
        if now and official:
            found.append(_prediction_goal("prediction vs official-style pipeline", aggregation, 3.0, now, official))
    for study in dict.fromkeys(line["study"] for line in lines if str(line.get("study", "")).startswith("real:")):
        now, official = (_find(lines, "predict", variant, study=study) for variant in (DEFAULT, OFFICIAL_STYLE))
        if now and official:  # issue 29: real images, the same run, images and weights
            settings = "" if now.get("ratio") == DEFAULT_RATIO else ", not the default settings"
            found.append(_prediction_goal(f"prediction vs official-style pipeline, real images ({study[5:]}, "
                                          f"coreset ratio {now.get('ratio')}{settings}, {now['bank_size']} bank "
                                          "patches)", "official", 2.5, now, official))
    wrn = next((line for line in lines if line["stage"] == "predict" and line.get("study") == "wrn50"
                and "backbone_images_per_s" in line), None)  # the default's line, not the exported ones
    if wrn:
        found.append({"goal": "WRN50 prediction vs backbone-only throughput", "aggregation": "official",
                      "target": 0.8, "ratio": round(wrn["items_per_s"] / wrn["backbone_images_per_s"], 3),
                      "notes": f"{wrn['items_per_s']} vs {wrn['backbone_images_per_s']} images/s"})
    for study in (None, "wrn50"):  # issue 29: the fast form at least at PyTorch's speed, same run, same crops
        fast, torch_line = (_find(lines, "predict", variant, study=study) for variant in (FAST_F32_ORT, PYTORCH))
        if fast and torch_line:
            found.append({"goal": f"exported fast form (ONNX Runtime, float32) vs PyTorch{', WRN50' if study else ''}",
                          "aggregation": "official", "target": 1.0,
                          "ratio": round(fast["items_per_s"] / torch_line["items_per_s"], 2),
                          "notes": f"{fast['items_per_s']} vs {torch_line['items_per_s']} images/s"})
    for goal in found:
        goal["met"] = goal["ratio"] >= goal["target"]
    return found


def goals_table(found: list[dict]) -> str:
    head = "| goal | aggregation | ratio | target | met | notes |\n|---|---|---:|---:|---|---|"
    rows = [f"| {g['goal']} | {g['aggregation']} | {g['ratio']} | >= {g['target']} | {'yes' if g['met'] else 'NO'} "
            f"| {g['notes']} |" for g in found]
    return "\n".join([head, *rows])
