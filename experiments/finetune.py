"""Fine-tune a backbone on each category's nominal training images: ``python experiments/finetune.py [overrides]``.

    python experiments/finetune.py method=rotation backbone=effnet_lite0 dataset=textures category=all
    python experiments/finetune.py method=cutmix_contrastive backbone=wrn50 dataset=mvtec category=bottle

The backbone (conf/backbone/), dataset (conf/dataset/) and method (conf/method/) are composed by
Hydra; only ``layout.train_set`` (the train/<good> images) is read, never a test image. Each
category's result goes to ``<checkpoint_dir>/<method>/<backbone>/<category>.pt`` (+ .json sidecar,
.loss.jsonl log), which ``python experiments/main.py backbone=finetuned backbone.method=<method>
backbone.base=<backbone>`` loads. A new method is one module and one YAML (docs/architecture.md, Recipes).
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.harness.interrupts import exit_on_interrupt
from experiments.harness.overrides import refuse_bad_overrides


@exit_on_interrupt("finished categories' checkpoints are kept, and the interrupted one continues from its last "
                   "resume file (every checkpoint_every steps);\nrun the same command again to resume (resume=true)")
def main() -> None:
    """Old setting names are refused before torch is imported, with the new name."""
    refuse_bad_overrides(sys.argv[1:])
    _hydra_main()


@hydra.main(version_base="1.3", config_path="../conf", config_name="finetune")
def _hydra_main(cfg: DictConfig) -> None:
    from experiments.harness.finetuning import run

    try:
        records = run(cfg, HydraConfig.get().runtime.output_dir)
    except (ValueError, FileNotFoundError) as error:  # bad settings or input: the message says what to fix
        raise SystemExit(f"error: {error}") from None
    for category, record in records.items():
        loss = record["final_loss"]
        loss_text = "no step finished" if loss is None else (
            f"final loss {loss:.4f} (mean of last epoch {record['final_loss_mean']:.4f})")
        proxy = (record.get("selection") or {}).get("proxy") or {}
        chosen = "" if not proxy else (f", selected step {record['selected_step']} (proxy image AUROC "
                                       f"{proxy['image_auroc']:.4f}, pixel AUROC {proxy['pixel_auroc']:.4f})")
        print(f"{category:>16}: {record['steps']} steps, {loss_text}{chosen} -> "
              f"{cfg.checkpoint_dir}/{record['method']}/{cfg.backbone.name}/{category}.pt")
    print(f"use it: python experiments/main.py backbone=finetuned backbone.method={cfg.method.name} "
          f"backbone.base={cfg.backbone.name} "
          f"dataset={cfg.dataset.name} category=<category>")


if __name__ == "__main__":
    main()
