"""The convolutional-autoencoder baseline: training lowers the loss, maps and scores are consistent."""

import pytest
import torch

from core.cae import CAE, ConvAutoencoder


def tiny_loader(count: int = 6, size: int = 48) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    base = torch.linspace(0, 1, size).repeat(size, 1)
    images = [(base + 0.05 * torch.rand(size, size, generator=generator)).clamp(0, 1).expand(3, -1, -1)
              for _ in range(count)]
    return torch.utils.data.DataLoader([{"image": image, "label": 0} for image in images], batch_size=3)


@pytest.mark.parametrize("loss", ["ssim", "l2"])
def test_training_lowers_the_loss_and_maps_have_input_size(loss: str) -> None:
    model = CAE(image_size=32, latent_dim=16, loss=loss, epochs=15, batch_size=3, progress=False)
    report = model.fit(tiny_loader())
    assert report.n_images == 6 and len(model.loss_log) == 15 * 2
    first, last = sum(model.loss_log[:4]) / 4, sum(model.loss_log[-4:]) / 4
    assert last < 0.8 * first
    images = next(iter(tiny_loader()))["image"]
    scores, maps = model.score(images)
    assert maps.shape == (3, 48, 48) and scores.shape == (3,)
    torch.testing.assert_close(scores, maps.flatten(1).max(dim=1).values)  # image score = max of the map


def test_defect_scores_higher_and_save_load(tmp_path) -> None:
    model = CAE(image_size=32, latent_dim=16, epochs=20, batch_size=3, progress=False)
    model.fit(tiny_loader())
    nominal = next(iter(tiny_loader()))["image"][:1]
    defect = nominal.clone()
    defect[..., 20:30, 10:20] = 1.0 - defect[..., 20:30, 10:20]  # inverted patch
    scores, maps = model.score(torch.cat([nominal, defect]))
    assert scores[1] > scores[0]
    threshold = {"image_threshold": float(scores.mean()), "pixel_threshold": None, "min_defect_area": 0}
    # the Detector signature PatchCore has too; weights=False is ignored: the trained weights are the model
    model.save(tmp_path / "cae", metadata={"category": "toy"}, weights=False, threshold=threshold)
    # safetensors weights and a manifest, as PatchCore's folders (no pickle: tests/test_hostile_load.py)
    assert sorted(path.name for path in (tmp_path / "cae").iterdir()) == ["cae.safetensors", "manifest.json",
                                                                          "model.json"]
    reloaded = CAE.load(tmp_path / "cae", progress=False)
    torch.testing.assert_close(reloaded.score(defect)[0], model.score(defect)[0])
    assert reloaded.threshold == threshold and reloaded.metadata == {"category": "toy"}


def test_seeded_training_is_deterministic() -> None:
    first = CAE(image_size=32, latent_dim=8, epochs=2, batch_size=3, progress=False, seed=3)
    second = CAE(image_size=32, latent_dim=8, epochs=2, batch_size=3, progress=False, seed=3)
    first.fit(tiny_loader())
    second.fit(tiny_loader())
    assert first.loss_log == second.loss_log


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="cae.image_size"):
        ConvAutoencoder(image_size=40)
    with pytest.raises(ValueError, match="cae.loss"):
        CAE(loss="l1")
