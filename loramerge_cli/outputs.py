"""Where loramerge may write, and how: the one guard every `--out` goes through, staging folders that
replace an output atomically, leftover staging from killed runs cleaned up, and the finiteness check every
written tensor passes (single files are replaced through loramerge_cli.atomic).

Users' files are sacred: an output never resolves to an input or to a folder holding one, never replaces
anything that is not a folder or file loramerge wrote, and `--force` swaps the old output for the new one in
one rename, so the old or the new adapter is under `--out` at every instant. No torch import at module level
(the CLI imports this before deciding to load anything).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from loramerge_cli import atomic
from loramerge_cli.adapters.card import RECIPE_NAME
from loramerge_cli.errors import LoramergeError

LOGGER = logging.getLogger(__name__)

MARKER = "loramerge.json"  # every adapter folder loramerge writes holds its provenance under this name
ADAPTERS_MARKER = ".loramerge-adapters.json"  # beside the adapter folders loramerge writes (hidden: `out/*` is them)
FOLDER_EXTRAS = ("mask.json", "loramerge.yaml", ADAPTERS_MARKER)  # beside the adapter folders of apply-mask's output
ADAPTER_FOLDER_FILES = ("adapter_config.json", "adapter_model.safetensors", MARKER, "mask.json", "loramerge.yaml",
                        "README.md")  # the files of a merge's folder (and heads/)
TASK_FOLDER_FILES = ("adapter_config.json", "adapter_model.safetensors", MARKER)  # apply-mask's folder of a task
SYSTEM_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")  # what a file browser leaves in any folder it shows
HEADS_FOLDER = "heads"  # each task's head beside a merge; in apply-mask's output, those of tasks pruned entirely
RENAME_EXCHANGE = 2  # linux/fs.h: renameat2 swaps the two paths atomically
AT_FDCWD = -100


def guard_output(out: str | Path, *, inputs: Iterable[str | Path] = (), force: bool = False,
                 kind: str = "folder", formats: tuple[str, ...] = ("loramerge.mask/",)) -> Path:
    """Fail before any work unless `out` may be written: not an input, not a folder holding one, not the
    working folder; an existing one only with `force`, and only when loramerge wrote it (a `kind` "folder"
    holding loramerge.json, or apply-mask's folder of such; a "file" of one of the writer's `formats`, not
    inside such a folder). Anything else (a regular file where a folder goes, a device, a symlink) is refused even with
    `force`. Its nearest existing ancestor must be a writable folder. Returns `out` with `~` expanded."""
    if not isinstance(out, (str, os.PathLike)):  # (a library caller's)
        from loramerge_cli.errors import UsageError

        raise UsageError(f"--out must be a path (got {out!r})")
    if str(out) == "-":  # the Unix spelling of standard output: a folder or file named '-' would surprise
        from loramerge_cli.errors import UsageError

        raise UsageError("--out -: the output is a file or folder, never standard output (--json prints the "
                         "summary there); give a path (./- names one called '-')")
    out = Path(out)
    target = Path(os.path.abspath(out.expanduser()))
    check_not_working_folder(out)
    check_not_an_input(out, inputs)
    if os.path.lexists(target):
        _check_replaceable(out, target, force, kind, formats)
    elif kind == "file" and (target.parent / MARKER).is_file() and target.name in (
            ADAPTER_FOLDER_FILES if _is_merge_folder(target.parent) else TASK_FOLDER_FILES):
        raise LoramergeError(f"--out {out} takes the name of a file of the merge output {out.parent}, whose "
                             "rebuild or --force would replace it: write it elsewhere (or under another name)")
    check_creatable(target.parent, f"--out {out}: cannot create it")
    clean_debris(target)
    return out.expanduser()  # what was checked is what is written (`~/x` given quoted: the home's x, not ./~/x)


def check_creatable(folder: str | Path, what: str) -> None:
    """`folder` is a writable folder, or can be made as one: its nearest existing ancestor is a writable folder
    (else `what`, then why, in one line)."""
    ancestor = Path(os.path.abspath(Path(folder).expanduser()))
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LoramergeError(f"{what}, {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LoramergeError(f"{what}, {ancestor} is not writable")
    try:  # permissions are not all (root, an immutable folder, some network mounts): a file is made and removed
        handle, probe = tempfile.mkstemp(dir=ancestor, prefix=".loramerge-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise LoramergeError(f"{what}, {ancestor} is not writable ({error.strerror or error})") from None


def check_not_working_folder(out: str | Path, flag: str = "--out") -> None:
    """`out` is not the working folder nor a folder holding it."""
    resolved = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or str(out) in ("", ".", ".."):
        raise LoramergeError(f"{flag} {out}: that is the working folder (or holds it); give a new folder's name")


def check_not_an_input(out: str | Path, inputs: Iterable[str | Path], flag: str = "--out", role: str = "input") -> None:
    """`out` is not an input (or another file it must not replace: `role` names them), does not hold one, and
    is not inside an input folder."""
    resolved = Path(out).expanduser().resolve()
    for item in inputs:
        path = Path(item).expanduser().resolve()
        if resolved == path or resolved in path.parents or (path.is_dir() and path in resolved.parents):
            what = "is" if resolved == path else "holds" if resolved in path.parents else "is inside"
            article = "an" if role[0] in "aeiou" else "a"
            raise LoramergeError(f"{flag} {out} {what} the {role} {item}; refusing to write over {article} {role}")


def input_files(adapter_args: Iterable[str] = (), *paths: str | Path | None) -> list[Path]:
    """The local files and folders a command reads (adapter sources as given, a Hub adapter's repository in the
    local cache, a mask, a task spec and its data), found without loading anything: what guard_output
    protects."""
    from loramerge_cli.adapters.sources import CONFIG_NAME, HUB_ID, cached_repo_folder, split_name

    found = []
    for argument in adapter_args:
        spec = split_name(argument).spec
        path = Path(spec).expanduser()
        if path.exists() and not spec.startswith("hf://"):
            found.append(path)
            if path.is_file() and (path.parent / CONFIG_NAME).is_file():
                found.append(path.parent / CONFIG_NAME)
        elif HUB_ID.match(spec.removeprefix("hf://")) and cached_repo_folder(spec.removeprefix("hf://")) is not None:
            found.append(cached_repo_folder(spec.removeprefix("hf://")))
    found += [Path(path) for path in paths if path is not None and Path(path).exists()]
    return found


def base_model_folders(names: Iterable) -> list[Path]:
    """The folders of the base models `names` name (adapters' configs, --base): a local model folder (with its
    config.json: a config naming `.` or a folder that holds no model protects nothing), or a Hub id's repository
    in the local cache. A command reads the base (its config for the model card, its weights to evaluate) and
    writes no output into or over it."""
    from loramerge_cli.adapters.card import is_repo_id
    from loramerge_cli.adapters.sources import base_reference, cached_repo_folder

    folders = []
    for name in dict.fromkeys(str(name) for name in names if name):
        local = Path(name).expanduser()
        if local.is_dir():
            if (local / "config.json").is_file():
                folders.append(local)
        elif is_repo_id(base_reference(name)[0]) and cached_repo_folder(base_reference(name)[0]) is not None:
            folders.append(cached_repo_folder(base_reference(name)[0]))
    return folders


def read_inputs(adapters, tasks: str | Path | None, base: str | None = None,
                allow_pickle: bool = False) -> tuple[list[Path], list[Path]]:
    """(files, folders) a command that evaluates reads, found without loading a model: adapter weights and
    configs (`adapters`: arguments or loaded Adapters) and the folders they were read from; the task spec,
    its data and head files and data folders; a local base model's files and folder (`base`, else the spec's
    base_model, else the adapters' one base). Files are what a resume hashes; both are what no output may
    go over or into."""
    from loramerge_cli.adapters.peft_reader import read_config
    from loramerge_cli.adapters.sources import hub_repo_folder, resolve, split_name
    from loramerge_cli.evaluation.specs import load_task_file

    files: list[Path] = []
    folders: list[Path] = []
    bases = set()
    for argument in adapters:
        if isinstance(argument, str):
            source = resolve(split_name(argument).spec, allow_pickle=allow_pickle)
        else:  # a loaded Adapter (the library API)
            source = argument.source
        files += [Path(source.weights_file)] + ([Path(source.config_file)] if source.config_file else [])
        if source.kind in ("dir", "hub"):
            folders.append(Path(source.weights_file).parent)
        repository = hub_repo_folder(source.weights_file) if source.kind == "hub" else None
        if repository is not None:  # the whole cached repository (its blobs and refs too)
            folders.append(repository)
        if source.config_file:
            try:
                bases.add(read_config(Path(source.config_file)).get("base_model_name_or_path"))
            except LoramergeError:
                pass  # the loader reports it
    task_file = load_task_file(tasks) if tasks is not None else None
    if task_file is not None:
        from loramerge_cli.evaluation.data import listed_files

        for item in task_file.inputs(adapters=False):  # a task's `adapter:` is one of the adapters
            files += files_under(item)
        files += listed_files(task_file)  # the images a listing names
        folders += [item for item in task_file.inputs() if item.is_dir()]
    base = base or (task_file.base_model if task_file else None) or (bases.pop() if len(bases) == 1 else None)
    if base and Path(base).expanduser().is_dir():
        files += files_under(Path(base).expanduser())
    elif base:
        files += _hub_base_files(str(base))
    folders += base_model_folders([base, *bases])  # a Hub base in the cache too: no output goes into it
    return list(dict.fromkeys(files)), list(dict.fromkeys(folders))


def _hub_base_files(base: str) -> list[Path]:
    """The files of a Hub base's snapshot at the commit its revision names now (pinned_base), in the local cache:
    a search's resume hashes them, so a branch that moved since the run started is refused, not scored on
    another model. None where the base is not cached (its loader reports that)."""
    from loramerge_cli.adapters.sources import base_reference, cached_repo_folder, pinned_base
    from loramerge_cli.errors import LoramergeError

    try:
        name, commit = base_reference(pinned_base(base))
    except LoramergeError:
        return []
    repository = cached_repo_folder(name) if commit else None
    snapshot = repository / "snapshots" / commit if repository is not None else None
    return files_under(snapshot) if snapshot is not None and snapshot.is_dir() else []


def files_under(path: Path) -> list[Path]:
    """The files a data or model path names: itself, or every file under a folder (hidden ones aside)."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path] if path.is_file() else []


