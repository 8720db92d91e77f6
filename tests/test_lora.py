import io

import pytest
import torch

from cocodc.config import ModelConfig
from cocodc.federated.lora import add_lora, lora_targets, trainable_parameters
from cocodc.model import Transformer, ffn_hidden_size, lm_loss

CONFIG = ModelConfig(n_layers=2, d_model=32, n_heads=2)
VOCAB, SEQ = 64, 16


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CONFIG, VOCAB, SEQ)


def tokens(seed: int = 1, extra: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ + extra), generator=torch.Generator().manual_seed(seed))


def train(model: Transformer, steps: int = 2) -> None:
    # No weight decay: it would move the adapters even where their gradient is zero.
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.0)
    for step in range(steps):
        optimizer.zero_grad()
        lm_loss(model, tokens(seed=step, extra=1)).backward()
        optimizer.step()


def test_injection_leaves_the_output_unchanged():
    model = tiny()
    x = tokens()
    with torch.no_grad():
        before = model(x)
        assert add_lora(model, rank=4) is model
        assert torch.equal(model(x), before)


def test_only_adapters_train_and_their_count_matches_the_shapes():
    rank, d, hidden = 4, CONFIG.d_model, ffn_hidden_size(CONFIG)
    model = add_lora(tiny(), rank=rank)
    shapes = {"qkv": (d, 3 * d), "out": (d, d), "gate": (d, hidden), "up": (d, hidden), "down": (hidden, d)}
    expected = CONFIG.n_layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes.values())
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected == 2 * 4 * 672
    assert list(trainable) == [
        f"blocks.{i}.{group}.{target}.lora_{ab}.default.weight"
        for i in range(CONFIG.n_layers)
        for group, targets in (("attn", ("qkv", "out")), ("ffn", ("gate", "up", "down")))
        for target in targets
        for ab in "AB"
    ]
    assert [id(p) for p in trainable_parameters(model)] == [id(p) for p in trainable.values()]
    assert lora_targets(tiny()) == ["down", "gate", "out", "qkv", "up"]
    assert model.blocks[0].attn.qkv.scaling["default"] == 2.0  # alpha defaults to 2 * rank


def test_a_step_moves_the_adapters_and_no_base_parameter():
    model = add_lora(tiny(), rank=4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model)
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == p.requires_grad, name


def test_eval_and_state_dict_round_trip():
    model = add_lora(tiny(), rank=4)
    train(model)
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = add_lora(tiny(seed=7), rank=4).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(tokens()), model(tokens()))


@pytest.mark.parametrize("rank", [0, -2])
def test_rank_must_be_positive(rank):
    with pytest.raises(ValueError, match="positive integer"):
        add_lora(tiny(), rank=rank)


def test_adapters_cannot_be_added_twice():
    model = add_lora(tiny(), rank=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, rank=2)
