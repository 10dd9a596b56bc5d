"""Self-describing weights: one ``model.safetensors`` plus ``model.json`` metadata in a folder.

The JSON carries everything needed to rebuild and use the model (architecture, class names in
order, preprocessing, calibration, screening threshold, OOD statistics' presence, metrics, the
training config and a fingerprint of its data) and the SHA-256 of the tensor file, so a swapped or
damaged file is caught before use. Loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tumor_xai.model import build_model, pooling_of, unwrap
from tumor_xai.preprocess import PreprocessConfig

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "FORMAT_VERSION",
    "NEGATIVE_CLASS",
    "WEIGHTS_FILE",
    "METADATA_FILE",
    "Decision",
    "LoadedWeights",
    "WeightsError",
    "atomic_write_bytes",
    "load_weights",
    "save_weights",
    "update_metadata",
]


FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
EXTRA_PREFIX = "extra."  # tensors stored beside the model's own (e.g. OOD statistics)
# The class whose complement is "tumour present"; weights may name another in ``screening.negative_class``.
NEGATIVE_CLASS = "notumor"


class WeightsError(RuntimeError):
    """A weights folder is missing, damaged or does not match its metadata."""


@dataclass(frozen=True)
class Decision:
    """How the weights turn logits into answers: calibration temperature, screening threshold, negative class.

    Read once from the metadata (:meth:`from_metadata`) and used by every consumer, so the app, the
    Predictor and the evaluation divide by the same temperature and flag at the same threshold.
    """

    class_names: tuple[str, ...]
    temperature: float = 1.0
    threshold: float | None = None  # on P(tumour) = 1 - P(negative class); None: no screening flag
    negative_class: str | None = NEGATIVE_CLASS  # None when the weights have no such class

    @property
    def negative_index(self) -> int | None:
        return None if self.negative_class is None else self.class_names.index(self.negative_class)

    @classmethod
    def from_metadata(cls, meta: dict) -> Decision:
        """Validated rules from a weights' metadata; ``ValueError`` saying which value is wrong."""
        names = tuple(meta["class_names"])
        temperature = (meta.get("calibration") or {}).get("temperature", 1.0)
        screening = meta.get("screening") or {}
        threshold = screening.get("threshold")
        negative = screening.get("negative_class", NEGATIVE_CLASS)
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
            raise ValueError(f"calibration temperature {temperature!r} must be a positive number; retrain or refit it")
        if not math.isfinite(temperature):
            raise ValueError(f"calibration temperature {temperature!r} must be finite; retrain or refit it")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
            raise ValueError(f"screening threshold {threshold!r} must be a number in [0, 1]")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"screening threshold {threshold!r} must be in [0, 1]")
        if negative not in names:
            if "negative_class" in screening:
                raise ValueError(f"screening negative class {negative!r} is not one of the classes {list(names)}")
            negative = None
        if threshold is not None and negative is None:
            raise ValueError(f"a screening threshold needs a {NEGATIVE_CLASS!r} class; the classes are {list(names)}")
        return cls(names, float(temperature), None if threshold is None else float(threshold), negative)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities ``(N, K)`` (float32) from logits ``(N, K)``."""
        return torch.softmax(logits.float() / self.temperature, dim=1)

    def tumor_probability(self, probs: dict[str, float]) -> float | None:
        """``1 - P(negative class)`` for one image's probabilities, or ``None`` without that class."""
        return None if self.negative_class is None else 1.0 - probs[self.negative_class]

    def screening_positive(self, tumor_probability: float | None) -> bool | None:
        """The high-sensitivity flag: ``None`` when the weights store no threshold."""
        if tumor_probability is None or self.threshold is None:
            return None
        return tumor_probability >= self.threshold


