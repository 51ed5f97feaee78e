"""Capacity planner (`actdb plan`, `compute/estimate.py`): bytes, passes and memory from the engine's own planner,
FLOPs counted against the engine's own calls, the published study's numbers, and one-line errors. No test here
times anything: the rates are injected."""

from __future__ import annotations

import json
from dataclasses import replace

import click
import numpy as np
import pytest
from click.testing import CliRunner

from actdb.compute.correlation import baseline as baseline_module
from actdb.compute.correlation.engine import (
    CorrelationOptions,
    SetInput,
    correlate_sets,
    pass_overhead,
    plan_passes,
    task_bytes,
)
from actdb.compute.planning import estimate, operations, rates
from actdb.compute.planning.estimate import plan_study
from actdb.compute.planning.operations import correlation_flops, qr_flops, synthetic_inputs
from actdb.compute.planning.rates import HostRates, Rates, rates_for
from actdb.compute.planning.shapes import (
    ACCELERATORS,
    ARCHITECTURES,
    PlanRequest,
    architecture,
    custom_architecture,
    parse_count,
)
from actdb.query.commands.plan import COMMANDS as PLAN_COMMANDS
from actdb.query.commands.plan import plan_rows
from actdb.store.device import NUMPY, ArrayBackend, host_cores
from actdb.store.errors import ActdbError
from actdb.store.files.activation import ActivationHeader, ActivationWriter

RATES = Rates(
    products=1e11, grams=8e10, adds=1e9, baseline=5e10, float64=2.5e10, forward=1e11, host_qr=1e10, stream=1e9
)
HOST = HostRates(
    products=1e11, grams=8e10, adds=1e9, float32=5e10, float64=2.5e10, qr=1e10, stream=1e9, forward=1e11, width=512
)
GIB = 2**30
GPT2 = ARCHITECTURES["gpt2-small"]


def study(**kw) -> PlanRequest:
    """The published study (5 GPT-2 small seeds x 5 checkpoints x 5,000,000 tokens), with changes."""
    args = {"arch": GPT2, "models": 5, "steps": 5, "tokens": 5_000_000, "memory_budget": 64 * GIB, "host_cores": 1}
    return PlanRequest(**{**args, **kw})


def test_published_study_bytes_and_pair_products():
    p = plan_study(study(), RATES)
    assert p.n_sets == 25
    assert p.set_bytes == 5_000_000 * 12 * 3072 * 2 == 368_640_000_000  # ~369 GB of float16 per set
    assert p.token_bytes == 5_000_000 * 5  # int32 id + bool mask per position
    assert p.total_bytes == 25 * 368_640_000_000 + 25_000_000  # ~9.2 TB
    assert 9.2e12 < p.total_bytes < 9.3e12
    # each of the 10 unordered pairs is multiplied once per checkpoint: 10 x 36,864^2 x 5e6 = 6.8e16 multiply-adds,
    # i.e. 1.36e17 FLOPs (the "1.4e17" of the published description counts FLOPs, not multiply-adds per direction)
    n = 36_864
    assert p.flops.pair_products == 2 * 10 * n * n * 5_000_000
    assert p.flops.pair_products / 2 == pytest.approx(6.795e16, rel=1e-3)
    assert p.flops.grams == 5 * 12 * 3072 * 3073 * 5_000_000  # NumPy's SYRK on the CPU: one triangle
    assert plan_study(study(device="h100"), RATES).flops.grams == 2 * 5 * 12 * 3072**2 * 5_000_000
    assert p.ingest_flops == 2 * 124_439_808 * 5_000_000


def test_bytes_follow_the_arithmetic_for_other_shapes():
    shape = custom_architecture(3, 100, 10_000)
    p = plan_study(PlanRequest(shape, models=2, steps=7, tokens=1000, memory_budget=GIB), RATES)
    assert p.set_bytes == 1000 * 300 * 2
    assert p.activation_bytes == 14 * 1000 * 300 * 2
    assert p.total_bytes == p.activation_bytes + 5000


