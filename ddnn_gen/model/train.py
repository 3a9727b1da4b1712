"""Joint training of all exits (DDNN): loss = sum_i w_i * CE(exit_i), Adam, weight clipping (a Big-Little
model's little exit on its remapped K + 1 labels; it shares no parameters with the big net, so the sum trains
each on its own labels). A multi-view
model's local exit is the aggregated one, trained with random views left out (``views.dropout``).

Checkpoints are ordinary self-describing model files plus an ``.opt.npz`` with the
optimizer state and the epoch counter, so ``--resume`` continues exactly where it stopped.
Accuracy is always measured in test mode: BN running statistics never see test data.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import chainer
import numpy as np

from ddnn_gen.errors import ModelFileError
from ddnn_gen.model.datasets import Dataset
from ddnn_gen.model.links import clip_binary_weights, input_to_float
from ddnn_gen.model.modelfile import load_model, save_model
from ddnn_gen.model.network import DDNN, predict_exits, softmax_cross_entropy_joint
from ddnn_gen.model.spec import ModelSpec, parse_spec
from ddnn_gen.model.views import dropout_mask

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    loss_weights: tuple[float, ...] | None = None
    max_steps: int | None = None  # stop early (tests, smoke runs)
    progress: bool = True
    lr_decay_epochs: tuple[int, ...] = ()
    augment: tuple[str, ...] = ()  # "crop:P" (pad by P pixels, crop back at random), "flip" (horizontal)


@dataclass
class TrainResult:
    model: DDNN
    epochs_done: int
    seconds: float
    history: list[dict[str, float]]


# Without a terminal (a log file, CI) a progress bar writes every update as its own line: log a line
# this often instead.
PROGRESS_LINE_S = 30.0


def optimizer_path(out: Path) -> Path:
    """The optimizer state and epoch counter saved beside a checkpoint, for --resume."""
    return out.with_suffix(".opt.npz")


class _Progress:
    """A tqdm bar on a terminal, else an INFO line at most every PROGRESS_LINE_S seconds."""

    def __init__(self, enabled: bool, batches: range, description: str) -> None:
        self._bar = None
        self._description = description
        self._total = len(batches)
        self._next_line = time.monotonic() + PROGRESS_LINE_S
        self._lines = enabled and not sys.stderr.isatty()
        if enabled and not self._lines:
            from tqdm import tqdm

            self._bar = tqdm(total=self._total, desc=description, unit="batch", leave=False)

    def update(self, done: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        elif self._lines and time.monotonic() >= self._next_line:
            self._next_line = time.monotonic() + PROGRESS_LINE_S
            log.info("%s: %d/%d batches (%.0f%%), loss %.4f", self._description, done, self._total,
                     100.0 * done / max(1, self._total), loss)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


AUGMENTATIONS = ("crop:P", "flip")


def parse_augment(text: str) -> tuple[str, ...]:
    """``crop:4,flip`` -> ("crop:4", "flip"); ValueError naming the choices otherwise."""
    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    for part in parts:
        name, _, value = part.partition(":")
        if part == "flip" or (name == "crop" and value.isdigit() and 0 < int(value) <= 16):
            continue
        raise ValueError(f"unknown augmentation {part!r}; choose from {', '.join(AUGMENTATIONS)} (P in 1..16)")
    return parts


def augment_batch(images: np.ndarray, augment: tuple[str, ...], rng: np.random.RandomState) -> np.ndarray:
    """Random crops of zero-padded images and horizontal flips, on uint8 (N, C, H, W): training only."""
    out = images
    for part in augment:
        if part == "flip":
            flip = rng.random_sample(len(out)) < 0.5
            out = np.where(flip[:, None, None, None], out[..., ::-1], out)
        else:
            pad = int(part.partition(":")[2])
            n, _, height, width = out.shape
            padded = np.pad(out, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            top = rng.randint(0, 2 * pad + 1, n)
            left = rng.randint(0, 2 * pad + 1, n)
            rows = top[:, None] + np.arange(height)[None, :]
            cols = left[:, None] + np.arange(width)[None, :]
            out = padded[np.arange(n)[:, None, None, None], np.arange(out.shape[1])[None, :, None, None],
                         rows[:, None, :, None], cols[:, None, None, :]]
    return np.ascontiguousarray(out)


def train(spec: ModelSpec, train_set: Dataset, config: TrainConfig, out: Path | None = None,
          resume: bool = False, val_set: Dataset | None = None) -> TrainResult:
    np.random.seed(config.seed)
    weights = config.loss_weights or spec.loss_weights
    start_epoch = 0
    history: list[dict[str, float]] = []
    if resume:
        if out is None or not out.exists() or not optimizer_path(out).exists():
            raise ModelFileError(f"cannot resume: {out} and its optimizer checkpoint {out and optimizer_path(out)} "
                                 "must both exist")
        model = load_model(out).model
        spec = model.spec
        state = np.load(optimizer_path(out))
        start_epoch = int(state["epoch"])
        history = json.loads(str(state["history"]))
        log.info("resuming %s at epoch %d", out, start_epoch)
    else:
        model = DDNN(spec)
    optimizer = chainer.optimizers.Adam(alpha=config.learning_rate)
    optimizer.setup(model)
    if start_epoch and out is not None:
        chainer.serializers.load_npz(str(optimizer_path(out)), optimizer, path="optimizer/")
        # Adam's rate is a hyper-parameter, not saved state: replay the decays already passed.
        optimizer.alpha *= 0.1 ** sum(1 for decay in config.lr_decay_epochs if decay < start_epoch)
    # Without augmentation the float input is made once; with it, per batch from the augmented pixels.
    x_all = None if config.augment else input_to_float(train_set.images, spec.input.scale)
    t_all = train_set.labels.astype(np.int32)
    n = len(t_all)
    rng = np.random.RandomState(config.seed + start_epoch)
    steps = 0
    begin = time.time()
    epoch = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if epoch in config.lr_decay_epochs:
            optimizer.alpha *= 0.1
        order = rng.permutation(n)
        # Seeded by the epoch alone: a run resumed at this epoch draws the same crops, flips and missing views.
        augment_rng = np.random.RandomState(config.seed + 7919 * (epoch + 1))
        view_rng = np.random.RandomState(config.seed + 104729 * (epoch + 1))
        batches = range(0, n, config.batch_size)
        progress = _Progress(config.progress, batches, f"epoch {epoch + 1}/{config.epochs}")
        total_loss = 0.0
        correct = np.zeros(len(spec.tiers))
        seen = 0
        with chainer.using_config("train", True):
            for done, begin_index in enumerate(batches, 1):
                index = order[begin_index:begin_index + config.batch_size]
                x = (x_all[index] if x_all is not None else input_to_float(
                    augment_batch(train_set.images[index], config.augment, augment_rng), spec.input.scale))
                present = (dropout_mask(spec.views, len(index), view_rng)
                           if spec.views is not None and spec.views.dropout > 0 else None)
                loss, logits = softmax_cross_entropy_joint(model, x, t_all[index], weights, present)
                model.cleargrads()
                loss.backward()
                optimizer.update()
                clip_binary_weights(model)
                total_loss += float(loss.array) * len(index)
                for tier, exit_logits in enumerate(logits):
                    targets = spec.exit_labels(tier, t_all[index])
                    correct[tier] += int((exit_logits.array.argmax(axis=1) == targets).sum())
                seen += len(index)
                steps += 1
                progress.update(done, total_loss / seen)
                if config.max_steps is not None and steps >= config.max_steps:
                    break
        progress.close()
        record = {"epoch": epoch + 1, "loss": total_loss / seen,
                  **{f"train_acc_{t.exit_name}": correct[i] / seen for i, t in enumerate(spec.tiers)}}
        if val_set is not None:
            for index, (tier, exit_logits) in enumerate(zip(spec.tiers, predict_exits(model, val_set.images))):
                targets = spec.exit_labels(index, val_set.labels)
                record[f"val_acc_{tier.exit_name}"] = float((exit_logits.argmax(1) == targets).mean())
        history.append(record)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
        if out is not None:
            _checkpoint(out, model, optimizer, epoch + 1, history)
        if config.max_steps is not None and steps >= config.max_steps:
            break
    seconds = time.time() - begin
    return TrainResult(model, epoch + 1, seconds, history)


def _checkpoint(out: Path, model: DDNN, optimizer: chainer.Optimizer, epoch: int,
                history: list[dict[str, float]]) -> None:
    raw = model.spec.to_dict()
    raw["training"] = {"epochs": epoch, "history": history}
    save_model(out, model, parse_spec(raw))
    serializer = chainer.serializers.DictionarySerializer()
    serializer["optimizer"].save(optimizer)
    state = {key.lstrip("/"): np.asarray(value) for key, value in serializer.target.items()}
    tmp = optimizer_path(out).with_suffix(".tmp.npz")
    np.savez(tmp, epoch=np.array(epoch), history=np.array(json.dumps(history)), **state)
    tmp.replace(optimizer_path(out))
