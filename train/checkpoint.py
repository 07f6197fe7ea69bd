"""Resumable training state on disk: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint is a folder ``checkpoint-{step:08d}`` written as ``tmp-…`` and renamed only
once every file is fsynced, so a kill mid-write leaves the previous checkpoints intact.
``trainer_state.json`` is written last and lists the states the folder holds; a folder without
it is never resumed from, and ``verify_checkpoint`` reads every listed state before one is.
Frozen models are never saved: a checkpoint holds only what training changes.

A preemption checkpoint is written in two stages, so that a usable one exists early in the
30 s between SIGTERM and SIGKILL: first the adapter, schedule, RNG streams and data positions
(renamed into place with ``pending`` naming what is still to come), then the larger optimizer
and EMA states, each renamed into place, and ``trainer_state.json`` again without ``pending``.
Resuming from a checkpoint whose ``pending`` parts never arrived starts those parts afresh.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from train.errors import CheckpointError  # defined without torch, for the command line's early checks

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
LATER_PARTS = ("optimizer", "ema")  # on preemption written after the rest: 3x the adapter's size together
NAME = re.compile(r"^checkpoint-(\d{8})$")
# States every checkpoint holds; those written before trainer_state.json listed its states are checked for these.
CORE_STATES = ("adapter", "optimizer", "lr_scheduler", "ranks")
# What a damaged file raises while it is read and decoded.
READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError, SafetensorError)




def encode_state(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON tree of a state dict; tensors move to ``tensors`` under their tree path.

    Non-string dict keys (optimizer param ids), tuples (RNG states) and numpy arrays are
    tagged so ``decode_state`` restores them exactly.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode_state(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        return {"__items__": [[k, encode_state(v, tensors, f"{path}.{k}" if path else str(k))] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint")


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``encode_state``."""
    if isinstance(tree, list):
        return [decode_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return np.asarray(tree["__ndarray__"], dtype=tree["dtype"])
    if "__items__" in tree:
        return {k: decode_state(v, tensors) for k, v in tree["__items__"]}
    if "__tuple__" in tree:
        return tuple(decode_state(v, tensors) for v in tree["__tuple__"])
    return {k: decode_state(v, tensors) for k, v in tree.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_encoded(folder: Path, name: str, tree: Any, tensors: dict[str, torch.Tensor]) -> None:
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(tree))


def iter_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(tree path, tensor) of every tensor in a state dict, without copying any."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from iter_tensors(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from iter_tensors(value, f"{path}.{i}")


def nonfinite_tensor(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The path of the first floating-point tensor holding inf or NaN, or None."""
    for path, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return path
    return None


FINITE_HINT = "lower optim.lr, set trainer.max_grad_norm, check trainer.noise_offset"


def check_finite(parts: Mapping[str, Stateful], what: str) -> None:
    """CheckpointError naming the first non-finite tensor of ``parts``: such weights are never written."""
    for name, part in parts.items():
        bad = nonfinite_tensor(iter_tensors(part.state_dict()))
        if bad is not None:
            raise CheckpointError(f"refusing to write the {what}: {name} tensor {bad!r} holds inf/NaN ({FINITE_HINT})")


def read_state(folder: Path, name: str) -> Any:
    """State ``name`` of a checkpoint folder: ``name.json`` (+ ``name.safetensors`` when it holds tensors)."""
    tensor_file = folder / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}
    return decode_state(json.loads((folder / f"{name}.json").read_text()), tensors)


def verify_checkpoint(folder: str | Path, step: int | None = None) -> dict:
    """Read every state the checkpoint lists (JSON, safetensors, the tensors they name); returns its trainer_state.

    CheckpointError, one line: ``checkpoint-… is unusable (ranks: ranks.json: No such file or directory)``.
    Checkpoints are small, so a full read is cheap next to resuming from a broken one.
    """
    folder = Path(folder)
    what = STATE_FILE
    try:
        trainer_state = json.loads((folder / STATE_FILE).read_text())
        if not isinstance(trainer_state, dict) or type(trainer_state.get("step")) is not int:
            raise ValueError("no integer step")
        if step is not None and trainer_state["step"] != step:
            raise ValueError(f"step {trainer_state['step']}, expected {step}")
        present = [p.stem for p in folder.glob("*.json") if p.name != STATE_FILE]
        pending = trainer_state.get("pending", [])  # a preemption checkpoint cut short: resumable without them
        if not isinstance(pending, list) or not all(isinstance(p, str) and p in LATER_PARTS for p in pending):
            raise ValueError(f"pending is {pending!r}; only {', '.join(LATER_PARTS)} may be written late")
        for what in trainer_state.get("states") or sorted({*CORE_STATES, *present}):
            if what not in pending or (folder / f"{what}.json").is_file():
                read_state(folder, what)
    except READ_ERRORS as err:
        raise CheckpointError(f"{folder.name} is unusable ({what}: {_one_line(err)})") from None
    return trainer_state


def _one_line(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        # The file's own name, not its full path: the message names the folder already.
        return f"{Path(err.filename).name}: {err.strerror}" if err.filename else err.strerror
    return (str(err).splitlines() or [type(err).__name__])[0]


class CheckpointManager:
    """Writes, rotates and finds checkpoints under ``RUN/checkpoints``."""

    def __init__(self, root: str | Path, keep: int) -> None:
        self.root, self.keep = Path(root), keep
        self._own_tmp: set[str] = set()  # tmp- folders this manager made and has not renamed yet

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (``tmp-`` folders and unfinished ones are ignored)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if NAME.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def newest_usable(self) -> Path | None:
        """The newest checkpoint that reads completely (None when there is none); each newer one is logged with why.

        CheckpointError when there are checkpoints but none reads: starting over beside them could
        rotate good work away, so that is the user's call.
        """
        done, reason = self.complete(), ""
        for folder in reversed(done):
            try:
                verify_checkpoint(folder)
                return folder
            except CheckpointError as err:
                reason = str(err)
                log.warning("%s; trying an older checkpoint", reason)
        if done:
            raise CheckpointError(f"no usable checkpoint in {self.root} (newest: {reason}); move the broken ones "
                                  "away, resume=PATH from another copy, or resume=none to start over")
        return None

    def save(self, step: int, states: dict[str, Any], trainer_state: dict, config_yaml: str,
             later: tuple[str, ...] = ()) -> Path:
        """Write every state atomically as ``checkpoint-{step:08d}``; then keep only the last K.

        States named in ``later`` are written after the checkpoint is already in place (preemption).
        CheckpointError (nothing written) when a tensor holds inf/NaN.
        """
        encoded = {}
        for name, state in states.items():
            tensors: dict[str, torch.Tensor] = {}
            encoded[name] = (encode_state(state, tensors), tensors)
            bad = nonfinite_tensor(tensors.items())
            if bad is not None:
                raise CheckpointError(f"refusing to write checkpoint-{step:08d}: {name} tensor {bad!r} holds inf/NaN "
                                      f"({FINITE_HINT})")
        pending = [name for name in states if name in later]
        trainer_state = {**trainer_state, "states": list(states)}
        try:
            tmp = self._write_tmp(step, {n: e for n, e in encoded.items() if n not in pending}, config_yaml,
                                  {**trainer_state, "pending": pending} if pending else trainer_state)
        except OSError as err:  # a full disk, a read-only folder: the previous checkpoints stay as they were
            self.rotate()
            raise CheckpointError(f"cannot write checkpoint-{step:08d} in {self.root}: {err.strerror or err}; "
                                  "free space or choose another output_dir, then resume") from None
        final = self.root / f"checkpoint-{step:08d}"
        if final.exists():  # the same step saved twice (preemption right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        self._own_tmp.discard(tmp.name)
        _fsync(self.root)
        if pending:
            try:
                self.complete_pending(final, {name: encoded[name] for name in pending}, trainer_state)
            except (OSError, CheckpointError) as err:  # the first stage is in place and resumable without them
                log.warning("%s: could not add %s (%s); a resume starts them afresh", final.name, ", ".join(pending),
                            getattr(err, "strerror", None) or err)
        self.rotate()
        return final

    def _write_tmp(self, step: int, encoded: dict[str, tuple], config_yaml: str, trainer_state: dict) -> Path:
        """Every file of a checkpoint in a new ``tmp-`` folder, fsynced; the folder is renamed into place later."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"tmp-{step:08d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()  # new: no file inside can be a symlink planted beforehand
        self._own_tmp.add(tmp.name)
        for name, (tree, tensors) in encoded.items():
            _write_encoded(tmp, name, tree, tensors)
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        return tmp

    def complete_pending(self, final: Path, encoded: dict[str, tuple], trainer_state: dict) -> None:
        """Add the pending states to a checkpoint in place, each file renamed in whole, then clear ``pending``."""
        for name, (tree, tensors) in encoded.items():
            staging = final / f".{name}.tmp"
            staging.mkdir(exist_ok=True)
            _write_encoded(staging, name, tree, tensors)
            # Tensors before JSON: a state is read through its .json, so it appears only once complete.
            for file in sorted(staging.iterdir(), key=lambda f: f.suffix == ".json"):
                _fsync(file)
                os.replace(file, final / file.name)
            staging.rmdir()
        replace_text(final / STATE_FILE, json.dumps(trainer_state, indent=2))
        _fsync(final)

    def rotate(self) -> None:
        """Delete all but the newest ``keep`` complete checkpoints, and this manager's own failed ``tmp-`` writes.

        Another process's ``tmp-`` folder may be a write in progress; see ``remove_stale_tmp``.
        """
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for name in sorted(self._own_tmp):
            shutil.rmtree(self.root / name, ignore_errors=True)
        self._own_tmp.clear()

    def remove_stale_tmp(self) -> None:
        """Delete every ``tmp-`` folder: only call while holding the run's ``RunLock`` (then they are a dead run's)."""
        for stale in self.root.glob("tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def replace_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and an atomic rename: readers see the old or the new text."""
    from instantstyle.errors import OutputPathError
    from instantstyle.safe_paths import write_atomic

    try:
        write_atomic(path, text, "checkpoint state")
    except OutputPathError as err:
        raise CheckpointError(str(err)) from None


class Stateful(Protocol):
    """Anything a checkpoint holds: the adapter, optimizer, schedule, EMA, a rank's RNG and data position."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def save_parts(manager: "CheckpointManager", step: int, parts: Mapping[str, Stateful], ranks: list,
               trainer_state: dict, config_yaml: str, later: tuple[str, ...] = ()) -> Path:
    """Write every part's state (and every rank's, gathered) as one checkpoint; ``later`` parts last."""
    states = {name: part.state_dict() for name, part in parts.items()}
    return manager.save(step, {**states, "ranks": ranks}, trainer_state, config_yaml, later=later)


def load_parts(folder: str | Path, parts: Mapping[str, Stateful], rank: int, rank_part: Stateful) -> dict:
    """Load a checkpoint into the same named parts ``save_parts`` wrote; returns its trainer_state."""
    states, trainer_state = load_checkpoint(folder, [*parts, "ranks"])
    pending = set(trainer_state.get("pending", ()))
    for name, part in parts.items():
        if name in pending and name not in states:  # a preemption checkpoint cut short after its first stage
            log.warning("%s has no %s state (killed while writing it): it starts afresh",
                        Path(folder).name, name)
            continue
        if name not in states:
            raise CheckpointError(f"{Path(folder).name} has no {name} state (was it saved with other settings, "
                                  "e.g. trainer.ema off?); use resume=none or the same settings")
        part.load_state_dict(states[name])
    rank_part.load_state_dict(states["ranks"][rank])
    return trainer_state


def load_checkpoint(folder: str | Path, names: list[str]) -> tuple[dict[str, Any], dict]:
    """(states by name, trainer_state) of a complete checkpoint; states it does not hold are left out."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {STATE_FILE}); use resume=auto or another one")
    try:
        states = {name: read_state(folder, name) for name in names if (folder / f"{name}.json").is_file()}
        return states, json.loads((folder / STATE_FILE).read_text())
    except READ_ERRORS as err:  # verified before, so this is a disk changing under us
        raise CheckpointError(f"{folder.name} is unusable ({_one_line(err)})") from None


def check_compatible(saved: dict, current: dict, folder: Path) -> None:
    """One-line error when a checkpoint comes from another base model, block set or world size."""
    from instantstyle.adapter import AdapterSpec

    old, new = AdapterSpec.from_metadata(saved), AdapterSpec.from_metadata(current)

    pairs = [("base model", old.extra.get("base_model"), new.extra.get("base_model")),
             ("block set", list(old.blocks), list(new.blocks)), ("adapter type", old.adapter_type, new.adapter_type),
             ("number of image tokens", old.num_tokens, new.num_tokens),
             ("number of processes", saved.get("world_size"), current.get("world_size"))]
    for what, was, now in pairs:
        if str(was) != str(now):
            raise CheckpointError(f"{folder.name} was trained with {what} {was!r}, this run has {now!r}; "
                                  "use the same setting, resume=none or another output_dir")


def gather_json(obj: Any, accelerator) -> list:
    """Every rank's JSON-able ``obj``, on every rank.

    ``accelerate.utils.gather_object`` would do this by pickling; bytes of JSON in a tensor keep
    the promise that nothing in this project is ever unpickled.
    """
    if accelerator.num_processes == 1:
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=accelerator.device)
    sizes = accelerator.gather(torch.tensor([data.numel()], device=accelerator.device)).tolist()
    padded = accelerator.pad_across_processes(data, dim=0)
    rows = accelerator.gather(padded).view(accelerator.num_processes, -1)
    return [json.loads(bytes(row[:n].tolist()).decode()) for row, n in zip(rows.cpu(), sizes)]


class RankState:
    """One rank's part of a checkpoint: its RNG streams and its data position."""

    def __init__(self, generator: torch.Generator, loader: Stateful) -> None:
        self.generator, self.loader = generator, loader

    def state_dict(self) -> dict:
        return {"rng": capture_rng(self.generator), "data": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        restore_rng(state["rng"], self.generator)
        self.loader.load_state_dict(state["data"])


def capture_rng(generator: torch.Generator) -> dict:
    """This process's RNG states as JSON: torch (CPU, CUDA), numpy, python, and the noise generator."""
    import random

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "noise": generator.get_state().tolist(),
    }


def restore_rng(state: dict, generator: torch.Generator) -> None:
    """Inverse of ``capture_rng``."""
    import random

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(torch.tensor(state["noise"], dtype=torch.uint8))