@pytest.mark.parametrize(
    ("arch", "models", "budget", "control"),
    [
        ("gpt2-small", 5, 64 * GIB, "none"),
        ("gpt2-small", 5, 200 * GIB, "none"),
        ("pythia-1b", 3, 400 * GIB, "none"),
        ("pythia-70m", 3, 32 * GIB, "token"),
    ],
)
def test_passes_and_memory_are_the_engines_planner(arch, models, budget, control):
    request = study(arch=architecture(arch), models=models, memory_budget=budget, control=control)
    p = plan_study(request, RATES)
    inputs = synthetic_inputs(request.arch, models)
    options = request.options
    vocab = request.n_vocab
    assert p.memory.passes == plan_passes(inputs, vocab, options, budget)
    # peak: the least budget giving the same passes; minimum: the least the planner accepts; one pass: the least
    # budget under which every task fits one pass
    m = p.memory
    assert plan_passes(inputs, vocab, options, m.peak) == m.passes
    assert plan_passes(inputs, vocab, options, m.peak - 1) != m.passes
    assert m.minimum <= m.peak <= budget
    plan_passes(inputs, vocab, options, m.minimum)
    with pytest.raises(ActdbError):
        plan_passes(inputs, vocab, options, m.minimum - 1)
    assert len(plan_passes(inputs, vocab, options, m.one_pass)) == 1
    assert len(plan_passes(inputs, vocab, options, m.one_pass - 1)) > 1
    # reads: the first pass reads every set, later passes the sets their tasks involve
    per_set = request.tokens * inputs[0].n_neurons * 2
    expected = models * per_set + sum(
        len({t.a for t in tasks} | {t.b for t in tasks}) * per_set for tasks in m.passes[1:]
    )
    assert m.read_bytes == expected
    assert 1 <= m.amplification <= m.n_passes


def test_a_budget_too_small_is_reported_not_raised():
    p = plan_study(study(memory_budget=8 * GIB), RATES)
    m = p.memory
    assert not m.fits and m.minimum > 8 * GIB
    assert m.passes == plan_passes(synthetic_inputs(GPT2, 5), 5_000_000, CorrelationOptions(), m.minimum)
    with pytest.raises(ActdbError, match="at least"):
        plan_passes(synthetic_inputs(GPT2, 5), 5_000_000, CorrelationOptions(), 8 * GIB)
    # a smaller chunk fits where the default does not
    small = plan_study(study(arch=architecture("pythia-70m"), memory_budget=6 * GIB), RATES).memory
    assert not small.fits and small.fitting_chunk is not None
    plan_passes(
        synthetic_inputs(architecture("pythia-70m"), 5),
        1,
        CorrelationOptions(chunk_tokens=small.fitting_chunk),
        6 * GIB,
    )


def test_flops_of_a_tiny_case_by_hand():
    # 3 sets of 2 layers x 4 neurons (N = 8), 10 tokens, 2 draws, everything in one pass
    options = CorrelationOptions(baseline_draws=2)
    inputs = synthetic_inputs(custom_architecture(2, 4, 1), 3)
    passes = plan_passes(inputs, 1, options, GIB)
    assert len(passes) == 1
    f = correlation_flops(inputs, passes, 10, options, 1)
    assert f.pair_products == 3 * 2 * 8 * 8 * 10  # 3 pairs, 2 x N_a x N_b x T each
    assert f.grams == 3 * 2 * (4 * 5 * 10)  # 3 sets x 2 layers x d (d + 1) T: NumPy's SYRK
    assert correlation_flops(inputs, passes, 10, options, 1, syrk=False).grams == 3 * 2 * (2 * 4 * 4 * 10)
    assert f.sums == 3 * 8 * 10
    assert f.adds == 6 * 4 * 8  # one chunk: each task's (4 x 8) block added once
    # per (pair x layer) task and draw: forward (4 x 8) @ two (4 x 4) rotations, backward (4 x 4) @ (4 x 8)
    assert f.baseline == 6 * 2 * (2 * 4 * 4 * 4 * 2 + 2 * 4 * 4 * 8)
    assert f.rotation_sd == 3 * 2 * 2 * (2 * 4**3)  # sets x draws x layers x (C R)
    assert f.draw_products == 3 * 2 * (2 * 4**3)  # sets x layers x R^T (C R), once when there are draws > 0
    assert qr_flops(4) == 170  # 8/3 d^3, rounded down
    assert f.qr == (3 * 2 + 1) * 170  # each set's layers, and one P_1 for the width
    assert f.total == 3840 + 1200 + 240 + 192 + 6144 + 1536 + 768 + 1190


