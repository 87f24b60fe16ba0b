"""Hugging Face checkpoint I/O: a local folder or a hub id in, config.json + safetensors shards out.

Loading builds the model on the meta device and assigns the tensors read from disk straight onto the target device
(no throw-away random init). Every problem is an error that names it: a missing, unexpected or wrongly shaped
tensor names the key; a truncated or corrupt file names the file; pickle checkpoints (.bin/.pt) are refused, since
loading them can run arbitrary code. Saving writes a temporary folder and renames it into place, so a crash never
leaves half a checkpoint, and it never replaces an existing folder unless asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, FalconH1Config

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")  # owner/name
HUB_PATTERNS = ["config.json", "*.safetensors", SAFE_INDEX, "generation_config.json"]
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written as asked; the message names the key or file and the fix."""


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device computes in it natively (recent CUDA GPUs), else float32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------------- locating files
def resolve_checkpoint(path_or_id, *, token: str | None = None, revision: str | None = None) -> Path:
    """A local checkpoint folder, or the local snapshot of a hub repo (config + safetensors files only)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and the weights")
        return path
    return hub_snapshot(str(path_or_id), patterns=HUB_PATTERNS, token=token, revision=revision)


def hub_snapshot(name: str, *, patterns: list[str], token: str | None = None, revision: str | None = None,
                 error: type[Exception] = CheckpointError, what: str = "") -> Path:
    """The local snapshot of hub repo `name` (only the files matching `patterns`), downloading what is missing.
    `error` is raised, naming `what` is fetched, when the name is not a hub id or the hub cannot provide it."""
    if not HUB_ID.fullmatch(name):
        raise error(f"{name}: no such folder, and not a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, token=token, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise error(f"could not fetch {what}{name!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
                    "Check the name and your network; gated models need a token: --token / token=, the HF_TOKEN "
                    "environment variable, or `hf auth login` once; "
                    "a local folder path works too") from None


def load_config(model: str, *, token: str | None = None, revision: str | None = None) -> FalconH1Config:
    """The config of a preset name, a local checkpoint folder, or a hub id (fetching config.json alone)."""
    from .presets import PRESETS

    if model in PRESETS and not Path(model).exists():
        return FalconH1Config.from_preset(model)
    path = Path(model).expanduser()
    if path.exists():
        return FalconH1Config.from_pretrained(path)
    if not HUB_ID.fullmatch(model):
        raise CheckpointError(f"{model}: not a preset ({', '.join(PRESETS)}), a folder, or a hub id 'owner/name'")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return FalconH1Config.from_json_file(hf_hub_download(model, "config.json", revision=revision, token=token))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise CheckpointError(f"could not fetch config.json of {model!r} from the Hugging Face hub "
                              f"({type(err).__name__}: {err}); check the name and your network") from None


def weight_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it (from the index, or the single file)."""
    index = folder / SAFE_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        files = {name: folder / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise CheckpointError(f"{f}: shard named in {SAFE_INDEX} is missing (incomplete download?)")
        return files
    single = folder / SAFE_SINGLE
    if single.exists():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{folder}: only pickle weights ({', '.join(pickles)}); gyrfalcon loads safetensors "
                              "only, since unpickling can run arbitrary code. Convert once with transformers "
                              "(from_pretrained, then save_pretrained(safe_serialization=True)).")
    raise CheckpointError(f"{folder}: no {SAFE_SINGLE} or {SAFE_INDEX}; is this a Falcon-H1 checkpoint folder?")


def _open(file: Path, device: str = "cpu"):
    try:
        return safe_open(str(file), framework="pt", device=device)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors file, truncated or corrupt ({err}); "
                              "download it again") from None


