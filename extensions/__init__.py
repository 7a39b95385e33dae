"""Backbone fine-tuning on a task's own nominal images, for PatchCore.

    protection.py          what is kept from the pretrained weights: frozen stem/stages, frozen BatchNorm, L2-SP
    objective.py           the Objective base class every method implements, and its head helpers
    training.py            the shared loop: optimiser, schedule, checkpoints, resume, progress bar, loss log
    run_state.py           what makes the loop resumable: epoch order, schedules, RNG state, JSONL logs
    proxy.py               checkpoint selection without test labels: held-out nominal images, early stopping
    synthetic.py           the proxy's synthetic anomalies (CutPaste, CutMix, the generator's kinds), exact masks
    monitors.py            collapse monitors: effective rank, nearest-neighbour spread, the warning
    rotation.py            rotation prediction (Gidaris et al., ICLR 2018)
    cutmix_contrastive.py  SimCLR NT-Xent with CutMix-made negatives (Chen et al. 2020; Yun et al. 2019)
    checkpoint.py          checkpoint files, and ``FineTunedBackbone``: the PatchCore extractor that loads them

A method is one module here (an ``Objective``) plus one conf/method/<name>.yaml (docs/architecture.md, recipe
"Add a fine-tuning method"). Entry point: ``python experiments/finetune.py method=rotation backbone=wrn50
dataset=mvtec category=bottle``; PatchCore then uses ``backbone=finetuned backbone.method=rotation``.
"""
