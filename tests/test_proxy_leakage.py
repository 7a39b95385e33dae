"""The checkpoint-selection proxy cannot see the embedded test set's defect generator, nor any test image.

Three independent checks: (1) a static walk of the project's import graph from the proxy's modules, each
imported name resolved to the module that defines it (a package's ``__init__`` re-exporting a name is followed
to where the name comes from), never reaches core/data/defects.py or core/data/textures.py; (2) at run time,
with every function of those two modules replaced by a trap, the proxy set-up and an evaluation still run;
(3) with ``open``, ``os.open``, ``PIL.Image.open`` and the image reader failing on any path under ``test/``, the proxy
set-up on an MVTec-layout folder reads only ``train/good``."""

from __future__ import annotations

import ast
import builtins
import inspect
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import core.data.defects
import core.data.textures
from core.backbones import TorchvisionCNN
from core.data import MVTecLayout
from experiments.harness.finetuning import datasets
from extensions.proxy import ProxyConfig, severity_bands
from extensions.synthetic import SYNTHETIC_KINDS, describe, make_synthetic
from tests.conftest import write_tiny_category

REPO = Path(__file__).resolve().parents[1]
PROXY_MODULES = ("extensions.synthetic", "extensions.proxy")
GENERATOR = {"core.data.defects", "core.data.textures"}


def _file(module: str) -> Path | None:
    path = REPO.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _package(module: str) -> str:
    return module if _file(module).name == "__init__.py" else module.rpartition(".")[0]


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = _package(module).split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _defining_module(package: str, name: str, seen: frozenset = frozenset()) -> str:
    """The project module a name imported from ``package`` comes from (submodule, or followed re-export)."""
    if _file(f"{package}.{name}"):
        return f"{package}.{name}"
    path = _file(package)
    if path is None or path.name != "__init__.py" or (package, name) in seen:
        return package
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = _absolute(package, node)
                    return _defining_module(source, alias.name, seen | {(package, name)}) if _file(source) else package
    return package  # defined in the package's __init__ itself


