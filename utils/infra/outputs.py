"""Output folders and files: what a script may write into, replace or delete.

A script only ever deletes or replaces what it wrote itself. It recognises its own folders by a marker file,
`.created_by.json`, that it writes into every folder it creates for its outputs (and into its temporary work
folders). So:

- an output folder may be new, empty, or one this same script wrote before (to resume, or to replace a finished
  merge); anything else (a folder of the user's, another script's output, an output of an earlier version of this
  project without the marker) is refused in one line, before any work;
- an output may never be, contain, or lie inside one of the run's inputs (the pre-trained model, the data, the
  models to merge): a merge written over its inputs would delete them;
- a finished folder appears in one rename, so a crash never leaves a half-written one that looks complete.
"""

import glob
import json
import os
import shutil
import tempfile

import torch
from safetensors import safe_open

from .errors import UserError

MARKER = ".created_by.json"


def created_by(path: str) -> str | None:
    """The script that marked `path` as its output, or None."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f).get("script")
    except (OSError, ValueError, AttributeError):
        return None


def mark(path: str, script: str) -> None:
    """Create `path` if needed and mark it as `script`'s output."""
    os.makedirs(path, exist_ok=True)
    if created_by(path) != script:
        write_json_atomically(os.path.join(path, MARKER), {"script": script})


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _overlaps(a: str, b: str) -> bool:
    """a and b are the same folder, or one lies inside the other."""
    a, b = _real(a), _real(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def check_output_dir(path: str, script: str, inputs=(), flag: str = "--output_dir"):
    """Refuse, in one line, an output folder the script may not write into: a file, a folder it cannot write, one
    that overlaps an input (`inputs`: (flag, local path) pairs; None and Hub ids are skipped), or an existing,
    non-empty folder that `script` did not create."""
    for name, source in inputs:
        if source and os.path.exists(source) and _overlaps(path, source):
            raise UserError(f"{flag} {path} overlaps {name} {source}: an output may not be, contain or lie inside an "
                            "input; choose another folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")
    if os.path.isdir(path) and os.listdir(path):
        owner = created_by(path)
        if owner is None:
            raise UserError(f"{flag} {path} already holds files that {script} did not write (no {MARKER}); choose a "
                            "new or empty folder (an output of an earlier version of this project can be reused by "
                            f"writing {{\"script\": \"{script}\"}} to {os.path.join(path, MARKER)})")
        if owner != script:
            raise UserError(f"{flag} {path} is an output of {owner}, not of {script}; choose another folder")
    check_writable(path, flag)


def check_writable(path: str, flag: str):
    """The nearest existing folder at or above `path` must be writable."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not a writable folder")


def check_output_file(path: str, flag: str, is_own=lambda path: False):
    """Refuse an output file in a missing or unwritable folder, or one that would overwrite a file this script did
    not write (`is_own(path)` says whether an existing file is one of its own)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the folder {folder} is not writable")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder, not a file")
    if os.path.exists(path) and not is_own(path):
        raise UserError(f"{flag} {path} exists and was not written by this script; choose another file name")


def work_dir(final: str, script: str) -> str:
    """A new, marked temporary folder beside `final`, for building it before `replace_dir` moves it into place.
    Left-overs of a killed run are hidden (a leading dot) and never look like a finished output; the next run
    removes the ones `script` marked."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    prefix = f".{os.path.basename(os.path.abspath(final))}.tmp-"
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        stale = os.path.join(parent, name)
        if name.startswith(prefix) and created_by(stale) == script:
            shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    mark(tmp, script)
    return tmp


def replace_dir(tmp: str, final: str, script: str) -> None:
    """Move the finished `tmp` to `final`. An existing `final` is replaced only if `script` created it (checked
    again here, not only at start-up), and it is moved aside first, so `final` always holds a complete folder."""
    if os.path.exists(final):
        if not os.path.isdir(final) or (os.listdir(final) and created_by(final) != script):
            raise UserError(f"{final} was not written by {script}; it is left as it is and the result stays in {tmp}")
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(final))}.old-",
                               dir=os.path.dirname(os.path.abspath(final)))
        os.replace(final, os.path.join(old, "folder"))
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def write_json_atomically(path: str, content, **dump_kw) -> None:
    """JSON written to a temporary file and renamed: readers see the old or the new file, never half of one.
    Non-finite numbers are refused (strict JSON)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(content, f, indent=2, allow_nan=False, **dump_kw)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def nonfinite_tensors(folder: str, files=None) -> list[str]:
    """`file:tensor` names of every floating-point tensor holding a NaN or an infinity, over the safetensors files
    in `folder` (or the given `files`), read one tensor at a time."""
    bad = []
    for path in files if files is not None else glob.glob(os.path.join(folder, "**", "*.safetensors"),
                                                           recursive=True):
        with safe_open(path, "pt") as f:
            names = list(f.keys())
        for name in names:
            with safe_open(path, "pt") as f:  # reopened per tensor: a mapping kept open would grow to the file
                tensor = f.get_tensor(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(f"{os.path.relpath(path, folder)}:{name}")
    return bad


def finite_tensors(items, what: str):
    """Pass (name, tensor) pairs through, refusing (one line) the first with a NaN or an infinity: a check for
    weights being streamed to disk, without reading them back."""
    for name, tensor in items:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{what}: tensor {name} holds NaN or infinite values; a diverged or broken model is not "
                            "saved or pushed")
        yield name, tensor


def check_finite_model(folder: str, what: str, files=None) -> None:
    """Refuse (one line) to save, card or push a model with a NaN or an infinity in its weights."""
    bad = nonfinite_tensors(folder, files)
    if bad:
        raise UserError(f"{what}: {len(bad)} tensor(s) hold NaN or infinite values (first: {bad[0]}); a diverged or "
                        "broken model is not saved or pushed")