def _check_replaceable(out: Path, target: Path, force: bool, kind: str, formats: tuple[str, ...]) -> None:
    if target.is_symlink():
        raise LoramergeError(f"--out {out} is a symbolic link; refusing to replace it (give its target or a new name)")
    if kind == "folder" and not target.is_dir():
        raise LoramergeError(f"--out {out} exists and is not a folder; refusing to replace it, even with --force")
    if kind == "file" and not target.is_file():
        raise LoramergeError(f"--out {out} exists and is not a regular file; refusing to replace it, even with --force")
    if not force:
        raise LoramergeError(f"--out {out} already exists; pass --force to replace it")
    if kind == "folder" and not written_by_loramerge(target):
        tasks = _task_folders(target)
        foreign = foreign_entries(target) + [
            entry for folder in tasks for entry in foreign_entries(folder, f"{target.name}/{folder.name}",
                                                                   TASK_FOLDER_FILES)]
        if tasks and not (target / MARKER).exists():  # apply-mask's output: its task folders, table, recipe, heads
            known = {folder.name for folder in tasks} | set(FOLDER_EXTRAS) | {HEADS_FOLDER} | set(SYSTEM_FILES)
            foreign += [f"{target.name}/{entry.name}" for entry in sorted(target.iterdir()) if entry.name not in known]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise LoramergeError(f"--out {out} holds what loramerge did not write there ({shown}): --force would "
                                 "delete it; refusing to replace it (move those out, or give another --out)")
        if tasks and not any((target / name).is_file() for name in ("mask.json", ADAPTERS_MARKER)):
            raise LoramergeError(f"--out {out} holds adapter folders but no mask.json, so it cannot be told from a "
                                 "folder of your adapters; refusing to replace it, even with --force")
        raise LoramergeError(f"--out {out} is a folder loramerge did not write (no {MARKER}); refusing to replace "
                             "it, even with --force")
    edited = edited_files(target) if kind == "folder" else []
    if edited:
        shown = ", ".join(edited[:5]) + (f" and {len(edited) - 5} more" if len(edited) > 5 else "")
        raise LoramergeError(f"--out {out}: {shown} changed or added since loramerge wrote the folder (its "
                             "loramerge.json records what it wrote, by sha256): --force would lose that; move it "
                             "out (or delete it), or give another --out")
    if kind == "file" and not _is_loramerge_output(target, formats):
        shown = " or ".join(f"{name}…" if name.endswith("/") else name for name in formats)
        raise LoramergeError(f"--out {out} is not a file of what this command writes (JSON whose \"format\" is "
                             f"{shown}); refusing to replace it, even with --force")
    if kind == "file" and any((target.parent / name).is_file() for name in (MARKER, RECIPE_NAME)):
        raise LoramergeError(f"--out {out} is part of the output loramerge wrote in {out.parent} (its recipe "
                             "reads it); refusing to replace it, even with --force")
    if kind == "file" and in_run_dir(target):
        raise LoramergeError(f"--out {out} is part of the search run directory {out.parent} (--resume reads it); "
                             "refusing to replace it, even with --force")


