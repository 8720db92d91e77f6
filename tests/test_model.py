import math

import pytest
import torch

from cocodc.config import load_config
from cocodc.model import Transformer, apply_rotary, lm_loss, rotary_tables

from conftest import REPO


def test_tiny_config_is_about_a_million_parameters():
    config = load_config(REPO / "configs" / "tiny.yaml")
    model = Transformer(config.model, vocab_size=256, max_seq_len=config.train.seq_len)
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 1.2e6
    assert len(model.blocks) == config.model.n_layers


@pytest.mark.parametrize(("name", "low", "high"), [("gpu-150m", 130e6, 170e6), ("gpu-1b", 0.9e9, 1.2e9)])
def test_gpu_configs_have_their_size(name, low, high):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    with torch.device("meta"):
        model = Transformer(config.model, vocab_size=config.data.vocab_size, max_seq_len=config.train.seq_len)
    assert low < sum(p.numel() for p in model.parameters()) < high


def test_attention_is_causal():
    torch.manual_seed(0)
    config = load_config(REPO / "configs" / "tiny.yaml", ["model.n_layers=2", "model.d_model=32", "model.n_heads=2"])
    model = Transformer(config.model, vocab_size=50, max_seq_len=16)
    tokens = torch.randint(0, 50, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    assert torch.equal(model(tokens)[:, :10], model(changed)[:, :10])
    assert not torch.allclose(model(tokens)[:, 10:], model(changed)[:, 10:])


def test_rotary_is_a_rotation():
    cos, sin = rotary_tables(4, 3, 10000.0)
    x = torch.tensor([[[[1.0, 0.0, 0.0, 1.0]] * 3]])
    rotated = apply_rotary(x, cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(rotated[..., 0, :], x[..., 0, :])  # position 0 is not rotated
    assert torch.allclose(rotated[0, 0, 1, :2], torch.tensor([math.cos(1.0), math.sin(1.0)]))


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    config = load_config(REPO / "configs" / "tiny.yaml")
    model = Transformer(config.model, vocab_size=256, max_seq_len=64)
    loss = lm_loss(model, torch.randint(0, 256, (4, 65)))
    assert abs(loss.item() - math.log(256)) < 0.1
