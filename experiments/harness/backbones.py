"""Fine-tuned backbones on the harness side: one checkpoint per category, each checked before any work.

A fine-tuned backbone (conf/backbone/{rotation,cutmix_contrastive}.yaml, a ``FineTunedBackbone``)
names its checkpoint with ``${category}``; the harness resolves that config once per category and
says, for every missing checkpoint at once, the make target that fine-tunes it (Makefile.finetune).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from extensions.checkpoint import MissingCheckpointError, finetune_command, is_finetuned, missing_message

# method name (conf/method/<name>.yaml) -> the make target that fine-tunes it (Makefile.finetune)
MAKE_TARGETS = {"rotation": "finetune-rotation", "cutmix_contrastive": "finetune-cutmix"}
_DATASET_NOTE = "add DATASET=<dataset> unless the category is from MVTec AD or the embedded textures"


def make_command(method: str, base: str, category: str) -> str:
    """The make command that produces the checkpoint of (method, base backbone, category)."""
    target = MAKE_TARGETS.get(method, f"finetune-{method}")
    return f"make {target} CATEGORY={category} BACKBONE={base}"


def loads_one_checkpoint_per_category(backbone: DictConfig) -> bool:
    """Whether the backbone config builds a ``FineTunedBackbone`` (whose checkpoint depends on the category)."""
    return is_finetuned(backbone)


def per_category_backbones(cfg: DictConfig, categories: Sequence[str]) -> dict | None:
    """``None`` for an ordinary backbone; for a fine-tuned one, each category's backbone config
    (``${category}`` resolved to that category), after checking that every checkpoint exists (one error
    listing all missing ones and the commands that make them).
    """
    if not loads_one_checkpoint_per_category(cfg.backbone):
        return None
    configs = {category: OmegaConf.merge(cfg, {"category": category}).backbone for category in categories}
    require_checkpoints(list(configs.values()))
    return configs


def require_checkpoints(backbone_configs: Sequence[Mapping]) -> None:
    """Fail before any work when a per-category checkpoint is missing, listing every one and its command.

    ``backbone_configs``: the resolved backbone config of each category (``checkpoint``, ``method``, ``base``).
    """
    missing = [cfg for cfg in backbone_configs if not Path(str(cfg["checkpoint"])).expanduser().is_file()]
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
