"""Publishing an output folder to a Hub model repository with huggingface_hub (`merge --push-to-hub`,
`api.push_folder`): the checks before any work, what an upload would reveal of this machine, the upload."""

from __future__ import annotations

import re
from pathlib import Path

from loramerge_cli.errors import LoramergeError, UsageError, first_line


def is_revision(revision: str) -> bool:
    """A branch name git and the Hub take (`git check-ref-format --branch`): letters, digits, - _ . /; no '..',
    no empty part between slashes, no part starting with '.' or ending with '.lock', no '.' or '-' at the ends,
    not HEAD."""
    from loramerge_cli.adapters.sources import ref_parts_valid

    return (bool(re.fullmatch(r"[\w.\-/]+", revision)) and ".." not in revision and revision != "HEAD"
            and not revision.startswith("-") and not revision.endswith(".") and ref_parts_valid(revision))


def check_repo_id(repo_id: str | None, dry_run: bool = False, private: bool = False,
                  revision: str | None = None) -> None:
    """Fail before any work when --push-to-hub names no valid repository id, or cannot upload (offline mode), or
    how to push is given without it."""
    if repo_id is None:
        given = [flag for flag, value in (("--dry-run", dry_run), ("--private", private), ("--revision", revision))
                 if value not in (False, None)]
        if given:
            raise UsageError(f"{given[0]} does nothing without --push-to-hub")
        return
    from loramerge_cli.adapters.card import is_repo_id

    if "/" not in repo_id or not is_repo_id(repo_id):  # a folder of that name here does not matter
        hint = " (the branch goes in --revision)" if "@" in repo_id else ""
        raise LoramergeError(f"--push-to-hub {repo_id}: expected a Hub repository id, owner/name{hint}")
    if revision is not None and not is_revision(revision):
        raise LoramergeError(f"--revision {revision!r}: not a branch name the Hub takes (letters, digits, - _ . /, "
                             "no '..', no space)")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and not dry_run:
        raise LoramergeError(f"--push-to-hub {repo_id}: the Hub is in offline mode (HF_HUB_OFFLINE), so nothing can "
                             "be uploaded; unset it, or add --dry-run to list the files")
    from huggingface_hub import get_token

    if not dry_run and not get_token():  # the Hub takes no upload without one: said before the merge, not after
        raise LoramergeError(f"--push-to-hub {repo_id}: no Hugging Face token (log in with `hf auth login`, or set "
                             "HF_TOKEN), so nothing can be uploaded; or add --dry-run to list the files")


def folder_files(folder: str | Path) -> list[str]:
    """The files upload_folder sends, relative to the folder, sorted."""
    folder = Path(folder)
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


LOCAL_PATH = re.compile(r"""(?<![\w.:/-])(?:/(?:[\w.-]+/)*[\w.-]+|(?:\.\./)+[\w.-]+(?:/[\w.-]+)*)""")
TEXT_FILES = ("adapter_config.json", "loramerge.json", "loramerge.yaml", "mask.json", "README.md")


def local_paths_warnings(folder: str | Path) -> list[str]:
    """What an upload would publish of this machine: paths in the folder's text files that lie outside it (an
    absolute path, or ../…: they show the folder layout, often a user name), and a base model that is a local
    path (the pushed adapter then loads only here). Warnings: a recipe names its inputs by path on purpose."""
    from loramerge_cli.adapters.peft_reader import read_config

    folder = Path(folder)
    if not folder.is_dir():
        raise LoramergeError(f"{folder}: not a folder, so there is nothing to check")
    warnings = []
    try:
        base = read_config(folder / "adapter_config.json").get("base_model_name_or_path")
    except LoramergeError:
        base = None
    from loramerge_cli.adapters.card import is_repo_id

    if base and not is_repo_id(base):
        warnings.append(f"the base model is a local path ({base}): the pushed adapter_config.json names it, so "
                        "the adapter loads only where that path exists; --base OWNER/NAME names its Hub id")
    elif base and (Path(base).expanduser() / "config.json").is_file():  # `models/base`: read as a Hub id
        warnings.append(f"the base model {base} is a folder here, and spelt as a Hub id: the pushed adapter and its "
                        f"card name the Hub repository {base}; --base OWNER/NAME names the base's real Hub id")
    found: dict[str, list[str]] = {}
    for name in TEXT_FILES:
        try:
            text = (folder / name).read_text(encoding="utf-8")
        except OSError:
            continue
        for path in dict.fromkeys(LOCAL_PATH.findall(text)):
            if path.startswith("../") or (path.count("/") > 1 and not path.startswith("//")):
                found.setdefault(path, []).append(name)
    if found:
        first = next(iter(found))
        warnings.append(f"the files to upload name {len(found)} local path(s) outside the folder, e.g. {first} (in "
                        f"{', '.join(found[first])}): they show this machine's folder layout; --dry-run lists the "
                        "files")
    return warnings


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                dry_run: bool = False, message: str = "Upload merged adapter (loramerge)") -> dict:
    """Create the repository if needed and upload the folder in one commit; with `dry_run`, only list the files.

    Returns {repo_id, revision, private, files, dry_run, url} (`private`: after an upload, the repository's
    visibility as the Hub says it, None if it did not). The repository id and the folder are checked first,
    for a dry run too: a folder that does not exist or holds no file is an error, never an empty listing.
    """
    check_repo_id(repo_id, dry_run, private, revision)
    if not Path(folder).is_dir():
        raise LoramergeError(f"{folder}: not a folder, so there is nothing to upload")
    files = folder_files(folder)
    if not files:
        raise LoramergeError(f"{folder}: the folder holds no files, so there is nothing to upload")
    report = {"repo_id": repo_id, "revision": revision or "main", "private": private,
              "files": files, "dry_run": dry_run, "url": None}
    if dry_run:
        return report
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        if private:  # (create_repo ignores `private` for a repository that exists)
            _check_not_public(api, repo_id)
        # None, not False: a new repository takes its organisation's default visibility (private for some)
        api.create_repo(repo_id, private=True if private else None, repo_type="model", exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # an earlier push's heads and table that this merge lacks go: the card lists what the folder holds
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                   commit_message=message, repo_type="model", delete_patterns=STALE_OUTPUTS)
    except LoramergeError:
        raise
    except Exception as error:  # noqa: BLE001 - HTTP errors, offline, an unreachable endpoint (httpx's own errors)
        raise LoramergeError(f"--push-to-hub {repo_id}: upload failed, {folder} is written but not uploaded "
                             f"({first_line(error)})") from None
    report["url"] = getattr(commit, "commit_url", None) or str(commit)
    try:  # the visibility the repository has (an organisation's default, for one made now without --private)
        report["private"] = bool(api.repo_info(repo_id).private)
    except Exception:  # noqa: BLE001 - the upload is done: its report stands without this
        report["private"] = None
    return report


STALE_OUTPUTS = ["heads/*", "mask.json"]  # a merge's outputs that another merge of the same repository may lack


def _check_not_public(api, repo_id: str) -> None:
    """--private to a repository that exists and is public would upload there publicly: refused."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        public = getattr(api.repo_info(repo_id), "private", None) is False
    except RepositoryNotFoundError:
        return
    if public:
        raise LoramergeError(f"--push-to-hub {repo_id} --private: the repository exists and is public, so the "
                             "upload would be public; make it private on the Hub first, or drop --private")