@pytest.fixture
def tiny_sets(tmp_path):
    """Three files of 2 layers x 8 neurons x 2048 tokens, written through the store's writer."""
    rng = np.random.default_rng(0)
    sets = []
    for k in range(3):
        header = ActivationHeader(f"m{k}", 0, "fp", "mlp.post", 2, 8, 2048, "float16")
        writer = ActivationWriter(tmp_path / f"s{k}.h5", header)
        writer.write_rows(0, [rng.standard_normal((2048, 8)).astype(np.float16) for _ in range(2)])
        writer.finish()
        sets.append(SetInput(k, str(tmp_path / f"s{k}.h5"), 2, 8, np.zeros(16), rotation_key=k))
    return sets


def test_flops_equal_the_engines_own_calls(tiny_sets, monkeypatch):
    """The per-chunk products are counted on the engine's backend, the QRs on `baseline._haar`: both match the
    planner's count, in one pass and in several (the rotations are redone in every pass a set takes part in)."""
    counted = {"products": 0, "qr": 0}

    class Counting(ArrayBackend):
        def matmul(self, a, b, out):
            m, k, n = a.shape[0], a.shape[1], b.shape[1]
            gram = a.T.shape == b.shape and np.shares_memory(a, b)  # NumPy's SYRK: one triangle of x^T x
            counted["products"] += m * (m + 1) * k if gram else 2 * m * k * n
            return NUMPY.matmul(a, b, out)

    real_haar = baseline_module._haar

    def haar(rng, d):
        counted["qr"] += qr_flops(d)
        return real_haar(rng, d)

    monkeypatch.setattr(baseline_module, "_haar", haar)
    tokens = np.zeros((4, 512), dtype=np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    options = CorrelationOptions(baseline_draws=3, chunk_tokens=1024)
    one_pass = operations.plan_memory(tiny_sets, 1, options, GIB, 2048, 2).one_pass
    for budget, n_passes in ((GIB, 1), (one_pass - 1, 2)):
        counted.update(products=0, qr=0)
        passes = plan_passes(tiny_sets, 1, options, budget)
        assert len(passes) == n_passes
        result = correlate_sets(tiny_sets, tokens, mask, replace(options, memory_budget=budget), Counting("numpy", np))
        assert result.n_passes == n_passes
        f = correlation_flops(tiny_sets, passes, 2048, options, 1, budget=budget)
        assert counted["products"] == f.products
        assert counted["qr"] == f.qr


def test_times_divide_flops_by_the_rates():
    p = plan_study(study(workers=4, memory_budget=100 * GIB), RATES)
    f, t = p.flops, p.step
    assert p.sharing == 4  # 120 (pair x layer) tasks: every worker holds some
    assert t.products == pytest.approx((f.pair_products / 1e11 + f.grams / 8e10 + (f.adds + f.sums) / 1e9) / 4)
    assert t.stream == pytest.approx(p.design.read_bytes / 1e9)  # read once by the host, not split
    assert t.baseline == pytest.approx(f.baseline_phase / 5e10 / 4)
    assert p.qr_seconds == pytest.approx(f.qr / 1e10)
    assert t.total == pytest.approx(t.products + t.stream + t.baseline)  # the CPU reads between products
    assert p.correlation_total_seconds == pytest.approx(5 * t.total + p.qr_seconds)
    assert p.ingest_total_seconds == pytest.approx(25 * 2 * 124_439_808 * 5_000_000 / 1e11 / 4)


def test_the_cpu_engine_efficiency_slows_every_engine_phase():
    slow = replace(RATES, efficiency=0.5)
    fast, half = plan_study(study(), RATES).step, plan_study(study(), slow).step
    assert half.total == pytest.approx(2 * fast.total)
    assert rates_for(study(), HOST).efficiency == rates.CPU_ENGINE_EFFICIENCY
    assert rates_for(study(device="h100"), HOST).efficiency == 1.0  # a published peak is a bound, not calibrated


def test_accelerators_use_their_published_peaks():
    h100 = rates_for(study(device="h100"), HOST)
    assert h100.products == 494.7e12 and h100.baseline == 66.9e12 and h100.float64 == 66.9e12
    assert h100.overlapped and h100.host_qr == HOST.qr and h100.stream == HOST.stream
    assert h100.adds == 3.35e12 / 20  # HBM bandwidth over the bytes of one `acc += out`
    assert rates_for(study(device="h100", precision="float32"), HOST).products == 66.9e12
    assert rates_for(study(device="a100"), HOST).products == 156e12
    assert rates_for(study(device="h200", torch_dtype="bfloat16"), HOST).forward == 989.4e12
    assert ACCELERATORS["h200"].memory > ACCELERATORS["h100"].memory
    p = plan_study(study(device="h100", memory_budget=None), h100)
    assert p.memory.budget == int(80e9 * 0.6)  # the engine's share (memory_budget) of the spec sheet's memory
    assert p.step.total == pytest.approx(max(p.step.products, p.step.stream) + p.step.baseline)
    assert rates_for(study(), HOST).products == HOST.products


def test_architectures_match_transformers_configs():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    neox = {"rotary_pct": 0.25, "use_parallel_residual": True, "tie_word_embeddings": False, "vocab_size": 50304}
    configs = {
        "gpt2-small": GPT2Config(),
        "gpt2-medium": GPT2Config(n_layer=24, n_embd=1024, n_head=16),
        "pythia-160m": GPTNeoXConfig(
            num_hidden_layers=12, hidden_size=768, intermediate_size=3072, num_attention_heads=12, **neox
        ),
        "pythia-410m": GPTNeoXConfig(
            num_hidden_layers=24, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, **neox
        ),
        "pythia-1b": GPTNeoXConfig(
            num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=8, **neox
        ),
        "llama-7b": LlamaConfig(),
    }
    for name, config in configs.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        arch = ARCHITECTURES[name]
        assert arch.params == sum(p.numel() for p in model.parameters()), name
        assert arch.vocab == config.vocab_size, name
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        assert arch.d_model == hidden, name
        assert arch.n_layers == config.num_hidden_layers, name
        d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        assert arch.d_mlp == d_mlp, name


def test_counts_parse():
    assert parse_count("5000000") == parse_count("5e6") == parse_count("5M") == parse_count("5,000,000") == 5_000_000
    assert parse_count("124.4M") == 124_400_000 and parse_count("1.5B") == 1_500_000_000
    for bad in ("abc", "0", "1.5", "-3", "2.5k7"):
        with pytest.raises(ActdbError):
            parse_count(bad)


def _cli():
    @click.group()
    def group() -> None:
        pass

    for command in PLAN_COMMANDS:
        group.add_command(command)
    return group


def _invoke(monkeypatch, *args: str) -> tuple[int, str]:
    """Run `plan` like `actdb.query.cli.main` does: ActdbError and usage errors become one message."""
    monkeypatch.setattr(estimate, "measure_rates", lambda request: (rates_for(request, HOST), None))
    try:
        result = CliRunner().invoke(_cli(), ["plan", *args], standalone_mode=False, catch_exceptions=False)
    except click.ClickException as exc:
        return 2, exc.format_message()
    except ActdbError as exc:
        return 1, str(exc)
    return result.exit_code, result.output


def test_cli_table_and_json(monkeypatch):
    base = ("--models", "5", "--steps", "5", "--tokens", "5e6", "--arch", "gpt2-small", "--memory-budget", "64GB")
    code, out = _invoke(monkeypatch, *base, "--device", "h100", "--workers", "8")
    assert code == 0, out
    assert "368.6 GB" in out and "9.216 TB" in out and "perfect scaling assumed" in out
    assert "each unordered pair of sets is multiplied once" in out
    assert "read amplification" in out and "multi-pass design on one worker" in out
    assert "research method time" in out and "research / actdb" in out and "bound" in out
    code, out = _invoke(monkeypatch, *base, "--format", "json")
    assert code == 0, out
    rows = {r["quantity"]: r for r in json.loads(out)}
    assert rows["activations per set"]["value"] == 368_640_000_000 and rows["activations per set"]["unit"] == "B"
    expected = plan_passes(synthetic_inputs(GPT2, 5), 5_000_000, CorrelationOptions(), 64 * GIB)
    assert rows["passes per step"]["value"] == len(expected)
    assert rows["pair products"]["value"] == 2 * 10 * 36_864**2 * 5_000_000
    code, out = _invoke(
        monkeypatch,
        "--models",
        "3",
        "--steps",
        "2",
        "--tokens",
        "1M",
        "--layers",
        "4",
        "--d-mlp",
        "256",
        "--params",
        "20M",
    )
    assert code == 0 and "custom 4x256" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--arch", "gpt5"), "known: gpt2-small"),
        (("--arch", "gpt2-small", "--layers", "3"), "not both"),
        (("--layers", "3"), "all of --layers"),
        (("--arch", "gpt2-small", "--device", "tpu"), "'tpu' is not one of"),
        (("--arch", "gpt2-small", "--precision", "tf32"), "needs a CUDA device"),
        (("--arch", "gpt2-small", "--models", "1"), "at least 2"),
        (("--arch", "gpt2-small", "--host-cores", "0"), "--host-cores"),
        (("--arch", "gpt2-small", "--tokens", "lots"), "cannot read"),
        (("--layers", "3", "--d-mlp", "8", "--params", "1M", "--control", "token"), "--vocab"),
    ],
)
def test_bad_input_is_one_line(monkeypatch, args, needle):
    defaults = {"--models": "5", "--steps": "5", "--tokens": "5e6"}
    given = dict(zip(args[::2], args[1::2], strict=True))
    argv = [x for k, v in {**defaults, **given}.items() for x in (k, v)]
    code, message = _invoke(monkeypatch, *argv)
    assert code != 0
    assert needle in message and "\n" not in message.strip(), message


