"""Checkpoints as atomic units: everything a resumed run needs, published by one rename.

A run folder keeps its units under `checkpoints/`:

    checkpoints/step-000120/    the model and tokenizer (`save_pretrained`, safetensors), train_state.json and
                                train_state.safetensors (optimizer, schedule, scaler, data position, RNG, step,
                                config, metrics), and unit.json, the manifest, written last
    checkpoint -> checkpoints/step-000120    the newest unit, a plain HF folder for `from_pretrained`

A unit is written into a hidden `checkpoints/.tmp-*` folder, its files and the folder are fsync'ed, and it is
then renamed to `step-NNNNNN`: a folder under that name is always complete. The `checkpoint` link is
replaced atomically afterwards; the oldest units beyond `keep_last` are removed last. Resume takes the newest
unit whose manifest, files and state agree (`latest_unit`); a kill at any point leaves the previous unit or
the new one as that unit, never a mix. An old unit is renamed out of the `step-*` names before it is
deleted. `clean_stale` removes what an interrupted save left behind.

The manifest records each file's size and SHA-256; a unit verifies when every listed file is a regular file
(no symlink, no path leaving the unit) of that size and hash. Nothing is deleted because of its name alone:
a unit folder is removed only when its manifest (or, unpublished, its `.leanfit-partial` marker) proves it
leanfit's, and then only the files it lists.
"""

import json
import os
import secrets
import shutil
import signal
from pathlib import Path

from safetensors import SafetensorError

from .atomic import fsync_path
from .manifest import (
    MANIFEST,
    PARTIAL,
    SCHEMA,
    UnitError,
    inside,
    is_unit_folder,
    remove_listed,
    sha256,
    verify_unit,
)
from .state_files import StateFileError, load_state, save_state

__all__ = ["UNITS", "EXPORT", "MANIFEST", "SaveError", "UnitError", "unit_name", "begin_unit", "save_unit",
           "latest_unit", "list_units", "load_unit", "verify_unit", "is_unit_folder", "clean_stale",
           "remove_unit_outputs"]

UNITS = "checkpoints"
EXPORT = "checkpoint"
STATE = "train_state"
_TMP = ".tmp-"
KEPT = ".kept-"  # a damaged unit moved aside: what its manifest does not list (or no manifest at all) stays there


class SaveError(RuntimeError):
    """A unit could not be written (e.g. a full disk); the previous unit is untouched."""


def unit_name(step: int) -> str:
    return f"step-{step:06d}"


def _fault_hook():
    """A test hook: LEANFIT_TEST_FAULT="kill@N" (or "enospc@N") acts at the N-th filesystem step of this process."""
    spec = os.environ.get("LEANFIT_TEST_FAULT")
    if not spec:
        return None
    action, _, at = spec.partition("@")
    count = {"n": 0}

    def hook(what):
        count["n"] += 1
        if count["n"] == int(at):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(28, f"No space left on device (injected before {what})")

    return hook


_HOOK = _fault_hook()


def _step(what: str):
    if _HOOK is not None:
        _HOOK(what)


def _write_unit(tmp: Path, model, tokenizer, state: dict):
    _step("model")
    model.save_pretrained(tmp, safe_serialization=True)
    _step("tokenizer")
    tokenizer.save_pretrained(tmp)
    _step("train state")
    save_state(tmp, STATE, state)
    files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != PARTIAL}
    _step("manifest")
    (tmp / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "step": state["step"], "run_id": state["run_id"],
                                            "files": files}, indent=1), encoding="utf-8")
    (tmp / PARTIAL).unlink()
    _step("fsync")
    for p in tmp.rglob("*"):
        fsync_path(p)
    fsync_path(tmp)


def _link_export(out: Path, name: str):
    link = out / EXPORT
    tmp = out / f".{EXPORT}{_TMP}{secrets.token_hex(4)}"
    _step("export link")
    os.symlink(Path(UNITS) / name, tmp)
    _step("export rename")
    os.replace(tmp, link)


