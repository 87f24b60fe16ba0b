"""gyrfalcon: fast fine-tuning and generation for TII's Falcon-H1 hybrid (Mamba-2 + attention) language models.

    import gyrfalcon
    model = gyrfalcon.FalconH1ForCausalLM.from_pretrained("tiiuae/Falcon-H1-0.5B-Instruct")
    out = model(input_ids, labels=input_ids)     # out.logits, out.loss
"""

from .checkpoint import CheckpointError
from .config import ConfigError, FalconH1Config
from .model import CausalLMOutput, FalconH1ForCausalLM
from .presets import PRESETS

__version__ = "0.1.0"

__all__ = ["CausalLMOutput", "CheckpointError", "ConfigError", "FalconH1Config", "FalconH1ForCausalLM", "PRESETS",
           "__version__"]
