"""The model card (README.md) of a merged adapter, built with huggingface_hub's ModelCard, and the
helpers that keep every written text file free of absolute local paths.

The Hub reads the card's metadata: `base_model` must be a Hub id, so a local base is left out (with a
note). Inputs are named by task, file name and sha256, never by where they lay on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
from pathlib import Path

from loramerge_cli import __version__
from loramerge_cli.merging.registry import shown_parameter

RECIPE_NAME = "loramerge.yaml"  # the recipe every output folder holds (cli/recipe.py)
TAGS = ["loramerge", "merge", "lora"]
# PEFT task type -> the AutoPeftModel class that loads it (with its base model) in one call.
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}


def is_hub_id(name: str | None) -> bool:
    """A repository id the Hub accepts (org/name or a legacy name) that is not a local path."""
    return is_repo_id(name) and not os.path.exists(name)


def is_repo_id(name: str | None) -> bool:
    """Spelled as a repository id the Hub accepts (org/name or a legacy name), whatever the working folder holds:
    not an absolute, relative (./, ../) or home (~) path."""
    if not name or name.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_base_model(*candidates: str | None) -> str | None:
    """The first candidate spelled as a Hub id (the card's `base_model`), else None: the same card whatever the
    working folder holds (the base is read from the inputs' configs, as PEFT will read it)."""
    return next((name for name in candidates if is_repo_id(name)), None)


def relative_path(path: str | Path, folder: str | Path) -> str:
    """`path` (absolute, or relative to the working folder) relative to `folder`, so that `folder/result` names
    the same file: spelled through the paths as given, unless a symbolic link on the way makes a `..` climb
    out of the link's target (then between the resolved paths)."""
    target = os.path.join(os.getcwd(), os.path.expanduser(str(path)))  # not normalized: `link/..` is the
    start = os.path.join(os.getcwd(), os.path.expanduser(str(folder)))  # parent of the link's target
    lexical = os.path.relpath(target, start)
    if os.path.realpath(os.path.join(start, lexical)) == os.path.realpath(target):
        return lexical
    return os.path.relpath(os.path.realpath(target), os.path.realpath(start))


STREAM_PATH = re.compile(r"^/dev/(stdin|fd/\d+)$|^/proc/(self|\d+)/fd/\d+$")  # bash's <(...): /dev/fd/63


def is_stream_path(path: str) -> bool:
    """Whether `path` names a stream this process was handed (/dev/stdin, /dev/fd/63), the same name anywhere and
    no file to find again."""
    return bool(STREAM_PATH.match(str(path)))


def portable_path(path: str, folder: str | Path) -> str:
    """An absolute local path rewritten relative to `folder`; a stream's (/dev/stdin) and anything else unchanged."""
    if not os.path.isabs(path) or is_stream_path(path):
        return path
    return relative_path(path, folder)


def portable_base(path: str, folder: str | Path) -> str:
    """A base model path as outputs record it: relative to `folder` when it is a folder here; else as written (a
    Hub id, or the path on another machine: a Hub adapter's author's, a --base of the machine that loads it)."""
    return portable_path(path, folder) if os.path.isdir(os.path.expanduser(path)) else path


def portable_source(spec: str, folder: str | Path) -> str:
    """An adapter source as written in the outputs: a Hub id as is, a local path relative to `folder`."""
    return spec if is_hub_id(spec.removeprefix("hf://").split("@", 1)[0]) else portable_path(spec, folder)


def portable_command(command: str | None, folder: str | Path) -> str | None:
    """The command line with every absolute path (also in name=path and --flag=path) relative to `folder`; one
    that is not a shell line (a hand-written table's: an unclosed quote) as it is."""
    if command is None:
        return None
    try:
        split = shlex.split(command)
    except ValueError:
        return command
    tokens = []
    for token in split:
        # a path as a whole (`/a/d=/b` is one); else the first `=` after which an absolute path begins: `--flag=/p`,
        # `name=/p`, `--adapters=name=/p`
        cut = None if os.path.isabs(token) else next(
            (index for index, char in enumerate(token) if char == "=" and os.path.isabs(token[index + 1:])), None)
        if cut is not None:
            token = token[:cut + 1] + portable_path(token[cut + 1:], folder)
        tokens.append(portable_path(token, folder))
    return shlex.join(tokens)


def portable_inputs(inputs: list[dict], folder: str | Path) -> list[dict]:
    """Provenance input records with their sources made portable: a local file or folder (`kind`) relative to
    `folder`, also when given relative to the working folder (`org/name` is then a local path, not a Hub id);
    else as portable_source."""
    return [{**record, "source": relative_path(str(record["source"]), folder) if record.get("kind") in ("dir", "file")
             else portable_source(str(record["source"]), folder),
             **({"base_model": portable_base(record["base_model"], folder)} if record.get("base_model") else {})}
            for record in inputs]


def _source_label(adapter) -> str:
    source = adapter.source
    changed = ", with a weight table applied" if source.modified else ""
    if source.kind == "hub" and source.repo_id:
        return f"[{source.repo_id}](https://huggingface.co/{source.repo_id}){changed}"
    weights = Path(source.weights_file)
    return f"local {code_cell(weights.parent.name if source.kind == 'dir' else weights.name)}{changed}"


def code_cell(text: str) -> str:
    """`text` as inline code in a Markdown table cell, whatever it holds: `|` escaped (a table splits cells on it
    even in code), line breaks written as \\n, and a fence longer than any run of backticks inside."""
    import re

    text = text.replace("\r", "\\r").replace("\n", "\\n").replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _papers(settings) -> list[str]:
    from loramerge_cli.merging.registry import PRESETS

    papers = [settings.method.paper]
    preset = PRESETS.get(settings.merger)
    if preset is not None and preset.paper not in papers:
        papers.insert(0, preset.paper)
    return papers


def head_classes(adapters, head: str | None) -> int | None:
    """The classes of task `head`'s head (model.head_class_count), None when unknown."""
    from loramerge_cli.adapters.model import head_class_count

    adapter = next((a for a in adapters if a.name == head), None)
    return head_class_count(adapter.heads) if adapter is not None else None


TASK_TYPE_MODEL_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                           "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
                           "QUESTION_ANS": "AutoModelForQuestionAnswering"}
# the transformers Auto class of a base whose config names its architecture (a PEFT task type names none for
# image classifiers): the class PEFT's module names were saved from
ARCHITECTURE_MODEL_CLASSES = (("ForImageClassification", "AutoModelForImageClassification"),
                              ("ForSequenceClassification", "AutoModelForSequenceClassification"),
                              ("ForTokenClassification", "AutoModelForTokenClassification"),
                              ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
                              ("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
                              ("ForMaskedLM", "AutoModelForMaskedLM"))
# the Hub's pipeline_tag of a model loaded with each Auto class (the card's metadata; the Hub would otherwise
# infer it from the base's architecture: a classifier merged on a causal-LM base would read text-generation)
PIPELINE_TAGS = {"AutoModelForSequenceClassification": "text-classification",
                 "AutoModelForImageClassification": "image-classification", "AutoModelForCausalLM": "text-generation",
                 "AutoModelForTokenClassification": "token-classification",
                 "AutoModelForQuestionAnswering": "question-answering", "AutoModelForSeq2SeqLM": "text2text-generation",
                 "AutoModelForMaskedLM": "fill-mask"}
CLASSIFIER_MODEL_CLASSES = {"AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                            "AutoModelForImageClassification"}


def base_config(base: str | None) -> dict:
    """The base model's config.json (a local folder, or the Hub cache: nothing is downloaded); {} when it is
    not here or not readable."""
    if not base:
        return {}
    config = Path(base).expanduser() / "config.json"
    if not config.is_file():
        from huggingface_hub import try_to_load_from_cache

        from loramerge_cli.adapters.sources import base_reference

        name, revision = base_reference(base)
        try:
            cached = try_to_load_from_cache(name, "config.json", revision=revision)
        except ValueError:  # not a Hub id
            cached = None
        config = Path(cached) if isinstance(cached, str) else None
    try:
        loaded = json.loads(config.read_text(encoding="utf-8")) if config else {}
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def base_model_class(task_type: str | None, base: str | None, trained_on: str | None = None) -> str:
    """The Auto class to load the base with: the task type's, else that of the class the adapters were trained
    on (`trained_on`: their PEFT `auto_mapping.base_model_class`, ViTForImageClassification on a ViTModel
    base), else the one the base's config.json names (base_config), else AutoModel."""
    if task_type in TASK_TYPE_MODEL_CLASSES:
        return TASK_TYPE_MODEL_CLASSES[task_type]
    architectures = base_config(base).get("architectures") or []
    if not isinstance(architectures, list):
        architectures = []
    for name in [trained_on] + architectures[:1]:
        for suffix, model_class in ARCHITECTURE_MODEL_CLASSES:
            if name and str(name).endswith(suffix):
                return model_class
    return "AutoModel"


def trained_class(adapters) -> str | None:
    """The model class every input adapter was trained on, from PEFT's `auto_mapping` (None: they differ or
    do not say)."""
    names = set()
    for adapter in adapters:
        mapping = adapter.config.get("auto_mapping")
        names.add(mapping.get("base_model_class") if isinstance(mapping, dict) else None)
    return names.pop() if len(names) == 1 else None


def _use_snippet(task_type: str | None, base: str | None, repo: str, head: str | None, has_heads: bool,
                 num_labels: int | None = None, model_class: str | None = None, revision: str = "",
                 base_revision: str | None = None) -> list[str]:
    auto = AUTO_CLASSES.get(task_type or "")
    model_class = model_class or TASK_TYPE_MODEL_CLASSES.get(task_type or "", "AutoModel")
    # a classifier head wider or narrower than the base config's default (2) loads only with its class count
    labels = f", num_labels={num_labels}" if num_labels and model_class in CLASSIFIER_MODEL_CLASSES else ""
    branch = f", revision={revision!r}" if revision else ""  # the branch it was pushed to
    code = ["```python"]
    if auto and base:
        code += [f"from peft import {auto}", "", f"model = {auto}.from_pretrained({repo!r}{branch}{labels})"]
    else:
        base_line, comment = (repr(base) + (f", revision={base_revision!r}" if base_revision else ""), "") if base \
            else ('"path/to/the/base/model"', "  # the base the inputs were trained on")  # (AutoPeft reads the
        # config's revision itself)
        code += [f"from transformers import {model_class}", "from peft import PeftModel", "",
                 f"base = {model_class}.from_pretrained({base_line}{labels}){comment}",
                 f"model = PeftModel.from_pretrained(base, {repo!r}{branch})"]
    code.append("```")
    if head:
        code += ["", f"The task head in `modules_to_save` is task `{head}`'s; rebuild with `--head TASK` to serve "
                 "another."]
    if has_heads:
        code += ["", "The heads of all input tasks are in `heads/<task>.safetensors`."]
    return code


def _lambda_lines(tuning: dict | None, lam: float) -> list[str]:
    if not tuning:
        return [f"- λ (factor on the merged update): {lam:.6g}"]
    counts = sorted(set((tuning.get("examples") or {}).values()))
    scored = f"the {tuning.get('split', 'validation')} split" + (
        f" ({counts[0]} examples per task)" if len(counts) == 1 else
        f" ({counts[0]}–{counts[-1]} examples per task)" if counts else "")
    lines = [f"- λ tuned on {scored}: **{tuning['best']:.6g}** (largest mean normalized accuracy on the grid)", "",
             "| λ | mean normalized accuracy (%) |", "|---|---|"]
    for record in tuning["grid"]:
        mark = " ←" if record["lambda"] == tuning["best"] else ""
        mean = record.get("mean_normalized_accuracy")
        lines.append(f"| {record['lambda']:.6g}{mark} | {'—' if mean is None else f'{mean:.2f}'} |")
    best = next((r for r in tuning["grid"] if r["lambda"] == tuning["best"]), None)
    if best and best.get("normalized_accuracy"):
        lines += ["", "Scores at the chosen λ (normalized accuracy, 100 · merged / expert): " + ", ".join(
            f"{task} {value:.2f}" for task, value in best["normalized_accuracy"].items() if value is not None)]
    return lines


def _table_lines(table, lam: float) -> list[str]:
    if table is None:
        return []
    cells = len(table.tasks) * len(table.units)
    lines = ["## Weight table", "",
             f"{table.pruned_count()} of {cells} (task, {table.unit}) units pruned before merging."]
    if table.pruned_count():
        lines += ["", "| task | pruned | units |", "|---|---|---|"]
        for task, row in zip(table.tasks, table.weights):
            pruned = [unit for unit, value in zip(table.units, row) if value == 0]
            lines.append(f"| {task} | {len(pruned)} | {', '.join(map(code_cell, pruned)) or '—'} |")
    scaled = [value for row in table.weights for value in row if value not in (0, 1)]
    if scaled:
        lines += ["", f"{len(scaled)} units carry a coefficient other than 0 or 1: min {min(scaled):.4g}, "
                  f"median {statistics.median(scaled):.4g}, max {max(scaled):.4g}."]
    if table.scale is not None:
        used = "" if float(table.scale) == float(lam) else f"; this merge used λ = {lam:.6g} instead"
        lines += ["", f"The table sets λ = {table.scale:.6g}{used}."]
    lines += ["", "The table is `mask.json` in this folder.", ""]
    return lines


ROUNDING = 1e-9  # a dense result factorised with a smaller relative error than this is exact to rounding


def _truncation_lines(result) -> list[str]:
    """Exact, or how many dense results lost more than rounding when factorised (and how much)."""
    factorised = [m for m in result.modules.values() if m.rank > 0 and m.truncation_error is not None]
    lossy = [m.truncation_error for m in factorised if m.truncation_error > ROUNDING]
    if not lossy:
        return ["- Exact: the merged update is written as LoRA factors without truncation"
                + (f" ({len(factorised)} dense results factorised exactly, to rounding)." if factorised else ".")]
    capped = sum(1 for m in factorised if m.capped and m.truncation_error > ROUNDING)
    return [f"- Truncated: {len(lossy)} of {len(factorised)} dense modules written at reduced rank; relative "
            f"Frobenius error median {statistics.median(lossy):.3g}, largest {max(lossy):.3g}"
            + (f" ({capped} capped at the summed input rank)" if capped else "")]


def model_card(result, adapters, *, title: str, base: str | None, task_type: str | None = None,
               head: str | None = None, table=None, recipe: str | None = None, tuning: dict | None = None,
               repo_id: str | None = None, base_revision: str | None = None, command: str | None = None) -> str:
    """README.md of a merged adapter: Hub metadata, method, inputs, table, λ, truncation, command, recipe, use.
    `repo_id`: the repository it is pushed to (`owner/name@branch` for a branch), which its title and code name;
    `command`: the command line that wrote it, its paths relative to the folder (portable_command)."""
    from huggingface_hub import ModelCard, ModelCardData

    repo, _, revision = (repo_id or "").partition("@")
    title = repo.rsplit("/", 1)[-1] if repo else title
    settings = result.settings
    hub_base = hub_base_model(base)
    model_class = base_model_class(task_type, base, trained_class(adapters))
    data = ModelCardData(base_model=hub_base, library_name="peft", tags=list(TAGS),
                         pipeline_tag=PIPELINE_TAGS.get(model_class))
    named = {adapter.base_model for adapter in adapters if adapter.base_model}
    base_line = (f"Base model: [{hub_base}](https://huggingface.co/{hub_base})." if hub_base else
                 "Base model: a local model, not a Hub id, so the card's metadata names none; set `base_model` "
                 "before publishing if it is on the Hub." if base else
                 f"Base model: the inputs name {len(named)} different bases (merged with --allow-base-mismatch; "
                 "`loramerge.json` lists them), so the card names none." if len(named) > 1 else
                 "Base model: not recorded by the inputs.")
    shown = {k: v for k, v in settings.describe().items()
             if k not in ("merger", "method", "space", "lambda") and v is not None}
    lines = [
        f"# {title}", "",
        f"A LoRA adapter merged from {len(adapters)} adapters ({', '.join(a.name for a in adapters)}) with "
        f"loramerge {__version__}.", "",
        base_line, "",
        "## Method", "",
        f"- Merger `{settings.merger}`: method `{settings.method.name}` ({settings.method.summary}) in the "
        f"`{settings.space}` space",
        *(f"- Paper: {paper}" for paper in _papers(settings)),
        f"- Parameters: {', '.join(shown_parameter(k, v) for k, v in shown.items())}",
        *_lambda_lines(tuning, settings.lam),
        *_truncation_lines(result), "",
        "## Inputs", "",
        "| task | source | revision | sha256 |", "|---|---|---|---|",
        *(f"| {a.name} | {_source_label(a)} | {a.source.revision or '—'} | `{a.source.sha256}` |" for a in adapters),
        "",
        *_table_lines(table, settings.lam),
    ]
    if command:
        lines += ["## Command", "", "The command that wrote this folder (paths relative to it):", "",
                  "```bash", command, "```", ""]
    if recipe:
        rebuild = next((line.removeprefix("# Rebuild: ") for line in recipe.splitlines()
                        if line.startswith("# Rebuild: ")), f"loramerge merge --config {RECIPE_NAME} --out DIR")
        lines += ["## Recipe", "", f"`{RECIPE_NAME}` (adapter paths relative to this folder) rebuilds this adapter "
                  "bit for bit:", "", "```yaml", recipe.rstrip("\n"), "```", "",
                  "```bash", rebuild.replace("--out DIR", "--out rebuilt/"), "```", ""]
    lines += ["## Use", "", *_use_snippet(task_type, hub_base, repo or title, head,
                                          any(a.heads for a in adapters), head_classes(adapters, head),
                                          model_class, revision, base_revision),
              "", "Provenance (settings, input hashes, per-module truncation) is in `loramerge.json`.", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)