def _save_error(out: Path, final: Path, e: Exception) -> SaveError:
    previous = [u.name for u in list_units(out) if u != final]
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
    return SaveError(f"could not save checkpoint {final.name} in {final.parent} ({reason}); {kept}")


def begin_unit(out, state: dict) -> Path | None:
    """Creates the hidden folder the unit of `state["step"]` is written into, and returns it; None when a
    complete unit of that step is already published (a damaged one is moved aside to `.kept-*`, and the files
    its manifest lists are removed).

    `save_unit` calls it; a run over several ranks calls it on rank 0 and lets every rank write its shards
    into the folder before `save_unit(..., tmp=folder)` publishes it.
    Raises:
        SaveError when the folder cannot be created.
    """
    out = Path(out)
    units = out / UNITS
    final = units / unit_name(state["step"])
    if final.is_dir():
        try:
            _check_unit(final, state["run_id"], tensors=False)
            return None
        except UnitError:
            doomed = units / f"{KEPT}{final.name}-{secrets.token_hex(4)}"
            os.rename(final, doomed)
            remove_listed(doomed)
    tmp = units / f"{_TMP}{final.name}-{secrets.token_hex(4)}"
    try:
        _step("units folder")
        units.mkdir(parents=True, exist_ok=True)
        _step("unit folder")
        tmp.mkdir()
        (tmp / PARTIAL).write_text(state["run_id"], encoding="utf-8")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(out, final, e) from None
    return tmp


def save_unit(out, model, tokenizer, state: dict, keep_last: int = 2, tmp: Path | None = None) -> Path:
    """Publishes `state` (with "step" and "run_id") and the model as the unit `checkpoints/step-NNNNNN` of `out`.

    `tmp`: a folder from `begin_unit` that already holds other files of the unit (the ranks' optimizer shards);
    they are listed in the manifest with the rest.
    Returns:
        the unit's folder. A complete unit of the same step is kept as it is; a damaged one is replaced.
    Raises:
        SaveError when a file cannot be written; what was published before stays as it was.
    """
    out = Path(out)
    units = out / UNITS
    final = units / unit_name(state["step"])
    tmp = tmp or begin_unit(out, state)
    if tmp is None:
        return final
    try:
        _write_unit(tmp, model, tokenizer, state)
        _step("publish")
        os.rename(tmp, final)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(out, final, e) from None
    try:
        _step("fsync units")
        fsync_path(units)
        _link_export(out, final.name)
        for old in list_units(out)[:-keep_last] if keep_last > 0 else []:
            _step("prune")
            doomed = units / f"{_TMP}{old.name}-{secrets.token_hex(4)}"
            os.rename(old, doomed)
            remove_listed(doomed)
    except OSError as e:
        raise SaveError(f"checkpoint {final.name} was saved, but syncing {units}, updating {out / EXPORT} or "
                        f"removing older units failed ({e.strerror or e})") from None
    return final


