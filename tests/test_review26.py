"""Defects found by the reviews of 2026-12-07 (eighth session), each test failing on the code before its fix."""

from pathlib import Path


def test_lora_lego_says_what_its_default_cluster_count_stands_for(sources, tmp_path):
    """The summary and the card showed `clusters=0`, a count no merge uses (0 stands for the largest task rank)."""
    from factories import invoke_cli

    result = invoke_cli(["merge", "--adapters", *sources, "--merger", "lora_lego", "--out", tmp_path / "m"])
    assert result.exit_code == 0, result.stderr
    shown = "".join(result.stdout.replace("│", " ").split())  # (the table may wrap the row)
    assert "clusters=0(thelargesttaskrank)" in shown
    assert "clusters=0 (the largest task rank)" in (tmp_path / "m" / "README.md").read_text()
    given = invoke_cli(["merge", "--adapters", *sources, "--merger", "lora_lego", "--clusters", "2",
                        "--out", tmp_path / "g"])
    assert "clusters=2," in (tmp_path / "g" / "README.md").read_text()
    assert Path(tmp_path / "g" / "adapter_model.safetensors").is_file() and given.exit_code == 0
