"""Command-line overrides refused before Hydra composes anything, each with the fix.

Settings that changed name: the old name fails at once, naming the new one.

Hydra would refuse an old key too, but only with "Key 'num_neighbors' is not in struct" and a hint to
append it with ``+``, which would silently do nothing. Checked on the command line before Hydra composes
(``refuse_renamed``) and on a study's overrides when it is planned. Each entry: old key (or old prefix,
ending in ``.``) -> new key (or new prefix).
"""

from __future__ import annotations

from collections.abc import Iterable

RENAMED: dict[str, str] = {
    # the PatchCore settings live in conf/model/patchcore.yaml, nested by the class that uses them
    **{f"patchcore.{key}": f"patchcore.embedder.{key}" for key in ("aggregation", "embed_dim", "patch_size")},
    **{f"patchcore.{key}": f"patchcore.scoring.{key}"
       for key in ("num_neighbors", "reweight_neighbors", "distance", "image_score", "top_percent", "blur_sigma")},
    "model.": "cae.",  # the CAE's settings (model=cae) are the cae node; `model` is the node that gets built
    "memory": "search",  # the former name of the search group (memory=faiss)
    "memory.": "search.",
    # a fine-tuning method: the shared training settings under method.train, the method's own under
    # method.objective (conf/method/<name>.yaml)
    **{f"method.{key}": f"method.train.{key}"
       for key in ("epochs", "max_steps", "batch_size", "lr", "head_lr", "weight_decay", "seed", "frozen_stages",
                   "freeze_bn", "train_bn_affine", "l2sp_weight", "head_only_steps")},
    **{f"method.{key}": f"method.objective.{key}"
       for key in ("_target_", "hidden_dim", "flip", "temperature", "box_scale", "box_ratio", "same_image_prob",
                   "crop_scale", "jitter", "projection_dim")},
}


def override_key(override: str) -> str:
    """The key an override sets (``+key=v`` adds it, ``~key`` deletes it: the same key)."""
    return override.split("=", 1)[0].lstrip("+~")


def renamed(override: str) -> str | None:
    """The message for an override that uses an old name, else None."""
    key = override_key(override)
    for old, new in RENAMED.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            fixed = new + key[len(old):]
            return f"{key} was renamed {fixed}: write {override.replace(key, fixed, 1)}"
    return None


def renamed_overrides(overrides: Iterable[str]) -> list[str]:
    """One message per override that uses an old name."""
    return [message for message in map(renamed, overrides) if message]


def mixed_models(overrides: Iterable[str]) -> str | None:
    """A sweep over several models (``model=patchcore,cae``) that also sets one model's settings
    (``patchcore.scoring.num_neighbors=3``): the other model's jobs would fail mid-sweep, so it is refused
    up front. Each model's settings are the node named after it (conf/model/<name>.yaml)."""
    overrides = list(overrides)
    models = [value.split(",") for key, _, value in (o.partition("=") for o in overrides) if key == "model"]
    names = {name.strip() for options in models for name in options}
    if len(names) < 2:
        return None
    own = sorted({o.split("=", 1)[0] for o in overrides if o.split(".", 1)[0].lstrip("+~") in names and "." in o})
    if not own:
        return None
    return (f"the sweep runs model={','.join(sorted(names))} but sets {', '.join(own)}, which only one of them has: "
            "sweep each model in a run of its own")


def refuse_bad_overrides(argv: Iterable[str]) -> None:
    """Exit with the fix when a command line uses old names or mixes models (before Hydra composes)."""
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    messages = renamed_overrides(overrides)
    mixed = mixed_models(overrides)
    if messages or mixed:
        raise SystemExit("error: " + "; ".join([*messages, *([mixed] if mixed else [])]))
