"""Resolve what the user wrote (`name=path`, a folder, a .safetensors file, a Hub id) to local files."""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loramerge_cli.errors import LoramergeError, UsageError, first_line, shell_words

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
REVISION = r"(?:@(?P<rev>[\w./-]+))?$"  # `@branch`, `@tag`, `@commit`
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)" + REVISION, re.ASCII)  # (as the Hub: ASCII names)
# a base: legacy one-word ids too (`gpt2`, `bert-base-uncased`), as transformers loads them
BASE_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)" + REVISION, re.ASCII)
NAME = re.compile(r"^[A-Za-z0-9_][\w.-]*$")


NAME_RULE = "an ASCII letter, digit or _ first, then letters, digits, _ . -"


def name_problems(names: list, what: str = "adapter") -> list[str]:
    """Why these task names cannot name tasks (empty if they can): each a string of NAME's form (it becomes a
    folder or file name in outputs, and goes into recipes and tables), no two alike."""
    problems, seen = [], set()
    for name in names:
        if not isinstance(name, str) or not NAME.match(name):
            problems.append(f"{name!r} cannot be a task name ({NAME_RULE})")
        elif name in seen:
            problems.append(f"two {what}s are named {name!r}; name them apart")
        seen.add(name if isinstance(name, str) else None)
    return problems


def check_names(names: list, what: str = "adapter") -> None:
    """One line for the first of `name_problems`: a usage error, since `name=source` on the command line mends it."""
    problems = name_problems(names, what)
    if problems:
        raise UsageError(problems[0])


@dataclass
class NamedSource:
    name: str | None  # given with name=source, else derived later
    spec: str


@dataclass
class LocalFiles:
    kind: str  # dir, file, hub
    weights_file: Path
    config_file: Path | None
    repo_id: str | None = None
    revision: str | None = None


def as_sources(arguments) -> list:
    """Sources as a list (one source given alone is not a sequence of characters), paths (`pathlib.Path`, bytes)
    as the text a command line gives; loaded Adapters (the library API) as they are."""
    arguments = [arguments] if isinstance(arguments, (str, bytes, os.PathLike)) else list(arguments)
    return [os.fsdecode(argument) if isinstance(argument, (bytes, os.PathLike)) else argument
            for argument in arguments]


def split_name(argument: str) -> NamedSource:
    """`rte=./adapters/rte` -> (rte, ./adapters/rte); a plain source has no name yet."""
    head, sep, tail = argument.partition("=")
    if sep and NAME.match(head) and tail and not os.path.exists(argument):
        return NamedSource(head, tail)
    return NamedSource(None, argument)


def default_name(spec: str) -> str:
    """The last path component, or a Hub id's repository name, without revision or suffix."""
    if os.path.exists(spec):  # a/sub/.. is the folder a, whatever the spelling
        spec = os.path.abspath(os.path.expanduser(spec))
    else:
        spec = spec.removeprefix("hf://").split("@", 1)[0]
    name = Path(spec.rstrip("/\\")).name
    name = name.removesuffix(".safetensors") if name.endswith(".safetensors") else name
    if not NAME.match(name):  # the name goes into recipes and tables, which a rebuild reads back
        raise UsageError(f"{spec}: {name!r} cannot be a task name ({NAME_RULE}): name it, "
                             f"NAME={shell_words([spec])}")
    return name


def source_names(adapters: list) -> list[str]:
    """The task name of each adapter: a loaded Adapter's, or what a source argument (`name=source` or a plain
    source) will be named, without reading it; two of one name are refused."""
    names, specs = [], {}
    for adapter in adapters:
        if isinstance(adapter, (str, os.PathLike)):
            named = split_name(os.fspath(adapter))
            name, spec = named.name or default_name(named.spec), named.spec
        else:
            name, spec = adapter.name, adapter.source.spec
        if name in specs:  # as load_adapters says it, before any is read
            raise UsageError(f"two adapters are named {name!r} ({specs[name]}, {spec}); name them with "
                                 "name=source")
        specs[name] = spec
        names.append(name)
    return names


def check_base_given(base: str | None) -> None:
    """--base names a local folder or a Hub id (`[hf://]org/name[@revision]`): a path that does not exist is
    neither (one line before any work, not a tokenizer's error once the adapters are read)."""
    if base is not None and not is_base_source(base):
        raise LoramergeError(f"--base {base}: no such folder, and not a Hugging Face Hub id")


def is_base_source(base: str) -> bool:
    """A local folder, or spelled as a Hub id (`[hf://]org/name[@revision]`)."""
    from loramerge_cli.adapters.card import is_hub_id, is_repo_id

    if not base.startswith("hf://") and Path(base).expanduser().is_dir():
        return True
    name, _ = base_reference(base)
    return is_hub_id(name) if name == base else is_repo_id(name)


