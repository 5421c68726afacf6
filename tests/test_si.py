"""Separation Index, Center SI and greedy selection against plain float64 references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distml import si as si_module
from distml.si import (
    SelectionResult,
    _selection_state,
    _tile_bytes,
    center_separation_index,
    kept_prefix,
    select_features,
    select_features_naive,
    separation_index,
    tf32_disabled,
)

# ----------------------------------------------------------------------------- references


def brute_sq_distances(features: torch.Tensor) -> torch.Tensor:
    """Float64 squared distances by explicit differences (duplicates give exactly 0)."""
    flat = features.reshape(features.shape[0], -1).double()
    return ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)


def brute_si(features: torch.Tensor, labels: torch.Tensor, order: int = 1) -> float:
    """Hard SI: the order-th nearest same-class strictly below the nearest other-class."""
    d2, labels = brute_sq_distances(features), labels.tolist()
    separated = 0
    for i in range(len(labels)):
        same = sorted(
            d2[i, j].item() for j in range(len(labels)) if j != i and labels[j] == labels[i]
        )
        other = [d2[i, j].item() for j in range(len(labels)) if labels[j] != labels[i]]
        nearest_other = min(other, default=float("inf"))
        separated += len(same) >= order and same[order - 1] < nearest_other
    return separated / len(labels)


def brute_soft_si(features: torch.Tensor, labels: torch.Tensor, order: int) -> float:
    """Soft SI for tie-free data: the same-label share of the `order` nearest others."""
    d2 = brute_sq_distances(features)
    d2.fill_diagonal_(float("inf"))
    purity = 0.0
    for i in range(len(labels)):
        nearest = torch.argsort(d2[i])[:order]
        purity += (labels[nearest] == labels[i]).double().mean().item()
    return purity / len(labels)


def nearest_class_mean_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Strict nearest-centroid accuracy, centroids over the same samples (float64)."""
    flat = features.reshape(features.shape[0], -1).double()
    classes = labels.unique().tolist()
    centres = torch.stack([flat[labels == c].mean(0) for c in classes])
    d2 = ((flat[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    correct = 0
    for i, label in enumerate(labels.tolist()):
        own = classes.index(label)
        others = [d2[i, k].item() for k in range(len(classes)) if k != own]
        correct += d2[i, own].item() < min(others, default=float("inf"))
    return correct / len(labels)


def random_data(n: int, shape: tuple[int, ...], classes: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    # Class-dependent shift so the indices are neither 0 nor 1.
    features = torch.randn(n, *shape, generator=gen) + 0.7 * labels.view(-1, *[1] * len(shape))
    return features, labels


# ----------------------------------------------------------------------------- first-order SI


@pytest.mark.parametrize(
    ("n", "shape", "chunk"),
    [(97, (12,), 10), (97, (3, 4, 4), 10), (64, (5,), 7), (50, (2, 3, 3), None), (31, (1,), 31)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_si_matches_brute_force(n, shape, chunk, dtype):
    features, labels = random_data(n, shape, classes=4, seed=n)
    got = separation_index(features, labels, chunk_size=chunk, dtype=dtype)
    assert got == pytest.approx(brute_si(features, labels), abs=1e-12)


def test_equidistant_same_and_other_class_is_not_separated():
    # Sample 0 at 0 has a same-class neighbour at 1 and an other-class one at -1: a tie.
    features = torch.tensor([[0.0], [1.0], [-1.0]])
    labels = torch.tensor([0, 0, 1])
    assert separation_index(features, labels) == pytest.approx(1 / 3)  # only sample 1
    # Soft order 1 shares the tie: purities 0.5, 1, 0.
    assert separation_index(features, labels, soft=True) == pytest.approx(0.5)


def test_duplicates_are_neighbours_at_distance_zero():
    a, b, c = [5.0, 1.0], [-3.0, 2.0], [0.5, -4.0]
    # a twice with the same label: each is the other's nearest (self excluded by index, the
    # copy at 0 counts) -> separated, although the nearest non-copy has another class.
    # b twice with labels 2 and 1: a tie at 0; [-3.1, 2] (label 2) is equidistant from both
    # copies: a tie too. c three times with labels 0, 1, 1: every copy ties at 0.
    features = torch.tensor([a, a, [5.2, 1.1], b, b, [-3.1, 2.0], c, c, c])
    labels = torch.tensor([0, 0, 1, 2, 1, 2, 0, 1, 1])
    expected = brute_si(features, labels)
    assert expected == pytest.approx(2 / 9)  # only the two copies of a
    for dtype in (torch.float32, torch.float64):
        assert separation_index(features, labels, dtype=dtype) == pytest.approx(expected)
        assert separation_index(features, labels, dtype=dtype, chunk_size=2) == pytest.approx(
            expected
        )


def test_duplicates_in_random_data_match_brute_force():
    features, labels = random_data(80, (6,), classes=3, seed=1)
    gen = torch.Generator().manual_seed(2)
    copies = torch.randint(0, 80, (40,), generator=gen)
    features = torch.cat([features, features[copies]])  # exact copies...
    labels = torch.cat([labels, torch.randint(0, 3, (40,), generator=gen)])  # ...any label
    expected = brute_si(features, labels)
    for dtype in (torch.float32, torch.float64):
        for chunk in (None, 13):
            got = separation_index(features, labels, chunk_size=chunk, dtype=dtype)
            assert got == pytest.approx(expected, abs=1e-12)


def test_copies_share_one_distance_column_at_exactly_zero():
    # Internal guarantee behind exact duplicate ties: with 300 dims the GEMM formula alone
    # leaves rounding noise between copies; the library must report exactly 0, and every
    # other sample must see all copies at bitwise-equal distances.
    from distml.si import _distance_chunks

    gen = torch.Generator().manual_seed(4)
    base = torch.randn(30, 300, generator=gen).clamp(min=0) * 3 + 1
    x = torch.cat([base, base[:10], base[:5]])  # rows 0-4 thrice, 5-9 twice
    d2 = torch.cat([block for _, block in _distance_chunks(x, chunk_size=7)])
    assert torch.isinf(d2.diagonal()).all()
    others = torch.arange(10, 30)  # samples that are no copy of the ones checked
    for i in range(10):
        for j in [i + 30, i + 40] if i < 5 else [i + 30]:
            assert d2[i, j] == 0 and d2[j, i] == 0
            assert torch.equal(d2[others, i], d2[others, j])


def test_large_offset_is_harmless():
    # ReLU-like activations sit far from the origin; centring keeps fp32 distances accurate.
    features, labels = random_data(120, (40,), classes=5, seed=3)
    shifted = features + 1000.0
    expected = brute_si(features, labels)
    assert separation_index(shifted, labels) == pytest.approx(expected)


# ----------------------------------------------------------------------------- order > 1, soft


@pytest.mark.parametrize("order", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_higher_order_matches_brute_force(order, dtype):
    features, labels = random_data(89, (2, 3, 2), classes=3, seed=order)
    hard = separation_index(features, labels, order=order, chunk_size=10, dtype=dtype)
    soft = separation_index(features, labels, order=order, soft=True, chunk_size=10, dtype=dtype)
    assert hard == pytest.approx(brute_si(features, labels, order), abs=1e-12)
    assert soft == pytest.approx(brute_soft_si(features, labels, order), abs=1e-12)
    assert hard <= separation_index(features, labels, order=1, dtype=dtype)


def test_soft_order_one_equals_hard_without_ties():
    features, labels = random_data(70, (4,), classes=3, seed=5)
    assert separation_index(features, labels, soft=True) == pytest.approx(
        separation_index(features, labels)
    )


def test_soft_ties_share_places():
    # Sample 0's two nearest are tied at distance 1 with sample 3 behind them: order 1 gives
    # 1/2 (one of two tied places is same-class), order 2 counts both.
    features = torch.tensor([[0.0], [1.0], [-1.0], [3.0]])
    labels = torch.tensor([0, 0, 1, 0])
    soft1 = separation_index(features, labels, soft=True, order=1)
    # purities: s0 0.5, s1 nearest s0 (1), s2 nearest s0 (0), s3 nearest s1 (1)
    assert soft1 == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    soft2 = separation_index(features, labels, soft=True, order=2)
    # s0 {s1, s2}: 0.5; s1 {s0, s2 at 4 vs s3 at 4: tie, one place, s3 same}: (1 + 0.5) / 2
    # s2 {s0, s1}: 0; s3 {s1, s0}: 1
    assert soft2 == pytest.approx((0.5 + 0.75 + 0 + 1) / 4)


def test_class_smaller_than_order_is_never_separated():
    features = torch.tensor([[0.0], [0.1], [10.0], [10.1], [10.2]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    assert separation_index(features, labels, order=2) == pytest.approx(3 / 5)


# ----------------------------------------------------------------------------- symmetric blocks
# The hard index computes each pair of row blocks once and updates both blocks' rows: the
# results must not depend on the block side, also where it does not divide N.


@pytest.mark.parametrize("order", [1, 2, 4])
def test_block_side_not_dividing_n_matches_brute_force(order):
    features, labels = random_data(103, (7,), classes=4, seed=10 + order)
    expected = brute_si(features, labels, order)
    for chunk in (1, 9, 50, 102, 103, 500):
        got = separation_index(features, labels, order=order, chunk_size=chunk)
        assert got == pytest.approx(expected, abs=1e-12), chunk


@pytest.mark.parametrize("order", [1, 2, 3])
def test_exact_ties_across_blocks(order):
    # Integer points on a small grid: many exactly equal distances (float64 keeps them exact),
    # with tie partners in other blocks than the sample; a tie is never "separated".
    gen = torch.Generator().manual_seed(12)
    features = torch.randint(0, 3, (61, 2), generator=gen).double()
    labels = torch.randint(0, 3, (61,), generator=gen)
    expected = brute_si(features, labels, order)
    for chunk in (4, 7, 61):
        got = separation_index(features, labels, order=order, chunk_size=chunk, dtype=torch.float64)
        assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_copies_in_other_blocks_are_excluded_by_index(order):
    # The first and last samples are copies (same class): each is the other's neighbour at 0,
    # although the blocks put them far apart; a third copy with another label ties them.
    features, labels = random_data(40, (5,), classes=2, seed=13)
    features[-1], labels[-1] = features[0], labels[0]
    features[17] = features[5]  # a second pair: same label (class-sorting may move them)
    labels[17] = labels[5]
    expected = brute_si(features, labels, order)
    assert expected > 0
    for chunk in (3, 8, 40):
        got = separation_index(features, labels, order=order, chunk_size=chunk)
        assert got == pytest.approx(expected, abs=1e-12)
    features[20], labels[20] = features[0], 1 - labels[0]
    tied = brute_si(features, labels, order)
    assert tied < expected
    for chunk in (3, 8, 40):
        assert separation_index(features, labels, order=order, chunk_size=chunk) == pytest.approx(
            tied, abs=1e-12
        )


def test_higher_order_counts_copies_as_separate_neighbours():
    # Three copies of a point in class 0 and one class-1 point near them: for order 2 each
    # copy's two nearest same-class neighbours are the other copies at 0.
    features = torch.tensor([[0.0, 0.0]] * 3 + [[0.5, 0.0], [9.0, 9.0], [9.0, 9.5]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # order 2: the copies (two other copies at 0) and both far points (second same-class
    # neighbour sample 3 at 153.25 and 162.5, nearer than class 0 at 162 and 171.25); not
    # sample 3, whose nearest is class 0.
    assert separation_index(features, labels, order=2, chunk_size=2) == pytest.approx(5 / 6)
    assert separation_index(features, labels, order=2) == pytest.approx(
        brute_si(features, labels, 2)
    )
    assert separation_index(features, labels, order=3, chunk_size=4) == pytest.approx(
        brute_si(features, labels, 3)
    )


# ----------------------------------------------------------------------------- Center SI


@pytest.mark.parametrize("shape", [(10,), (3, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_center_si_is_nearest_class_mean_accuracy(shape, dtype):
    features, labels = random_data(150, shape, classes=5, seed=7)
    got = center_separation_index(features, labels, dtype=dtype)
    assert got == pytest.approx(nearest_class_mean_accuracy(features, labels), abs=1e-12)


def test_center_si_tie_is_not_counted():
    # Centres -1 and 1; sample 0.0 of class 0 is equidistant from both.
    features = torch.tensor([[-2.0], [0.0], [1.0], [1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert center_separation_index(features, labels) == pytest.approx(3 / 4)


# ----------------------------------------------------------------------------- input handling


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_any_integer_label_dtype(label_dtype):
    features, labels = random_data(60, (5,), classes=3, seed=11)
    reference = separation_index(features, labels)
    assert separation_index(features, labels.to(label_dtype)) == reference
    assert center_separation_index(features, labels.to(label_dtype)) == center_separation_index(
        features, labels
    )


def test_feature_dtypes_and_autograd_inputs_are_accepted():
    gen = torch.Generator().manual_seed(13)
    pixels = torch.randint(0, 256, (50, 3, 4, 4), generator=gen, dtype=torch.uint8)
    labels = torch.arange(50) % 5
    expected = brute_si(pixels.float(), labels)
    assert separation_index(pixels, labels) == pytest.approx(expected)
    assert separation_index(pixels.half(), labels) == pytest.approx(expected)
    assert separation_index(pixels.float().requires_grad_(), labels) == pytest.approx(expected)


def test_labels_need_not_be_contiguous_ids():
    features, labels = random_data(60, (5,), classes=3, seed=12)
    relabelled = torch.tensor([-7, 3, 100])[labels]
    assert separation_index(features, relabelled) == separation_index(features, labels)


@pytest.mark.parametrize("seed", range(4))
def test_values_are_fractions_of_the_samples(seed):
    """Hard SI and Center SI count samples (k / 40); soft order 3 counts neighbours
    (k / 120; continuous random features have no ties)."""
    features, labels = random_data(40, (3,), classes=2 + seed, seed=seed)
    for value, parts in (
        (separation_index(features, labels), 40),
        (separation_index(features, labels, order=3, soft=True), 120),
        (center_separation_index(features, labels), 40),
    ):
        assert value * parts == pytest.approx(round(value * parts), abs=1e-9)
        assert 0 <= round(value * parts) <= parts


def test_single_class_is_fully_separated():
    features = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(10, dtype=torch.long)
    assert separation_index(features, labels) == 1.0
    assert center_separation_index(features, labels) == 1.0


def test_sample_count_mismatch_raises_value_error():
    with pytest.raises(ValueError, match="10 samples but labels have 9"):
        separation_index(torch.zeros(10, 3), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="10 samples but labels have 9"):
        center_separation_index(torch.zeros(10, 3), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="10 samples but labels have 9"):
        select_features(torch.zeros(10, 3), torch.zeros(9, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": torch.zeros(10)}, "labels must be integers, got torch.float32"),
        ({"order": 0}, "order must be an integer in [1, N - 1 = 9]"),
        ({"order": 10}, "order must be an integer in [1, N - 1 = 9]"),
        ({"order": True}, "order must be an integer in [1, N - 1 = 9]"),  # not a number here
        ({"order": 2.0}, "order must be an integer in [1, N - 1 = 9]"),
        ({"dtype": torch.float16},
         "dtype must be torch.float32 or torch.float64, got torch.float16"),
        ({"chunk_size": 0}, "chunk_size must be a positive number of rows"),
        ({"features": torch.full((10, 3), float("nan"))},
         "features contain NaN or infinity (or overflow torch.float32)"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named_in_full(kwargs, message):
    args = {"features": torch.randn(10, 3), "labels": torch.arange(10) % 2, **kwargs}
    features, labels = args.pop("features"), args.pop("labels")
    with pytest.raises(ValueError) as raised:
        separation_index(features, labels, **args)
    assert str(raised.value) == message


def test_tf32_flags_are_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with tf32_disabled():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
        separation_index(torch.randn(8, 2), torch.arange(8) % 2)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("criterion", ["si", "center-si"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_incremental_selection_matches_naive(criterion, dtype):
    features, labels = random_data(61, (7, 2, 2), classes=3, seed=21)
    kwargs = {"criterion": criterion, "dtype": dtype, "chunk_size": 10}
    fast = select_features(features, labels, candidate_batch=3, **kwargs)
    slow = select_features_naive(features, labels, **kwargs)
    assert fast.order == slow.order
    assert fast.curve == pytest.approx(slow.curve, abs=1e-12)
    assert (fast.best, fast.kept) == (slow.best, slow.kept)


@pytest.mark.parametrize("criterion", ["si", "center-si"])
def test_incremental_selection_matches_naive_on_relu_like_data(criterion):
    # Many exact zeros and two dead channels: subsets are full of duplicates and exact ties.
    features, labels = random_data(53, (6, 1, 1), classes=3, seed=22)
    features = (features - 1.0).clamp(min=0.0)
    features[:, [1, 4]] = 0.0
    kwargs = {"criterion": criterion, "dtype": torch.float64, "chunk_size": 8}
    fast = select_features(features, labels, **kwargs)
    slow = select_features_naive(features, labels, **kwargs)
    assert fast.order == slow.order
    assert fast.curve == pytest.approx(slow.curve, abs=1e-12)


def test_two_dimensional_features_select_columns():
    features, labels = random_data(45, (5,), classes=3, seed=23)
    fast = select_features(features, labels, max_features=3)
    slow = select_features_naive(features, labels, max_features=3)
    assert fast.order == slow.order and len(fast.order) == 3


@pytest.mark.parametrize("criterion", ["si", "center-si"])
def test_planted_channels_are_selected_first(criterion):
    # Four classes coded by two bits, one bit per informative channel: both are needed.
    gen = torch.Generator().manual_seed(31)
    n, channels, informative = 240, 12, [3, 8]
    labels = torch.arange(n) % 4
    features = torch.randn(n, channels, 2, 2, generator=gen)
    bits = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])[labels]
    for channel, bit in zip(informative, bits.T, strict=True):
        features[:, channel] += 3.0 * bit.view(-1, 1, 1)
    result = select_features(features, labels, criterion=criterion, tolerance=0.02)
    assert set(result.order[:2]) == set(informative)
    assert result.curve[0] < 0.7 < 0.95 < result.curve[1]  # one bit alone is not enough
    assert result.selected == informative


def test_selection_result_prefix_and_tolerance():
    curve = [0.5, 0.8, 0.79, 0.81]
    result = SelectionResult.from_curve([3, 1, 2, 0], curve, tolerance=0.02)
    assert (result.best, result.kept, result.selected) == (0.81, 2, [1, 3])
    assert SelectionResult.from_curve([3, 1, 2, 0], curve, tolerance=0.0).kept == 4
    assert SelectionResult.from_curve([3, 1, 2, 0], curve, tolerance=0.4).selected == [3]
    assert result.to_dict()["selected"] == [1, 3]


def test_selection_reports_progress_and_stops_at_max_features():
    features, labels = random_data(30, (6, 1, 1), classes=2, seed=41)
    calls = []
    result = select_features(
        features, labels, max_features=4, progress=lambda done, total: calls.append((done, total))
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len(result.order) == len(result.curve) == 4 == len(set(result.order))
    assert result.curve[-1] == pytest.approx(separation_index(features[:, result.order], labels))


def test_selection_ties_pick_the_lowest_channel():
    features = torch.zeros(20, 4)  # every channel scores the same
    labels = torch.arange(20) % 2
    assert select_features(features, labels).order == [0, 1, 2, 3]
    assert select_features_naive(features, labels).order == [0, 1, 2, 3]


def test_selection_result_to_dict_is_the_json_the_commands_write():
    result = SelectionResult.from_curve([3, 1, 2, 0], [0.5, 0.8, 0.79, 0.81], tolerance=0.02)
    assert result.to_dict() == {
        "order": [3, 1, 2, 0],
        "curve": [0.5, 0.8, 0.79, 0.81],
        "best": 0.81,
        "kept": 2,
        "selected": [1, 3],
    }


# ----------------------------------------------------------------------------- memory budget
# The default chunking keeps every block of distances near a memory budget (256 MB; the
# selection's CPU tiles are cache-sized). Shrinking the budget makes the small test sets take
# the many-block paths that full-size features take, with the default chunk sizes.


@pytest.fixture
def small_budget(monkeypatch):
    monkeypatch.setattr(si_module, "_BLOCK_BYTES", 16 * 2**10)  # 16 KiB: 4,096 float32
    return 16 * 2**10


@pytest.mark.parametrize("soft", [False, True])
def test_default_chunks_under_a_small_budget_match_brute_force(small_budget, soft):
    features, labels = random_data(150, (3,), classes=4, seed=5)
    features[140:] = features[:10]  # copies across chunks
    if soft:
        features = features + 1e-3 * torch.arange(150).view(-1, 1)  # soft: no exact ties
        expected = brute_soft_si(features, labels, order=3)
        assert separation_index(features, labels, soft=True, order=3) == pytest.approx(expected)
    else:
        for order in (1, 2):
            expected = brute_si(features, labels, order=order)
            assert separation_index(features, labels, order=order) == pytest.approx(expected)


def test_selection_tiles_split_rows_and_stay_within_the_budget():
    # unbalanced classes (sizes 300, 200, 100): the padded layout, several row chunks
    gen = torch.Generator().manual_seed(9)
    labels = torch.cat([torch.full((s,), k) for k, s in enumerate((300, 200, 100))])
    features = torch.randn(600, 5, 1, 1, generator=gen) + 0.8 * labels.view(-1, 1, 1, 1)
    state = _selection_state(features, labels, "si", torch.float32, None, None)
    width = state.dist.shape[1]
    assert width == 3 * 300  # every class padded to the largest
    assert state.rows < 600  # the rows come in several chunks
    tile = 2 * state.rows * width * state.batch * 4  # a sum and one difference per tile
    assert tile <= _tile_bytes(torch.device("cpu"))
    chunks = list(state._row_chunks())
    assert chunks[0].start == 0 and chunks[-1].stop == 600
    assert all(a.stop == b.start for a, b in itertools.pairwise(chunks))
    # and the chunked, padded selection (float32, direct differences) is still the naive one
    # (float64: on one channel the float32 GEMM formula misplaces a near tie)
    fast = select_features(features, labels)
    slow = select_features_naive(features, labels, dtype=torch.float64)
    assert fast.order == slow.order
    assert fast.curve == pytest.approx(slow.curve, abs=1e-12)


def test_selection_of_balanced_classes_keeps_one_copy_of_the_features():
    features, labels = random_data(60, (4, 2, 2), classes=3, seed=3)
    labels = torch.arange(60) % 3
    state = _selection_state(features, labels, "si", torch.float32, None, None)
    assert state.col_values is state.row_values  # no padded second copy
    assert state.dist.shape == (60, 60)


def test_selection_keeps_exact_zero_distances_next_to_tiny_ones():
    # Sample 0 has a same-class copy (distance exactly 0) and an other-class sample at 1e-4
    # (squared 1e-8): separated only if 0 stays exactly 0 (1 + 1e-8 == 1 in float32).
    features = torch.tensor([[0.0], [0.0], [1e-4], [5.0], [5.0], [9.0]])
    labels = torch.tensor([0, 0, 1, 1, 1, 0])
    expected = brute_si(features, labels)
    assert expected == pytest.approx(4 / 6)
    assert select_features(features, labels).curve == [pytest.approx(expected)]


# ----------------------------------------------------------------------------- input messages
# Each message is checked whole: a user reads it to fix the call.


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        ([[0.0], [1.0]], [0, 1], "features must be a tensor shaped (N, ...)"),
        (torch.tensor(1.0), [0], "features must be a tensor shaped (N, ...)"),
        (torch.zeros(4, 2, dtype=torch.complex64), [0, 1, 0, 1], "features must be real"),
        (torch.zeros(4, 2), torch.zeros(4, 1, dtype=torch.long),
         "labels must be 1-D (N,), got shape (4, 1)"),
        (torch.zeros(4, 2), [0, 1, 0],
         "features have 4 samples but labels have 3: pass one label per sample "
         "(features (N, ...), labels (N,))"),
        (torch.zeros(4, 2), torch.zeros(4), "labels must be integers, got torch.float32"),
        (torch.zeros(1, 2), [0], "need at least 2 samples"),
    ],
)  # fmt: skip
def test_bad_inputs_are_named_in_full(features, labels, message):
    for index in (separation_index, center_separation_index):
        with pytest.raises(ValueError) as raised:
            index(features, labels)
        assert str(raised.value) == message


def test_the_smallest_valid_inputs_are_accepted():
    # two samples, one value each (features shaped (N,)), one class each
    assert separation_index(torch.tensor([0.0, 1.0]), torch.tensor([0, 1])) == 0.0
    assert separation_index(torch.tensor([0.0, 1.0]), torch.tensor([0, 0])) == 1.0
    assert center_separation_index(torch.tensor([0.0, 1.0]), torch.tensor([0, 1])) == 1.0
    assert separation_index(torch.tensor([[0.0], [1.0]]), [3, 3], chunk_size=1) == 1.0


@pytest.mark.parametrize(
    ("features", "kwargs", "message"),
    [
        (torch.zeros(6), {}, "selection needs features shaped (N, C, ...) with C >= 1"),
        (torch.zeros(6, 0), {}, "selection needs features shaped (N, C, ...) with C >= 1"),
        ([[0.0]] * 6, {}, "selection needs features shaped (N, C, ...) with C >= 1"),
        (torch.zeros(6, 2), {"criterion": "knn"},
         "criterion must be 'si' or 'center-si', got 'knn'"),
        (torch.zeros(6, 2), {"max_features": 0}, "max_features must be in [1, 2], got 0"),
        (torch.zeros(6, 2), {"max_features": 3}, "max_features must be in [1, 2], got 3"),
        (torch.zeros(6, 2), {"tolerance": math.nan}, "tolerance must be >= 0, got nan"),
        (torch.zeros(6, 2), {"tolerance": -0.5}, "tolerance must be >= 0, got -0.5"),
        (torch.zeros(6, 2), {"chunk_size": 0}, "chunk_size must be a positive integer, got 0"),
        (torch.zeros(6, 2), {"candidate_batch": 0},
         "candidate_batch must be a positive integer, got 0"),
    ],
)  # fmt: skip
def test_bad_selection_inputs_are_named_in_full(features, kwargs, message):
    labels = torch.arange(6) % 2
    for select in (select_features, select_features_naive):
        with pytest.raises(ValueError) as raised:
            select(features, labels, **kwargs)
        assert str(raised.value) == message


def test_the_smallest_valid_selection_is_accepted():
    features = torch.tensor([[0.0], [1.0], [5.0], [6.0]])
    labels = torch.tensor([0, 0, 1, 1])
    result = select_features(features, labels, max_features=1, chunk_size=1, candidate_batch=1)
    assert (result.order, result.curve, result.kept) == ([0], [1.0], 1)


def test_the_chunk_and_batch_a_caller_gives_are_the_ones_used(monkeypatch):
    states = []
    real = si_module._selection_state

    def spy(*args):
        states.append(real(*args))
        return states[-1]

    monkeypatch.setattr(si_module, "_selection_state", spy)
    features, labels = random_data(40, (6, 1, 1), classes=2, seed=4)
    select_features(features, labels, max_features=2, chunk_size=7, candidate_batch=2)
    select_features(features, labels, criterion="center-si", max_features=2, candidate_batch=3)
    (si_state, centre_state) = states
    assert (si_state.rows, si_state.batch) == (7, 2)
    assert centre_state.batch == 3


def test_an_empty_curve_is_refused_by_name():
    for call in (lambda: kept_prefix([], 0.0), lambda: SelectionResult.from_curve([], [], 0.0)):
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value) == "the curve is empty"


# ----------------------------------------------------------------------------- copies, GEMMs


@pytest.mark.parametrize("soft", [False, True])
def test_copies_tie_exactly_with_many_features(soft):
    # With 2,048 features the GEMM formula leaves copies at a rounding error from each other
    # (not 0) and at slightly different distances from everyone else. Every copy must still
    # sit at exactly 0 from its copies, so a copy with a same-class twin and an other-class
    # twin is a tie (not separated), as the float64 brute force says.
    gen = torch.Generator().manual_seed(11)
    base = 3.0 * torch.randn(30, 2048, generator=gen) + 5.0
    features = torch.cat([base, base, base])  # every row three times
    labels = torch.cat([torch.zeros(30), torch.zeros(30), torch.ones(30)]).long()
    labels[:10] = 1  # some rows with labels (1, 0, 1): two same-class copies for the others
    expected = brute_soft_si(features, labels, 2) if soft else brute_si(features, labels)
    got = separation_index(features, labels, soft=soft, order=2 if soft else 1)
    assert got == pytest.approx(expected, abs=1e-12)


def test_more_than_eight_default_blocks_per_side_match_a_chunked_run():
    # 2,100 samples: the default block side is ceil(N / 8) = 263 rows (not the 256 minimum)
    features, labels = random_data(2100, (3,), classes=5, seed=12)
    assert separation_index(features, labels, dtype=torch.float64) == separation_index(
        features, labels, dtype=torch.float64, chunk_size=500
    )


@pytest.mark.parametrize("tolerance", [-0.01, math.nan, math.inf])
def test_the_keep_rule_names_a_bad_tolerance(tolerance):
    with pytest.raises(ValueError) as raised:
        kept_prefix([0.5, 0.6], tolerance)
    assert str(raised.value) == f"tolerance must be >= 0, got {tolerance}"


def test_the_naive_selection_reports_progress_too():
    features, labels = random_data(20, (3,), classes=2, seed=42)
    calls = []
    select_features_naive(features, labels, progress=lambda done, total: calls.append(done))
    assert calls == [1, 2, 3]
