"""Checkpoints of a run: atomic saves with an integrity record, and loading that refuses what it cannot trust.

A checkpoint is `<run>/checkpoints/step-<step>/`: accelerate's files (model*.safetensors, optimizer*.bin,
random_states_<rank>.pkl) plus `trainer_state.json` (step, counters, config, validation history and the size
and SHA-256 of every other file). It is written into `.tmp-step-<step>/` and renamed into place, so a kill
during a save leaves the previous checkpoints untouched; `trainer_state.json` is written last, so a folder
without it is never taken for a checkpoint. The objectives' networks also appear under their own names
(`discriminators.safetensors`, `posenet.safetensors`, ...: hard links to accelerate's `model_<i>` files), and
`checkpoints/latest` points at the newest complete checkpoint once it is in place. Networks an objective holds
outside accelerate (`held`: an EMA teacher) are written by safetensors as `<name>.safetensors`, hashed with
the rest, and read back by safetensors.

Loading checks, before any weight is read: the state file parses, every recorded file is there with its
size and hash (a truncated or corrupted file is refused), and the config keys that shape the weights and
optimiser states are those of the current run. Weights are read by safetensors and the other files by
torch.load(weights_only=True) inside accelerate, so no code stored in a checkpoint is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from uda.config import OBJECTIVE_SECTIONS
from uda.files import write_text_atomic

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
SELF_HASH = "state_sha256"  # trainer_state.json's hash of its own content
LATEST = "latest"  # symlink (or, where links cannot be made, a text file) naming the newest checkpoint
TMP_PREFIX = ".tmp-step-"  # a save in progress (or interrupted)
OLD_PREFIX = ".old-step-"  # a checkpoint of the same step being replaced
FORMAT = 1

# Model keys that only choose the initialisation (or how BatchNorm syncs): they may change on resume.
INIT_ONLY_MODEL_KEYS = frozenset({"pretrained", "weights_path", "depth_init", "sync_bn", "checkpointing"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the one-line message says which file and why."""


class ConfigMismatch(CheckpointError):
    """A checkpoint of another model config (different weight or optimiser shapes)."""


# ------------------------------------------------------------------------------------------------ listing


def step_of(folder: Path) -> int:
    """The step of a `step-<n>` folder."""
    return int(folder.name.split("-")[1])


def complete_checkpoints(out: str | Path) -> list[Path]:
    """Checkpoint folders of a run that finished saving (they hold trainer_state.json), newest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit() and (d / STATE_FILE).is_file():
            found.append(d)
    return sorted(found, key=step_of, reverse=True)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names, if it is complete; None otherwise (scan instead)."""
    pointer = Path(out) / CHECKPOINTS / LATEST
    try:
        name = os.readlink(pointer) if pointer.is_symlink() else pointer.read_text().strip()
    except OSError:
        return None
    ckpt = Path(out) / CHECKPOINTS / Path(name).name
    return ckpt if ckpt.name.startswith("step-") and (ckpt / STATE_FILE).is_file() else None


def write_latest(root: Path, ckpt: Path) -> None:
    """Point `root/latest` at ckpt atomically (a relative symlink, or a text file holding its name)."""
    tmp = root / f".{LATEST}.tmp{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        os.symlink(ckpt.name, tmp, target_is_directory=True)
    except OSError:  # no symlinks here (e.g. some Windows or network file systems)
        tmp.write_text(ckpt.name + "\n")
    pointer = root / LATEST
    if (
        pointer.is_dir() and not pointer.is_symlink()
    ):  # a copy that followed the link (shutil.copytree, cp -L)
        shutil.rmtree(pointer)
    os.replace(tmp, pointer)


def remove_leftovers(root: Path) -> None:
    """Delete folders of interrupted saves (`.tmp-step-*`, `.old-step-*`)."""
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith((TMP_PREFIX, OLD_PREFIX)):
                shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ run folders