TEXT_SUFFIXES = (".md", ".json", ".yaml")  # hashed with CRLF read as LF: a checkout with autocrlf edits nothing
UNRECORDED = (MARKER, RECIPE_NAME)  # loramerge's own record, and the recipe: edited to be run, run to be rewritten


def output_digest(path: Path) -> str:
    """The sha256 loramerge.json records for a file it wrote (text files with their line ends as LF)."""
    stat = path.stat()  # (the change time too: an edit that restores the modification time, `touch -r`, is seen)
    return _digest(str(path), stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_size)


@functools.lru_cache(maxsize=256)
def _digest(path: str, mtime_ns: int, ctime_ns: int, inode: int, size: int) -> str:  # one read per file version
    from loramerge_cli.adapters.sources import sha256_file

    if Path(path).suffix in TEXT_SUFFIXES:
        return hashlib.sha256(Path(path).read_bytes().replace(b"\r\n", b"\n")).hexdigest()
    return sha256_file(Path(path))


def edited_files(folder: Path) -> list[str]:
    """Files of an output folder (and of its task folders) changed since loramerge wrote them there: a sha256
    other than the one the folder's loramerge.json records (a hand-edited model card), or a file it does not
    list (put there since); apply-mask's table and heads beside its task folders, as the task folders' records
    give them. Outputs written before loramerge.json recorded its files are not checked; the recipe
    (loramerge.yaml: edited to be rebuilt) and loramerge.json itself are not recorded."""
    edited = [] if (folder / MARKER).exists() else _edited_beside(folder)
    for marker in [folder / MARKER, *(child / MARKER for child in sorted(folder.iterdir()) if child.is_dir())]:
        try:
            recorded = json.loads(marker.read_bytes()).get("files")
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        if not isinstance(recorded, dict):
            continue
        base = marker.parent
        for path in sorted(base.rglob("*")):
            name = path.relative_to(base).as_posix()
            if not path.is_file() or path.is_symlink() or name in UNRECORDED or path.name in SYSTEM_FILES:
                continue
            if base != folder and name not in recorded:
                continue  # (apply-mask's task folders: their own files only)
            if recorded.get(name) != output_digest(path):
                edited.append(path.relative_to(folder.parent).as_posix())
    return edited


