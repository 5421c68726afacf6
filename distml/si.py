"""Separation Index (SI), Center SI, and greedy feature (channel) selection by either.

Definitions (REQUIREMENTS.md, "Definitions (Separation Index)"). Features of any shape (N, ...)
are flattened per sample; labels are N integers; distances are Euclidean.

* First-order SI: the fraction of samples whose nearest *other* sample has the same label (the
  leave-one-out 1-NN accuracy). The sample itself is excluded by its index, never by "distance
  0": bit-identical rows (duplicates) are ordinary neighbours at distance exactly 0.
* Tie rule: a sample is separated only when its nearest same-class distance is *strictly*
  smaller than its nearest other-class distance. An equidistant other-class sample (for example
  a duplicate with another label) means "not separated".
* Order r > 1 (hard): separated only when the r-th nearest same-class distance is strictly below
  the nearest other-class distance, i.e. the r nearest neighbours share the label whatever the
  tie breaking. A sample whose class has fewer than r other members is never separated.
* Order r, soft: the mean label purity of the r nearest neighbours. Neighbours tied at the r-th
  distance share the remaining places evenly (the expected purity under random tie breaking), so
  the value does not depend on the order of the samples. Soft order 1 gives half credit to an
  exact tie between a same-class and an other-class nearest neighbour; hard order 1 gives none.
* Center SI: the fraction of samples whose own class centre (mean feature vector of the class
  over the same samples, self included: a nearest-class-mean classifier, not leave-one-out) is
  *strictly* nearer than every other class centre.

Both indices lie in [0, 1]; with a single class every sample counts as separated.

Numerics: features are centred (distances do not change, rounding of |a|^2 + |b|^2 - 2ab does),
squared distances come from GEMMs with TF32 off, in float32 or float64, clamped at 0. The hard
index computes the matrix in square blocks of rows, each pair of blocks once (the upper
triangle, about half the flops of ``x @ x.T``), and merges every block into both of its row
ranges' r smallest distances per class; the soft index needs whole rows and keeps row chunks.
Duplicated rows share one representative row, so they are at distance exactly 0 from each other
and at bitwise-equal distances from everyone else; other exact ties (say between integer pixel
distances) hold only up to rounding, so use float64 where those matter. Memory is O(N * D) for
one working copy of the features (plus one of the distinct rows where copies exist) and one
block of distances (at most about 256 MB), never the whole matrix.

Greedy selection adds channels one at a time (a channel of an (N, C, H, W) tensor is its H x W
block). Squared distances add over disjoint channels, so the selector keeps the distances of the
selected set (N x N for "si", N x K to the class centres for "center-si") and adds each
candidate's own block, computed from direct differences (exact zeros for equal values, which are
common in ReLU channels), instead of recomputing from scratch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from distml.errors import DistmlError

__all__ = [
    "SelectionResult",
    "SeparationIndexError",
    "center_separation_index",
    "kept_prefix",
    "select_features",
    "select_features_naive",
    "separation_index",
    "tf32_disabled",
]

Criterion = Literal["si", "center-si"]
Progress = Callable[[int, int], None]

KEEP_RULE_SLACK = 1e-9  # index values are fractions of samples; float subtraction is inexact
_BLOCK_BYTES = 256 * 2**20  # one chunk of distances: big enough to keep a GPU busy
_DTYPES = (torch.float32, torch.float64)


class SeparationIndexError(DistmlError, ValueError):
    """Invalid input to an SI function (shapes, dtypes, order); also a ValueError."""


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """Turn TF32 off for CUDA matmuls and cuDNN inside the block, restoring the flags after.

    TF32 keeps 10 mantissa bits: enough to flip nearest-neighbour decisions.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------- input handling


@dataclass(frozen=True)
class _Samples:
    """Features flattened to (N, D) in the working dtype, samples sorted by class.

    Sorting makes every class one contiguous column block, so per-class minima are slices,
    not masks. The indices are order-free, so the permutation never needs undoing.
    """

    x: torch.Tensor  # (N, D), a private copy: safe to modify in place
    classes: torch.Tensor  # (N,) class ids 0..K-1, non-decreasing
    bounds: tuple[int, ...]  # K + 1 offsets: class k is rows bounds[k]:bounds[k + 1]
    mean: torch.Tensor  # (D,) the mean sample


