"""Fine-tuned backbones on the harness side: one checkpoint per category, each checked before any work.

A fine-tuned backbone (``backbone=finetuned backbone.method=<name>``, conf/backbone/finetuned.yaml: a
``FineTunedBackbone``) names its checkpoint with ``${category}``; the harness resolves that config once
per category and says, for every missing checkpoint at once, the command that fine-tunes it
(``make finetune METHOD=<name>``, Makefile.finetune).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.harness.finetuning import method_names
from extensions.checkpoint import MissingCheckpointError, finetune_command, is_finetuned, missing_message

_DATASET_NOTE = "add DATASET=<dataset> unless the category is from MVTec AD or the embedded textures"


def backbone_problem(node: Mapping) -> str | None:
    """None when this backbone config builds on this machine (its pretrained weights or fine-tuned checkpoint
    found and loaded), else why not, in a line: the one weights check of the study planner and of selection."""
    from experiments.harness.components import build

    try:
        build(node)
    except Exception as error:  # missing weights, offline hub, missing checkpoint, unknown config: the message
        return unavailable(error)
    return None


def unavailable(error: Exception) -> str:
    """Why a backbone cannot be built here, in a line (its error's first line)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"weights not available: {type(error).__name__}: {first}"  # whole: a cut reason loses its fix


def make_command(method: str, base: str, category: str) -> str:
    """The make command that produces the checkpoint of (method, base backbone, category): one generic target
    for every conf/method/<name>.yaml, so no list of methods is kept here."""
    return f"make finetune METHOD={method} CATEGORY={category} BACKBONE={base}"


def per_category_backbones(cfg: DictConfig, categories: Sequence[str]) -> dict | None:
    """``None`` for an ordinary backbone; for a fine-tuned one, each category's backbone config
    (``${category}`` resolved to that category), after checking that every checkpoint exists (one error
    listing all missing ones and the commands that make them).
    """
    if not is_finetuned(cfg.backbone):
        return None
    configs = {category: OmegaConf.merge(cfg, {"category": category}).backbone for category in categories}
    require_checkpoints(list(configs.values()))
    return configs


def require_checkpoints(backbone_configs: Sequence[Mapping]) -> None:
    """Fail before any work when a per-category checkpoint is missing, listing every one and its command.

    ``backbone_configs``: the resolved backbone config of each category (``checkpoint``, ``method``, ``base``).
    """
    missing = [cfg for cfg in backbone_configs if not Path(str(cfg["checkpoint"])).expanduser().is_file()]
    unknown = sorted({str(cfg.get("method")) for cfg in missing} - set(method_names()))
    if unknown:
        raise MissingCheckpointError(
            f"backbone.method={unknown[0]!r} has no checkpoint and is not a fine-tuning method: choose one of "
            f"{method_names()} (conf/method/), or point backbone.checkpoint at an existing file"
        )
    if len(missing) == 1:
        cfg = missing[0]
        method, base, category = cfg.get("method"), cfg.get("base"), cfg.get("category")
        how = None
        if method and base and isinstance(category, str):
            how = (f"Make it with `{make_command(method, base, category)}` ({_DATASET_NOTE}), "
                   f"i.e. `{finetune_command(method, base, category)}`")
        raise MissingCheckpointError(missing_message(Path(str(cfg["checkpoint"])), method, base, category, how))
    if missing:
        lines = "\n".join(
            f"  {cfg['checkpoint']}: {make_command(cfg.get('method'), cfg.get('base'), cfg.get('category'))}"
            for cfg in missing
        )
        raise MissingCheckpointError(
            f"{len(missing)} fine-tuned checkpoints do not exist; make them with ({_DATASET_NOTE}):\n{lines}"
        )