def test_the_published_study_on_eight_workers_reads_each_byte_once():
    """8 H100s share the step's 190 GiB of accumulators: one pass (read amplification 1.0) at the largest
    halving of --chunk-tokens that fits every worker's share in its budget; one worker alone needs 30 passes."""
    request = study(device="h100", workers=8, memory_budget=None)
    p = plan_study(request, rates_for(request, HOST))
    assert p.memory.n_passes == 30 and p.memory.amplification == pytest.approx(12.6, abs=0.05)
    assert p.design.n_passes == 1 and p.design.amplification == 1.0
    assert p.design.read_bytes == p.design.step_bytes == 5 * 5_000_000 * 36_864 * 2
    # every worker's share fits its own budget, in the engine's own accounting, at the design's chunk
    inputs = synthetic_inputs(GPT2, 5)
    options = replace(request.options, chunk_tokens=p.design_chunk)
    size = task_bytes(inputs[0], inputs[0])
    share = -(-120 // 8)
    assert pass_overhead(inputs, request.n_vocab, options, size) + share * size <= p.memory.budget
    # and the requested chunk is halved no further than needed
    bigger = replace(options, chunk_tokens=2 * p.design_chunk)
    assert pass_overhead(inputs, request.n_vocab, bigger, size) + share * size > p.memory.budget
    assert p.design_chunk < request.chunk_tokens


def test_rotations_are_counted_once_per_model_and_layer_for_the_study():
    one = plan_study(study(memory_budget=100 * GIB), RATES)
    many = plan_study(study(memory_budget=100 * GIB, steps=50, workers=3), RATES)
    expected = 5 * 12 * qr_flops(3072) + 7 * qr_flops(3072)  # models x layers, and P_k for 7 extra draws
    assert one.memory.n_passes > 1
    assert one.flops.qr == many.flops.qr == expected
    assert one.qr_seconds == many.qr_seconds == pytest.approx(expected / RATES.host_qr)


@pytest.mark.parametrize(
    ("device", "arch", "models", "budget"),
    [("h100", "gpt2-small", 5, None), ("cpu", "gpt2-small", 5, 64 * GIB), ("a100", "pythia-1b", 4, None)],
)
def test_more_workers_never_make_an_estimate_longer(device, arch, models, budget):
    previous = None
    for workers in (*range(1, 17), 24, 32, 64, 128, 256):
        request = study(device=device, arch=architecture(arch), models=models, memory_budget=budget, workers=workers)
        p = plan_study(request, rates_for(request, HOST))
        now = (p.correlation_total_seconds, p.research.total, p.design.read_bytes)
        if previous is not None:
            assert all(b <= a * (1 + 1e-12) for a, b in zip(previous, now, strict=True)), (workers, previous, now)
        previous = now


def test_the_same_rates_give_the_same_plan():
    request = study(device="h100", workers=8, memory_budget=None)
    rates_now = rates_for(request, HOST)
    first, second = plan_study(request, rates_now), plan_study(request, rates_now)
    assert first == second
    assert list(plan_rows(first, "json")) == list(plan_rows(second, "json"))


def test_the_research_method_by_hand():
    """Gurnee et al.'s jobs on 8 H100s: 10 pairs x 5 steps x (correlation, baseline) = 100 jobs in 13 rounds,
    each recomputing two forward passes and multiplying in plain float32."""
    request = study(device="h100", workers=8, memory_budget=None)
    r = plan_study(request, rates_for(request, HOST)).research
    n, t = 36_864, 5_000_000
    assert r.jobs == 100 and r.rounds == 13
    assert r.products == pytest.approx(2 * n * n * t / 66.9e12)  # no TF32: torch's default float32 matmul
    assert r.forward == pytest.approx(4 * 124_439_808 * t / 66.9e12)
    assert r.rotation == pytest.approx(12 * 2 * 3072**2 * t / 66.9e12)
    assert r.adds == pytest.approx(-(-t // (32 * 512)) * n * n / (3.35e12 / 20))
    assert r.total == pytest.approx(13 * (r.forward + r.products + r.adds + r.rotation / 2))
    assert 40 * 60 < r.total < 70 * 60  # "roughly an hour on the same node"


def test_the_bound_names_what_the_time_goes_to():
    request = study(device="h100", workers=8, memory_budget=None)
    slow_reader = plan_study(request, replace(rates_for(request, HOST), stream=1e8))
    fast_reader = plan_study(request, replace(rates_for(request, HOST), stream=1e13, host_qr=1e13))
    assert slow_reader.bound == "reading" and fast_reader.bound == "products"
    slow_qr = plan_study(request, replace(rates_for(request, HOST), stream=1e13, host_qr=1e6))
    assert slow_qr.bound == "host"


def test_host_rates_are_per_core_and_scale_by_the_host_cores():
    one, four = rates_for(study(host_cores=1), HOST), rates_for(study(host_cores=4), HOST)
    assert four.products == 4 * one.products and four.stream == 4 * one.stream and four.host_qr == 4 * one.host_qr
    h100 = rates_for(study(device="h100", host_cores=4), HOST)
    assert h100.products == 494.7e12 and h100.stream == 4 * HOST.stream and h100.host_qr == 4 * HOST.qr
    assert rates_for(study(host_cores=None), HOST).stream == host_cores() * HOST.stream


def test_rates_are_measured_on_one_blas_thread(monkeypatch):
    """Every host rate is timed with one BLAS thread (threadpoolctl), whatever the machine's default."""
    from threadpoolctl import threadpool_info

    seen = []

    def record(*args, **kwargs):
        seen.append({pool["num_threads"] for pool in threadpool_info()})
        return 1e9

    for name in ("numpy_gemm_rate", "chunk_product_rate", "add_rate", "gram_rate", "qr_rate", "stream_rate"):
        monkeypatch.setattr(rates, name, record)
    host = rates.measure_host(study())
    assert len(seen) == 6 and all(s == {1} for s in seen)
    assert host.cores == 1 and host.products == 1e9
    accel = len(seen)
    rates.measure_host(study(device="h100"))  # only the host's share is timed for an accelerator
    assert len(seen) - accel == 2