def _edited_beside(folder: Path) -> list[str]:
    """apply-mask's output: its files beside the task folders that differ from what the task folders' records
    say was written there (`beside_files`; outputs written before those records are not checked)."""
    task_folders = [child for child in sorted(folder.iterdir()) if child.is_dir() and (child / MARKER).is_file()]
    recorded = None
    for child in task_folders:
        try:
            recorded = json.loads((child / MARKER).read_bytes()).get("beside_files")
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        if isinstance(recorded, dict):
            break
    if not isinstance(recorded, dict):
        return []
    edited, tasks = [], set(task_folders)
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path in tasks or not tasks.isdisjoint(path.parents):
            continue
        if path.is_file() and not path.is_symlink() and name not in UNRECORDED and path.name not in SYSTEM_FILES \
                and recorded.get(name) != output_digest(path):
            edited.append(path.relative_to(folder.parent).as_posix())
    return edited


def holds(path: str | Path, text: str) -> bool:
    """Whether `path` is a file whose content is `text` (writing it again would change nothing)."""
    try:
        return Path(path).is_file() and Path(path).read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False


def write_result(out: str | Path, text: str, force: bool, formats: tuple[str, ...] = ("loramerge.mask/",)) -> None:
    """Write a command's result file when the work is done. What appeared at `out` while the command ran is
    never replaced: without `force` the file is created only where nothing is; with it, what is there now must
    still be what `guard_output` allows. Refused, the result is kept beside it and the error names that file."""
    from loramerge_cli import interrupts

    out = Path(out)
    target = Path(os.path.abspath(out.expanduser()))
    try:
        if force and os.path.lexists(target):
            _check_replaceable(out, target, force, "file", formats)
            atomic.write_text(target, text)
        else:
            atomic.write_new(target, text)
        written = f"{out} was written whole before it"  # a Ctrl-C while the result is printed (or plotted)
        previous = interrupts.resume_hint()  # (a finished search's: how to get its table and pictures again)
        interrupts.set_hint(f"{previous}; {written}" if previous else written, resumable=previous is not None)
        return
    except FileExistsError:
        reason = "appeared while the command ran"
    except LoramergeError as error:
        if not os.path.lexists(target) or "refusing to replace" not in str(error):
            raise
        reason = "changed while the command ran"
    kept = write_beside(target, text)
    if kept is None:
        raise LoramergeError(f"--out {out} {reason}; it was not replaced, and no free name beside it was found")
    raise LoramergeError(f"--out {out} {reason}; it was not replaced, the result is in {kept}")


