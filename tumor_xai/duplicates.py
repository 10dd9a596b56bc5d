"""Near-duplicate detection: the dataset holds many re-encoded copies of the same picture.

Two images count as the same picture when their 32 x 32 thumbnails differ by less than
``threshold`` grey levels on average (mean absolute difference on a 0-255 scale). Re-encoded JPEG
copies of one slice land far below 2 grey levels; neighbouring slices of one patient land well above,
so they are *not* caught (the dataset has no patient IDs to catch them with).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["DEFAULT_THRESHOLD", "THUMB_SIZE", "group_ids", "near_duplicate_pairs", "thumbnail"]

THUMB_SIZE = 32
DEFAULT_THRESHOLD = 2.0


def thumbnail(gray: np.ndarray) -> np.ndarray:
    """A 32 x 32 float32 thumbnail on a 0-255 scale of a grayscale image in [0, 1]."""
    return cv2.resize(gray.astype(np.float32), (THUMB_SIZE, THUMB_SIZE), interpolation=cv2.INTER_AREA) * 255.0


def _coarse(t: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Block means of flattened 32 x 32 thumbnails -> flattened 8 x 8."""
    side = THUMB_SIZE // factor
    return t.view(len(t), side, factor, side, factor).mean(dim=(2, 4)).reshape(len(t), -1)


def near_duplicate_pairs(
    a: np.ndarray, b: np.ndarray | None = None, threshold: float = DEFAULT_THRESHOLD, chunk: int = 1024
) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, mad)`` with thumbnails ``a[i]`` and ``b[j]`` closer than ``threshold``.

    With ``b=None`` pairs within ``a`` are returned once each (``i < j``). Candidates are found on
    8 x 8 block means first: a block mean's difference never exceeds the mean difference of its
    pixels, so no pair under the threshold is lost, and the exact 32 x 32 check runs on few pairs.
    """
    ta = torch.from_numpy(np.asarray(a, dtype=np.float32).reshape(len(a), -1))
    tb = ta if b is None else torch.from_numpy(np.asarray(b, dtype=np.float32).reshape(len(b), -1))
    ca, cb = _coarse(ta), _coarse(tb)
    pairs: list[tuple[int, int, float]] = []
    for start in range(0, len(ta), chunk):
        coarse = torch.cdist(ca[start : start + chunk], cb, p=1) / ca.shape[1]
        ii, jj = torch.nonzero(coarse < threshold, as_tuple=True)
        ii = ii + start
        if b is None:
            keep = ii < jj
            ii, jj = ii[keep], jj[keep]
        if len(ii) == 0:
            continue
        mad = (ta[ii] - tb[jj]).abs().mean(dim=1)
        hit = mad < threshold
        pairs.extend(zip(ii[hit].tolist(), jj[hit].tolist(), mad[hit].tolist(), strict=False))
    return pairs


def group_ids(n: int, pairs: list[tuple[int, int, float]]) -> np.ndarray:
    """Connected components of the duplicate graph: one integer group id per item."""
    if not pairs:
        return np.arange(n)
    i, j = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    graph = coo_matrix((np.ones(len(pairs)), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]