def base_reference(base: str) -> tuple[str, str | None]:
    """(what `from_pretrained` loads, the revision it loads): a local folder as it is; a Hub id
    `[hf://]org/name[@revision]` as `org/name` and its revision (None: the default branch)."""
    if not base.startswith("hf://") and (Path(base).expanduser().is_dir() or os.path.exists(base)):
        return base, None
    match = BASE_ID.match(base.removeprefix("hf://"))
    if match is None:
        return base, None
    return match["repo"], match["rev"]


def pinned_base(base: str) -> str:
    """A Hub base as `org/name@commit`, the commit its revision names now (the local cache's refs under
    HF_HUB_OFFLINE, else the Hub's): every load of one run reads that commit, and its records rebuild it. A
    local folder as it is."""
    name, revision = base_reference(base)
    if name == base and not base.startswith("hf://") and Path(base).expanduser().is_dir():
        return base
    if Path(name).is_dir():  # transformers would load that folder and ignore the revision
        raise LoramergeError(f"{base}: a folder {name} is here, which the model loaders would read instead of the Hub "
                             f"repository {name}; run from another folder (or give ./{name} for the folder)")
    from huggingface_hub import constants, snapshot_download, try_to_load_from_cache

    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision) \
            and isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return f"{name}@{revision}"  # a commit never moves: its cached config is all there is to ask
    # (snapshot_download asks the Hub once, and gives up in one line; hf_hub_download retried an unreachable Hub
    # five times with a 60 s timeout of its own, printing each retry)
    with hub_errors(base, name, revision), hub_requests_time_out(constants.HF_HUB_ETAG_TIMEOUT):
        snapshot = Path(snapshot_download(name, revision=revision, allow_patterns=["config.json"]))
    if not (snapshot / "config.json").is_file():
        if constants.HF_HUB_OFFLINE:
            raise LoramergeError(f"{base}: config.json is not in the local cache at {snapshot.name[:12]} "
                                 "(HF_HUB_OFFLINE is set: the Hub is not asked for it)")
        if _listed_without_config(name, snapshot.name):
            raise LoramergeError(f"{base}: the repository has no config.json (not a model)")
        raise LoramergeError(f"{base}: config.json is not in the local cache at {snapshot.name[:12]}, and the Hub "
                             f"could not be reached to list the repository (offline, or no answer within "
                             f"{constants.HF_HUB_ETAG_TIMEOUT} s: HF_HUB_ETAG_TIMEOUT)")
    return f"{name}@{snapshot.name}"  # (snapshots/<commit>)


def _listed_without_config(repo_id: str, commit: str) -> bool:
    """Whether the cache holds the Hub's listing of `repo_id` at `commit` (snapshot_download saves it when the
    Hub answers; it returns a cached snapshot silently when the Hub cannot be reached) and it has no config.json."""
    try:
        from huggingface_hub import get_cached_repo_tree  # (recent huggingface_hub only)

        return "config.json" not in {entry.path for entry in get_cached_repo_tree(repo_id, revision=commit)}
    except Exception:  # noqa: BLE001 - no listing cached (the Hub did not answer), or an older huggingface_hub
        return False


def ref_parts_valid(revision: str) -> bool:
    """Each '/'-separated part of a git ref name as git takes it: not empty, no leading '.', no '.lock' ending."""
    return all(part and not part.startswith(".") and not part.endswith(".lock") for part in revision.split("/"))