# ---------------------------------------------------------------------------------------------- loading
def load_model(cls, path_or_id, *, dtype: torch.dtype | None = None, device=None, token: str | None = None,
               revision: str | None = None):
    """Build `cls` (FalconH1ForCausalLM) from a checkpoint; see the module docstring for the guarantees."""
    folder = resolve_checkpoint(path_or_id, token=token, revision=revision)
    config = FalconH1Config.from_pretrained(folder)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = cls(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()

    files = weight_files(folder)
    shapes = _read_shapes(files)
    _check_keys(folder, expected, shapes, optional)

    from .model import FP32_PARAMETERS
    state = {}
    for name, tensor in read_tensors(files, device, skip=lambda n: n not in expected or n in optional):
        fp32 = name.rsplit(".", 1)[-1] in FP32_PARAMETERS and dtype != torch.float64
        state[name] = tensor.to(torch.float32 if fp32 else dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # cannot happen after _check_keys; a guard against silently random weights
        raise CheckpointError(f"{folder}: tensors not loaded: {', '.join(still_meta[:5])}")
    return model.eval()


def read_tensors(files: dict[str, Path], device, skip=lambda name: False):
    """Yield (name, tensor) for every tensor of the checkpoint's files, one at a time, read straight onto `device`
    (a caller that drops each tensor after use holds one at a time); names for which skip(name) is true are not
    read. An unreadable tensor is a CheckpointError naming its file."""
    for file in sorted(set(files.values())):
        with _open(file, str(device)) as f:
            for name in f.keys():
                if skip(name):
                    continue
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError) as err:
                    raise CheckpointError(f"{file}: tensor {name!r} unreadable, file truncated or corrupt "
                                          f"({err}); download it again") from None
                yield name, tensor
                del tensor  # before the next read: the caller may already have dropped it


def _read_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in sorted(set(files.values())):
        with _open(file) as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    missing_from_files = [n for n, f in files.items() if n not in shapes]
    if missing_from_files:
        raise CheckpointError(f"{files[missing_from_files[0]]}: the index lists {missing_from_files[0]!r} "
                              f"(and {len(missing_from_files) - 1} more) but the file does not hold it")
    return shapes


def _check_keys(folder: Path, expected: dict, found: dict, optional: set) -> None:
    def listing(names):
        names = sorted(names)
        return ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")

    missing = set(expected) - set(found) - optional
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensor(s) missing from the checkpoint: {listing(missing)}. "
                              "Is config.json the one these weights were saved with?")
    unexpected = set(found) - set(expected)
    if unexpected:
        raise CheckpointError(f"{folder}: {len(unexpected)} unexpected tensor(s): {listing(unexpected)}. "
                              "The weights do not match a Falcon-H1 built from this config.json.")
    for name, shape in found.items():
        if name in expected and shape != expected[name]:
            raise CheckpointError(f"{folder}: tensor {name!r} has shape {list(shape)}, but config.json implies "
                                  f"{list(expected[name])}")


# ---------------------------------------------------------------------------------------------- saving
def parse_size(size: int | str) -> int:
    """Bytes from 1000000, '500MB', '5GB', '2GiB'."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"cannot read a size from {size!r}; use bytes or e.g. '500MB', '5GB'")
    unit = match.group(2)
    base = 1024 if "I" in unit else 1000
    power = " KMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(float(match.group(1)) * base ** power)


@contextlib.contextmanager
def atomic_folder(directory, *, overwrite: bool = False, error: type[Exception] = CheckpointError):
    """Yield a temporary folder beside `directory`; when the block succeeds, rename it to `directory` (replacing an
    existing one only if `overwrite`). A crash or Ctrl-C inside the block leaves `directory` as it was and no
    temporary folder behind. `error` is the exception raised for a refused destination."""
    directory = Path(directory).expanduser()
    if directory.exists() and not overwrite:
        raise error(f"{directory} already exists; choose a new folder, or pass overwrite=True "
                    "(CLI: --overwrite) to replace it")
    if directory.exists() and not directory.is_dir():
        raise error(f"{directory} is a file, not a folder; choose another path")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        yield tmp
        _move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model, directory, *, max_shard_size: int | str = "5GB", overwrite: bool = False) -> None:
    """Write `model` as a Hugging Face checkpoint folder (atomic; refuses an existing folder unless overwrite)."""
    limit = parse_size(max_shard_size)
    tied = model.config.tie_word_embeddings
    tensors = {name: t for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    with atomic_folder(directory, overwrite=overwrite) as tmp:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = SAFE_SINGLE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: v.detach().to("cpu").contiguous() for k, v in shard.items()}, str(tmp / fname),
                      metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": weight_map}, indent=2) + "\n")
        _write_config(model, tmp / "config.json")


def _write_config(model, path: Path) -> None:
    data = model.config.to_dict()
    data.setdefault("architectures", ["FalconH1ForCausalLM"])
    name = _DTYPE_NAMES.get(model.dtype, "float32")
    data["torch_dtype"] = name  # read by transformers 4.x and 5.x alike
    if "dtype" in data:
        data["dtype"] = name
    path.write_text(json.dumps(data, indent=2) + "\n")


def _move_into_place(tmp: Path, directory: Path) -> None:
    if not directory.exists():
        os.rename(tmp, directory)
        return
    # Replace: park the old folder beside, swap in the new one, then delete the old one.
    parked = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    os.rmdir(parked)
    os.rename(directory, parked)
    try:
        os.rename(tmp, directory)
    except OSError:
        os.rename(parked, directory)
        raise
    shutil.rmtree(parked, ignore_errors=True)
