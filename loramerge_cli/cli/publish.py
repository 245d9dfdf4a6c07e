"""--push-to-hub: upload an output folder to a Hub model repository with huggingface_hub."""

from __future__ import annotations

from pathlib import Path

from loramerge_cli.errors import LoramergeError


def check_repo_id(repo_id: str | None, dry_run: bool = False) -> None:
    """Fail before any work when --push-to-hub names no valid repository id, or cannot upload (offline mode)."""
    if repo_id is None:
        return
    from loramerge_cli.adapters.card import is_hub_id

    if "/" not in repo_id or not is_hub_id(repo_id):
        raise LoramergeError(f"--push-to-hub {repo_id}: expected a Hub repository id, owner/name")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and not dry_run:
        raise LoramergeError(f"--push-to-hub {repo_id}: the Hub is in offline mode (HF_HUB_OFFLINE), so nothing can "
                             "be uploaded; unset it, or add --dry-run to list the files")


def folder_files(folder: str | Path) -> list[str]:
    """The files upload_folder sends, relative to the folder, sorted."""
    folder = Path(folder)
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                dry_run: bool = False, message: str = "Upload merged adapter (loramerge)") -> dict:
    """Create the repository if needed and upload the folder in one commit; with `dry_run`, only list the files.

    Returns {repo_id, revision, private, files, dry_run, url}.
    """
    report = {"repo_id": repo_id, "revision": revision or "main", "private": private,
              "files": folder_files(folder), "dry_run": dry_run, "url": None}
    if dry_run:
        return report
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                   commit_message=message, repo_type="model")
    except (HfHubHTTPError, OSError) as error:  # OSError: offline, connection refused
        raise LoramergeError(f"--push-to-hub {repo_id}: upload failed, {folder} is written but not uploaded "
                             f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    report["url"] = getattr(commit, "commit_url", None) or str(commit)
    return report


def push_lines(report: dict) -> list[str]:
    """What a push did (or, dry, would do), for people."""
    where = f"{report['repo_id']} (revision {report['revision']}{', private' if report['private'] else ''})"
    head = f"would upload to {where}:" if report["dry_run"] else f"uploaded to {where}: {report['url']}"
    return [head, *(f"  {name}" for name in report["files"])]
