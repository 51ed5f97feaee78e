"""Tiny models built locally: a BPE tokenizer trained on the Python standard library's own source, tiny
GPT-2 / GPT-NeoX / Llama models saved with `save_pretrained`, and a seeded zoo of trained GPT-2 checkpoints.

Everything here uses text every machine has, so tests and the demo never download anything; the saved
folders load through exactly the code path a hub id takes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import sysconfig
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from actdb.store.device import host_cores
from actdb.store.errors import ActdbError

SPECIAL_EOS = "<|endoftext|>"


def stdlib_files() -> list[Path]:
    """The standard library's top-level .py files, sorted: the same list on every machine with this Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def stdlib_texts(max_files: int | None = None, offset: int = 0) -> list[str]:
    files = stdlib_files()[offset:]
    if max_files is not None:
        files = files[:max_files]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> Path:
    """Train a byte-level BPE tokenizer and save it as a `PreTrainedTokenizerFast` folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL_EOS, bos_token=SPECIAL_EOS, unk_token=SPECIAL_EOS, pad_token=SPECIAL_EOS
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def tiny_config(arch: str, vocab_size: int, n_layers: int = 2, d_model: int = 32, d_mlp: int = 128, n_ctx: int = 128):
    """A transformers config for a tiny model of the given architecture (every model type
    `actdb.store.ingest.architectures.supported_architectures()` lists): 4 attention heads, no dropout, token id 0 as
    bos/eos/pad (the test tokenizer's only special token)."""
    from transformers import CONFIG_MAPPING

    n_heads = 4
    head_dim = d_model // n_heads
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if arch == "gpt2":
        return CONFIG_MAPPING["gpt2"](
            vocab_size=vocab_size,
            n_positions=n_ctx,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_inner=d_mlp,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    if arch == "gpt_neox":
        return CONFIG_MAPPING["gpt_neox"](
            vocab_size=vocab_size,
            max_position_embeddings=n_ctx,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            intermediate_size=d_mlp,
            bos_token_id=0,
            eos_token_id=0,
        )
    if arch == "gpt_neo":
        pattern = [[["global", "local"], n_layers // 2]] if n_layers % 2 == 0 else [[["global"], n_layers]]
        return CONFIG_MAPPING["gpt_neo"](
            vocab_size=vocab_size,
            max_position_embeddings=n_ctx,
            hidden_size=d_model,
            num_layers=n_layers,
            attention_types=pattern,
            num_heads=n_heads,
            intermediate_size=d_mlp,
            window_size=max(1, n_ctx // 4),
            **special,
        )
    if arch == "gptj":
        return CONFIG_MAPPING["gptj"](
            vocab_size=vocab_size,
            n_positions=n_ctx,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            rotary_dim=max(2, head_dim // 2),
            n_inner=d_mlp,
            **special,
        )
    if arch == "bloom":
        if d_mlp != 4 * d_model:
            raise ValueError(f"bloom's MLP width is 4 * d_model = {4 * d_model}, not {d_mlp}")
        return CONFIG_MAPPING["bloom"](
            vocab_size=vocab_size, hidden_size=d_model, n_layer=n_layers, n_head=n_heads, **special
        )
    if arch == "falcon":
        return CONFIG_MAPPING["falcon"](
            vocab_size=vocab_size,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            ffn_hidden_size=d_mlp,
            max_position_embeddings=n_ctx,
            **special,
        )
    if arch == "opt":
        return CONFIG_MAPPING["opt"](
            vocab_size=vocab_size,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            ffn_dim=d_mlp,
            max_position_embeddings=n_ctx,
            num_attention_heads=n_heads,
            word_embed_proj_dim=d_model,
            dropout=0.0,
            **special,
        )
    sizes = {
        "vocab_size": vocab_size,
        "max_position_embeddings": n_ctx,
        "hidden_size": d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_heads,
        "intermediate_size": d_mlp,
        **special,
    }
    if arch in ("gemma", "gemma2", "gemma3_text", "qwen3"):
        sizes["head_dim"] = head_dim
    if arch in ("gemma2", "gemma3_text"):
        sizes.update(query_pre_attn_scalar=head_dim, sliding_window=max(1, n_ctx // 4))
    if arch == "phi3":
        sizes["original_max_position_embeddings"] = n_ctx
    gated = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "stablelm", "gemma", "gemma2", "gemma3_text")
    if arch in gated or arch in ("phi", "phi3"):
        return CONFIG_MAPPING[arch](**sizes)
    raise ValueError(f"no tiny config for architecture {arch!r}")


def save_tiny_model(arch: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0, **sizes: int) -> Path:
    """A randomly initialised tiny model plus its tokenizer, saved as a loadable folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), **sizes))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def training_batches(token_ids: list[int], seq_len: int, batch_size: int, seed: int) -> Iterator:
    """Endless random windows of a token stream, seeded so each zoo seed sees its own but reproducible order."""
    import torch

    data = torch.tensor(token_ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        yield torch.stack([data[s : s + seq_len] for s in starts.tolist()])


def read_zoo_manifest(root: Path) -> dict | None:
    path = Path(root) / "zoo.json"
    return json.loads(path.read_text()) if path.exists() else None


# 2: training runs deterministically on a fixed thread count (version-1 weights depended on the machine's threads)
ZOO_VERSION = 2
TRAIN_THREADS = 1


def zoo_config(
    seeds: int,
    train_steps: int,
    checkpoints: list[int],
    vocab_size: int = 2000,
    d_model: int = 128,
    d_mlp: int = 512,
    n_layers: int = 2,
    seq_len: int = 128,
    batch_size: int = 8,
    lr: float = 2e-3,
    train_files: int = 150,
    train_threads: int | None = TRAIN_THREADS,
) -> dict:
    """Everything that determines the zoo's weights; a cached zoo is reused only when this matches.

    `train_threads=None` trains as version 1 did (torch's own thread count, non-deterministic algorithms
    allowed): faster on many cores, but the weights then depend on the machine."""
    return {
        "version": ZOO_VERSION,
        "seeds": seeds,
        "train_steps": train_steps,
        "checkpoints": sorted(checkpoints),
        "vocab_size": vocab_size,
        "d_model": d_model,
        "d_mlp": d_mlp,
        "n_layers": n_layers,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lr": lr,
        "train_files": train_files,
        "train_threads": train_threads,
    }


@contextlib.contextmanager
def reproducible_training(threads: int | None) -> Iterator[None]:
    """Make torch's CPU training bit-reproducible for the block, then restore the caller's settings.

    A float sum's value depends on how it is split: a matmul or a reduction cut into as many pieces as torch
    has threads rounds differently on a machine with another core count, and the difference grows over
    hundreds of optimiser steps into different universal sets. So training runs on a fixed number of threads
    (1 by default: the same split on every machine) with deterministic algorithms; the data order is already
    drawn from a generator seeded per zoo seed (`training_batches`).
    """
    import torch

    if threads is None:
        yield
        return
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.set_num_threads(threads_before)


def checkpoint_dir(root: Path, seed: int, step: int) -> Path:
    return Path(root) / f"seed{seed}" / f"step-{step}"


def train_zoo(root: Path, config: dict, progress: bool = True, processes: int | None = None) -> Path:
    """Train (or reuse) `seeds` tiny GPT-2 models on standard-library source; returns the tokenizer folder.

    Each seed's checkpoints are written as they are reached; a seed whose last checkpoint exists is skipped,
    so an interrupted zoo continues where it stopped (a partly trained seed restarts from scratch). Seeds train in
    up to `processes` processes at once (default: one per core this process may use; with one, in turn).
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = Path(root)
    found = read_zoo_manifest(root)
    if found is not None and found.get("version") != config["version"]:
        raise ActdbError(
            f"zoo at {root} was trained by zoo version {found.get('version')} (this is version {config['version']}: "
            "bit-reproducible training on a fixed thread count); delete that folder or pick another --zoo folder"
        )
    if found not in (None, config):
        raise ActdbError(f"zoo at {root} was built with other settings; pick another --zoo folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / "zoo.json").write_text(json.dumps(config, indent=2))
    tok_dir = root / "tokenizer"
    last = max(config["checkpoints"])
    todo = [k for k in range(config["seeds"]) if not (checkpoint_dir(root, k, last) / "config.json").exists()]
    if not todo:
        return tok_dir
    (root / TRAINED_ON).unlink(missing_ok=True)  # seeds trained here from now on: written again when they are done
    texts = stdlib_texts(max_files=config["train_files"])
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(texts, config["vocab_size"], tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    workers = min(len(todo), processes or host_cores())
    if workers < 2 or config["train_threads"] is None:
        with reproducible_training(config["train_threads"]):
            for seed in todo:
                _train_seed(root, config, tokenizer, stream, seed, progress)
        _record_training_machine(root)
        return tok_dir
    # Seeds are independent and each trains on a fixed thread count, so they train side by side in processes (one
    # per core): the same weights as one after another, in a fraction of the time.
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"train {len(todo)} seeds on {workers} processes", disable=not progress)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_train_seed_process, root, config, tok_dir, stream, seed) for seed in todo]
        for job in as_completed(jobs):
            job.result()
            bar.update()
    bar.close()
    _record_training_machine(root)
    return tok_dir


def _train_seed_process(root: Path, config: dict, tok_dir: Path, stream: list[int], seed: int) -> None:
    """One seed in a worker process: the tokenizer loaded there, training under the zoo's fixed thread count."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with reproducible_training(config["train_threads"]):
        _train_seed(root, config, AutoTokenizer.from_pretrained(tok_dir), stream, seed, progress=False)


def _train_seed(root: Path, config: dict, tokenizer, stream: list[int], seed: int, progress: bool) -> None:
    """Train one zoo seed from its own initialisation and data order, saving each checkpoint as it is reached."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GPT2LMHeadModel

    total = config["train_steps"]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        tiny_config(
            "gpt2",
            len(tokenizer),
            n_layers=config["n_layers"],
            d_model=config["d_model"],
            d_mlp=config["d_mlp"],
            n_ctx=config["seq_len"],
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    batches = training_batches(stream, config["seq_len"], config["batch_size"], seed)
    bar = tqdm(total=total, desc=f"train seed {seed}", disable=not progress, dynamic_ncols=True)
    for step in range(total + 1):
        if step in config["checkpoints"]:
            out = checkpoint_dir(root, seed, step)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        if step == total:
            break
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()


TRAINED_ON = "trained-on.json"  # torch's version and CPU kernel level where the zoo's seeds were trained


def _record_training_machine(root: Path) -> None:
    import torch

    machine = {"torch": torch.__version__, "cpu_kernels": torch.backends.cpu.get_cpu_capability()}
    (root / TRAINED_ON).write_text(json.dumps(machine, indent=2))


def zoo_provenance(root: Path, config: dict) -> str:
    """One line to compare a zoo with a published run's: a digest over every seed's last checkpoint, and the torch
    build and CPU kernel level (torch's ATen kernels and MKL's GEMMs differ between AVX2 and AVX-512) it was
    trained with. Training is bit-reproducible for a given build and CPU, not across them: another kernel level, or
    another CPU of the same level (a Zen 5 EPYC and a Xeon, both AVX-512, trained different zoos), trains other
    weights, and every number downstream differs in its later digits (and counts near a threshold)."""
    digest = hashlib.sha256()
    for seed in range(config["seeds"]):
        digest.update(weight_digest(checkpoint_dir(root, seed, max(config["checkpoints"]))).encode())
    path = Path(root) / TRAINED_ON
    machine = json.loads(path.read_text()) if path.exists() else {"torch": "unknown", "cpu_kernels": "unknown"}
    return f"zoo digest {digest.hexdigest()[:16]} (torch {machine['torch']}, CPU kernels {machine['cpu_kernels']})"


def weight_digest(folder: Path) -> str:
    """SHA-256 over a saved model's tensors (names, dtypes, shapes and bytes, in name order): equal digests mean
    bit-identical weights, whatever the file's own metadata says."""
    from safetensors.numpy import load_file

    digest = hashlib.sha256()
    for name, array in sorted(load_file(str(Path(folder) / "model.safetensors")).items()):
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
