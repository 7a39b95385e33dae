"""Reconstruction baseline: the convolutional autoencoder of Bergmann et al. (VISAPP 2019, "SSIM-AE").

Trained on nominal images only, it reconstructs what it has learnt; defects reconstruct
badly. Residual map = 1 - SSIM(input, reconstruction) (or the squared error for the L2
variant), upsampled to the evaluation crop and smoothed like PatchCore's maps; image
score = maximum of the smoothed map. It implements ``core.detector.Detector`` like PatchCore, so its
runs go through the same harness and land in the same results files and tables.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import kornia
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from core.blur import MAX_BLUR_SIGMA, gaussian_blur
from core.detector import FitReport, Predictions, collect_predictions
from core.io import write_json_atomic
from core.model_files import ModelFilesError, read_tensors, versions, write_folder, write_tensors
from core.records import (
    RecordError,
    Schema,
    check_schema,
    check_threshold,
    is_finite,
    is_int,
    setting_integer,
    setting_number,
)
from core.saved_model import metadata_node, read_saved_record

log = logging.getLogger(__name__)

LOSSES = ("ssim", "l2")
# The network's input side: the bottleneck convolution's kernel is image_size / 16 square, so its weights
# grow with image_size squared times latent_dim (at 1024 and 4096: 64 x 64 x 32 x 4096 floats, 2 GB); the
# paper uses 128, and larger values only cost memory.
MAX_IMAGE_SIZE = 1024
MAX_LATENT_DIM = 4096


def _conv(cin: int, cout: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding), nn.LeakyReLU(0.2, inplace=True)]


def _deconv(cin: int, cout: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, kernel, stride, padding), nn.LeakyReLU(0.2, inplace=True)]


class ConvAutoencoder(nn.Module):
    """The paper's architecture (Table 1), for any input size divisible by 16; latent = a d-vector."""

    def __init__(self, image_size: int = 128, latent_dim: int = 100, channels: int = 3) -> None:
        super().__init__()
        if image_size % 16 or image_size < 32:
            raise ValueError(f"cae.image_size={image_size} must be a multiple of 16, at least 32")
        bottleneck = image_size // 16
        self.encoder = nn.Sequential(
            *_conv(channels, 32, 4, 2, 1), *_conv(32, 32, 4, 2, 1), *_conv(32, 32, 3, 1, 1),
            *_conv(32, 64, 4, 2, 1), *_conv(64, 64, 3, 1, 1), *_conv(64, 128, 4, 2, 1),
            *_conv(128, 64, 3, 1, 1), *_conv(64, 32, 3, 1, 1),
            nn.Conv2d(32, latent_dim, bottleneck, 1, 0),
        )
        self.decoder = nn.Sequential(
            *_deconv(latent_dim, 32, bottleneck, 1, 0), *_conv(32, 64, 3, 1, 1), *_conv(64, 128, 3, 1, 1),
            *_deconv(128, 64, 4, 2, 1), *_conv(64, 64, 3, 1, 1), *_deconv(64, 32, 4, 2, 1),
            *_conv(32, 32, 3, 1, 1), *_deconv(32, 32, 4, 2, 1),
            nn.ConvTranspose2d(32, channels, 4, 2, 1), nn.Sigmoid(),  # images live in [0, 1]
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(images))


