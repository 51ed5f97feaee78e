"""Neuron explanations: streaming top-K examples, token / position variance fractions, and their sidecar file.

Every result is checked against a direct NumPy computation on the activations exported from a real activation
file (masked to the counted positions).
"""

import h5py
import numpy as np
import pytest

from actdb.compute.explain.tokens import TokenExplanations, block_neurons, explain_tokens
from actdb.store.errors import ActdbError
from actdb.store.files.activation import ActivationHeader, ActivationReader, ActivationWriter
from actdb.store.files.explanation import (
    check_explanation_file,
    explanation_groups,
    explanation_path,
    read_explanation_attrs,
    read_explanation_group,
    write_explanations,
)
from actdb.store.files.identity import SidecarIdentity
from actdb.store.ingest.top_activations import TopKTracker, top_activations_from_file

N_SEQ, SEQ_LEN, LAYERS, D = 40, 64, 2, 200  # 2560 positions; 200 neurons: two storage chunks, one partial
K = 8
IDENTITY = SidecarIdentity(model="m", step=3, dataset_fingerprint="f" * 64, hook="mlp.post", weights_sha256="0" * 64)


def distinct_float16(
    rng: np.random.Generator, shape: tuple[int, ...], low: float = -30, high: float = 30
) -> np.ndarray:
    """Float16 values in (low, high) without ties within a column: distinct float16 numbers, drawn per column."""
    finite = np.arange(2**16, dtype=np.uint16).view(np.float16)
    finite = np.unique(finite[np.isfinite(finite)])  # sorted, -0.0 merged into 0.0
    finite = finite[(finite > low) & (finite < high)]
    cols = [rng.choice(finite, size=shape[0], replace=False) for _ in range(shape[1])]
    return np.stack(cols, axis=1)


@pytest.fixture(scope="module")
def activation_set(tmp_path_factory):
    """A real activation file with token-dependent activations, tokens and a random mask."""
    rng = np.random.default_rng(7)
    tokens = rng.zipf(1.6, size=(N_SEQ, SEQ_LEN)).clip(max=300).astype(np.int32)
    mask = rng.random((N_SEQ, SEQ_LEN)) < 0.8
    mask[:, 0] = False  # BOS
    mask[3] = False  # a whole sequence excluded
    mask[:, SEQ_LEN - 5] = False  # a position never counted
    flat_tokens = tokens.reshape(-1)
    position = np.tile(np.arange(SEQ_LEN), N_SEQ)
    data = []
    for layer in range(LAYERS):
        x = distinct_float16(rng, (N_SEQ * SEQ_LEN, D)).astype(np.float32) * 0.1
        x += rng.standard_normal((1, D)) * np.sin(flat_tokens[:, None] * (layer + 1.0))  # token effect
        x += rng.standard_normal((1, D)) * position[:, None] / SEQ_LEN  # position effect
        x[:, 3] = 1.5  # a constant neuron
        data.append(x.astype(np.float16))
    path = tmp_path_factory.mktemp("expl") / "set.h5"
    w = ActivationWriter(path, ActivationHeader("m", 0, "fp", "mlp.post", LAYERS, D, N_SEQ * SEQ_LEN, "float16"))
    for start in range(0, N_SEQ * SEQ_LEN, 1000):
        w.write_rows(start, [x[start : start + 1000] for x in data])
    w.finish()
    with ActivationReader(path) as r:  # what the tests compare with: the activations as stored
        stored = r.read_rows(0, N_SEQ * SEQ_LEN)
    return path, tokens, mask, stored


def reference_topk(x: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-x.astype(np.float32), axis=0, kind="stable")[:k]  # (k, neurons)
    return np.take_along_axis(x.astype(np.float32), order, axis=0).T, positions[order].T