def write_beside(target: Path, data: str | bytes) -> Path | None:
    """`data` written whole under a free name beside `target` (`NAME.loramerge-PID-N.SUFFIX`: a pid repeats
    across runs in containers), for a result whose place was taken while the command ran; None if none is free."""
    for attempt in range(1, 1000):
        kept = target.with_name(f"{target.stem}.loramerge-{os.getpid()}-{attempt}{target.suffix}")
        try:
            atomic.write_new(kept, data)
            return kept
        except FileExistsError:
            continue
    return None


def in_run_dir(path: Path) -> bool:
    """`path` is one of the files a search's run directory keeps (its state, trajectory, best table, score cache)
    in a folder holding a search's config.json."""
    from loramerge_cli.search.rundir import CONFIG_FORMAT, CONFIG_NAME, run_dir_files

    if path.name not in {file.name for file in run_dir_files(path.parent)}:
        return False
    try:
        return json.loads((path.parent / CONFIG_NAME).read_bytes()).get("format") == CONFIG_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def written_by_loramerge(folder: Path) -> bool:
    """An empty folder, an adapter folder loramerge wrote, or apply-mask's output: adapter folders loramerge
    wrote, one per task of the loramerge table `mask.json` beside them (a task the table prunes entirely has
    none, its head is in heads/<task>.safetensors), and loramerge.yaml, nothing else. A user's folder that holds
    merges, or merges and a mask, is not one."""
    if (folder / MARKER).is_file() or not any(folder.iterdir()):
        return not foreign_entries(folder)
    tasks = _written_tasks(folder)  # what tells apply-mask's output from a user's folder of adapters loramerge
    if tasks is None:  # wrote one by one
        return False
    entries = [entry for entry in folder.iterdir() if entry.name not in (*FOLDER_EXTRAS, *SYSTEM_FILES)
               or not entry.is_file()]
    heads = [entry for entry in entries if entry.name == HEADS_FOLDER and entry.name not in tasks]
    entries = [entry for entry in entries if entry not in heads]
    return (bool(entries) and {entry.name for entry in entries} <= tasks
            and all(entry.is_dir() and not entry.is_symlink() and (entry / MARKER).is_file()
                    and not _is_merge_folder(entry) and not foreign_entries(entry, files=TASK_FOLDER_FILES)
                    for entry in entries)
            and all(_pruned_heads(entry, tasks - {e.name for e in entries}) for entry in heads))


def _written_tasks(folder: Path) -> set[str] | None:
    """The tasks of the adapter folders written together into `folder` (apply-mask, api.write_adapters), as the
    table beside them (`mask.json`) or, without one, their marker (ADAPTERS_MARKER) names them; None if neither
    is loramerge's."""
    for name, layout in (("mask.json", "loramerge.mask/"), (ADAPTERS_MARKER, "loramerge.adapters/")):
        if not (folder / name).is_file():
            continue
        try:
            written = json.loads((folder / name).read_bytes())
            return set(written["tasks"]) if str(written.get("format", "")).startswith(layout) else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return None
    return None


def foreign_entries(folder: Path, shown_as: str | None = None,
                    files: tuple[str, ...] = ADAPTER_FOLDER_FILES) -> list[str]:
    """What an adapter folder loramerge wrote (holding loramerge.json: a merge, or one of apply-mask's, whose
    `files` are fewer) holds that loramerge does not write there, such as a search's run dir, a user's notes
    or a head of no input task: replacing the folder would delete it. [] for a folder without loramerge.json."""
    if not (folder / MARKER).is_file():
        return []
    tasks = _input_names(folder / MARKER)
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.name in (*files, *SYSTEM_FILES) and entry.is_file() and not entry.is_symlink():
            continue
        if entry.name == HEADS_FOLDER and _pruned_heads(entry, tasks):
            continue  # a merge's heads/: one file per input task
        foreign.append(f"{shown_as or folder.name}/{entry.name}" + ("/" if entry.is_dir() else ""))
    return foreign


