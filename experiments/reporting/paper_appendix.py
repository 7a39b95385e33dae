"""The paper's appendix parts that would otherwise crowd the results: the fine-tuning diagnostics (every
fine-tuned arm's training and proxy logs, finetune_figures.py) and the commands, one per job kind with the
manifest that lists every job's command, never every job's command line."""

from __future__ import annotations

from experiments.reporting.comparisons import Inputs
from experiments.reporting.data import first_run
from experiments.reporting.document import Block, Code, Heading, text
from experiments.reporting.finetune_figures import finetune_figure
from experiments.reporting.wording import plural
from extensions.checkpoint import is_finetuned

DIAGNOSTICS = "Fine-tuning diagnostics"


def finetuned(comparison) -> bool:
    return any(is_finetuned(arm.runs[0].config.get("backbone") or {}) for arm in comparison.others)


def diagnostics_blocks(ctx, figure_blocks) -> list[Block]:
    """The appendix section of the fine-tuning logs (each log drawn once, though two comparisons share its
    fine-tuning); none without fine-tuned arms. ``figure_blocks``: paper_sections' saver of built figures."""
    seen: set = set()
    built = [figure for comparison in ctx.present if finetuned(comparison)
             for figure in finetune_figure(comparison, seen)]
    if not built:
        return []
    return [Heading(DIAGNOSTICS, 1),
            text("Per fine-tuned arm (first seed), what its fine-tuning logged at each step: the training loss and "
                 "task accuracy, then the label-free proxy's evaluations that select the checkpoint and the collapse "
                 "monitors. Quantities that never change are named in the caption, not drawn."),
            *figure_blocks(built, ctx.out)]


def command_lines(inputs: Inputs) -> list[str]:
    """The study's command, one job of each kind (with how many there are and the manifest that lists them all)
    and this report's command; without a study, one run of each variant."""
    manifest = inputs.manifest or {}
    lines = []
    if manifest:
        lines.append(f"# the study ({manifest.get('study')}); re-running it resumes\n{manifest.get('command')}")
        where = f"{manifest.get('folder') or inputs.run_dirs[0]}/study.json"
        lines.append(f"# every job's command, folder and status: {where}; one job of each kind:")
        by_kind: dict[str, list[dict]] = {}
        for job in manifest.get("jobs") or []:
            by_kind.setdefault(job.get("kind", "?"), []).append(job)
        for kind, jobs in by_kind.items():
            lines.append(f"# {kind}: {plural(len(jobs), 'job')}, e.g. {jobs[0]['id']}\n{jobs[0]['command']}")
    else:
        variants = dict.fromkeys(run.variant for run in inputs.runs)
        lines += [f"# {variant} (other seeds: seed=<n>)\n"
                  f"{first_run([r for r in inputs.runs if r.variant == variant]).command}" for variant in variants]
    lines.append("# this report\npython experiments/report.py " + " ".join(inputs.run_dirs))
    return lines


def commands_blocks(inputs: Inputs) -> list[Block]:
    return [text("*Commands.*"), Code("\n".join(command_lines(inputs)))]