@contextmanager
def hub_errors(spec: str, repo_id: str, revision: str | None):
    """huggingface_hub's errors while `spec` (`repo_id` at `revision`) is read, as one line naming it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if revision is not None and not ref_parts_valid(revision):
        raise LoramergeError(f"{spec}: {revision!r} is not a revision (a branch, a tag or a commit)")
    # a mistyped relative path reads as a Hub id (adaptors/rte): say that no such local path exists either
    local = "no such local file or folder, and as a Hub id: " \
        if "@" not in spec and "/" in spec and not spec.startswith("hf://") else ""  # (hf://: the Hub only)
    try:
        yield
    except LocalEntryNotFoundError:
        why = (" (HF_HUB_OFFLINE is set: the Hub is not asked)" if constants.HF_HUB_OFFLINE
               else f" and the Hub cannot be reached (offline, or no answer within {constants.HF_HUB_ETAG_TIMEOUT} s: "
               "HF_HUB_ETAG_TIMEOUT)")
        cached = _cached_revisions(repo_id)
        held = f"; the cache holds {repo_id} at {', '.join(cached)}" if cached else ""
        raise LoramergeError(f"{spec}: {local}not in the local Hugging Face cache{why}{held}") from None
    except RevisionNotFoundError:
        raise LoramergeError(f"{spec}: revision {revision!r} not found on the Hub") from None
    except GatedRepoError:
        raise LoramergeError(f"{spec}: gated repository; log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise LoramergeError(f"{spec}: {local}repository not found on the Hub (or private)") from None
    except LoramergeError:
        raise
    except Exception as error:  # noqa: BLE001 - network errors and friends (httpx's are no OSErrors)
        raise LoramergeError(f"{spec}: cannot download from the Hub: {first_line(error)}") from None


def sha256_file(path: Path) -> str:
    return read_into(hashlib.sha256(), path).hexdigest()


def read_into(digest, path: Path):
    """`digest` updated with the file's bytes, read 1 MB at a time; returns it."""
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def resolve(spec: str, allow_pickle: bool = False) -> LocalFiles:
    """Find the weights and config of one source, downloading Hub sources into the HF cache."""
    if spec.startswith("hf://"):
        return _resolve_hub(spec.removeprefix("hf://"), spec, allow_pickle)
    path = Path(spec).expanduser()
    if path.is_dir():
        try:
            return _resolve_dir(path, allow_pickle)
        except LoramergeError as error:  # a local folder wins over a Hub id of the same name: say how to ask
            if HUB_ID.match(spec) and not spec.startswith((".", "/")):  # for the Hub's
                raise LoramergeError(f"{error} (a local folder; for the Hub id, write hf://{spec})") from None
            raise
    if path.is_file():
        return _resolve_file(path, allow_pickle)
    if os.path.lexists(path):  # here, a FIFO or a dangling link named like a Hub id is still this path
        raise LoramergeError(f"{spec}: not a regular file or a folder (a {_kind_of(path)})")
    if HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return _resolve_hub(spec, spec, allow_pickle)
    head, sep, tail = spec.partition("=")
    if sep and head and tail and os.path.exists(os.path.expanduser(tail)):  # NAME=source, with NAME no task name
        raise UsageError(f"{spec}: {head!r} cannot be a task name ({NAME_RULE})")
    raise LoramergeError(f"{spec}: no such file or folder (a Hub id looks like org/name[@revision])")


def _cached_revisions(repo_id: str) -> list[str]:
    """The branch names and commits (whole: snapshot_download takes no shorter one) of a model repository in the
    local Hugging Face cache. Only that repository's folder is read (scan_cache_dir reads the whole cache, and
    drops a repository with one ref whose snapshot is gone); a ref to no snapshot is left out."""
    folder = cached_repo_folder(repo_id)
    if folder is None:
        return []
    names = set()
    try:
        commits = {path.name for path in (folder / "snapshots").iterdir() if path.is_dir()}
        names.update(commits)
        for ref in (folder / "refs").rglob("*"):
            if ref.is_file() and ref.read_text(encoding="utf-8", errors="replace").strip() in commits:
                names.add(ref.relative_to(folder / "refs").as_posix())
    except OSError:  # a folder that cannot be read: what was listed so far
        pass
    return sorted(names)


def _kind_of(path: Path) -> str:
    """What a path that is no regular file or folder is, for an error."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return "symbolic link in a loop" if error.errno == errno.ELOOP else "dangling symbolic link"
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


def _resolve_dir(path: Path, allow_pickle: bool, kind: str = "dir") -> LocalFiles:
    config = path / CONFIG_NAME
    weights = path / SAFETENSORS_NAME
    if not weights.is_file():
        pickle = path / PICKLE_NAME
        if pickle.is_file():
            if not allow_pickle:
                raise LoramergeError(
                    f"{path}: only {PICKLE_NAME} (a pickle file) found; pass --allow-pickle if you trust it"
                )
            weights = pickle
        elif os.path.lexists(weights):  # a folder, a FIFO, a device, a dangling link under that name
            raise LoramergeError(f"{weights}: not a regular file (a {_kind_of(weights)})")
        else:
            candidates = sorted(p.name for p in path.glob("*.safetensors"))
            hint = f" (found {', '.join(candidates)}: pass the file itself)" if candidates else ""
            raise LoramergeError(f"{path}: folder has no {SAFETENSORS_NAME}{hint}")
    if not config.is_file():
        if os.path.lexists(config):  # a folder, a dangling link under that name
            raise LoramergeError(f"{config}: not a regular file (a {_kind_of(config)})")
        raise LoramergeError(f"{path}: folder has no {CONFIG_NAME}")
    return LocalFiles(kind, weights, config)


def _resolve_file(path: Path, allow_pickle: bool) -> LocalFiles:
    if path.suffix in (".bin", ".pt", ".pth"):
        if not allow_pickle:
            raise LoramergeError(f"{path}: a pickle file; pass --allow-pickle if you trust it")
    elif path.suffix != ".safetensors":
        raise LoramergeError(f"{path}: not a .safetensors file or an adapter folder")
    config = path.parent / CONFIG_NAME
    return LocalFiles("file", path, config if config.is_file() else None)


@contextmanager
def hub_requests_time_out(seconds: float):
    """Within it, a request to the Hub's endpoint through huggingface_hub's shared HTTP client that would wait
    forever gives up after `seconds` (its metadata calls, `repo_info` first, and the Xet token requests of its
    download threads name no timeout: a proxy that accepts the connection and never answers held a Hub source
    until Ctrl-C); requests with a timeout of their own (downloads) keep it, and requests to other hosts are left
    alone. A client without request hooks (huggingface_hub before 1.0, on requests) is left as it is."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants, get_session

    hooks = getattr(get_session(), "event_hooks", None)
    if not isinstance(hooks, dict) or not isinstance(hooks.get("request"), list):
        yield
        return
    hub = urlsplit(constants.ENDPOINT).hostname

    def bound(request) -> None:
        if getattr(request.url, "host", None) == hub and not any(request.extensions.get("timeout", {}).values()):
            request.extensions = {**request.extensions,
                                  "timeout": dict.fromkeys(("connect", "read", "write", "pool"), seconds)}

    hooks["request"].append(bound)
    try:
        yield
    finally:
        hooks["request"].remove(bound)