def _imports(module: str) -> set[str]:
    """The project modules whose names ``module`` uses (every import statement, at any depth, lazy ones too)."""
    found = set()
    for node in ast.walk(ast.parse(_file(module).read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            if _file(source) and _file(source).name == "__init__.py":
                found |= {_defining_module(source, alias.name) for alias in node.names if alias.name != "*"}
            else:
                found.add(source)
    return {name for name in found if _file(name)}


def reachable(roots) -> dict[str, str | None]:
    """Every project module reachable from ``roots`` -> the module that imports it first (None for a root)."""
    parents: dict[str, str | None] = {}
    stack = [(root, None) for root in roots]
    while stack:
        module, parent = stack.pop()
        if module not in parents:
            parents[module] = parent
            stack += [(child, module) for child in _imports(module)]
    return parents


def test_the_proxy_cannot_reach_the_test_generator() -> None:
    graph = reachable(PROXY_MODULES)
    assert {"core.patchcore", "core.data.preprocessing", "extensions.monitors"} <= graph.keys()  # the walk works
    leaked = {module: graph[module] for module in GENERATOR & graph.keys()}
    assert not leaked, f"the proxy reaches the test generator: {leaked}"
    # the walk does find the generator where it is used: the dataset layer does reach it
    assert "core.data.defects" in reachable(["core.data.textures"])
    for module in PROXY_MODULES:  # and no proxy module names a skimage image (the embedded set's photographs)
        assert "skimage" not in _file(module).read_text()


def test_the_proxy_runs_with_the_generator_trapped(tmp_path, monkeypatch) -> None:
    trapped = []
    for module in (core.data.defects, core.data.textures):
        for name, value in vars(module).items():
            if inspect.isfunction(value) and value.__module__ == module.__name__:
                monkeypatch.setattr(module, name, lambda *a, _n=name, **k: pytest.fail(f"the proxy called {_n}"))
                trapped.append(name)
    assert {"make_defect", "photo_crop", "blob_region", "scratch_region", "texture_photos"} <= set(trapped)
    extractor = TorchvisionCNN("resnet18", ["layer2", "layer3"], pretrained=False, name="resnet18")
    write_tiny_category(tmp_path, "widget", n_train=6, size=40)
    layout = MVTecLayout("folder", tmp_path, resize=32, image_size=32)
    config = ProxyConfig(holdout=0.34, embed_dim=16)
    train, validator = datasets(layout, "widget", layout.preprocessing(extractor.mean, extractor.std), config, 0,
                                extractor, "cpu")
    row = validator.evaluate(extractor, 0)
    assert len(validator.anomalies) == 2 * len(SYNTHETIC_KINDS) and 0 <= row["image_auroc"] <= 1


def test_the_proxy_set_up_never_opens_test(tmp_path, monkeypatch) -> None:
    data = tmp_path / "data"
    write_tiny_category(data, "widget", n_train=6, size=40)
    opened: list[str] = []

    def guard(real):
        def opening(path, *args, **kwargs):
            text = str(getattr(path, "name", path)) if not isinstance(path, str | Path) else str(path)
            if isinstance(path, str | Path):
                opened.append(text)
                if "/test/" in text.replace("\\", "/") or "/ground_truth/" in text.replace("\\", "/"):
                    pytest.fail(f"the proxy opened {text}")
            return real(path, *args, **kwargs)
        return opening

    monkeypatch.setattr(builtins, "open", guard(builtins.open))
    monkeypatch.setattr(PIL.Image, "open", guard(PIL.Image.open))
    monkeypatch.setattr(os, "open", guard(os.open))
    extractor = TorchvisionCNN("resnet18", ["layer2", "layer3"], pretrained=False, name="resnet18")
    layout = MVTecLayout("folder", data, resize=32, image_size=32)
    datasets(layout, "widget", layout.preprocessing(extractor.mean, extractor.std),
             ProxyConfig(holdout=0.34, embed_dim=16), 0, extractor, "cpu")
    images = {p for p in opened if p.endswith(".png")}
    assert images == {str(p) for p in (data / "widget" / "train" / "good").glob("*.png")}  # those, nothing else


def test_severity_spans_the_stated_range_and_sets_area_and_strength(tmp_path) -> None:
    """Area grows with severity as stated (AREA, linear); the record names every family and range."""
    from extensions.synthetic import AREA, SEVERITY, STRENGTH, lerp

    write_tiny_category(tmp_path, "widget", n_train=12, size=72)
    samples = MVTecLayout("folder", tmp_path).train_samples("widget")
    made = make_synthetic(samples, __import__("core.data", fromlist=["Preprocessing"]).Preprocessing(64, 64))
    severities = np.array(made.severities)
    assert SEVERITY[0] <= severities.min() and severities.max() <= SEVERITY[1] and severities.std() > 0.15
    for mask, kind, s in zip(made.masks, made.kinds, made.severities, strict=True):
        expected = lerp(AREA, s) * 64 * 64
        area = int(mask.sum())
        # boxes: rounding of each side; noise regions: a quantile of the window (ties, its rounded side)
        assert 0.5 * expected - 6 <= area <= 1.6 * expected + 6, (kind, s, area, expected)
    record = describe()
    assert record["kinds"] == list(SYNTHETIC_KINDS) and record["area_fraction"] == list(AREA)
    assert record["strength"] == {k: list(v) for k, v in STRENGTH.items()}
    assert severity_bands([0.0, 0.2, 0.34, 0.5, 0.7, 1.0]) == {"subtle": [0, 1], "medium": [2, 3],
                                                                "obvious": [4, 5]}


def test_strength_is_the_blend_factor_by_hand() -> None:
    """A cutmix box at blend ``strength`` is (1 - strength) * image + strength * the other image's box."""
    from extensions.synthetic import STRENGTH, draw, lerp

    image = np.full((64, 64, 3), 100, np.uint8)
    other = np.full((64, 64, 3), 200, np.uint8)
    for s in (0.0, 0.5, 1.0):
        edited, region = draw("cutmix", image, [other], s, np.random.default_rng(0))
        w = lerp(STRENGTH["cutmix"], s)
        assert region.any() and np.allclose(edited[region], (1 - w) * 100 + w * 200)
        assert np.array_equal(edited[~region], image[~region].astype(np.float32))
    grey = np.repeat(np.arange(64, dtype=np.uint8)[None, :, None], 64, 0).repeat(3, 2)
    edited, region = draw("draem", grey, [], 1.0, np.random.default_rng(1))
    assert region.any() and np.array_equal(edited[..., 0], edited[..., 2])  # a grey image gets a grey texture
    assert torch.is_tensor(torch.from_numpy(edited))