def check_output_dir(out: Path) -> None:
    """Fail before training when the run folder cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"{out}: run folder is not writable ({exc.strerror}); pass --out to a writable folder"
        ) from None


def initialise_from(path: str | Path, model: nn.Module, networks: list[nn.Module] = ()) -> None:
    """Initialise from another run's weights (e.g. a depth-only self-supervised run, paper §4.4).

    Tensors with the same name and shape are copied; task decoders the source run did not have start from
    its depth decoder (both decoders of the paper's 3-ways model start from the depth model); each of
    `networks` (an objective's networks, e.g. the pose net) is taken from the checkpoint file whose tensors
    match it. Output heads are never copied across tasks (different channels). The checkpoint's files are first
    checked against the sizes and hashes recorded at save time: a damaged one is a CheckpointError naming it.
    """
    from safetensors.torch import load_file

    from uda.evaluate import find_checkpoint

    try:
        ckpt = find_checkpoint(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"train.init_from: {exc}") from None
    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{ckpt}: no model*.safetensors to initialise from; pass a run or checkpoint folder"
        )
    hint = "pass train.init_from (--init-from) an intact checkpoint folder, e.g. an older step-*/ of that run"
    try:  # the sizes and hashes recorded at save time: damaged weights are refused, never copied
        check_files(ckpt, read_state(ckpt))
        tensors = []
        for f in files:
            tensors.append(load_file(str(f)))
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {hint}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{f}: cannot read weights ({reason}); {hint}") from None
    own = model.state_dict()
    source = tensors[0]
    copied = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    for key in own:
        if key in copied or not key.startswith("decoders.") or ".heads." in key:
            continue
        depth_key = "decoders.depth." + key.split(".", 2)[2]
        if depth_key in source and source[depth_key].shape == own[key].shape:
            copied[key] = source[depth_key]
    # The point of init_from is the trained encoder: a source of another backbone (or family of models) fits
    # only a stem's worth of tensors or none, and the run would silently start from scratch.
    encoder = [k for k in own if k.startswith("encoder.")] or list(own)
    fitting = sum(k in copied for k in encoder)
    if fitting < len(encoder) / 2:
        raise CheckpointError(
            f"train.init_from: {ckpt}: only {fitting}/{len(encoder)} encoder tensors fit this model (same name and "
            "shape); start from a run of the same model.backbone and model family"
        )
    model.load_state_dict(copied, strict=False)
    message = f"initialised {len(copied)}/{len(own)} model tensors from {ckpt}"
    for net in networks:
        keys = set(net.state_dict())
        match = [t for t in tensors[1:] if set(t) == keys]
        if match:
            net.load_state_dict(match[0])
            message += f" (and the {type(net).__name__})"
    print(message, flush=True)


# ------------------------------------------------------------------------------------------------ saving


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of a state record's canonical JSON, without its own hash field."""
    body = {k: v for k, v in record.items() if k != SELF_HASH}
    body = json.loads(json.dumps(body))  # as read back: str keys, lists for tuples
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (so a power cut cannot leave a renamed but empty file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def _complete(
    tmp: Path,
    step: int,
    state: Mapping[str, Any],
    names: Mapping[str, str] | None,
    held: Mapping[str, nn.Module] | None,
) -> None:
    """Main process: add the held networks and the named links to accelerate's files in `tmp`, then the state file
    with every file's size and hash, all flushed to disk."""
    from safetensors.torch import save_model

    for name, net in (held or {}).items():
        save_model(net, str(tmp / f"{name}.safetensors"))
    for source, name in (names or {}).items():
        if (tmp / source).is_file():
            try:
                os.link(tmp / source, tmp / name)
            except OSError:  # no hard links on this file system
                shutil.copyfile(tmp / source, tmp / name)
    files = {}
    for f in sorted(tmp.iterdir()):
        if f.is_file() and f.name != STATE_FILE:
            _fsync(f)
            files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256(f)}
    _write_state(tmp, {"format": FORMAT, "step": step, **state, "files": files})
    _fsync(tmp)


def _write_state(folder: Path, record: dict[str, Any]) -> None:
    """Write trainer_state.json with its own hash (the other files are checked by the hashes it records),
    atomically and flushed to disk."""
    record[SELF_HASH] = _record_hash(record)
    write_text_atomic(folder / STATE_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    _fsync(folder / STATE_FILE)


def update_state(accelerator: Accelerator, ckpt: Path, **values: Any) -> None:
    """Replace entries of a saved checkpoint's trainer_state.json (e.g. the history after the final validation),
    main process only; the checkpoint's other files are not written again."""
    if accelerator.is_main_process:
        _write_state(ckpt, {**read_state(ckpt), **values})


def _not_written(
    acc: Accelerator, out: str | Path, final: Path, tmp: Path, exc: Exception
) -> CheckpointError:
    """The one-line error of a save that failed (typically a full disk), after removing its partial folder."""
    root = tmp.parent
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # the space it took is needed
    reason = str(exc).splitlines()[0][:160] if str(exc) else ""
    free = shutil.disk_usage(root).free / 2**20
    newest = complete_checkpoints(out)
    kept = f"the newest checkpoint {newest[0].name} is intact" if newest else "no earlier checkpoint exists"
    return CheckpointError(
        f"{final}: checkpoint not written ({type(exc).__name__}: {reason}; {free:.0f} MiB free on its disk); "
        f"{kept}; free disk space and continue the run with --resume"
    )


def save(
    accelerator: Accelerator,
    out: str | Path,
    step: int,
    state: Mapping[str, Any],
    keep: int = 2,
    names: Mapping[str, str] | None = None,
    held: Mapping[str, nn.Module] | None = None,
) -> Path:
    """Save the prepared models, optimisers and RNG states plus `state` as checkpoint `step`, atomically.

    Every process calls this. The main process gives accelerate's files the names in `names` too (e.g.
    model_1.safetensors -> discriminators.safetensors, as hard links), records each file's size and hash in
    trainer_state.json, renames the temporary folder into place, points `latest` at it and keeps the newest
    `keep` checkpoints. Each `held` network (not prepared by accelerate) is written as `<name>.safetensors`.
    A save that fails (e.g. a full disk) removes its temporary folder and raises CheckpointError.
    """
    acc = accelerator
    root = Path(out) / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f"{TMP_PREFIX}{step:07d}"
    if acc.is_main_process:
        remove_leftovers(root)
        root.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    # Every process learns whether the save worked everywhere (a collective instead of a barrier): a process that
    # failed alone (e.g. its disk filled up) would otherwise leave the others waiting for it forever.
    error: Exception | None = None
    try:
        acc.save_state(str(tmp))
    except Exception as exc:  # noqa: BLE001 - a full disk shows as OSError, RuntimeError (torch.save), ...
        error = exc
    if all_processes(acc, error is None) and acc.is_main_process:
        try:
            _complete(tmp, step, state, names, held)
        except Exception as exc:  # noqa: BLE001 - as above
            error = exc
    if not all_processes(acc, error is None):
        error = error or RuntimeError("the save failed on another process")
        raise _not_written(acc, out, final, tmp, error) from error  # the cause shows with --debug
    if acc.is_main_process:
        old = root / f"{OLD_PREFIX}{step:07d}"
        if final.exists():  # the same step saved again (e.g. resuming a finished run)
            os.replace(final, old)
        os.replace(tmp, final)
        write_latest(root, final)
        _fsync(root)
        shutil.rmtree(old, ignore_errors=True)
        for stale in complete_checkpoints(out)[keep:]:
            shutil.rmtree(stale, ignore_errors=True)
    acc.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------ checking


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def shape_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config keys that decide the weights' and optimiser states' shapes (and their meaning)."""
    model = config.get("model") or {}
    keys: dict[str, Any] = {
        f"model.{k}": v for k, v in _flatten(model).items() if k.split(".")[0] not in INIT_ONLY_MODEL_KEYS
    }
    keys["tasks"] = config.get("tasks")
    keys["data.label_set"] = (config.get("data") or {}).get("label_set")
    keys["optim.optimizer"] = (config.get("optim") or {}).get("optimizer")
    # Learnt task weights add parameters (and optimiser groups); a config from before weighting was fixed.
    loss = config.get("loss") or {}
    keys["loss.weighting"] = loss.get("weighting", "fixed")
    if keys["loss.weighting"] == "dwa":  # its saved running means are over periods of this many steps
        keys["loss.dwa_period"] = loss.get("dwa_period")
    # train.bn_mode=domain gives every BatchNorm layer target statistics when the run trains on another dataset
    # (uda.data.streams.RunData.target_statistics); separate and joint share one set and may change on resume.
    target, data = config.get("target"), config.get("data") or {}
    domain_bn = (config.get("train") or {}).get("bn_mode") == "domain"
    kept = domain_bn and target is not None and target.get("dataset") != data.get("dataset")
    keys["train.bn_mode"] = "domain" if kept else "not domain"
    # Each objective section: on/off and the keys that shape its networks (a section that needs a target
    # is off without one, as the Trainer skips it).
    for section, cls in OBJECTIVE_SECTIONS.items():
        values = config.get(section)
        if cls.NEEDS_TARGET and config.get("target") is None:
            values = None
        keys[section] = "on" if values else "off"
        for k in cls.SHAPE_KEYS:
            if values and k in values:
                keys[f"{section}.{k}"] = values[k]
    return keys


def config_mismatches(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key (checkpoint X, this run Y)' for every weight-shaping key that differs; keys missing on a side are
    not compared (a config written before the key existed)."""
    a, b = shape_config(saved), shape_config(current)
    return [
        f"{k} (checkpoint {json.dumps(a[k])}, this run {json.dumps(b[k])})"
        for k in sorted(set(a) & set(b))
        if a[k] != b[k]
    ]


# Settings whose change on resume makes the run differ from an uninterrupted one from then on (the data stream's
# order, the batches' composition); other changes (iterations, rates, schedules) act from the resumed step.
STREAM_KEYS = ("train.seed", "data.batch_size", "target.batch_size", "train.grad_accum", "processes")


def changed_settings(state: Mapping[str, Any], current: Mapping[str, Any], processes: int) -> str | None:
    """A line naming every setting that differs between a checkpoint's config (in its `state`) and this run's (the
    weight-shaping ones are refused by check_config), and the number of processes, or None; keys missing on a side
    and the run folder are not compared."""
    a, b = _flatten(state["config"]), _flatten(current)
    # The processes split each global batch: another count moves the data stream's position on resume.
    a["processes"], b["processes"] = state.get("processes", processes), processes
    keys = [k for k in sorted(set(a) & set(b)) if a[k] != b[k] and k != "out"]
    if not keys:
        return None
    line = "resumed with settings changed since the checkpoint: " + "; ".join(
        f"{k} (checkpoint {json.dumps(a[k])}, this run {json.dumps(b[k])})" for k in keys
    )
    stream = [k for k in keys if k in STREAM_KEYS]
    if stream:  # worth a warning: the rest of the run sees other batches than the saved run would have
        line = f"warning: {line}; with another {', '.join(stream)} the run is not an exact continuation"
    return line


def read_state(ckpt: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint, or CheckpointError."""
    path = ckpt / STATE_FILE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        int(state["step"])
        # A state file saved before it carried its own hash is read as it is (its files are still checked).
        if SELF_HASH in state and state[SELF_HASH] != _record_hash(state):
            raise ValueError("its content differs from the hash recorded at save time")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable or damaged ({reason})") from None
    return state


def check_files(ckpt: Path, state: Mapping[str, Any]) -> None:
    """Every file recorded at save time is present with its size and SHA-256."""
    files = state.get("files")
    if not isinstance(files, Mapping):
        tqdm.write(
            f"warning: {ckpt} has no file record (saved by an older version); its integrity is not checked"
        )
        return
    for name, record in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (partial checkpoint)")
        size = path.stat().st_size
        if size != record.get("bytes"):
            raise CheckpointError(
                f"{path}: truncated or overwritten ({size} bytes, saved {record.get('bytes')})"
            )
        if sha256(path) != record.get("sha256"):
            raise CheckpointError(f"{path}: corrupted (SHA-256 differs from the one recorded at save time)")


def check_config(ckpt: Path, state: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose weight-shaping config differs from the current run's, naming the keys."""
    saved = state.get("config")
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{ckpt / STATE_FILE}: no config recorded")
    diffs = config_mismatches(saved, current)
    if diffs:
        raise ConfigMismatch(
            f"{ckpt}: trained with another model config: {'; '.join(diffs)}; resume with the checkpoint's "
            "values of these keys, or start a new run in another --out"
        )


def check_rng_state(accelerator: Accelerator, ckpt: Path) -> None:
    """This process's RNG file must load (accelerate would silently skip a bad one)."""
    from accelerate.utils.other import load

    path = ckpt / f"random_states_{accelerator.process_index}.pkl"
    if not path.is_file():
        tqdm.write(
            f"warning: {path} is missing (checkpoint saved with fewer processes); "
            "this process's random stream restarts from the seed"
        )
        return
    try:
        seed = load(path, weights_only=True)["torch_manual_seed"]
        if not isinstance(seed, torch.Tensor) or seed.shape != torch.get_rng_state().shape:
            raise TypeError("not a torch RNG state")
    except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be trusted
        raise CheckpointError(f"{path}: unreadable RNG state ({type(exc).__name__})") from None


# ------------------------------------------------------------------------------------------------ loading


def all_processes(accelerator: Accelerator, ok: bool) -> bool:
    """Whether `ok` holds on every process (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() == accelerator.num_processes)


def load_held(net: nn.Module, path: Path) -> None:
    """Read a held network's tensors from `path` (safetensors, no code run) into `net`, on its device."""
    from safetensors.torch import load_model

    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint of a run without this objective's network)")
    device = next(iter(net.state_dict().values())).device
    load_model(net, str(path), strict=True, device=str(device))


def load(
    accelerator: Accelerator,
    out: str | Path,
    config: Mapping[str, Any],
    path: str | Path | None = None,
    held: Mapping[str, nn.Module] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """Load `path` or the newest usable checkpoint of run `out` into the prepared objects; (folder, state).

    A damaged checkpoint is reported and the next older one is tried; a checkpoint of another model config
    stops with ConfigMismatch. None when the run has no checkpoint (and no path was given); CheckpointError
    when there are checkpoints but none is usable. Every process calls this and all take the same one. Each
    `held` network is read from `<name>.safetensors` (strictly: every tensor, same shapes).
    """
    acc = accelerator
    if path is not None:
        candidates = [Path(path)]
    else:  # the `latest` pointer first, then every complete checkpoint, newest first
        latest = latest_checkpoint(out)
        scanned = complete_checkpoints(out)
        candidates = [latest, *(c for c in scanned if c != latest)] if latest is not None else scanned
    errors: list[str] = []
    loaded_badly = False  # a checkpoint whose files are intact but do not load into this run
    for ckpt in candidates:
        state, error = None, None
        try:
            state = read_state(ckpt)
            check_config(ckpt, state, config)
            check_files(ckpt, state)
            check_rng_state(acc, ckpt)
        except ConfigMismatch:
            raise
        except CheckpointError as exc:
            error = str(exc)
        if all_processes(acc, error is None):
            scaler = acc.scaler
            if scaler is not None and not (ckpt / "scaler.pt").is_file():
                # Saved without fp16 (fp32 or bf16: mixed precision may change on resume): accelerate would fail
                # on the missing file; this run's gradient scaler starts from its initial scale instead.
                if acc.is_main_process:
                    tqdm.write(
                        f"note: {ckpt} holds no gradient scaler (saved without fp16); it starts afresh"
                    )
                acc.scaler = None
            try:
                acc.load_state(str(ckpt))
                for name, net in (held or {}).items():
                    load_held(net, ckpt / f"{name}.safetensors")
            except Exception as exc:  # noqa: BLE001 - any failure while reading means an unusable file
                error = f"{ckpt}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                loaded_badly = True
            finally:
                acc.scaler = scaler
            if all_processes(acc, error is None):
                return ckpt, state
        error = error or f"{ckpt}: unusable on another process"
        errors.append(error)
        if acc.is_main_process:
            tqdm.write(f"warning: checkpoint refused: {error}; trying an older one")
    if path is not None or errors:
        fix = (
            "resume with the settings and number of processes the run was saved with, or start a new run"
            if loaded_badly
            else "delete the damaged folders or start a new run"
        )
        raise CheckpointError("no usable checkpoint (" + "; ".join(errors) + f"); {fix}")
    return None
