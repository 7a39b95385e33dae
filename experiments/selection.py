"""Choose PatchCore's configuration without defect labels: ``python experiments/selection.py [overrides]``.

    python experiments/selection.py dataset=textures category=brick
    python experiments/selection.py dataset=elpv backbone=resnet18 select/space=default select.seed=1
    python experiments/selection.py score_run=outputs/<date>/<time>_textures_effnet_lite0

Per category, from train/good only, every candidate of the space (conf/select/space/) is fitted on a seeded
part and scored on the held-out rest and synthetic anomalies made from it (the proxy of extensions/proxy.py);
the best is written to ``selection.json`` in the run folder, which ``python experiments/main.py
selection=<path> category=<name>`` applies. ``score_run=<run folder>`` scores a finished main.py run's
configuration with the same proxy instead. The work is experiments/harness/selection.py's; docs/selection.md.
Not named select.py: Python puts a script's folder first on sys.path, and an experiments/select.py would then
shadow the standard library's ``select`` module (imported by logging) for every script in experiments/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.harness.interrupts import exit_on_interrupt
from experiments.harness.overrides import refuse_bad_overrides


@exit_on_interrupt("the candidates already scored are kept in selection.json (complete: false);\n"
                   "run the same command again to resume without fitting them again")
def main() -> None:
    """Old setting names are refused before torch is imported, with the new name."""
    refuse_bad_overrides(sys.argv[1:])
    _hydra_main()


def _compose(overrides: list[str]) -> DictConfig:
    """main.py's config for these overrides, composed as main.py would compose it."""
    return hydra.compose(config_name="config", overrides=overrides)


@hydra.main(version_base="1.3", config_path="../conf", config_name="select")
def _hydra_main(cfg: DictConfig) -> None:
    from experiments.harness.selection import run_selection, score_run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        if cfg.score_run:
            record = score_run(cfg, Path(str(cfg.score_run)), run_dir, _compose)
            for category, row in record["categories"].items():
                print(f"{category:>16}: proxy {record['metric']} {row['score']:.4f} (image AUROC "
                      f"{row['image_auroc']:.4f}, pixel AUROC {row['pixel_auroc']:.4f})")
            print(f"proxy scores of {cfg.score_run}: {run_dir / 'score_run.json'} (the run itself is unchanged)")
            return
        record = run_selection(cfg, run_dir, list(hydra_cfg.overrides.task), _compose,
                               hydra_cfg.runtime.choices.get("select/space", "default"))
    except (ValueError, FileNotFoundError) as error:  # bad settings or input: the message says what to fix
        raise SystemExit(f"error: {error}") from None
    for category, node in record["categories"].items():
        best = next(e for e in node["candidates"] if e["name"] == node["chosen"])
        print(f"{category:>16}: chose {node['chosen']} (proxy {record['metric']} {best['score']:.4f} of "
              f"{len(node['candidates'])} candidates)")
        print(f"{'':>16}  {record['commands'][category]}")
        for skipped in node.get("skipped", []):
            print(f"{'':>16}  skipped {skipped['name']}: {skipped['reason']}")
    print(f"selection: {run_dir / 'selection.json'} ({record['time_s']:.1f}s)")


if __name__ == "__main__":
    main()
