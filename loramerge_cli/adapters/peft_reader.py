"""Read a PEFT LoRA adapter (folder, .safetensors file or Hub snapshot) into an `Adapter`.

Everything loramerge cannot merge exactly is refused here, by name, before any work starts.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from loramerge_cli.adapters.model import Adapter, AdapterSource, LoraModule, saved_whole
from loramerge_cli.adapters.sources import check_names, default_name, resolve, sha256_file, split_name
from loramerge_cli.errors import LoramergeError, UsageError, brief, first_line, is_finite_number

# Config fields that change what a LoRA module computes; loramerge refuses them by name.
REFUSED_FIELDS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "target_parameters": "LoRA on parameters",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "aLoRA",
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "arrow_config": "Arrow routing",
    "megatron_config": "Megatron parallel LoRA",
}
# init_lora_weights values whose initialisation subtracts the initial B·A from the base weight (PEFT's LoraLayer)
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
LORA_KEY = re.compile(r"^(?P<path>.+?)\.lora_(?P<factor>A|B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
OTHER_LORA_KEY = re.compile(r"\.(lora_embedding_[AB]|lora_magnitude_vector|lora_[A-Z]\w*|trainable_tokens_\w+)\b")
PEFT_PREFIX = "base_model.model."


def load_adapter(argument: str, allow_pickle: bool = False, name: str | None = None) -> Adapter:
    """Resolve and read one adapter given as `[name=]source` (text, or a path)."""
    if not isinstance(argument, (str, os.PathLike)):
        raise UsageError(f"give the adapter's source (a path, name=path or a Hub id), not {argument!r}")
    named = split_name(os.fspath(argument))
    if name is not None:  # (as a name=source argument is)
        check_names([name])
    files = resolve(named.spec, allow_pickle=allow_pickle)
    adapter_name = name or named.name or default_name(named.spec)
    with _named_by_spec(files, named.spec):
        config = read_config(files.config_file) if files.config_file else {}
        check_supported(config, named.spec)
        tensors = read_tensors(files.weights_file)
    modules, heads, base_copies = parse_state_dict(tensors, config, named.spec)
    source = AdapterSource(
        spec=named.spec,
        kind=files.kind,
        weights_file=str(files.weights_file.absolute()),  # (absolute: the same files after the caller's chdir)
        config_file=str(files.config_file.absolute()) if files.config_file else None,
        sha256=sha256_file(files.weights_file),
        repo_id=files.repo_id,
        revision=files.revision,
    )
    return Adapter(adapter_name, source, config, modules, heads, base_copies)


@contextmanager
def _named_by_spec(files, spec: str):
    """A Hub adapter's file errors named as its other errors are, by the spec and the snapshot ("org/name@main:
    in its snapshot 1a2b…: adapter_model.safetensors: corrupt …"), not by a path deep in the cache."""
    try:
        yield
    except LoramergeError as error:
        folder = f"{Path(files.weights_file).parent}{os.sep}"
        if files.kind != "hub" or not str(error).startswith(folder):
            raise
        raise LoramergeError(f"{spec}: in its snapshot {Path(folder).name[:12]}: {str(error).removeprefix(folder)}") \
            from None


def load_adapters(arguments: list[str], allow_pickle: bool = False) -> list[Adapter]:
    """Load every source (text, or a path), in task order; names must be unique."""
    if isinstance(arguments, (str, os.PathLike)):  # one source, not a sequence of characters
        arguments = [arguments]
    if not isinstance(arguments, (list, tuple)) or not all(isinstance(a, (str, os.PathLike)) for a in arguments):
        raise UsageError(f"give the adapters' sources (paths, name=path or Hub ids) as a list, not {brief(arguments)}")
    adapters = [load_adapter(argument, allow_pickle) for argument in arguments]
    seen: dict[str, str] = {}
    for adapter in adapters:
        if adapter.name in seen:
            raise UsageError(
                f"two adapters are named {adapter.name!r} ({seen[adapter.name]}, {adapter.source.spec}); "
                "name them with name=source"
            )
        seen[adapter.name] = adapter.source.spec
    return adapters


CONFIG_MAX_BYTES = 16 << 20  # PEFT writes a few KB (a rank_pattern of every module: a few hundred)


