"""Does the zoo's training depend on the CPU's kernel level? One tiny seed trained in fresh processes with torch's
kernels (ATen) and MKL's GEMMs held to lower instruction sets by their documented environment variables; equal
weight digests would mean the level does not matter.

    .venv/bin/python benchmarks/zoo_kernels.py

Prints the digest and torch's CPU capability per setting, and how long each training took.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

TRAIN_ONE_SEED = """
import sys, tempfile
from pathlib import Path
import torch
from actdb.store.ingest.zoo import checkpoint_dir, train_zoo, weight_digest, zoo_config
root = Path(tempfile.mkdtemp())
config = zoo_config(1, 12, [12], vocab_size=300, d_model=64, d_mlp=256, seq_len=64, batch_size=8, train_files=12)
train_zoo(root, config, progress=False)
print(weight_digest(checkpoint_dir(root, 0, 12)), torch.backends.cpu.get_cpu_capability())
"""

MKL_AVX2 = {"MKL_CBWR": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SETTINGS = {
    "this machine's default": {},
    "ATen held to AVX2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "MKL and oneDNN held to AVX2": MKL_AVX2,
    "all held to AVX2": {"ATEN_CPU_CAPABILITY": "avx2", **MKL_AVX2},
}


def main() -> None:
    base = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    print(f"{'setting':<30} {'weight digest':<18} {'torch capability':<17} seconds")
    for name, extra in SETTINGS.items():
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", TRAIN_ONE_SEED], env=base | extra, capture_output=True, text=True, check=True
        ).stdout.split()
        print(f"{name:<30} {out[0][:16]:<18} {out[1]:<17} {time.perf_counter() - started:.1f}")


if __name__ == "__main__":
    main()