def exact_topk_check(values, positions, stored, mask, k):
    """Values exactly as a sort of the counted activations; positions too, except among equal values."""
    flat_mask = mask.reshape(-1)
    counted = np.flatnonzero(flat_mask)
    for layer, x in enumerate(stored):
        x = x[flat_mask]
        want_v, want_p = reference_topk(x, counted, k)
        np.testing.assert_array_equal(values[layer], want_v)
        tied = np.array([[np.count_nonzero(x[:, c] == v) > 1 for v in want_v[c]] for c in range(D)])
        assert tied.mean() < 0.05  # the data has few ties: positions are checked almost everywhere
        np.testing.assert_array_equal(positions[layer][~tied], want_p[~tied])
        # every reported position is a distinct counted position holding the reported value
        np.testing.assert_array_equal(stored[layer][positions[layer], np.arange(D)[:, None]], values[layer])
        assert flat_mask[positions[layer]].all()
        assert all(len(set(row)) == k for row in positions[layer])


def test_tracker_matches_sort_of_counted_activations_in_uneven_chunks(activation_set):
    _, _, mask, stored = activation_set
    flat_mask = mask.reshape(-1)
    rng = np.random.default_rng(1)
    for dtype in (np.float16, np.float32):
        tracker = TopKTracker(LAYERS, D, K)
        start = 0
        while start < flat_mask.size:
            stop = min(flat_mask.size, start + int(rng.integers(1, 700)))
            m = flat_mask[start:stop]
            for layer in range(LAYERS):
                tracker.update(layer, stored[layer][start:stop][m].astype(dtype), start + np.flatnonzero(m))
            start = stop
        values, positions = tracker.result()
        assert values.dtype == np.float32 and positions.dtype == np.int64 and values.shape == (LAYERS, D, K)
        assert (np.diff(values, axis=-1) <= 0).all()
        exact_topk_check(values, positions, stored, mask, K)


def test_tracker_negative_values_dead_neurons_and_late_rising_neurons():
    """The threshold path for negative thresholds, all-equal columns and columns whose values keep rising."""
    rng = np.random.default_rng(3)
    n = 6000
    x = distinct_float16(rng, (n, 6))
    x[:, 0] = distinct_float16(rng, (n, 1), low=-1000, high=-0.01)[:, 0]  # always negative: negative thresholds
    x[:, 1] = 0  # dead neuron (ties everywhere)
    x[:, 2] = np.sort(x[:, 2])  # every chunk beats the last: the dense path every time
    x[:, 3] = np.sort(x[:, 3])[::-1]  # nothing after the first chunk enters
    tracker = TopKTracker(1, 6, 16)
    for start in range(0, n, 1024):
        tracker.update(0, x[start : start + 1024], np.arange(start, min(n, start + 1024)))
    values, positions = tracker.result()
    want_v, want_p = reference_topk(x, np.arange(n), 16)
    np.testing.assert_array_equal(values[0], want_v)
    cols = [0, 2, 3, 4, 5]
    np.testing.assert_array_equal(positions[0][cols], want_p[cols])
    assert (values[0, 1] == 0).all() and len(set(positions[0, 1])) == 16


def test_tracker_pads_when_fewer_rows_than_k_and_nan_counts_as_minus_infinity():
    tracker = TopKTracker(2, 3, k=5)
    tracker.update(0, np.array([[1, np.nan, 2], [3, 4, np.nan]], np.float16), np.array([10, 20]))
    tracker.update(0, np.zeros((0, 3), np.float16), np.zeros(0, np.int64))
    values, positions = tracker.result()
    np.testing.assert_array_equal(values[0, 0], [3, 1, -np.inf, -np.inf, -np.inf])
    np.testing.assert_array_equal(positions[0, 0], [20, 10, -1, -1, -1])
    assert values[0, 1, 0] == 4 and positions[0, 1, 0] == 20 and np.isneginf(values[0, 1, 1])
    assert (positions[1] == -1).all() and np.isneginf(values[1]).all()
    with pytest.raises(ValueError, match="expected values"):
        tracker.update(0, np.zeros((2, 4), np.float16), np.arange(2))


