"""FalconH1Config: every field of a Falcon-H1 `config.json`, derived sizes, validation and presets.

The field names and defaults are those of Hugging Face's `FalconH1Config`, so a checkpoint's config.json reads
with the same meaning it has in transformers. Keys this class does not know are kept in `extra` and written back,
so reading and writing a config.json loses nothing.

    cfg = FalconH1Config.from_pretrained("path/to/checkpoint")   # a folder with config.json
    cfg = FalconH1Config.from_preset("7B")                       # a released shape (random-init use)
    cfg.d_ssm, cfg.mamba_head_dim, cfg.attn_head_dim, cfg.conv_dim  # derived sizes
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .presets import PRESETS

MODEL_TYPE = "falcon_h1"
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")

# A config.json without these does not describe a model: HF's defaults for them (hidden_size 4096, ...) are
# placeholders, so reading them silently would build the wrong network.
REQUIRED_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads")


def _decode_special_floats(obj: dict):
    """transformers >= 5 writes inf/nan as {"__float__": "Infinity"}; older files use the bare JSON extension."""
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    return obj


class ConfigError(ValueError):
    """A config that does not describe a valid Falcon-H1 model; the message names the field and the fix."""


@dataclass
class FalconH1Config:
    """Falcon-H1 hyper-parameters, with Hugging Face's names and defaults.

    Derived sizes (properties): `d_ssm` (Mamba inner width), `mamba_head_dim`, `attn_head_dim`, `conv_dim`
    (channels of the causal conv: x | B | C), `in_proj_size` (z | xBC | dt), and `rope` (the normalised RoPE
    parameters, whichever of `rope_theta` / `rope_scaling` / `rope_parameters` the file used).
    """

    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    num_logits_to_keep: int | None = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    attention_dropout: float = 0.0
    attention_bias: bool = False
    mlp_bias: bool = False
    projectors_bias: bool = False
    # Mamba-2 mixer
    mamba_d_ssm: int | None = 1024
    mamba_n_heads: int = 128
    mamba_d_head: int | str = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_norm_before_gate: bool = True
    mamba_rms_norm: bool = False
    time_step_limit: tuple[float, float] | None = (0.0, math.inf)
    # RoPE: older files say rope_theta (+ rope_scaling), newer ones rope_parameters; both are kept as read.
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    # µP forward multipliers: part of the function, applied exactly as the checkpoint was trained.
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    key_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    mlp_multipliers: list[float] = field(default_factory=lambda: [1.0, 1.0])
    ssm_multipliers: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0, 1.0])
    # Keys of config.json this class does not model (architectures, torch_dtype, transformers_version, ...).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.time_step_limit is not None:
            self.time_step_limit = tuple(float(v) for v in self.time_step_limit)
        if self.mlp_multipliers is None:
            self.mlp_multipliers = [1.0, 1.0]
        if self.ssm_multipliers is None:
            self.ssm_multipliers = [1.0] * 5
        self.mlp_multipliers = [float(v) for v in self.mlp_multipliers]
        self.ssm_multipliers = [float(v) for v in self.ssm_multipliers]
        if self.rope_theta is None and self.rope_parameters is None:
            self.rope_theta = 10000.0
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def d_ssm(self) -> int:
        """Mamba inner width: `mamba_d_ssm`, or `mamba_expand * hidden_size` when that is None."""
        return self.mamba_expand * self.hidden_size if self.mamba_d_ssm is None else self.mamba_d_ssm

    @property
    def mamba_head_dim(self) -> int:
        return self.d_ssm // self.mamba_n_heads if self.mamba_d_head == "auto" else int(self.mamba_d_head)

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim else self.hidden_size // self.num_attention_heads

    @property
    def conv_dim(self) -> int:
        """Channels through the causal conv: x (d_ssm) | B (groups*state) | C (groups*state)."""
        return self.d_ssm + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def in_proj_size(self) -> int:
        """Output width of `in_proj`: z (d_ssm) | xBC (conv_dim) | dt (n_heads)."""
        return self.d_ssm + self.conv_dim + self.mamba_n_heads

    @property
    def rope(self) -> dict:
        """RoPE parameters normalised the way transformers does: always `rope_type` and `rope_theta`, plus
        `factor`, `original_max_position_embeddings` and the YaRN knobs where the type uses them."""
        params = dict(self.rope_parameters or self.rope_scaling or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params.pop("type", None)
        if params.get("rope_theta") is None:
            params["rope_theta"] = self.rope_theta if self.rope_theta is not None else 10000.0
        if params["rope_type"] == "yarn":
            # As transformers: a top-level original_max_position_embeddings wins over the one in the rope dict.
            if "original_max_position_embeddings" in self.extra:
                params["original_max_position_embeddings"] = self.extra["original_max_position_embeddings"]
            params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return params

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError naming the first field that does not describe a buildable Falcon-H1."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_conv",
                    "mamba_chunk_size", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu' (the only activation Falcon-H1 uses), "
                              f"got {self.hidden_act!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                              f"({self.hidden_size}), or head_dim must be given")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                              f"({self.num_attention_heads})")
        if self.d_ssm % self.mamba_n_heads:
            raise ConfigError(f"mamba_n_heads ({self.mamba_n_heads}) must divide the Mamba width d_ssm "
                              f"({self.d_ssm} = mamba_d_ssm, or mamba_expand * hidden_size)")
        if self.mamba_d_head != "auto":
            if not isinstance(self.mamba_d_head, int) or self.mamba_d_head * self.mamba_n_heads != self.d_ssm:
                raise ConfigError(f"mamba_d_head ({self.mamba_d_head!r}) * mamba_n_heads ({self.mamba_n_heads}) "
                                  f"must equal d_ssm ({self.d_ssm}); use 'auto' to derive it")
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ConfigError(f"mamba_n_groups ({self.mamba_n_groups}) must divide mamba_n_heads "
                              f"({self.mamba_n_heads}): each B/C group is shared by a whole number of heads")
        if len(self.mlp_multipliers) != 2:
            raise ConfigError(f"mlp_multipliers must hold 2 values (gate, down), got {self.mlp_multipliers}")
        if len(self.ssm_multipliers) != 5:
            raise ConfigError(f"ssm_multipliers must hold 5 values (z, x, B, C, dt), got {self.ssm_multipliers}")
        if self.time_step_limit is not None and (len(self.time_step_limit) != 2
                                                 or self.time_step_limit[0] > self.time_step_limit[1]):
            raise ConfigError(f"time_step_limit must be (min, max) with min <= max, got {self.time_step_limit}")
        rope = self.rope
        if rope["rope_type"] not in ROPE_TYPES:
            raise ConfigError(f"rope type {rope['rope_type']!r} is not supported; use one of {ROPE_TYPES}")
        if rope["rope_type"] != "default" and not (isinstance(rope.get("factor"), (int, float)) and rope["factor"] > 0):
            raise ConfigError(f"rope type {rope['rope_type']!r} needs a positive 'factor', got {rope.get('factor')!r}")

    # ---------------------------------------------------------------- dict / file I/O
    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "FalconH1Config":
        """Build from a config.json dict. Unknown keys go to `extra`; missing required ones are an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type is not None and model_type != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {model_type!r}, but gyrfalcon runs Falcon-H1 "
                              f"(model_type {MODEL_TYPE!r}) only")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ConfigError(f"{source}: required field(s) missing: {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: copy.deepcopy(v) for k, v in data.items() if k in known}
        extra = {k: copy.deepcopy(v) for k, v in data.items() if k not in known and k != "model_type"}
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_dict(self) -> dict:
        """The config.json dict: every known field, then the unknown keys read in, as they were."""
        out: dict[str, Any] = {"model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in ("rope_parameters", "rope_scaling", "rope_theta", "head_dim") and value is None:
                continue  # absent in the file it came from; writing null would change nothing but the text
            out[f.name] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "FalconH1Config":
        path = Path(path)
        try:
            data = json.loads(path.read_text(), object_hook=_decode_special_floats)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file; a Falcon-H1 checkpoint folder holds config.json") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "FalconH1Config":
        """Read `config.json` from a checkpoint folder (or the file itself)."""
        path = Path(path)
        return cls.from_json_file(path / "config.json" if path.is_dir() else path)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FalconH1Config":
        """A released Falcon-H1 shape (see `gyrfalcon.presets`), e.g. "0.5B", "7B", "34B", or "tiny"."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        data = copy.deepcopy(PRESETS[name])
        data.update(overrides)
        return cls.from_dict({"model_type": MODEL_TYPE, **data}, source=f"preset {name}")

    def replace(self, **changes) -> "FalconH1Config":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(copy.deepcopy(self), **changes)
