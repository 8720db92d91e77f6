"""LoRA adapters on the transformer's block Linears, injected with peft, so federated rounds move only the adapters.

`add_lora` wraps each Linear of the model's blocks in place (peft's `inject_adapter_in_model`): the model stays a plain
`Transformer` whose forward is `forward(tokens)`. A wrapped layer's weight moves to `<layer>.base_layer.weight` and its
adapters are `<layer>.lora_A.default.weight` (rank, in) and `<layer>.lora_B.default.weight` (out, rank), so load a
pretrained checkpoint before calling `add_lora`.
"""

from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from cocodc.config import ConfigError
from cocodc.sync.fragments import find_blocks


def lora_targets(model: nn.Module) -> list[str]:
    """The names of the Linear layers inside the model's blocks (cocodc's: qkv, out, gate, up, down; a
    transformers Llama's: q_proj ... down_proj). The embedding and the (untied) head stay frozen: an
    adapter on the head costs rank * (vocab + d_model), as much as a couple of blocks' adapters at a
    32k vocabulary, and fine-tuning should keep the pretrained token representations."""
    blocks = find_blocks(model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in blocks.named_modules() if isinstance(m, nn.Linear)})


def add_lora(model: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Inject rank-`rank` LoRA adapters into every Linear of the blocks and freeze all base parameters.

    `alpha` defaults to 2 * rank, so the adapter scale alpha / rank is 2 whatever the rank. The adapters start as
    B = 0 (A random, from torch's global generator), so the model's output is unchanged at injection. Returns the
    same model object, modified in place.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha is None:
        alpha = 2.0 * rank
    if any(isinstance(module, LoraLayer) for module in model.modules()):
        raise ValueError("model already has LoRA adapters")
    targets = lora_targets(model)
    if not targets:
        raise ConfigError(f"federated.lora_rank: {type(model).__name__}'s blocks have no Linear layer to adapt")
    base = list(model.parameters())
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets)
    model = inject_adapter_in_model(config, model)
    # peft already freezes non-adapter weights; done explicitly so the guarantee does not rest on its defaults.
    for param in base:
        param.requires_grad_(False)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (after `add_lora`: the adapters), in `named_parameters` order."""
    return [param for _, param in model.named_parameters() if param.requires_grad]