def test_nan_never_displaces_a_number_on_the_dense_and_the_sparse_path():
    rng = np.random.default_rng(4)
    x = distinct_float16(rng, (3000, 5)).astype(np.float64)  # float64 input is taken as float32
    nan = np.zeros(x.shape, bool)
    nan[rng.choice(3000, 300, replace=False), 1] = True
    nan[[2100, 2500, 2900], 2] = True  # a few NaN in a later chunk: the sparse path sees them
    x[nan] = np.nan
    tracker = TopKTracker(1, 5, 8)
    for start in range(0, 3000, 1000):
        tracker.update(0, x[start : start + 1000], np.arange(start, start + 1000))
    values, positions = tracker.result()
    want_v, want_p = reference_topk(np.where(nan, -np.inf, x), np.arange(3000), 8)
    np.testing.assert_array_equal(values[0], want_v)
    np.testing.assert_array_equal(positions[0], want_p)


def test_tracker_is_deterministic_with_ties():
    x = np.zeros((3000, 4), np.float16)
    x[::7] = 1
    runs = []
    for _ in range(2):
        tracker = TopKTracker(1, 4, 8)
        for start in range(0, 3000, 512):
            tracker.update(0, x[start : start + 512], np.arange(start, min(3000, start + 512)))
        runs.append(tracker.result())
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert (runs[0][0] == 1).all() and (runs[0][1] % 7 == 0).all()


def test_top_activations_from_file(activation_set):
    path, _, mask, stored = activation_set
    done = []
    with ActivationReader(path) as reader:
        values, positions = top_activations_from_file(reader, mask, K, chunk_rows=300, progress=done.append)
        exact_topk_check(values, positions, stored, mask, K)
        assert sum(done) == mask.size
        with pytest.raises(ActdbError, match="mask"):
            top_activations_from_file(reader, mask[:-1], K)