def _is_merge_folder(folder: Path) -> bool:
    """A folder loramerge wrote a merge into (its loramerge.json records merge settings), not one of apply-mask's
    task folders."""
    try:
        return "parameters" in json.loads((folder / MARKER).read_bytes())
    except (OSError, ValueError, TypeError, RecursionError):
        return False


def _input_names(provenance: Path) -> set[str]:
    """The task names of the inputs a loramerge.json records (none if it cannot be read)."""
    try:
        return {str(record["name"]) for record in json.loads(provenance.read_bytes())["inputs"]}
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return set()


def _task_folders(folder: Path) -> list[Path]:
    """The adapter folders inside apply-mask's output (each with loramerge.json)."""
    return [entry for entry in sorted(folder.iterdir()) if entry.is_dir() and not entry.is_symlink()
            and (entry / MARKER).is_file()]


def _pruned_heads(folder: Path, pruned: set[str]) -> bool:
    """A heads/ folder of these tasks: a safetensors file per task (apply-mask's: each one it pruned entirely;
    a merge's: its inputs'), nothing else."""
    return folder.is_dir() and not folder.is_symlink() and all(
        entry.is_file() and not entry.is_symlink() and entry.suffix == ".safetensors" and entry.stem in pruned
        for entry in folder.iterdir())


def _is_loramerge_output(path: Path, formats: tuple[str, ...]) -> bool:
    """A JSON file whose "format" starts with one of `formats` (never a merge's provenance, a run's state)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith(formats)


# --- staging ----------------------------------------------------------------------------------------

def clean_debris(target: str | Path) -> None:
    """Remove staging folders of `target` left by killed runs (their process is gone); a crash between the
    two renames of the fallback replacement left the old output aside: put it back."""
    target = Path(os.path.abspath(target))
    parent = target.parent
    if not parent.is_dir():
        return
    entries = {entry: prefix for prefix in {atomic.sibling_prefix(target), f".{target.name}.loramerge-"}
               for entry in parent.glob(glob.escape(prefix) + "*")}  # (and the unshortened names of older versions)
    for entry, prefix in entries.items():
        pid_text, _, rest = entry.name[len(prefix):].partition(".")
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        if rest == "old" and not os.path.lexists(target):
            os.rename(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def clean_temporaries(folder: Path) -> None:
    """Remove the temporary files (atomic.temporary_sibling) and staging folders that killed processes left in
    `folder` (a search's run dir, once its lock is held); best effort: what cannot be removed stays."""
    for entry in folder.iterdir():
        head, marker, rest = entry.name.partition(".loramerge-")
        pid_text = rest.partition(".")[0]
        if not (head.startswith(".") and marker and entry.name.endswith(".tmp") and pid_text.isdigit()):
            continue
        if _alive(int(pid_text)):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        except OSError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # a number past any pid (a name not ours): no process
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def staged_folder(out_dir: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()):
    """Yield a hidden sibling folder to write into; on success it takes `out_dir`'s place in one rename (an
    existing output is swapped out atomically), on any failure or interrupt it is removed."""
    from loramerge_cli import interrupts

    out_dir = guard_output(out_dir, inputs=inputs, force=force, kind="folder")
    target = Path(os.path.abspath(out_dir))
    made = [parent for parent in target.parents if not os.path.lexists(parent)]  # removed again on failure
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{atomic.sibling_prefix(target)}{os.getpid()}.", suffix=".tmp",
                                        dir=target.parent))
    except OSError as error:
        raise LoramergeError(f"{out_dir}: cannot create the output folder ({error.strerror or error})") from None
    try:
        yield staging
        _apply_umask(staging)
        interrupts.check()  # a Ctrl-C some library swallowed: write nothing
        # from the moment the output is in place, a Ctrl-C (while the old one is removed, or the result printed)
        _replace(staging, target, force, lambda: interrupts.set_hint(f"{out_dir} was written whole before it"))
    except FolderKept as error:  # the user's folder is kept where the error says, maybe at `staging`
        if error.kept != staging:
            _remove_staging(staging, made)
        raise
    except OSError as error:
        _remove_staging(staging, made)
        raise LoramergeError(f"{out_dir}: cannot write the output ({error.strerror or error})") from None
    except LoramergeError as error:  # a file of the folder that could not be written: named in the output
        _remove_staging(staging, made)
        if str(staging) not in str(error):
            raise
        raise type(error)(str(error).replace(str(staging), str(out_dir))) from None
    except BaseException:
        _remove_staging(staging, made)
        raise


