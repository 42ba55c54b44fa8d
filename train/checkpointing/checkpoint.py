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
"""

import json
import os
import secrets
import shutil
import signal
from pathlib import Path

from safetensors import SafetensorError

from .state_files import StateFileError, load_state, save_state

__all__ = ["UNITS", "EXPORT", "SaveError", "UnitError", "unit_name", "begin_unit", "save_unit", "latest_unit",
           "list_units", "load_unit", "clean_stale", "remove_unit_outputs"]

UNITS = "checkpoints"
EXPORT = "checkpoint"
STATE = "train_state"
MANIFEST = "unit.json"
SCHEMA = "leanfit.checkpoint/1"
_TMP = ".tmp-"


class SaveError(RuntimeError):
    """A unit could not be written (e.g. a full disk); the previous unit is untouched."""


class UnitError(ValueError):
    """No complete unit to resume from, or a unit whose parts disagree."""


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


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_unit(tmp: Path, model, tokenizer, state: dict):
    _step("model")
    model.save_pretrained(tmp, safe_serialization=True)
    _step("tokenizer")
    tokenizer.save_pretrained(tmp)
    _step("train state")
    save_state(tmp, STATE, state)
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    _step("manifest")
    (tmp / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "step": state["step"], "run_id": state["run_id"],
                                            "files": files}, indent=1), encoding="utf-8")
    _step("fsync")
    for p in tmp.rglob("*"):
        _fsync(p)
    _fsync(tmp)


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
    complete unit of that step is already published (a damaged one is removed first).

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
            doomed = units / f"{_TMP}{final.name}-damaged-{secrets.token_hex(4)}"
            os.rename(final, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    tmp = units / f"{_TMP}{final.name}-{secrets.token_hex(4)}"
    try:
        _step("units folder")
        units.mkdir(parents=True, exist_ok=True)
        _step("unit folder")
        tmp.mkdir()
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
        _step("fsync units")
        _fsync(units)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(out, final, e) from None
    try:
        _link_export(out, final.name)
        for old in list_units(out)[:-keep_last] if keep_last > 0 else []:
            _step("prune")
            doomed = units / f"{_TMP}{old.name}-{secrets.token_hex(4)}"
            os.rename(old, doomed)
            shutil.rmtree(doomed)
    except OSError as e:
        raise SaveError(f"checkpoint {final.name} was saved, but updating {out / EXPORT} or removing older units "
                        f"failed ({e.strerror or e})") from None
    return final


def list_units(out) -> list[Path]:
    """The published unit folders of `out`, oldest first."""
    units = Path(out) / UNITS
    if not units.is_dir():
        return []
    found = [p for p in units.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _check_unit(unit: Path, run_id: str | None, tensors: bool = True) -> dict:
    """The unit's train state, after checking that its manifest, files and state agree."""
    try:
        manifest = json.loads((unit / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnitError(f"{unit / MANIFEST} is missing or unreadable ({type(e).__name__})") from None
    step = int(unit.name[5:])
    if manifest.get("schema") != SCHEMA or manifest.get("step") != step:
        raise UnitError(f"{unit / MANIFEST} does not describe step {step}")
    for name, size in manifest.get("files", {}).items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise UnitError(f"{unit / MANIFEST} lists {name!r}, a file outside the unit")
        path = unit / name
        if not path.is_file() or path.stat().st_size != size:
            raise UnitError(f"{path} is missing or truncated (expected {size} bytes)")
    try:
        state = load_state(unit, STATE, tensors=tensors)
    except StateFileError as e:
        raise UnitError(str(e)) from None
    if state.get("step") != step or state.get("run_id") != manifest.get("run_id"):
        raise UnitError(f"{unit}: its train state (step {state.get('step')}) and manifest (step {step}) disagree")
    if run_id is not None and state["run_id"] != run_id:
        raise UnitError(f"{unit} belongs to another run (run id {state['run_id']}, the folder's run.json says "
                        f"{run_id})")
    return state


def latest_unit(out, run_id: str | None = None, tensors: bool = True) -> tuple[Path, dict, list[str]]:
    """The newest complete unit of `out`: (folder, train state, [why each newer unit was passed over]).

    `run_id`, when given, must be the unit's; `tensors=False` reads the state's JSON part only.
    Raises:
        UnitError when no unit is complete.
    """
    skipped = []
    for unit in reversed(list_units(out)):
        try:
            return unit, _check_unit(unit, run_id, tensors), skipped
        except UnitError as e:
            skipped.append(str(e))
    detail = f": {'; '.join(skipped)}" if skipped else ""
    raise UnitError(f"{Path(out)} has no complete checkpoint in {UNITS}/ to resume from{detail}")


def load_unit(unit, run_id: str | None = None) -> dict:
    """The train state of one unit (tensors included), checked as `latest_unit` checks it."""
    return _check_unit(Path(unit), run_id)


def clean_stale(out) -> list[str]:
    """Removes what interrupted saves left in `out` (unpublished units, temporary links and files); returns
    their names."""
    out = Path(out)
    stale = []
    units = out / UNITS
    if units.is_dir():
        stale += [p for p in units.iterdir() if p.name.startswith(_TMP)]
    if out.is_dir():
        stale += [p for p in out.iterdir() if p.name.startswith(f".{EXPORT}{_TMP}")
                  or (p.name.startswith(".") and p.name.endswith(".tmp"))]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return sorted(p.name for p in stale)


def remove_unit_outputs(out):
    """Removes a previous run's units and export link from `out` (for --overwrite)."""
    out = Path(out)
    if (out / UNITS).is_dir():
        shutil.rmtree(out / UNITS)
    if (out / EXPORT).is_symlink() or (out / EXPORT).is_file():
        (out / EXPORT).unlink()
    elif (out / EXPORT).is_dir():
        shutil.rmtree(out / EXPORT)
