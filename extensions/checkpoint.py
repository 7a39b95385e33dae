"""Fine-tuning checkpoint files, and ``FineTunedBackbone``: the PatchCore extractor that loads one.

For one (method, base backbone, category) the files live side by side:

    checkpoints/<method>/<backbone>/<category>.pt          fine-tuned extractor weights (what PatchCore loads)
    checkpoints/<method>/<backbone>/<category>.json        sidecar: base backbone, method, config, steps, loss, date
    checkpoints/<method>/<backbone>/<category>.loss.jsonl  one line per training step
    checkpoints/<method>/<backbone>/<category>.resume.pt   training state while a run is unfinished

Every file is written atomically (temp file + rename) and every ``.pt`` is read with
``torch.load(..., weights_only=True)``: plain tensors and containers, no pickled code.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.backbones import FeatureExtractor
from core.io import atomic_write, write_json_atomic

FORMAT_VERSION = 1
# method name (conf/method/<name>.yaml) -> the make target that fine-tunes it (Makefile.finetune)
MAKE_TARGETS = {"rotation": "finetune-rotation", "cutmix_contrastive": "finetune-cutmix"}
_TRUSTED_MODULES = ("core.", "extensions.")


class MissingCheckpointError(FileNotFoundError):
    """The fine-tuned checkpoint PatchCore asks for does not exist; the message names the command that makes it."""


class CheckpointMismatchError(ValueError):
    """A checkpoint is not the one the configuration (or a saved model) refers to."""


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one fine-tuning run, all next to ``weights``."""

    weights: Path

    @classmethod
    def for_run(cls, root: str | Path, method: str, backbone: str, category: str) -> CheckpointFiles:
        return cls(Path(root) / method / backbone / f"{category}.pt")

    @property
    def sidecar(self) -> Path:
        return self.weights.with_suffix(".json")

    @property
    def loss_log(self) -> Path:
        return self.weights.with_suffix(".loss.jsonl")

    @property
    def state(self) -> Path:
        return self.weights.with_suffix(".resume.pt")


def save_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save`` through a temp file and a rename: a crash leaves the old file or the new one."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU; a clear error for an unreadable file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointMismatchError(
            f"cannot read checkpoint {path}: {error}. Delete it and fine-tune again."
        ) from error


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sidecar(files: CheckpointFiles, record: dict) -> Path:
    return write_json_atomic(files.sidecar, record)


def read_sidecar(files: CheckpointFiles) -> dict | None:
    try:
        return json.loads(files.sidecar.read_text())
    except (OSError, ValueError):
        return None


def make_command(method: str, base: str, category: str) -> str:
    """The command that produces the checkpoint of (method, base backbone, category)."""
    target = MAKE_TARGETS.get(method, f"finetune-{method}")
    return f"make {target} CATEGORY={category} BACKBONE={base}"


def _missing_message(path: Path, method: str | None, base: str | None, category) -> str:
    what = f"{method or 'fine-tuned'} checkpoint for category {category!r} on base backbone {base}"
    if method and base and isinstance(category, str):
        how = (
            f"Make it with `{make_command(method, base, category)}` (add DATASET=<dataset> unless the category is "
            f"from MVTec AD or the embedded textures), i.e. `python experiments/finetune.py method={method} "
            f"backbone={base} dataset=<dataset> category={category}`"
        )
    else:
        how = "Make it with experiments/finetune.py (see the README section on fine-tuning)"
    return f"no {what}: {path} does not exist. {how}; or point backbone.checkpoint at an existing file."


def require_checkpoints(backbone_configs: Sequence[Mapping]) -> None:
    """Fail before any work when a per-category checkpoint is missing, listing every one and its command.

    ``backbone_configs``: the resolved backbone config of each category (``checkpoint``, ``method``, ``base``).
    """
    missing = [cfg for cfg in backbone_configs if not Path(str(cfg["checkpoint"])).expanduser().is_file()]
    if len(missing) == 1:
        cfg = missing[0]
        raise MissingCheckpointError(
            _missing_message(Path(str(cfg["checkpoint"])), cfg.get("method"), cfg.get("base"), cfg.get("category"))
        )
    if missing:
        lines = "\n".join(
            f"  {cfg['checkpoint']}: {make_command(cfg.get('method'), cfg.get('base'), cfg.get('category'))}"
            for cfg in missing
        )
        raise MissingCheckpointError(
            f"{len(missing)} fine-tuned checkpoints do not exist; make them with (add DATASET=<dataset> unless the "
            f"categories are from MVTec AD or the embedded textures):\n{lines}"
        )