class LoadedWeights:
    """A model in eval mode with its metadata, its :class:`Decision` rules and any extra tensors."""

    def __init__(self, model: nn.Module, metadata: dict, extras: dict[str, torch.Tensor], path: Path):
        self.model = model
        self.metadata = metadata
        self.extras = extras
        self.path = path
        try:
            self.decision = Decision.from_metadata(metadata)
        except ValueError as exc:
            raise WeightsError(f"{exc} ({path})") from exc

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.metadata["preprocessing"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are ordinary readable files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_weights(
    model: nn.Module,
    out_dir: str | Path,
    metadata: dict,
    extras: dict[str, torch.Tensor] | None = None,
    half: bool = False,
) -> Path:
    """Save ``model`` and ``metadata`` into ``out_dir`` atomically; returns the folder.

    ``metadata`` must hold at least ``arch``, ``class_names`` and ``preprocessing``. ``half`` stores
    floating tensors as float16 (they are upcast on load) to halve the file.
    """
    for key in ("arch", "class_names", "preprocessing"):
        if key not in metadata:
            raise ValueError(f"metadata needs {key!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = unwrap(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    # Extras (e.g. the OOD precision matrix) stay float32: they are small and float16 would overflow.
    for k, v in (extras or {}).items():
        tensors[EXTRA_PREFIX + k] = v.detach().cpu().float().contiguous() if v.is_floating_point() else v.detach().cpu()
    weights_path = out / WEIGHTS_FILE
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{WEIGHTS_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "tumor_xai_format": str(FORMAT_VERSION)})
        os.chmod(tmp, 0o644)
        digest = _sha256(Path(tmp))
        os.replace(tmp, weights_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = dict(metadata)
    meta["format_version"] = FORMAT_VERSION
    meta["num_classes"] = len(meta["class_names"])
    meta.setdefault("in_chans", 1)
    meta["pooling"] = pooling_of(module)
    meta["weights_sha256"] = digest
    meta["storage_dtype"] = "float16" if half else "float32"
    _write_json(out / METADATA_FILE, meta)
    return out


def update_metadata(weights_dir: str | Path, **updates: Any) -> dict:
    """Merge ``updates`` into a weights folder's metadata (atomically) and return the result."""
    path = Path(weights_dir) / METADATA_FILE
    meta = json.loads(path.read_text())
    meta.update(updates)
    _write_json(path, meta)
    return meta


def _fix(what: str, path: Path) -> str:
    return (
        f"{what} in {path}. Retrain with `python -m tumor_xai.train`, or restore the folder from the "
        "repository (`git checkout -- weights/`; the file is stored with Git LFS on a Space)."
    )


def load_weights(path: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedWeights:
    """Load a weights folder (default: the repository's ``weights/``) into an eval-mode model."""
    folder = Path(path) if path is not None else DEFAULT_WEIGHTS_DIR
    if folder.is_file():
        folder = folder.parent
    meta_path, weights_path = folder / METADATA_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise WeightsError(_fix("No weights folder", folder))
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise WeightsError(_fix(f"{p.name} is missing", folder))
    if weights_path.stat().st_size < 1024 and weights_path.read_bytes().startswith(b"version https://git-lfs"):
        raise WeightsError(_fix("model.safetensors is a Git LFS pointer, not the weights (run `git lfs pull`)", folder))
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(_fix(f"{METADATA_FILE} is not valid JSON ({exc})", folder)) from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise WeightsError(
            _fix(
                f"{METADATA_FILE} has an unsupported format_version {meta.get('format_version') if isinstance(meta, dict) else None!r}",
                folder,
            )
        )
    missing = [k for k in ("arch", "class_names", "preprocessing", "weights_sha256") if k not in meta]
    if missing:
        raise WeightsError(_fix(f"{METADATA_FILE} lacks {', '.join(missing)}", folder))
    if _sha256(weights_path) != meta["weights_sha256"]:
        raise WeightsError(
            _fix(f"{WEIGHTS_FILE} does not match the checksum in {METADATA_FILE} (damaged or swapped file)", folder)
        )
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(_fix(f"{WEIGHTS_FILE} cannot be read ({exc})", folder)) from exc
    extras = {k[len(EXTRA_PREFIX) :]: v.float() for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    state = {
        k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)
    }
    try:
        model = build_model(
            meta["arch"],
            len(meta["class_names"]),
            in_chans=meta.get("in_chans", 1),
            members=meta.get("members", 1),
            pooling=meta.get("pooling", "avg"),
        )
    except ValueError as exc:
        raise WeightsError(_fix(str(exc), folder)) from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            _fix(
                f"the tensors do not fit a {meta['arch']} with {len(meta['class_names'])} classes ({str(exc).splitlines()[0]})",
                folder,
            )
        ) from exc
    model.eval().to(device)
    return LoadedWeights(model, meta, extras, folder)