def _resolve_hub(repo_spec: str, spec: str, allow_pickle: bool) -> LocalFiles:
    match = HUB_ID.match(repo_spec)
    if not match:
        raise LoramergeError(f"{spec}: not a Hub id (expected org/name[@revision])")
    repo_id, revision = match["repo"], match["rev"]
    from huggingface_hub import constants, snapshot_download

    patterns = [CONFIG_NAME, SAFETENSORS_NAME] + ([PICKLE_NAME] if allow_pickle else [])
    with hub_errors(spec, repo_id, revision):
        with hub_requests_time_out(constants.HF_HUB_ETAG_TIMEOUT):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    try:
        files = _resolve_dir(folder, allow_pickle, kind="hub")
    except LoramergeError as error:  # named by the spec, not by the cache's snapshot folder
        reason = str(error).removeprefix(f"{folder}: ").removeprefix(f"{folder}{os.sep}")
        from huggingface_hub import constants

        missing = f"has no {SAFETENSORS_NAME}" in reason
        nested = sorted(path.parent.relative_to(folder).as_posix() for path in folder.glob(f"*/**/{SAFETENSORS_NAME}"))
        if missing and nested:  # an adapter in a subfolder: no download would put it at the top
            reason = (f"{SAFETENSORS_NAME} is not at the repository's top level but in {nested[0]}/ (a Hub id names no "
                      f"subfolder: give the folder {folder / nested[0]}, or download it with hf download {repo_id} "
                      f"--include '{nested[0]}/*' --local-dir DIR)")
        elif missing and constants.HF_HUB_OFFLINE:  # the snapshot may be cached in part: nothing is fetched now
            reason = (f"{SAFETENSORS_NAME} is not in the local cache (HF_HUB_OFFLINE is set: the Hub is not asked "
                      "for it; download it, or unset HF_HUB_OFFLINE)")
        pickle = "" if allow_pickle or not missing or nested else \
            "; a repository with adapter_model.bin only needs --allow-pickle"
        raise LoramergeError(f"{spec}: in its snapshot {folder.name[:12]}: {reason}{pickle}") from None
    files.repo_id, files.revision = repo_id, folder.name
    return files


def hub_repo_folder(path) -> Path | None:
    """The cached repository folder (models--org--name: its blobs hold the bytes, its refs name them) that a
    file of a Hub snapshot lies in."""
    return next((folder for folder in Path(path).parents if folder.name.startswith("models--")), None)


def cached_repo_folder(repo_id: str) -> Path | None:
    """The local Hugging Face cache's folder of a model repository (`org/name[@revision]`), if it holds one."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id.partition("@")[0], repo_type="model")
    return folder if folder.is_dir() else None


def safetensors_header(path) -> dict | None:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), read without a tensor; None when the
    file is not one."""
    import json
    import struct

    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length)) if length < 1 << 28 else None
    except (OSError, ValueError, struct.error, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def header_module_paths(arguments, allow_pickle: bool = False) -> set[str] | None:
    """The LoRA module paths of adapter sources (arguments or loaded Adapters), read from their safetensors
    headers without loading a tensor; None when one is not a readable safetensors file (its loader reports it)."""
    paths: set[str] = set()
    for argument in arguments:
        if not isinstance(argument, str):
            paths |= set(argument.modules)
            continue
        header = safetensors_header(resolve(split_name(argument).spec, allow_pickle).weights_file)
        if header is None:
            return None
        paths |= {name.removeprefix("base_model.model.").split(".lora_A")[0] for name in header if ".lora_A" in name}
    return paths