def reference_eta2(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """SS_between / SS_total per column by a direct group-by, in float64."""
    x = x.astype(np.float64)
    mean = x.mean(axis=0)
    total = ((x - mean) ** 2).sum(axis=0)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    group_means = np.stack([np.bincount(inverse, weights=x[:, c]) for c in range(x.shape[1])], axis=1)
    group_means /= counts[:, None]
    between = (counts[:, None] * (group_means - mean) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, between / total, np.nan)


def reference_top_tokens(x: np.ndarray, ids: np.ndarray, top: int, min_count: int):
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    out = []
    for c in range(x.shape[1]):
        means = np.bincount(inverse, weights=x[:, c].astype(np.float64)) / counts
        ok = np.flatnonzero(counts >= min_count)
        best = ok[np.lexsort((uniq[ok], -means[ok]))][:top]
        out.append((uniq[best], means[best], counts[best]))
    return out


def check_explanations(result: TokenExplanations, tokens, mask, stored, top, min_count):
    flat_mask = mask.reshape(-1)
    ids = tokens.reshape(-1)[flat_mask]
    position = np.tile(np.arange(SEQ_LEN), N_SEQ)[flat_mask]
    assert result.n_counted == int(flat_mask.sum())
    for layer, x in enumerate(stored):
        x = x[flat_mask]
        np.testing.assert_allclose(result.token_r2[layer], reference_eta2(x, ids), rtol=0, atol=1e-9)
        np.testing.assert_allclose(result.position_r2[layer], reference_eta2(x, position), rtol=0, atol=1e-9)
        assert np.isnan(result.token_r2[layer, 3]) and np.isnan(result.position_r2[layer, 3])
        for c, (want_ids, want_means, want_counts) in enumerate(reference_top_tokens(x, ids, top, min_count)):
            n = len(want_ids)
            # equal means (the constant neuron) may be ordered differently only when they are exactly equal
            np.testing.assert_allclose(result.top_means[layer, c, :n], want_means, rtol=0, atol=1e-9)
            if c != 3:
                np.testing.assert_array_equal(result.top_ids[layer, c, :n], want_ids)
                np.testing.assert_array_equal(result.top_counts[layer, c, :n], want_counts)
            assert (result.top_counts[layer, c, :n] >= min_count).all()
            assert (result.top_ids[layer, c, n:] == -1).all() and np.isnan(result.top_means[layer, c, n:]).all()


def test_variance_fractions_and_top_tokens_match_a_direct_groupby(activation_set):
    path, tokens, mask, stored = activation_set
    done = []
    with ActivationReader(path) as reader:
        result = explain_tokens(reader, tokens, mask, top=6, min_count=5, progress=done.append)
    assert result.n_passes == 1 and sum(done) == mask.size
    assert result.token_r2.shape == (LAYERS, D) and result.top_ids.shape == (LAYERS, D, 6)
    assert np.nanmax(result.token_r2) > 0.5 and np.nanmax(result.position_r2) > 0.05  # the effects built in
    check_explanations(result, tokens, mask, stored, 6, 5)


def test_neuron_blocks_under_a_tiny_budget_give_the_same_numbers(activation_set):
    path, tokens, mask, stored = activation_set
    n_ids = len(np.unique(tokens[mask]))
    budget = 30 * (8 * n_ids + 8 * SEQ_LEN + 24 + 18 * 256 + 16 * n_ids)  # about 30 neurons per pass
    assert block_neurons(n_ids, SEQ_LEN, 256, budget) < 40
    with ActivationReader(path) as reader:
        whole = explain_tokens(reader, tokens, mask, top=6, min_count=5)
        blocked = explain_tokens(reader, tokens, mask, top=6, min_count=5, memory_budget=budget, chunk_rows=256)
        assert blocked.n_passes > 10  # blocks cross the layer boundary and the storage chunk boundary
        for name, a in whole.arrays().items():
            np.testing.assert_allclose(blocked.arrays()[name], a, rtol=0, atol=1e-12, err_msg=name)
        strict = explain_tokens(reader, tokens, mask, top=50, min_count=40, memory_budget=budget, chunk_rows=256)
        check_explanations(strict, tokens, mask, stored, 50, 40)
        assert (strict.top_ids == -1).any()  # fewer than 50 tokens are seen 40 times
        with pytest.raises(ActdbError, match="budget"):
            explain_tokens(reader, tokens, mask, memory_budget=1000)
        with pytest.raises(ActdbError, match="do not match"):
            explain_tokens(reader, tokens[1:], mask[1:])


def test_sidecar_round_trip_keeps_other_groups(activation_set, tmp_path):
    path, tokens, mask, _ = activation_set
    with ActivationReader(path) as reader:
        values, positions = top_activations_from_file(reader, mask, K)
        expl = explain_tokens(reader, tokens, mask, top=4)
    side = explanation_path(tmp_path / "step-3" / "wiki.h5")
    assert side.name == "wiki.explain.h5"
    write_explanations(side, {"examples": {"values": values, "positions": positions}}, {"k": K}, identity=IDENTITY)
    write_explanations(
        side, {"tokens": expl.arrays()}, {"min_count": expl.min_count, "n_counted": expl.n_counted}, identity=IDENTITY
    )
    assert not list(side.parent.glob(side.name + ".partial*"))
    attrs = read_explanation_attrs(side)
    assert attrs["k"] == K and attrs["min_count"] == 5 and attrs["activation_file"] == "wiki.h5"
    assert attrs["format_version"] == 1 and attrs["actdb_complete"]
    assert explanation_groups(side) == ["examples", "tokens"]
    examples = read_explanation_group(side, "examples")
    np.testing.assert_array_equal(examples["values"], values)
    np.testing.assert_array_equal(examples["positions"], positions)
    back = TokenExplanations.from_arrays(read_explanation_group(side, "tokens"), attrs["n_counted"], 5)
    for name, a in expl.arrays().items():
        np.testing.assert_array_equal(back.arrays()[name], a)
    with h5py.File(side, "r") as f:
        assert all(ds.fletcher32 for g in f.values() for ds in g.values())
    assert check_explanation_file(side, LAYERS, D) == []
    assert check_explanation_file(side, LAYERS, D + 1)  # the wrong width is a problem
    with pytest.raises(ActdbError, match="no 'vocabulary'"):
        read_explanation_group(side, "vocabulary")
    assert {k: attrs[k] for k in ("model", "step", "dataset_fingerprint", "hook", "weights_sha256")} == vars(IDENTITY)
    assert read_explanation_group(side, "examples", IDENTITY)["values"].shape == values.shape
    other_step = SidecarIdentity(**{**vars(IDENTITY), "step": 4})
    with pytest.raises(ActdbError, match=r"is not the one SQL records: its attributes say step 3 \(SQL: 4\)"):
        read_explanation_group(side, "examples", other_step)
    assert check_explanation_file(side, LAYERS, D, other_step, quick=True)[0].endswith(
        "`actdb examples m@4 --force` rewrites it"
    )
    unknown_weights = SidecarIdentity(**{**vars(IDENTITY), "weights_sha256": None})  # SQL without a fingerprint
    assert check_explanation_file(side, LAYERS, D, unknown_weights) == []
    with pytest.raises(ValueError, match="scalar"):
        write_explanations(side, {"tokens": {"x": np.float64(1)}}, identity=IDENTITY)


def test_incomplete_or_corrupt_sidecar_is_refused(tmp_path):
    side = tmp_path / "a.explain.h5"
    with pytest.raises(ActdbError, match="does not exist"):
        read_explanation_group(side, "examples")
    with h5py.File(side, "w") as f:  # what a killed writer would have left, had it written in place
        f.create_dataset("examples/values", data=np.ones((2, 3)))
    with pytest.raises(ActdbError, match="unfinished"):
        read_explanation_group(side, "examples")
    assert "unfinished" in check_explanation_file(side)[0]

    values = np.full((2, 1024, 8), 0.5, np.float32)
    write_explanations(side, {"examples": {"values": values}}, {"k": 8}, identity=IDENTITY)
    raw = bytearray(side.read_bytes())
    at = raw.find(np.full(64, 0.5, np.float32).tobytes())
    assert at > 0
    raw[at : at + 8] = b"\x00\x11\x22\x33\x44\x55\x66\x77"
    side.write_bytes(bytes(raw))
    with pytest.raises(ActdbError, match="corrupt") as caught:
        read_explanation_group(side, "examples")
    assert "\n" not in str(caught.value)
    problems = check_explanation_file(side)
    assert len(problems) == 1 and problems[0].startswith("examples/values: checksum")

    truncated = tmp_path / "t.explain.h5"
    truncated.write_bytes(bytes(raw[: len(raw) // 3]))
    with pytest.raises(ActdbError, match="unreadable or truncated"):
        read_explanation_attrs(truncated)


def test_a_big_first_chunk_seeded_from_every_fourth_row_equals_an_argsort():
    """The first chunk of a layer (rows >= 4 x 4K) is merged from every 4th row's top-K plus the rows beating it:
    the same top-K, each position once."""
    rng = np.random.default_rng(7)
    rows, d, k = 4096, 300, 32
    values = rng.standard_normal((rows, d)).astype(np.float32)
    values[:, 5] = np.linspace(-1, 1, rows)  # rising: the top rows are all at the end, none of them every 4th
    values[:, 6] = 2.0  # constant: ties everywhere
    positions = np.arange(rows, dtype=np.int64) * 3 + 11
    tracker = TopKTracker(1, d, k)
    tracker.update(0, values, positions)
    got_v, got_p = tracker.result()
    expected = -np.sort(-values, axis=0)[:k].T
    np.testing.assert_array_equal(got_v[0], expected)
    for n in range(d):
        assert len(set(got_p[0, n])) == k  # no row counted twice
        np.testing.assert_array_equal(values[(got_p[0, n] - 11) // 3, n], got_v[0, n])