def _prepare(features: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> _Samples:
    features, labels = _check_inputs(features, labels, dtype)
    n = features.shape[0]
    _, classes, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    by_class = torch.argsort(classes, stable=True)
    x = features.reshape(n, -1)[by_class].to(dtype)  # indexing copies: x is ours
    column_sums = x.sum(0)  # one pass for the check and the mean; NaN and inf survive a sum
    if not bool(torch.isfinite(column_sums).all()):
        raise SeparationIndexError(f"features contain NaN or infinity (or overflow {dtype})")
    bounds = (0, *torch.cumsum(counts, 0).tolist())
    return _Samples(x, classes[by_class], bounds, column_sums.div_(n))


def _check_inputs(
    features: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(features, torch.Tensor) or features.ndim < 1:
        raise SeparationIndexError("features must be a tensor shaped (N, ...)")
    if features.is_complex():
        raise SeparationIndexError("features must be real")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise SeparationIndexError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    if labels.shape[0] != features.shape[0]:
        raise SeparationIndexError(
            f"features have {features.shape[0]} samples but labels have {labels.shape[0]}: "
            "pass one label per sample (features (N, ...), labels (N,))"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise SeparationIndexError(f"labels must be integers, got {labels.dtype}")
    if features.shape[0] < 2:
        raise SeparationIndexError("need at least 2 samples")
    if dtype not in _DTYPES:
        raise SeparationIndexError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return features.detach(), labels.to(features.device)  # a measurement: no autograd graph


def _centred(samples: _Samples) -> torch.Tensor:
    """Subtract the mean sample in place: |a|^2 + |b|^2 - 2ab then cancels far less."""
    return samples.x.sub_(samples.mean)  # any point near the middle: no float64 pass needed


def _symmetric_block_rows(n: int, element_size: int) -> int:
    """Block side for the symmetric pass: about 8 blocks per side (the upper triangle is then
    9/16 of the matrix), at least 256 rows (efficient GEMMs), at most 256 MB per block."""
    return min(max(256, -(-n // 8)), math.isqrt(_BLOCK_BYTES // element_size))


def _balanced_chunk(n: int, most: int) -> int:
    """The smallest chunk that needs as few chunks as `most` does (no tiny last chunk)."""
    most = max(1, min(n, most))
    return -(-n // -(-n // most))


# ----------------------------------------------------------------------------- distances


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    """|a|^2 of every row without an (N, D) temporary (x.square() would copy the features)."""
    return torch.einsum("nd,nd->n", x, x)


def _sq_distances(
    rows: torch.Tensor, rows_sq: torch.Tensor, cols: torch.Tensor, cols_sq: torch.Tensor
) -> torch.Tensor:
    """|a|^2 + |b|^2 - 2ab with one GEMM, clamped at 0 (rounding can make it slightly < 0)."""
    d2 = torch.addmm(cols_sq.unsqueeze(0), rows, cols.T, alpha=-2.0)
    return d2.add_(rows_sq.unsqueeze(1)).clamp_(min=0.0)


def _first_copies(x: torch.Tensor) -> torch.Tensor | None:
    """Index of the first bit-identical copy of each row (itself if unique); None if all differ.

    Copies must be at distance exactly 0 from each other and at bitwise-equal distances from
    everyone else (a tie between a same-class and an other-class copy is then exact); the GEMM
    formula promises neither, so every copy reads its first copy's distance column.
    """
    n, d = x.shape
    # Equal rows agree on any subset of columns: an exact and cheap pre-filter.
    probe = x[:, :: max(1, d // 256)]
    _, inverse, counts = torch.unique(probe, dim=0, return_inverse=True, return_counts=True)
    suspects = torch.nonzero(counts[inverse] > 1).squeeze(1)
    if suspects.numel() == 0:
        return None
    _, group = torch.unique(x[suspects], dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1,), n, dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, group, suspects, reduce="amin")
    if first.numel() == suspects.numel():
        return None  # the suspects all differ somewhere outside the probe
    copies = torch.arange(n, device=x.device)
    copies[suspects] = first[group]
    return copies


def _distance_chunks(
    x: torch.Tensor, chunk_size: int | None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (rows, squared distances from those rows to all N samples), self = +inf by index."""
    n = x.shape[0]
    sq = _squared_norms(x)
    first_copy = _first_copies(x)
    step = chunk_size or _balanced_chunk(n, _BLOCK_BYTES // (n * x.element_size()))
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        d2 = _sq_distances(x[rows], sq[rows], x, sq)
        local = torch.arange(rows.stop - start, device=x.device)
        if first_copy is not None:
            d2[local, first_copy[rows]] = 0.0  # a row's copies are at exactly 0...
            d2 = d2[:, first_copy]  # ...and all copies share one column
        d2[local, local + start] = math.inf
        yield rows, d2


# ----------------------------------------------------------------------------- decisions


def _own_beats_others(
    own_dist: torch.Tensor, other_dist: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Rows whose own-class entry is strictly below every other class's entry.

    own_dist, other_dist: (..., R, K) per-class distances; classes: (R,) each row's class.
    """
    own = classes.unsqueeze(-1).expand(*own_dist.shape[:-1], 1)
    own_value = own_dist.gather(-1, own).squeeze(-1)
    other_value = other_dist.scatter(-1, own, math.inf).amin(-1)
    return own_value < other_value


def _soft_purity(
    d2: torch.Tensor, classes: torch.Tensor, col_classes: torch.Tensor, r: int
) -> torch.Tensor:
    """Same-class fraction of the r nearest, those tied at the r-th distance sharing evenly."""
    rth = d2.topk(r, dim=-1, largest=False).values[..., -1:]
    same = classes.unsqueeze(-1) == col_classes
    closer, tied = d2 < rth, d2 == rth
    n_closer, n_tied = closer.sum(-1), tied.sum(-1)  # n_tied >= 1: the r-th itself
    same_closer, same_tied = (closer & same).sum(-1), (tied & same).sum(-1)
    return (same_closer + (r - n_closer) * same_tied.double() / n_tied) / r


# ----------------------------------------------------------------------------- indices


# ----------------------------------------------------------------------------- symmetric blocks


@dataclass(frozen=True)
class _Columns:
    """The samples a block of representative rows stands for, as distance columns.

    Bit-identical rows share one representative (their first copy), so the GEMM runs over
    representatives only and every copy reads its representative's distance column: copies
    are then at bitwise-equal distances from everyone else.
    """

    gather: torch.Tensor | None  # block-local column of each member (None: members = block)
    own: torch.Tensor | None  # member position of each representative (diagonal blocks)
    segments: tuple[tuple[int, int, int], ...]  # (class, first, end) runs of member columns


def _block_columns(
    block: slice, rep_of: torch.Tensor | None, classes: torch.Tensor, reps: torch.Tensor | None
) -> _Columns:
    if rep_of is None or reps is None:
        member_classes, gather, own = classes[block], None, None
    else:
        members = torch.nonzero((rep_of >= block.start) & (rep_of < block.stop)).squeeze(1)
        member_classes, gather = classes[members], rep_of[members] - block.start
        own = torch.searchsorted(members, reps[block])
    ids, counts = torch.unique_consecutive(member_classes, return_counts=True)
    ends = torch.cumsum(counts, 0).tolist()
    starts = [0, *ends[:-1]]
    return _Columns(gather, own, tuple(zip(ids.tolist(), starts, ends, strict=True)))


def _merge_smallest(
    smallest: torch.Tensor, d2: torch.Tensor, columns: _Columns, transposed: bool
) -> None:
    """Merge the r smallest entries of each class run of d2's columns into smallest (R, K, r).

    transposed: the runs are d2's rows and smallest belongs to its columns, so a block
    computed once serves both of its row ranges.
    """
    dim, r = (0 if transposed else 1), smallest.shape[-1]
    for k, first, end in columns.segments:
        run = d2.narrow(dim, first, end - first)
        if r == 1:  # the hot path: a min, not a partial sort
            torch.minimum(smallest[:, k, 0], run.amin(dim), out=smallest[:, k, 0])
            continue
        found = run.topk(min(r, end - first), dim=dim, largest=False).values
        merged = torch.cat([smallest[:, k], found.T if transposed else found], 1)
        smallest[:, k] = merged.topk(r, dim=1, largest=False).values


def _class_smallest_symmetric(
    x: torch.Tensor, samples: _Samples, r: int, block_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r smallest squared distances per class of every representative row: (M, K, r).

    Each pair of row blocks is one GEMM (the upper triangle, diagonal blocks once) whose
    entries update both blocks' rows, so the matrix costs about half of ``x @ x.T``.
    Returns (smallest, each representative's class, members per representative).
    """
    first_copy = _first_copies(x)
    n, classes, n_classes = x.shape[0], samples.classes, len(samples.bounds) - 1
    reps = rep_of = None
    members = torch.ones(n, dtype=torch.long, device=x.device)
    if first_copy is not None:
        reps = torch.nonzero(first_copy == torch.arange(n, device=x.device)).squeeze(1)
        rep_of = torch.searchsorted(reps, first_copy)  # representative position of each row
        members = torch.bincount(rep_of, minlength=len(reps))
        x = x[reps]  # copies add no GEMM rows (a copy of the unique rows, not of all)
    m = x.shape[0]
    sq = _squared_norms(x)
    step = _balanced_chunk(m, block_rows)
    blocks = [slice(lo, min(m, lo + step)) for lo in range(0, m, step)]
    columns = [_block_columns(b, rep_of, classes, reps) for b in blocks]
    smallest = x.new_full((m, n_classes, r), math.inf)
    for i, j in itertools.combinations_with_replacement(range(len(blocks)), 2):
        rows, cols = blocks[i], blocks[j]
        d2 = _sq_distances(x[rows], sq[rows], x[cols], sq[cols])
        wide = _member_distances(d2, columns[j], diagonal=i == j)
        _merge_smallest(smallest[rows], wide, columns[j], transposed=False)
        if i != j:
            tall = d2 if columns[i].gather is None else d2[columns[i].gather]
            _merge_smallest(smallest[cols], tall, columns[i], transposed=True)
    rep_classes = classes if reps is None else classes[reps]
    return smallest, rep_classes, members


def _member_distances(d2: torch.Tensor, columns: _Columns, diagonal: bool) -> torch.Tensor:
    """d2's columns for every member sample; on a diagonal block, copies of a row at exactly
    0 and the row itself at +inf (self is excluded by index, never by distance)."""
    if columns.gather is None:
        return d2.fill_diagonal_(math.inf) if diagonal else d2
    if diagonal:
        d2.fill_diagonal_(0.0)
    wide = d2[:, columns.gather]
    if diagonal:
        wide[torch.arange(d2.shape[0], device=d2.device), columns.own] = math.inf
    return wide


def separation_index(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    order: int = 1,
    soft: bool = False,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Separation Index of `features` (N, ...) under `labels` (N,); see the module doc.

    order: neighbours that must share the label (hard) or whose purity is averaged (soft).
    chunk_size: rows of the distance matrix per step (hard: the side of a square block);
    by default a block stays near 256 MB.
    dtype: float32 (TF32 off) or float64. Runs on the features' device.
    """
    samples = _prepare(features, labels, dtype)
    n = samples.x.shape[0]
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= n - 1:
        raise SeparationIndexError(f"order must be an integer in [1, N - 1 = {n - 1}]")
    if chunk_size is not None and chunk_size < 1:
        raise SeparationIndexError("chunk_size must be a positive number of rows")
    x = _centred(samples)
    with tf32_disabled():
        if not soft:
            block_rows = chunk_size or _symmetric_block_rows(n, x.element_size())
            smallest, classes, members = _class_smallest_symmetric(x, samples, order, block_rows)
            separated = _own_beats_others(smallest[..., order - 1], smallest[..., 0], classes)
            return float((separated * members).sum()) / n
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for rows, d2 in _distance_chunks(x, chunk_size):
            total += _soft_purity(d2, samples.classes[rows], samples.classes, order).sum()
    return float(total) / n


def _class_centres(x: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """(K, ...) mean of each class block of the class-sorted x, accumulated in float64."""
    means = [
        x[lo:hi].sum(0, dtype=torch.float64) / (hi - lo) for lo, hi in itertools.pairwise(bounds)
    ]
    return torch.stack(means).to(x.dtype)


def center_separation_index(
    features: torch.Tensor, labels: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> float:
    """Center SI: accuracy of the nearest-class-mean classifier on the same samples.

    A sample counts only when its own centre is strictly nearer than every other centre.
    """
    samples = _prepare(features, labels, dtype)
    x = _centred(samples)
    centres = _class_centres(x, samples.bounds)
    with tf32_disabled():
        d2 = _sq_distances(x, _squared_norms(x), centres, _squared_norms(centres))
    return float(_own_beats_others(d2, d2, samples.classes).double().mean())


# ----------------------------------------------------------------------------- selection


def kept_prefix(curve: Sequence[float], tolerance: float) -> int:
    """The keep rule, one copy for layers (prune) and channels (select-features): the length
    of the shortest prefix with ``curve[k - 1] >= max(curve) - tolerance``.

    Equivalently, nothing after position k exceeds ``curve[k - 1]`` by more than the tolerance.
    A difference of exactly the tolerance is kept (compared with KEEP_RULE_SLACK for float
    rounding); tolerance 0 keeps up to the first maximum; equal values keep the shorter prefix.
    """
    if len(curve) == 0:
        raise SeparationIndexError("the curve is empty")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise SeparationIndexError(f"tolerance must be >= 0, got {tolerance}")
    best = max(curve)
    return next(
        k for k, value in enumerate(curve, 1) if best - value <= tolerance + KEEP_RULE_SLACK
    )


@dataclass(frozen=True)
class SelectionResult:
    """Outcome of greedy forward selection.

    order: channels in the order they were added; curve[k - 1]: the index with the first k.
    best: max(curve); kept: kept_prefix(curve, tolerance), the keep rule of the CLI.
    """

    order: list[int]
    curve: list[float]
    best: float
    kept: int

    @property
    def selected(self) -> list[int]:
        """The kept channels in ascending index order (ready for slicing a weight tensor)."""
        return sorted(self.order[: self.kept])

    @classmethod
    def from_curve(
        cls, order: Sequence[int], curve: Sequence[float], tolerance: float
    ) -> SelectionResult:
        kept = kept_prefix(curve, tolerance)  # checks the curve and the tolerance first
        return cls(list(order), list(curve), max(curve), kept)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary (features = 1..len(curve) on the x axis of the SI curve)."""
        return {
            "order": self.order,
            "curve": self.curve,
            "best": self.best,
            "kept": self.kept,
            "selected": self.selected,
        }


def _greedy(
    n_channels: int,
    steps: int,
    score: Callable[[list[int]], list[float]],
    add: Callable[[int], None],
    progress: Progress | None,
) -> tuple[list[int], list[float]]:
    """Forward selection: each step adds the best-scoring channel (ties: lowest index)."""
    remaining, order, curve = list(range(n_channels)), [], []
    for step in range(steps):
        scores = score(remaining)
        best = max(range(len(remaining)), key=scores.__getitem__)  # first maximum wins
        order.append(remaining.pop(best))
        curve.append(scores[best])
        add(order[-1])
        if progress is not None:
            progress(step + 1, steps)
    return order, curve


def _check_selection(
    features: torch.Tensor,
    criterion: str,
    max_features: int | None,
    tolerance: float,
    chunk_size: int | None,
    candidate_batch: int | None,
) -> int:
    """Validate the selection arguments; returns the number of greedy steps."""
    if not isinstance(features, torch.Tensor) or features.ndim < 2 or features.shape[1] < 1:
        raise SeparationIndexError("selection needs features shaped (N, C, ...) with C >= 1")
    if criterion not in ("si", "center-si"):
        raise SeparationIndexError(f"criterion must be 'si' or 'center-si', got {criterion!r}")
    n_channels = features.shape[1]
    steps = n_channels if max_features is None else max_features
    if not 1 <= steps <= n_channels:
        raise SeparationIndexError(f"max_features must be in [1, {n_channels}], got {steps}")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise SeparationIndexError(f"tolerance must be >= 0, got {tolerance}")
    for name, value in (("chunk_size", chunk_size), ("candidate_batch", candidate_batch)):
        if value is not None and value < 1:
            raise SeparationIndexError(f"{name} must be a positive integer, got {value}")
    return steps


def _tile_bytes(device: torch.device) -> int:
    """Working-set size of one selection tile: large on a GPU (fewer launches), cache-sized
    on a CPU, where each elementwise pass would otherwise stream from main memory."""
    return _BLOCK_BYTES if device.type == "cuda" else 2 * 2**20


def _add_channel_distances(
    base: torch.Tensor, row_values: torch.Tensor, col_values: torch.Tensor
) -> torch.Tensor:
    """base + squared differences, channel by channel: (B, R, M) from base (R, M).

    row_values (B, S, R), col_values (B, S, M): S = H*W positions of B channels. Direct
    differences, not the GEMM formula: equal values give exactly 0, and since every step is a
    separately rounded elementwise op, equal inputs give bitwise-equal distances (exact ties).
    """
    out = None
    for rows, cols in zip(row_values.unbind(1), col_values.unbind(1), strict=True):
        diff = rows.unsqueeze(-1) - cols.unsqueeze(-2)
        out = diff.square_().add_(base) if out is None else out.add_(diff.square_())
    return out


class _IncrementalSI:
    """Greedy state for "si": squared distances over the selected channels, N x (K * W).

    Columns are laid out class by class, each class padded to the largest class size W with
    +inf columns, so per-class minima of a whole tile are one reshape and one amin.
    """

    def __init__(
        self, x: torch.Tensor, samples: _Samples, chunk_size: int | None, batch: int | None
    ) -> None:
        n, device = x.shape[0], x.device
        starts = torch.tensor(samples.bounds, device=device)
        sizes = starts.diff()
        self.n_classes, width = len(sizes), int(sizes.max())
        cls = samples.classes
        slot = torch.arange(n, device=device) - starts[cls] + cls * width  # padded column
        self.row_values = x.permute(1, 2, 0).contiguous()  # (C, S, N)
        self.col_values = self.row_values  # equal class sizes: no padding, no second copy
        if self.n_classes * width != n:
            self.col_values = x.new_zeros(*self.row_values.shape[:2], self.n_classes * width)
            self.col_values[:, :, slot] = self.row_values
        self.dist = x.new_full((n, self.n_classes * width), math.inf)
        self.dist[:, slot] = 0.0
        self.dist[torch.arange(n, device=device), slot] = math.inf  # self excluded by index
        self.classes = cls
        budget = _tile_bytes(device) // (2 * x.element_size())  # a sum and one difference
        self.rows = chunk_size or _balanced_chunk(n, budget // self.dist.shape[1])
        self.batch = batch or max(1, budget // (self.rows * self.dist.shape[1]))

    def _row_chunks(self) -> Iterator[slice]:
        n = self.dist.shape[0]
        return (slice(s, min(n, s + self.rows)) for s in range(0, n, self.rows))

    def counts(self, candidates: list[int]) -> list[int]:
        """Separated samples with each candidate added to the selected set."""
        out: list[int] = []
        for i in range(0, len(candidates), self.batch):
            batch = candidates[i : i + self.batch]
            row_values, col_values = self.row_values[batch], self.col_values[batch]
            total = torch.zeros(len(batch), dtype=torch.long, device=self.dist.device)
            for rows in self._row_chunks():
                d2 = _add_channel_distances(self.dist[rows], row_values[..., rows], col_values)
                nearest = d2.unflatten(-1, (self.n_classes, -1)).amin(-1)  # (B, R, K)
                total += _own_beats_others(nearest, nearest, self.classes[rows]).sum(-1)
            out += total.tolist()
        return out

    def add(self, channel: int) -> None:
        # The same arithmetic as counts(), so the stored distances are the ones just scored.
        row_values = self.row_values[channel : channel + 1]
        col_values = self.col_values[channel : channel + 1]
        for rows in self._row_chunks():
            d2 = _add_channel_distances(self.dist[rows], row_values[..., rows], col_values)
            self.dist[rows] = d2[0]


class _IncrementalCenterSI:
    """Greedy state for "center-si": the N x K squared distances to the class centres.

    A centre restricted to some channels is the full centre restricted, so distances to the
    centres add over channels too.
    """

    def __init__(self, x: torch.Tensor, samples: _Samples, batch: int | None) -> None:
        n, n_classes = x.shape[0], len(samples.bounds) - 1
        self.values = x.permute(1, 2, 0).contiguous()  # (C, S, N)
        self.centres = _class_centres(x, samples.bounds).permute(1, 2, 0).contiguous()  # C,S,K
        self.dist = x.new_zeros(n, n_classes)
        self.classes = samples.classes
        budget = _tile_bytes(x.device) // (2 * x.element_size())
        self.batch = batch or max(1, budget // (n * n_classes))

    def _with(self, channels: list[int]) -> torch.Tensor:
        """(B, N, K): distances to the centres over the selected set plus each channel."""
        return _add_channel_distances(self.dist, self.values[channels], self.centres[channels])

    def counts(self, candidates: list[int]) -> list[int]:
        out: list[int] = []
        for i in range(0, len(candidates), self.batch):
            d2 = self._with(candidates[i : i + self.batch])
            out += _own_beats_others(d2, d2, self.classes).sum(-1).tolist()
        return out

    def add(self, channel: int) -> None:
        self.dist = self._with([channel])[0]


def select_features(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    criterion: Criterion = "si",
    max_features: int | None = None,
    tolerance: float = 0.0,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    chunk_size: int | None = None,
    candidate_batch: int | None = None,
) -> SelectionResult:
    """Greedy forward selection of channels of `features` (N, C, ...) by first-order SI or
    Center SI, with incremental distance updates (see the module doc).

    max_features: steps to run (default C). tolerance: for `kept`, see SelectionResult.
    progress(done, total) is called after each step. chunk_size (rows) and candidate_batch
    (channels scored at once) bound memory; by default a block stays near 256 MB.
    """
    steps = _check_selection(
        features, criterion, max_features, tolerance, chunk_size, candidate_batch
    )
    state = _selection_state(features, labels, criterion, dtype, chunk_size, candidate_batch)
    n, n_channels = features.shape[:2]
    order, counts = _greedy(n_channels, steps, state.counts, state.add, progress)
    return SelectionResult.from_curve(order, [c / n for c in counts], tolerance)


def _selection_state(
    features: torch.Tensor,
    labels: torch.Tensor,
    criterion: Criterion,
    dtype: torch.dtype,
    chunk_size: int | None,
    candidate_batch: int | None,
) -> _IncrementalSI | _IncrementalCenterSI:
    """The greedy state; the class-sorted working copy of the features is freed on return
    (the state keeps its own channel-major layout), so the loop holds one copy, not two."""
    samples = _prepare(features, labels, dtype)
    x = samples.x.view(*features.shape[:2], -1)  # differences need no centring
    if criterion == "si":
        return _IncrementalSI(x, samples, chunk_size, candidate_batch)
    return _IncrementalCenterSI(x, samples, candidate_batch)


def select_features_naive(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    criterion: Criterion = "si",
    max_features: int | None = None,
    tolerance: float = 0.0,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    chunk_size: int | None = None,
    candidate_batch: int | None = None,
) -> SelectionResult:
    """Reference for select_features: recompute the index from scratch for every candidate.

    Slow (a full index per candidate per step); for tests and benchmarks. candidate_batch is
    accepted for signature parity and ignored.
    """
    steps = _check_selection(
        features, criterion, max_features, tolerance, chunk_size, candidate_batch
    )
    selected: list[int] = []

    def index(channels: list[int]) -> float:
        subset = features[:, channels]
        if criterion == "si":
            return separation_index(subset, labels, chunk_size=chunk_size, dtype=dtype)
        return center_separation_index(subset, labels, dtype=dtype)

    def score(candidates: list[int]) -> list[float]:
        return [index([*selected, c]) for c in candidates]

    order, curve = _greedy(features.shape[1], steps, score, selected.append, progress)
    return SelectionResult.from_curve(order, curve, tolerance)