def _remove_staging(staging: Path, made: list[Path]) -> None:
    """A failed output leaves nothing: its staging folder, and the parent folders made for it while still empty
    (a second Ctrl-C waits until they are gone)."""
    from loramerge_cli import interrupts

    with interrupts.shielded():
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


def _apply_umask(folder: Path) -> None:
    """mkdtemp and safetensors create private (0700/0600) entries; give them the usual permissions."""
    from loramerge_cli.atomic import user_umask

    umask = user_umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace(staging: Path, target: Path, force: bool, committed: Callable[[], None]) -> None:
    """Put `staging` at `target`, then call `committed`. What is at `target` now is checked again (a folder can
    appear there while the output is written), and what a swap took out is checked once more: a user's folder is
    put back. The swap, `committed` and the old output's removal run shielded: a Ctrl-C among them says the
    output was written."""
    from loramerge_cli import interrupts

    if not os.path.lexists(target):
        staging.rename(target)
        committed()
        return
    _check_replaceable(target, target, force, "folder", ())
    with interrupts.shielded():  # from the swap until `committed` says so, a Ctrl-C must not be taken for
        if exchange(staging, target):  # "nothing was written" (the cleanup would remove the old output)
            if not _replaceable(staging):  # changed between the check and the swap: put it back
                _put_back(staging, target, swapped=True)
            old = staging  # now holds the old output
        else:
            old = target.with_name(f"{atomic.sibling_prefix(target)}{os.getpid()}.old")
            os.rename(target, old)  # a crash here: the next run puts `old` back (clean_debris)
            if not _replaceable(old):
                _put_back(old, target, swapped=False)
            os.rename(staging, target)
        committed()
        shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(old):  # a file that cannot be deleted (immutable, a read-only subfolder): said, not hidden
        LOGGER.warning("%s was replaced, but its old content could not be removed completely: what is left "
                       "is in %s", target, old)
    interrupts.check()


class FolderKept(LoramergeError):
    """A user's folder that a swap took out of --out could not be put back: it is kept at `kept`, never removed."""

    def __init__(self, message: str, kept: Path):
        super().__init__(message)
        self.kept = kept


def _put_back(held: Path, target: Path, swapped: bool) -> None:
    """Return a user's folder that a swap or a rename took out of `target` (now at `held`), and stop. Where that
    fails (`target` moved again), it goes beside `target` under a name no cleanup removes."""
    message = (f"--out {target} changed while the output was written and is now something loramerge did not "
               "write; left as it is, nothing written")
    try:
        if swapped and exchange(held, target):  # `held` holds the new output again: removed as staging
            raise LoramergeError(message)
        if not swapped and not os.path.lexists(target):
            os.rename(held, target)
            raise LoramergeError(message)
    except OSError:
        pass
    aside = target.with_name(f"{target.name}.yours-{os.getpid()}")
    try:
        os.rename(held, aside)
    except OSError:
        aside = held
    raise FolderKept(message.replace("left as it is", f"it is kept at {aside}"), aside)


def _replaceable(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and written_by_loramerge(folder)


def exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False  # file system without RENAME_EXCHANGE
    raise OSError(code, os.strerror(code), str(second))


# --- tensors ----------------------------------------------------------------------------------------

def check_finite(tensors: dict) -> None:
    """Every floating tensor finite, in the dtype it is written in, else one line naming the module: nothing
    non-finite is ever written."""
    import torch

    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            name = key.removeprefix("base_model.model.")
            module = name.rsplit(".", 2)[0] if ".lora_" in name else name.rsplit(".", 1)[0]
            overflow = f" (beyond the range of {str(tensor.dtype).removeprefix('torch.')}?)" \
                if tensor.dtype in (torch.float16, torch.bfloat16) else ""
            raise LoramergeError(f"module {module}: {name} has NaN or Inf values{overflow}; nothing written")
