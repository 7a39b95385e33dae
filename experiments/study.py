"""The comparative study in one command: ``python experiments/study.py [--study quick] [--dataset mvtec] ...``.

Runs conf/study/<name>.yaml (``default``: the whole comparison on the embedded textures set and on ELPV's solar
cells; ``quick``: a smoke run of a few minutes) by calling ``experiments/main.py`` and ``experiments/finetune.py``
once per job, into ``studies/<name>/<dataset>/<comparison>/<arm>[_seed<s>]/``. Re-running the same command
resumes it: finished jobs are skipped. ``studies/<name>/study.json`` records what ran, what was skipped and why,
and how long each job took; ``python experiments/report.py studies/<name>`` (``make report``) turns it into the paper.
The plan: experiments/studies/plan.py; running it: experiments/studies/runner.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.harness.interrupts import exit_on_interrupt
from experiments.studies.plan import StudyConfigError, build_plan, load_study
from experiments.studies.runner import run_plan


def resolve_categories(dataset: str, category) -> list[str]:
    """The dataset's categories named by ``category`` (the embedded textures are generated here if needed)."""
    from hydra import compose, initialize_config_dir

    from experiments.harness.components import build
    from experiments.studies.comparison import CONF_STUDY

    with initialize_config_dir(config_dir=str(CONF_STUDY.parent), version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={dataset}"])
    return list(build(cfg.dataset).resolve_categories(category))


@exit_on_interrupt("finished jobs are kept in the study folder; run the same command again to resume (finished jobs "
                   "are skipped)")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="default", help="conf/study/<name>.yaml or a YAML path (default: default)")
    parser.add_argument("--dataset", default=None,
                        help="run on this dataset only (conf/dataset/): the study's entry for it (its categories, "
                             "overrides, comparisons), else all its categories and every comparison; the study folder "
                             "becomes <name>_<dataset>")
    parser.add_argument("--category", default=None, help="one category, or a list as [a,b] (default: the study's); "
                                                         "with a study of several datasets, name one with --dataset")
    parser.add_argument("--backbones", default=None,
                        help="comma list: the baseline backbone first, then the extractors compared with it")
    parser.add_argument("--name", default=None, help="study folder name (default: the study's name)")
    parser.add_argument("--out", default="studies", help="folder of the studies (default: studies)")
    parser.add_argument("--extra", default="", help="overrides added to every run, e.g. 'device=cuda batch_size=32'")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs and exit")
    args = parser.parse_args(argv)
    try:
        config = load_study(args.study)
        if args.dataset:
            datasets = config.get("datasets") if isinstance(config.get("datasets"), dict) else {}
            config["datasets"] = {args.dataset: datasets.get(args.dataset) or {"category": "all"}}
            config["name"] = f"{config['name']}_{args.dataset}"
        if args.category:
            datasets = config.get("datasets") or {}
            if len(datasets) != 1:
                raise StudyConfigError(f"--category {args.category}: the study runs on {', '.join(datasets)}; "
                                       "name the dataset too (--dataset <name>)")
            name = next(iter(datasets))
            config["datasets"][name] = {**(datasets[name] or {}), "category": args.category}
        if args.backbones:
            names = [b.strip() for b in args.backbones.split(",") if b.strip()]
            config["backbone"] = names[0]
            for spec in (config.get("comparisons") or {}).values():
                if isinstance(spec, dict) and "extractors" in spec:
                    spec["extractors"] = names[1:]
        if args.name:
            config["name"] = args.name
        if args.extra:
            config["common"] = [*(config.get("common") or []), *args.extra.split()]
        datasets = config.get("datasets") if isinstance(config.get("datasets"), dict) else {}
        categories = {name: resolve_categories(name, (entry or {}).get("category", "all"))
                      for name, entry in datasets.items()}
        plan = build_plan(config, Path(args.out), categories)
    except (StudyConfigError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    on = "; ".join(f"{name} ({', '.join(names)})" for name, names in categories.items())
    print(f"study {plan.name} on {on}: {len(plan.jobs)} jobs in {len(plan.comparisons)} comparisons, "
          f"{len(plan.skipped)} arms skipped -> {plan.folder}")
    if args.dry_run:
        for job in plan.jobs:
            print(" ".join(job.command("python")))
        return
    manifest = run_plan(plan, python=sys.executable)
    failed = [row["id"] for row in manifest["jobs"] if row["status"] in ("failed", "blocked")]
    print(f"report: python experiments/report.py {plan.folder}")
    if failed:
        raise SystemExit(f"{len(failed)} jobs did not finish: {', '.join(failed)} (logs: <folder>/study.log); "
                         "re-run the same command to retry them")


if __name__ == "__main__":
    main()
