"""The explanation sidecar of an activation set: `<activation file stem>.explain.h5` next to the activation file.

One HDF5 group per kind of explanation, each a set of named arrays with Fletcher-32 checksums; the groups in
use are `examples` (per neuron top-K `values` and flat token `positions`), `tokens` (`token_r2`, `position_r2`,
`top_ids`, `top_means`, `top_counts`) and `vocabulary`. The file is written whole under `.partial-<pid>` and renamed
when complete (a new group is added by rewriting the file with the groups already there), so a reader either
sees a complete file or refuses it. Its attributes name the checkpoint, dataset and hook it explains
(`actdb.store.files.identity`); a reader given what SQL says the set is refuses another set's file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from actdb.store.errors import ActdbError
from actdb.store.files.identity import SidecarIdentity, verify_identity, write_identity
from actdb.store.hook_names import HOOK_NAME
from actdb.store.refs import examples_command

FORMAT_VERSION = 1
COMPLETE_ATTR = "actdb_complete"
SUFFIX = ".explain.h5"
SHARED_GROUPS = ("strings",)  # groups that are not one row per neuron (the token texts)


def explanation_path(activation_path: str | os.PathLike) -> Path:
    """The sidecar's path: the activation file's path with its suffix replaced by `.explain.h5`."""
    return Path(activation_path).with_suffix(SUFFIX)


def _partial(path: Path) -> Path:
    """This process's temporary file: two processes explaining one set each write their own and the last rename
    wins (their contents are the same computation on the same data)."""
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def write_explanations(
    path: str | os.PathLike,
    groups: Mapping[str, Mapping[str, np.ndarray]],
    attrs: Mapping[str, object] | None = None,
    keep_existing: bool = True,
    *,
    identity: SidecarIdentity,
) -> None:
    """Write named groups of arrays (and file attributes) atomically: under `.partial`, then renamed; `identity`
    (the set's checkpoint, dataset and hook) is stamped on the file for readers to compare with SQL.

    With `keep_existing`, the groups and attributes of a complete file already at `path` that `groups` and
    `attrs` do not replace are carried over, so explanations computed at different times share one file.
    Scalars belong in `attrs` (HDF5 cannot checksum a scalar dataset).
    """
    path = Path(path)
    tmp = _partial(path)
    old: dict[str, object] = {}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        source = _keepable(path) if keep_existing else None
        try:
            with h5py.File(tmp, "w") as f:
                if source is not None:
                    old = dict(source.attrs)
                    for name in source:
                        if name not in groups:
                            source.copy(source[name], f, name=name)
                for name, arrays in groups.items():
                    group = f.create_group(name)
                    for key, value in arrays.items():
                        data = np.asarray(value)
                        if data.ndim == 0:
                            raise ValueError(f"{name}/{key} is a scalar; store it as an attribute")
                        group.create_dataset(key, data=data, chunks=True, fletcher32=True)
                for key, value in {**old, **(attrs or {})}.items():
                    f.attrs[key] = value
                write_identity(f.attrs, identity)
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["activation_file"] = _activation_name(path)
                f.attrs[COMPLETE_ATTR] = True
        finally:
            if source is not None:
                source.close()
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ActdbError(f"cannot write explanation file {path}: {exc.strerror or exc}") from None


def _keepable(path: Path) -> h5py.File | None:
    """The complete sidecar already at `path`, open for reading; None when there is none or it is unusable."""
    try:
        f = h5py.File(path, "r")
    except OSError:
        return None
    if not f.attrs.get(COMPLETE_ATTR, False) or int(f.attrs.get("format_version", 0)) > FORMAT_VERSION:
        f.close()
        return None
    return f


def _activation_name(path: Path) -> str:
    name = path.name
    return name[: -len(SUFFIX)] + ".h5" if name.endswith(SUFFIX) else name


def _open(path: Path, expected: SidecarIdentity | None = None) -> h5py.File:
    """Open a complete sidecar for reading, or raise a one-line ActdbError saying what is wrong; with `expected`
    (what SQL says the set is) a file of another checkpoint, dataset or hook is refused (one written before
    sidecars carried an identity is opened unchecked)."""
    if not path.exists():
        hint = " (its writing is unfinished)" if any(path.parent.glob(f"{path.name}.partial-*")) else ""
        raise ActdbError(f"explanation file {path} does not exist{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ActdbError(f"explanation file {path} is unreadable or truncated: {_one_line(exc)}") from None
    if not f.attrs.get(COMPLETE_ATTR, False):
        f.close()
        raise ActdbError(f"explanation file {path} is unfinished (no completion marker)")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        f.close()
        raise ActdbError(f"explanation file {path} has format version {version}; this actdb reads {FORMAT_VERSION}")
    if expected is not None:
        try:
            verify_identity("explanation file", path, f.attrs, expected, _rewrite_command(expected))
        except ActdbError:
            f.close()
            raise
    return f


def _rewrite_command(expected: SidecarIdentity) -> str:
    """The command that rebuilds the explanations of the set `expected` names."""
    return examples_command(f"{expected.model}@{expected.step}", hook=expected.hook or HOOK_NAME) + " --force"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def explanation_groups(path: str | os.PathLike, expected: SidecarIdentity | None = None) -> list[str]:
    """The names of the groups a complete sidecar holds (`expected`: as `_open`)."""
    with _open(Path(path), expected) as f:
        return sorted(f)


def read_explanation_attrs(path: str | os.PathLike, expected: SidecarIdentity | None = None) -> dict[str, object]:
    """The file attributes of a complete sidecar (format version, identity, k, min_count, ...; `expected`: as
    `_open`)."""
    with _open(Path(path), expected) as f:
        return {key: (value.item() if isinstance(value, np.generic) else value) for key, value in f.attrs.items()}


def read_explanation_group(
    path: str | os.PathLike, group: str, expected: SidecarIdentity | None = None
) -> dict[str, np.ndarray]:
    """Every array of one group, read through its checksum; an ActdbError if missing, unfinished, corrupt or (with
    `expected`) another set's file."""
    path = Path(path)
    with _open(path, expected) as f:
        if group not in f:
            raise ActdbError(f"explanation file {path} has no {group!r} explanations")
        try:
            return {name: ds[()] for name, ds in f[group].items()}
        except OSError as exc:
            raise ActdbError(
                f"explanation file {path} is corrupt (checksum or read error in {group!r}): {_one_line(exc)}"
            ) from None


def read_neuron(
    path: str | os.PathLike, layer: int, neuron: int, expected: SidecarIdentity | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """One neuron's rows of every per-neuron array (those shaped (n_layers, d_mlp, ...)), by group: reads only the
    chunks that hold them, through their checksums (`expected`: as `_open`)."""
    path = Path(path)
    out: dict[str, dict[str, np.ndarray]] = {}
    with _open(path, expected) as f:
        try:
            for group in f:
                out[group] = {name: ds[layer, neuron] for name, ds in f[group].items() if ds.ndim >= 2}
        except OSError as exc:
            raise ActdbError(f"explanation file {path} is corrupt (checksum or read error): {_one_line(exc)}") from None
    return out


def check_explanation_file(
    path: str | os.PathLike,
    n_layers: int | None = None,
    d_mlp: int | None = None,
    expected: SidecarIdentity | None = None,
    quick: bool = False,
) -> list[str]:
    """Problems with a sidecar, one line each (none when intact): its identity must be `expected` (when given and
    the file has one), every dataset is read through its checksum (not when `quick`), and with `n_layers` /
    `d_mlp` each per-neuron array must start with those dimensions (one row per neuron)."""
    path = Path(path)
    try:
        f = _open(path, expected)
    except ActdbError as exc:
        return [str(exc)]
    problems = []
    with f:
        if quick:
            return problems
        for group in sorted(f):
            if not isinstance(f[group], h5py.Group):
                problems.append(f"{group}: not a group of arrays")
                continue
            for name, ds in sorted(f[group].items()):
                try:
                    ds[()]
                except OSError as exc:
                    problems.append(f"{group}/{name}: checksum or read error ({_one_line(exc)})")
                    continue
                if group in SHARED_GROUPS:
                    continue
                for axis, (what, want) in enumerate((("layers", n_layers), ("neurons", d_mlp))):
                    if want is not None and (ds.ndim <= axis or ds.shape[axis] != want):
                        problems.append(f"{group}/{name}: shape {ds.shape}, expected {want} {what} on axis {axis}")
    return problems


def pack_strings(texts: list[str]) -> dict[str, np.ndarray]:
    """Strings as one UTF-8 byte array and `n + 1` offsets: plain datasets, so they are checksummed like the rest."""
    encoded = [t.encode("utf-8", "surrogateescape") for t in texts]  # token texts keep bytes that are no character
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) for e in encoded])
    blob = np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8)
    return {"blob": blob, "offsets": offsets}


def unpack_strings(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The strings `pack_strings` packed."""
    blob, offsets = bytes(np.asarray(arrays["blob"], dtype=np.uint8)), arrays["offsets"]
    return [blob[offsets[i] : offsets[i + 1]].decode("utf-8", "surrogateescape") for i in range(len(offsets) - 1)]