def per_category_backbones(cfg, categories: Sequence[str]) -> dict | None:
    """For experiments/main.py: ``None`` for an ordinary backbone; for one with ``per_category: true``,
    each category's backbone config (``${category}`` resolved to that category), after checking that
    every checkpoint exists (one error listing all missing ones and the commands that make them).
    """
    from omegaconf import OmegaConf

    if not cfg.backbone.get("per_category", False):
        return None
    configs = {category: OmegaConf.merge(cfg, {"category": category}).backbone for category in categories}
    require_checkpoints(list(configs.values()))
    return configs


def build_base(spec: dict) -> FeatureExtractor:
    """Rebuild the base extractor of a checkpoint from its ``spec()``, without loading pretrained weights."""
    target = spec["target"]
    if not target.startswith(_TRUSTED_MODULES):
        raise CheckpointMismatchError(
            f"refusing to build {target!r}: base backbones must come from core/ or extensions/"
        )
    kwargs = dict(spec["kwargs"])
    for key, value in (("pretrained", False), ("weights_path", None)):  # the checkpoint holds every weight
        if key in kwargs:
            kwargs[key] = value
    module_name, _, class_name = target.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**kwargs)


class FineTunedBackbone(FeatureExtractor):
    """A base extractor (wrn50, resnet18/50, effnet_lite0) with weights fine-tuned by ``extensions``.

    Checkpoints are per category: conf/backbone/{rotation,cutmix_contrastive}.yaml name the file with
    ``${category}`` and say ``per_category: true``, and experiments/main.py builds one extractor per
    category (``category`` is only used to check that and in messages). Same ``layers``, ``mean``, ``std`` and
    ``interpolation`` as the base; ``spec()`` names the resolved file and its SHA-256, so a saved
    PatchCore model refuses a checkpoint that has been retrained since.
    """

    def __init__(
        self,
        checkpoint: str,
        method: str | None = None,
        base: str | None = None,
        category: str | Sequence[str] | None = None,
        name: str | None = None,
        sha256: str | None = None,
        per_category: bool = True,  # read by experiments/main.py; accepted here so the YAML instantiates
    ) -> None:
        super().__init__()
        path = self._resolve(str(checkpoint), category, method)
        if not path.is_file():
            raise MissingCheckpointError(_missing_message(path, method, base, category))
        digest = file_sha256(path)
        if sha256 is not None and digest != sha256:
            raise CheckpointMismatchError(
                f"{path} has changed since this model was made (SHA-256 {digest[:12]}..., expected "
                f"{sha256[:12]}...): it was fine-tuned again. Refit the PatchCore model."
            )
        payload = load_torch(path)
        if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
            raise CheckpointMismatchError(
                f"{path} is not a fine-tuning checkpoint of format {FORMAT_VERSION}: fine-tune again"
            )
        if method is not None and payload["method"] != method:
            raise CheckpointMismatchError(f"{path} was made by method {payload['method']!r}, not {method!r}")
        base_name = payload["base"]["name"]
        if base is not None and base_name != base:
            raise CheckpointMismatchError(
                f"{path} was fine-tuned from {base_name!r}, but backbone.base={base!r}: set backbone.base={base_name}"
            )
        self.model = build_base(payload["base"])
        self.model.load_state_dict(payload["state_dict"])
        self.model.eval()
        self.layers = list(self.model.layers)
        self.mean, self.std = tuple(self.model.mean), tuple(self.model.std)
        self.interpolation = self.model.interpolation
        self.method = payload["method"]
        self.base = base_name
        self.checkpoint = path
        self.steps = int(payload.get("step", 0))
        self.name = name or f"{self.method}_{base_name}"
        self._spec_kwargs = dict(
            checkpoint=str(path), method=self.method, base=base_name,
            category=category if isinstance(category, str) else None, name=self.name, sha256=digest,
        )

    @staticmethod
    def _resolve(checkpoint: str, category, method: str | None) -> Path:
        if category is not None and (not isinstance(category, str) or category == "all"):
            raise ValueError(
                f"backbone={method or 'fine-tuned'} loads one checkpoint per category, but category={category!r} "
                f"(checkpoint {checkpoint}): experiments/main.py builds it once per category when the backbone "
                "config has per_category: true; otherwise pass a single category=<name>"
            )
        return Path(checkpoint).expanduser()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model(images)