def read_config(path: Path) -> dict:
    from loramerge_cli.atomic import read_small_file

    try:
        config = json.loads(read_small_file(path, CONFIG_MAX_BYTES).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # a number of over 4,300 digits, nesting too deep; TooLarge
        raise LoramergeError(f"{path}: not a readable JSON adapter config ({str(error) or 'nested too deep'})") \
            from None
    if not isinstance(config, dict):
        raise LoramergeError(f"{path}: adapter config is not a JSON object")
    return config


def check_supported(config: dict, spec: str) -> None:
    """Refuse every adapter kind whose update is not ΔW = s·B·A on a Linear or Conv1D weight."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoramergeError(f"{spec}: peft_type {peft_type} is not supported (only LORA)")
    for field_name, what in REFUSED_FIELDS.items():
        if config.get(field_name):
            raise LoramergeError(f"{spec}: {what} ({field_name}): not supported, as it cannot be merged exactly")
    if config.get("bias", "none") not in ("none", None):
        raise LoramergeError(f"{spec}: trained biases (bias={config['bias']!r}) are not supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise LoramergeError(f"{spec}: init_lora_weights={init!r} changes the base model (PEFT subtracts the initial "
                             "B·A from it), so B·A is not this adapter's update; save it converted to plain LoRA "
                             "(PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    check_field_types(config, spec)


PEFT_DEFAULT_R = PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig's r and lora_alpha defaults (a test keeps them in step)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _names(value) -> bool:
    return value is None or isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value))


# adapter_config.json fields loramerge reads: (check, what it must be). Absent is fine; present must fit.
FIELD_TYPES = {
    "r": (_positive_int, "a positive integer"),
    "lora_alpha": (is_finite_number, "a finite number"),
    "rank_pattern": (lambda v: v is None or (isinstance(v, dict) and all(map(_positive_int, v.values()))),
                     "an object of positive integers"),
    "alpha_pattern": (lambda v: v is None or (isinstance(v, dict) and all(map(is_finite_number, v.values()))),
                      "an object of finite numbers"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "target_modules": (_names, "a name or a list of names"),
    "modules_to_save": (lambda v: v is None or (isinstance(v, list) and all(isinstance(i, str) for i in v)),
                        "a list of names"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string"),
    "task_type": (lambda v: v is None or isinstance(v, str), "a string"),
    "revision": (lambda v: v is None or isinstance(v, str), "a string"),
    "auto_mapping": (lambda v: v is None or (isinstance(v, dict) and (  # (Unsloth adds "unsloth_fixed": true)
        v.get("base_model_class") is None or isinstance(v["base_model_class"], str))),
        "an object whose base_model_class is a name"),
}


def check_field_types(config: dict, spec: str) -> None:
    """Every config field loramerge reads has the type PEFT gives it, else one line naming the field."""
    for name, (fits, what) in FIELD_TYPES.items():
        if name in config and not fits(config[name]):
            shown = json.dumps(config[name])
            shown = shown if len(shown) <= 60 else f"{shown[:40]}… ({len(shown)} characters)"
            raise LoramergeError(f"{spec}: adapter_config.json: {name} must be {what} (got {shown})")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError

        from loramerge_cli.atomic import read_safetensors

        try:
            with open(path, "rb"):  # (a file that cannot be read is not called missing or corrupt)
                pass
        except OSError as error:
            raise LoramergeError(f"{path}: cannot read ({error.strerror or error})") from None
        try:
            return read_safetensors(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise LoramergeError(f"{path}: corrupt or truncated safetensors file ({first_line(error)})") from None
    try:  # pickle, only with --allow-pickle (checked by the resolver); torch's restricted unpickler
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a data error
        raise LoramergeError(f"{path}: cannot read pickle file ({first_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoramergeError(f"{path}: pickle file is not a flat state dict of tensors")
    return state


def parse_state_dict(
    tensors: dict[str, torch.Tensor], config: dict, spec: str
) -> tuple[dict[str, LoraModule], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split PEFT keys into LoRA modules (by module path), head tensors (modules_to_save) and copies of base
    weights, keyed by the base's parameter name (PEFT's save_embedding_layers saves the input and output
    embeddings: `lm_head.base_layer.weight` when LoRA wraps the module, `lm_head.original_module.weight` when
    modules_to_save does, else `lm_head.weight`; PEFT loads each over the base's weight). With a config, a
    tensor is a head only if a `modules_to_save` name (or the task type's head, `score`/`classifier`) holds its
    module: PEFT loads any other over the base's weight; without one (a bare file), every such tensor is."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, torch.Tensor] = {}
    base_copies: dict[str, torch.Tensor] = {}
    saved = modules_to_save(config) if config else None
    adapter_names: set[str] = set()
    for key, tensor in tensors.items():
        bare = key.removeprefix(PEFT_PREFIX)
        other = OTHER_LORA_KEY.search(bare)
        if other and not LORA_KEY.match(bare):
            kind = other.group(1)
            what = {
                "lora_embedding_A": "embedding LoRA",
                "lora_embedding_B": "embedding LoRA",
                "lora_magnitude_vector": "DoRA",
                "trainable_tokens_delta": "trainable tokens",
            }.get(kind, f"{kind} weights")
            raise LoramergeError(f"{spec}: {what} ({key}) is not supported")
        match = LORA_KEY.match(bare)
        if match is None:
            if bare.endswith(".base_layer.bias"):  # a LoRA-wrapped module's own bias: bias="lora_only" or "all"
                raise LoramergeError(f"{spec}: trained biases ({key}: bias='lora_only' or 'all') are not supported")
            copy = bare.endswith(".base_layer.weight") or ".original_module." in bare
            name = bare.replace(".base_layer.", ".").replace(".original_module.", ".") if copy else _head_key(bare)
            copy = copy or (saved is not None and not saved_whole(saved, name.rsplit(".", 1)[0]))
            if tensor.is_floating_point():
                _check_float_values(tensor, f"{spec}: {key}" if copy else f"{spec}: head {key}")
            kept = base_copies if copy else heads
            if name in kept and not torch.equal(kept[name], tensor):  # a head saved with and without its wrapper
                raise LoramergeError(f"{spec}: {name} is saved twice with different values ({key})")
            kept[name] = tensor
            continue
        if match["param"] == "bias":
            raise LoramergeError(f"{spec}: LoRA bias terms (lora_bias, {key}) are not supported")
        if match["adapter"]:
            adapter_names.add(match["adapter"])
        path = match["path"].removesuffix(".base_layer")  # (factors saved hanging off the wrapped module)
        if ".base_layer." in f"{path}.":  # LoRA inside a LoRA-wrapped module: PEFT's nn.MultiheadAttention
            raise LoramergeError(f"{spec}: {key}: LoRA inside a LoRA-wrapped module (PEFT's LoRA on "
                                 "nn.MultiheadAttention keeps its out_proj's factors so) is not supported")
        if path in factors and match["factor"] in factors[path]:
            raise LoramergeError(f"{spec}: module {path} appears twice (several adapters in one file?)")
        factors.setdefault(path, {})[match["factor"]] = tensor
    if len(adapter_names) > 1:
        raise LoramergeError(f"{spec}: the file holds several adapters ({', '.join(sorted(adapter_names))})")
    if not factors:
        raise LoramergeError(f"{spec}: no LoRA weights (lora_A / lora_B) in the file")
    lone_biases = sorted(key for kept in (heads, base_copies) for key in kept
                         if key.endswith(".bias") and key.removesuffix(".bias") + ".weight" not in kept)
    if lone_biases:  # a head is a whole module (weight and bias); biases alone are bias="all"'s
        raise LoramergeError(f"{spec}: {lone_biases[0]} is a bias without its module's weight: trained biases "
                             "(bias='all') are not supported")
    modules = {path: _make_module(path, pair, config, spec) for path, pair in sorted(factors.items())}
    _check_targeted(list(modules), config, spec)
    return modules, heads, base_copies


READ_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float8 & co.: no arithmetic on CPU


def _check_float_values(tensor: torch.Tensor, what: str) -> None:
    """A floating-point tensor of a dtype loramerge computes with, every value finite: one line naming it."""
    if tensor.dtype not in READ_DTYPES:
        raise LoramergeError(f"{what} is {str(tensor.dtype).removeprefix('torch.')}, which is not supported (float16, "
                             "bfloat16, float32 or float64: convert the file)")
    if not torch.isfinite(tensor).all():
        raise LoramergeError(f"{what} has NaN or Inf values")


def _check_targeted(paths: list[str], config: dict, spec: str) -> None:
    """Every module with LoRA weights is one PEFT wraps under the config (target_modules as names or a regex,
    exclude_modules, layers_to_transform: PEFT's own rule decides): PEFT leaves the others' weights unloaded,
    so merging them would not merge what the adapter does."""
    targets = config.get("target_modules") if config else None
    if not targets or "all-linear" in ([targets] if isinstance(targets, str) else targets):
        return
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    matched = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")

    def view(*names: str) -> SimpleNamespace:
        return SimpleNamespace(modules_to_save=config.get("modules_to_save"), target_parameters=None,
                               **{name: config.get(name) if name in names else None for name in matched})

    for path in paths:
        try:
            targeted = check_target_module_exists(view(*matched), path)
        except (re.error, TypeError, ValueError) as error:
            raise LoramergeError(f"{spec}: adapter config: {_unmatchable(view, path)} cannot be matched "
                                 f"({first_line(error)})") from None
        if not targeted and config.get("modules_to_save") and check_target_module_exists(
                SimpleNamespace(**{**vars(view(*matched)), "modules_to_save": None}), path):
            raise LoramergeError(f"{spec}: module {path} has LoRA weights, but the config's modules_to_save lists it: "
                                 "PEFT would save that module whole and not load them (fix adapter_config.json to "
                                 "the modules the file holds)")
        if not targeted:
            fields = [name for name in ("exclude_modules", "layers_to_transform", "layers_pattern")
                      if config.get(name) not in (None, [], "")]
            raise LoramergeError(f"{spec}: module {path} has LoRA weights, but the config's target_modules"
                                 f"{''.join(f', {name}' for name in fields)} leave it out: PEFT would not load "
                                 "them (fix adapter_config.json to the modules the file holds)")


def _unmatchable(view, path: str) -> str:
    """The config field (with its value) that PEFT's matcher fails on: target_modules alone, else the first
    field that fails beside it."""
    from peft.tuners.tuners_utils import check_target_module_exists

    for name, beside in (("target_modules", ()), ("exclude_modules", ("target_modules",)),
                         ("layers_to_transform", ("target_modules",)),
                         ("layers_pattern", ("target_modules", "layers_to_transform"))):  # (read with the layers)
        try:
            check_target_module_exists(view(*beside, name), path)
        except (re.error, TypeError, ValueError):
            return f"{name} {getattr(view(name), name)!r}"
    return f"target_modules {getattr(view('target_modules'), 'target_modules')!r}"


TASK_TYPE_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                   "QUESTION_ANS": ("qa_outputs",)}  # what PeftModelFor<task type> adds to modules_to_save


def modules_to_save(config: dict) -> list[str]:
    """The module names PEFT saves whole for this config: its `modules_to_save` and its task type's heads."""
    listed = [name for name in config.get("modules_to_save") or [] if isinstance(name, str) and name]
    return listed + list(TASK_TYPE_HEADS.get(config.get("task_type") or "", ()))


def _head_key(bare: str) -> str:
    """PEFT saves modules_to_save without their wrapper; older files keep `modules_to_save.NAME.`, and
    save_embedding_layers keeps `lm_head.modules_to_save.weight` (the wrapper, its adapter name removed)."""
    return re.sub(r"\.modules_to_save\.(?=[^.]+$)|\.modules_to_save\.[^.]+\.", ".", bare)


def _make_module(path: str, pair: dict[str, torch.Tensor], config: dict, spec: str) -> LoraModule:
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise LoramergeError(f"{spec}: module {path} has no {missing} weight")
    lora_A, lora_B = pair["A"], pair["B"]
    if lora_A.dim() < 2 or lora_B.dim() < 2:
        raise LoramergeError(f"{spec}: module {path}: a {min(lora_A.dim(), lora_B.dim())}-d LoRA factor is not a "
                             "matrix")
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise LoramergeError(f"{spec}: convolution LoRA ({path}, {lora_A.dim()}-d factors) is not supported")
    rank = lora_A.shape[0]
    if rank == 0:
        raise LoramergeError(f"{spec}: module {path}: rank 0 (lora_A has no rows): it changes nothing; drop it")
    if lora_B.shape[1] != rank:
        raise LoramergeError(
            f"{spec}: module {path}: lora_A has rank {rank} but lora_B has {lora_B.shape[1]} columns"
        )
    if not lora_A.is_floating_point() or not lora_B.is_floating_point():
        raise LoramergeError(f"{spec}: module {path} has non-floating-point LoRA weights")
    for factor, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
        _check_float_values(tensor, f"{spec}: module {path} {factor}")
    # a config that leaves r or lora_alpha out gets PEFT's defaults, as PeftModel.from_pretrained does
    config_rank = _pattern_value(config, "rank_pattern", path, spec,
                                 config.get("r", PEFT_DEFAULT_R if config else None))
    if config and config_rank is not None and int(config_rank) != rank:
        raise LoramergeError(
            f"{spec}: config and weights disagree: module {path} has rank {rank} in the weights "
            f"but r={config_rank} in the config"
        )
    alpha = float(_pattern_value(config, "alpha_pattern", path, spec,
                                 config.get("lora_alpha", PEFT_DEFAULT_ALPHA) if config else rank))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraModule(path, lora_A, lora_B, scale, alpha, bool(config.get("fan_in_fan_out", False)))


def _pattern_error(key: str) -> str | None:
    """Why `key` is no regular expression (None: it is one)."""
    try:
        re.compile(key)
    except re.error as error:
        return first_line(error)
    return None


def _pattern_value(config: dict, pattern_field: str, path: str, spec: str, default):
    """A per-module value from rank_pattern / alpha_pattern, matched by PEFT's own rules."""
    patterns = config.get(pattern_field) or {}
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    try:
        key = get_pattern_key(list(patterns), path)
    except re.error:
        key, error = next((key, error) for key, error in ((key, _pattern_error(key)) for key in patterns) if error)
        raise LoramergeError(f"{spec}: adapter config: {pattern_field}: the key {key!r} is not a valid pattern "
                             f"({error})") from None
    return patterns.get(key, default)