def list_units(out) -> list[Path]:
    """The published unit folders of `out`, oldest first."""
    units = Path(out) / UNITS
    if not units.is_dir():
        return []
    found = [p for p in units.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _check_sharded(unit: Path, optimizer):
    """A sharded optimizer entry must name a folder inside the unit that holds its index."""
    if not isinstance(optimizer, dict) or "sharded" not in optimizer:
        return
    from .dcp_storage import DcpFormatError, read_index  # deferred: torch.distributed.checkpoint, sharded runs only

    if not isinstance(optimizer["sharded"], str):
        raise UnitError(f"{unit / STATE}.json: the sharded optimizer entry is not a folder name")
    try:
        read_index(inside(unit, optimizer["sharded"]))
    except DcpFormatError as e:
        raise UnitError(str(e)) from None


def _check_unit(unit: Path, run_id: str | None, tensors: bool = True, required=()) -> dict:
    """The unit's train state, after checking that its manifest, files and state agree."""
    manifest = verify_unit(unit)
    step = int(unit.name[5:])
    if manifest.get("step") != step:
        raise UnitError(f"{unit / MANIFEST} does not describe step {step}")
    try:
        state = load_state(unit, STATE, tensors=tensors)
    except StateFileError as e:
        raise UnitError(str(e)) from None
    if not isinstance(state, dict) or state.get("step") != step or state.get("run_id") != manifest.get("run_id"):
        raise UnitError(f"{unit}: its train state and manifest (step {step}) disagree")
    missing = [k for k in required if k not in state]
    if missing:
        raise UnitError(f"{unit / STATE}.json lacks {', '.join(missing)} (not a leanfit train state)")
    _check_sharded(unit, state.get("optimizer"))
    if run_id is not None and state["run_id"] != run_id:
        raise UnitError(f"{unit} belongs to another run (run id {state['run_id']}, the folder's run.json says "
                        f"{run_id})")
    return state


def latest_unit(out, run_id: str | None = None, tensors: bool = True, required=()) -> tuple[Path, dict, list[str]]:
    """The newest complete unit of `out`: (folder, train state, [why each newer unit was passed over]).

    `run_id`, when given, must be the unit's; `tensors=False` reads the state's JSON part only; `required`: keys
    the train state must have.
    Raises:
        UnitError when no unit is complete.
    """
    skipped = []
    for unit in reversed(list_units(out)):
        try:
            return unit, _check_unit(unit, run_id, tensors, required), skipped
        except UnitError as e:
            skipped.append(str(e))
    detail = f": {'; '.join(skipped)}" if skipped else ""
    raise UnitError(f"{Path(out)} has no complete checkpoint in {UNITS}/ to resume from{detail}")


def load_unit(unit, run_id: str | None = None) -> dict:
    """The train state of one unit (tensors included), checked as `latest_unit` checks it."""
    return _check_unit(Path(unit), run_id)


def _owned_tmp_unit(p: Path) -> bool:
    if p.is_symlink() or not p.is_dir():
        return False
    return not any(p.iterdir()) or (p / PARTIAL).is_file() or is_unit_folder(p)


def _owned_tmp_link(p: Path) -> bool:
    return p.is_symlink() and Path(os.readlink(p)).parts[:1] == (UNITS,)


def clean_stale(out, own_names=()) -> list[str]:
    """Removes what interrupted saves left in `out` and can be proven leanfit's: unpublished unit folders that
    carry the partial marker or a manifest (only the files listed), temporary `checkpoint` links into
    `checkpoints/`, and the temporary siblings `.NAME.*.tmp` / `.NAME.*.old` of the outputs named in
    `own_names`. Returns their names."""
    out = Path(out)
    stale = []
    units = out / UNITS
    if units.is_dir() and not units.is_symlink():
        stale += [p for p in units.iterdir() if p.name.startswith(_TMP) and _owned_tmp_unit(p)]
    if out.is_dir():
        stale += [p for p in out.iterdir() if p.name.startswith(f".{EXPORT}{_TMP}") and _owned_tmp_link(p)]
        stale += [p for p in out.iterdir() if any(p.name.startswith(f".{n}.") for n in own_names)
                  and p.name.endswith((".tmp", ".old")) and not p.is_symlink()]
    for p in stale:
        if p.parent == units:
            remove_listed(p)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return sorted(p.name for p in stale)


def remove_unit_outputs(out) -> list[str]:
    """Removes a previous run's units (the files their manifests list) and its `checkpoint` link from `out`
    (for --overwrite); returns what it removed. A foreign file or folder in `checkpoints/` stays."""
    out = Path(out)
    removed = []
    for unit in list_units(out):
        if is_unit_folder(unit):
            remove_listed(unit)
            removed.append(f"{UNITS}/{unit.name}")
    units = out / UNITS
    if units.is_dir() and not units.is_symlink() and not any(units.iterdir()):
        units.rmdir()
    if _owned_tmp_link(out / EXPORT):
        (out / EXPORT).unlink()
        removed.append(EXPORT)
    return removed
