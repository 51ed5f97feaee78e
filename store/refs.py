"""One parser, with one set of rules, for everything users type: MODEL@STEP references, step lists, L.N neuron
lists, token ranges, sizes and the names of models and datasets. Every mistake is an ActdbError of one line."""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from actdb.store.config import file_name_of
from actdb.store.errors import ActdbError
from actdb.store.hook_names import HOOK_NAME

MAX_STEP = 2**63 - 1  # steps are stored as BIGINT
MAX_NAME = 200
# Bytes of a name's file form (`file_name_of`): a file system allows 255 per path component, and actdb appends at
# most 36 to a dataset's (`.mlp.post.explain.h5.partial-<pid>`), so 200 leaves room on every common file system.
MAX_FILE_NAME = 200
NAME_RULE = "1-200 characters, none of / \\ , @ or control characters, not containing '..'"

Neuron = tuple[int, int]
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "tf32", "float32")  # of the correlation products on CUDA
CONTROLS = ("none", "token")
STORED_DTYPES = ("float16", "int8")  # what ingest writes (`ingest --dtype`)


def check_threshold(threshold: float | None) -> float | None:
    """A threshold must be a finite excess correlation in [0, 1] (None: each run's recorded one)."""
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ActdbError(f"threshold {threshold} is not a number in [0, 1]")
    return threshold


def check_name(name: str, what: str = "name") -> str:
    """A model or dataset name: they become file names and appear in MODEL@STEP and comma lists, so they must be
    non-empty, at most 200 characters, and free of `/ \\ , @`, `..` and control characters."""
    bad = [c for c in "/\\,@" if c in name]
    if (
        not name
        or len(name) > MAX_NAME
        or name != name.strip()
        or bad
        or ".." in name
        or any(unicodedata.category(c).startswith("C") for c in name)
    ):
        raise ActdbError(f"invalid {what} {name!r}: use {NAME_RULE}, without leading or trailing spaces")
    encoded = len(file_name_of(name))
    if encoded > MAX_FILE_NAME:
        shown = repr(name) if len(name) <= 40 else repr(name[:40]) + "…"
        raise ActdbError(
            f"invalid {what} {shown}: its file name would be {encoded} bytes, and may be at most {MAX_FILE_NAME} "
            "(letters, digits, _ - . take 1 byte; any other character 3 bytes per UTF-8 byte)"
        )
    return name


def parse_int(text: str, what: str, low: int = 0, high: int = MAX_STEP) -> int:
    """A decimal integer in [low, high]."""
    t = text.strip()
    if not re.fullmatch(r"-?[0-9]+", t):  # ASCII digits only: int() would also take "+5" and "٣"
        raise ActdbError(f"malformed {what} {text!r}; write a whole number")
    value = int(t)
    if not low <= value <= high:
        raise ActdbError(f"{what} {value} is out of range ({low}..{high})")
    return value


def parse_step(text: str) -> int:
    return parse_int(text, "step")


def parse_steps(text: str) -> list[int]:
    """`0,100,400`: distinct non-negative steps, in the order given."""
    steps = [parse_step(s) for s in text.split(",") if s.strip()]
    if not steps:
        raise ActdbError(f"no steps in {text!r}; write e.g. 0,100,400")
    if len(set(steps)) != len(steps):
        raise ActdbError(f"a step is listed twice in {text!r}")
    return steps


@dataclass(frozen=True)
class SetRef:
    """A `MODEL@STEP` reference to a checkpoint (optionally `MODEL@STEP/DATASET`)."""

    model: str
    step: int
    dataset: str | None = None

    def __str__(self) -> str:
        return f"{self.model}@{self.step}"


def examples_command(target: str, dataset: str | None = None, hook: str = HOOK_NAME) -> str:
    """The `actdb examples` command line that explains MODEL@STEP's set on `dataset` (None: its only one) at
    `hook`: what every message about a missing explanation tells the user to run."""
    flags = (f" --dataset {dataset}" if dataset else "") + (f" --hook {hook}" if hook != HOOK_NAME else "")
    return f"actdb examples {target}{flags}"


def parse_set_ref(text: str) -> SetRef:
    body, _, dataset = text.strip().partition("/")
    model, sep, step = body.rpartition("@")
    if not sep or not model or not step.strip():
        raise ActdbError(f"malformed checkpoint {text!r}; write MODEL@STEP (optionally MODEL@STEP/DATASET)")
    return SetRef(model, parse_step(step), dataset or None)


def parse_list(text: str, what: str) -> list[str]:
    """A comma-separated list of names, each listed once."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ActdbError(f"no {what} in {text!r}")
    if len(set(items)) != len(items):
        raise ActdbError(f"one of the {what} is listed twice in {text!r}")
    return items


def parse_set_refs(text: str) -> list[SetRef]:
    refs = [parse_set_ref(x) for x in parse_list(text, "sets")]
    return refs


def parse_neuron(text: str) -> Neuron:
    """`L.N`: a layer and a neuron index."""
    layer, dot, neuron = text.strip().partition(".")
    if not dot or not layer.isdigit() or not neuron.isdigit() or not layer.isascii() or not neuron.isascii():
        raise ActdbError(f"malformed neuron {text!r}; write LAYER.NEURON, e.g. 3.1234")
    return int(layer), int(neuron)


def parse_neuron_list(text: str) -> list[Neuron]:
    """`3.1234,11.3030`: L.N items separated by commas, spaces or newlines; `#` starts a comment. Sorted, unique."""
    out = [parse_neuron(item) for line in text.splitlines() for item in line.split("#", 1)[0].replace(",", " ").split()]
    if not out:
        raise ActdbError("the neuron list is empty; write LAYER.NEURON items, e.g. 3.1234,11.3030")
    return sorted(set(out))


def read_neuron_file(path: str | Path) -> list[Neuron]:
    """A text file holding an L.N list (`--neurons @FILE`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ActdbError(f"neuron file {path} is not UTF-8 text; it should hold LAYER.NEURON items") from None
    except OSError as exc:
        raise ActdbError(f"cannot read neuron file {path}: {exc.strerror or exc}") from None
    return parse_neuron_list(text)


def parse_index_list(text: str, what: str = "neuron") -> list[int]:
    """`5,17,3`: non-negative indices in the order given."""
    out = [parse_int(x, what, 0, 2**31 - 1) for x in text.split(",") if x.strip()]
    if not out:
        raise ActdbError(f"no {what} indices in {text!r}; write e.g. 5,17")
    return out


def parse_token_range(text: str | None, n: int) -> slice:
    """`START:END` rows within `0:n` (either side may be empty)."""
    if text is None:
        return slice(0, n)
    start, sep, stop = text.partition(":")
    if not sep:
        raise ActdbError(f"malformed token range {text!r}; write START:END")
    lo = parse_int(start, "token index", 0, MAX_STEP) if start.strip() else 0
    hi = parse_int(stop, "token index", 0, MAX_STEP) if stop.strip() else n
    if lo >= hi:
        raise ActdbError(f"token range {text!r} is empty: START must be below END")
    if hi > n:
        raise ActdbError(f"token range {text!r} is outside 0:{n}")
    return slice(lo, hi)


def parse_bytes(text: str) -> int:
    """'512MB', '4GB', '1.5GiB' or plain bytes; must be positive."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ActdbError(f"cannot read a size from {text!r} (e.g. 512MB, 4GB)")
    value = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))
    if value <= 0:
        raise ActdbError(f"size {text!r} must be positive")
    return value