class CAE:
    """Fit/predict wrapper: trains on the loader's nominal images, scores by reconstruction residuals.

    Inputs must be images in [0, 1] (preprocessing with mean 0 and std 1); they are resized
    to ``image_size`` for the network and the residual map is brought back to the input size.
    """

    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)
    interpolation = "bilinear"

    def __init__(self, image_size: int = 128, latent_dim: int = 100, loss: str = "ssim", epochs: int = 25,
                 batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 1e-5, ssim_window: int = 11,
                 blur_sigma: float = 4.0, seed: int = 0, device: str | torch.device = "cpu",
                 progress: bool = True) -> None:
        # every range checked here, the one place (a saved model.json's settings come through here too)
        if not isinstance(loss, str) or loss not in LOSSES:
            raise ValueError(f"cae.loss={loss!r}: choose one of {LOSSES}")
        _integer("image_size", image_size, 32, MAX_IMAGE_SIZE, " (a multiple of 16)")
        _integer("latent_dim", latent_dim, 1, MAX_LATENT_DIM)
        _integer("epochs", epochs, 1)
        _integer("batch_size", batch_size, 1)
        _integer("ssim_window", ssim_window, 3, 255, " (odd)")
        if ssim_window % 2 == 0:
            raise ValueError(f"cae.ssim_window={ssim_window} must be odd (the SSIM window is centred on a pixel)")
        if not is_int(seed):
            raise ValueError(f"cae.seed={seed!r} must be an integer")
        _number("lr", lr, lambda v: v > 0, "> 0")
        _number("weight_decay", weight_decay, lambda v: v >= 0, ">= 0")
        _number("blur_sigma", blur_sigma, lambda v: 0 <= v <= MAX_BLUR_SIGMA, f"in [0, {MAX_BLUR_SIGMA}] (0 = none)")
        self.settings = dict(image_size=image_size, latent_dim=latent_dim, loss=loss, epochs=epochs,
                             batch_size=batch_size, lr=lr, weight_decay=weight_decay, ssim_window=ssim_window,
                             blur_sigma=blur_sigma, seed=seed)
        self.device = torch.device(device)
        self.progress = progress
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = ConvAutoencoder(image_size, latent_dim).to(self.device)
        self.loss_log: list[float] = []
        self.metadata: dict = {}
        self.threshold: dict | None = None  # the decision thresholds given to save

    def _to_model_size(self, images: torch.Tensor) -> torch.Tensor:
        size = self.settings["image_size"]
        return F.interpolate(images.to(self.device), size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False).clamp_(0, 1)

    def _loss(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        if self.settings["loss"] == "ssim":
            return kornia.losses.ssim_loss(reconstruction, images, self.settings["ssim_window"])
        return F.mse_loss(reconstruction, images)

    def fit(self, loader: Iterable) -> FitReport:
        """Train for ``epochs`` on shuffled nominal images (seeded); the loss per step goes to ``loss_log``."""
        dataset = loader.dataset
        generator = torch.Generator().manual_seed(self.settings["seed"])
        batches = DataLoader(dataset, batch_size=self.settings["batch_size"], shuffle=True, generator=generator,
                             num_workers=getattr(loader, "num_workers", 0))
        optimiser = torch.optim.Adam(self.network.parameters(), lr=self.settings["lr"],
                                     weight_decay=self.settings["weight_decay"])
        start = time.perf_counter()
        self.network.train()
        steps = tqdm(total=self.settings["epochs"] * len(batches), desc="train CAE", disable=not self.progress,
                     leave=False)
        for _ in range(self.settings["epochs"]):
            for batch in batches:
                images = self._to_model_size(batch["image"])
                loss = self._loss(images, self.network(images))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                self.loss_log.append(loss.item())
                steps.update()
                steps.set_postfix(loss=f"{self.loss_log[-1]:.4f}")
        steps.close()
        self.network.eval()
        return FitReport(len(dataset), None, None, {"train": time.perf_counter() - start})

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images[B,3,H,W] in [0,1] -> (scores [B], residual maps [B,H,W])``."""
        self.network.eval()
        small = self._to_model_size(images)
        reconstruction = self.network(small)
        if self.settings["loss"] == "ssim":
            residual = 1.0 - kornia.metrics.ssim(small, reconstruction, self.settings["ssim_window"]).mean(dim=1)
        else:
            residual = (small - reconstruction).square().mean(dim=1)
        residual = F.interpolate(residual[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
        maps = gaussian_blur(residual[:, 0], self.settings["blur_sigma"])
        return maps.flatten(1).max(dim=1).values.cpu(), maps.cpu()

    def predict(self, loader: Iterable) -> Predictions:
        return collect_predictions(self.score, loader, self.progress)

    def save(self, directory: str | Path, *, metadata: dict | None = None, weights: bool = True,
             threshold: dict | None = None) -> Path:
        """One folder, as PatchCore's (``core.model_files``): ``cae.safetensors`` (the network's weights: no
        pickle), ``model.json`` (format, settings, loss log, ``threshold``, the caller's ``metadata``) and
        ``manifest.json``, written whole or not at all. ``weights=False`` is ignored: the CAE's weights are the
        fitted model itself, trained here from scratch, with no source to look them up from again."""
        if not weights:
            log.info("the CAE always saves its trained weights (save_model=spec_only applies to PatchCore only)")
        if threshold is not None:
            self.threshold = threshold
        record = {"format_version": CAE_FORMAT_VERSION, "model": "cae", "settings": self.settings,
                  "loss_log": self.loss_log, "threshold": self.threshold, "metadata": metadata or {},
                  "versions": versions()}

        def write(folder: Path) -> None:
            write_tensors(folder / WEIGHTS_FILE, self.network.state_dict())
            write_json_atomic(folder / "model.json", record)

        return write_folder(Path(directory), write)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", progress: bool = True) -> CAE:
        """Through the gate every saved model passes (``core.saved_model.read_saved_record``): the manifest,
        ``model.json`` against ``CAE_SCHEMA``, the settings through the constructor (which checks their ranges),
        all before the weights are hashed or read; the weights are safetensors, loaded strictly."""
        directory = Path(directory)
        legacy = directory / "cae.pt"
        if legacy.exists() or legacy.is_symlink():  # never handed to torch.load: a pickle can run code
            raise ModelFilesError(f"saved model {directory} was written by an earlier version of this code (cae.pt: "
                                  f"pickled weights, no manifest), which this version does not read; refit it "
                                  f"(model=cae save_model=true)")
        if not os.path.lexists(directory / "model.json"):
            raise FileNotFoundError(f"{directory} is not a saved model (it has no model.json): pass the "
                                    f"models/<category>/ folder of a run with save_model=true")
        built: dict = {}

        def check(record: dict) -> None:
            if record.get("model") != "cae":  # before the format: another kind has its own versions
                raise RecordError(f"model={record.get('model')!r}: it is not a CAE model (core.detector."
                                  f"load_detector loads each kind by its own class)")
            check_schema(record, CAE_SCHEMA, CAE_FORMAT_VERSION)
            try:
                built["model"] = cls(**record["settings"], device=device, progress=progress)
            except (ValueError, TypeError) as error:
                raise RecordError(f"settings: {error}") from None

        record = read_saved_record(directory, check)
        model = built["model"]
        state = read_tensors(directory / WEIGHTS_FILE, "CAE weights")
        try:
            model.network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ModelFilesError(f"CAE weights {directory / WEIGHTS_FILE} do not fit the network of its settings "
                                  f"({str(error).splitlines()[0]}); refit it") from None
        model.network.eval()
        model.loss_log = list(record["loss_log"])
        model.threshold = record["threshold"]
        model.metadata = record["metadata"]
        return model


def _integer(key: str, value: object, minimum: int, maximum: int | None = None, note: str = "") -> None:
    setting_integer(f"cae.{key}", value, minimum, maximum, note)


def _number(key: str, value: object, valid, what: str) -> None:
    setting_number(f"cae.{key}", value, valid, what)


# 2: safetensors weights (cae.safetensors), a manifest, model.json with this schema; 1 (cae.pt, pickled
# weights, no manifest) is refused: refit it.
CAE_FORMAT_VERSION = 2
WEIGHTS_FILE = "cae.safetensors"
_SETTINGS = frozenset(inspect.signature(CAE).parameters) - {"device", "progress"}

CAE_SCHEMA: Schema = {
    "format_version": (True, is_int, "an integer"),
    "model": (True, lambda v: v == "cae", "\"cae\""),
    "settings": (True, lambda v: isinstance(v, dict) and set(v) == _SETTINGS,
                 f"an object with exactly the keys {sorted(_SETTINGS)} (the CAE's constructor keywords)"),
    "loss_log": (True, lambda v: isinstance(v, list) and all(is_finite(x) for x in v), "a list of finite numbers"),
    "threshold": (True, check_threshold, "null or an object (image_threshold, pixel_threshold, min_defect_area)"),
    "metadata": (True, metadata_node, "an object"),
    "versions": (False, lambda v: isinstance(v, dict), "an object"),
}
