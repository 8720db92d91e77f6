import math
import os
import shutil

import pytest
import torch

from cocodc.config import load_config
from cocodc.model import Transformer, apply_rotary, chunked_cross_entropy, lm_loss, rotary_tables

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


def _small(seed: int = 0, **settings) -> Transformer:
    config = load_config(REPO / "configs" / "tiny.yaml", ["model.n_layers=2", "model.d_model=32", "model.n_heads=2"])
    model = Transformer(config.model, vocab_size=64, max_seq_len=16, seed=seed)
    for key, value in settings.items():
        setattr(model, key, value)
    return model


def _loss_and_grads(model: Transformer, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = lm_loss(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


BATCH = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(5))


def assert_trains_as_the_plain_model(**settings) -> torch.Tensor:
    """The model with `settings` gives the plain model's loss and gradients (1e-6); its loss."""
    plain_loss, plain_grads = _loss_and_grads(_small(), BATCH)
    loss, grads = _loss_and_grads(_small(**settings), BATCH)
    assert abs(loss - plain_loss) < 1e-6
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    return loss


@pytest.mark.parametrize("chunk", [7, 16, 40])  # uneven chunks, one per row, fewer than the tokens
def test_the_chunked_loss_equals_the_whole_one(chunk):
    loss = assert_trains_as_the_plain_model(loss_chunk_tokens=chunk)
    logits = _small(loss_chunk_tokens=chunk)(BATCH[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), BATCH[:, 1:].flatten())
    assert abs(loss - expected) < 1e-6  # the mean over every token, not over chunks


def test_the_chunked_loss_keeps_no_logits_for_backward():
    # Saved for backward: each chunk's hidden rows, never a (tokens x vocab) block of logits.
    model = _small()
    hidden = torch.randn(3, 16, 32, requires_grad=True)

    def saved_shapes(chunk: int) -> list[torch.Size]:
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
            chunked_cross_entropy(model.logits, hidden, BATCH[:, 1:], chunk)
        return shapes

    assert torch.Size([48, 64]) in saved_shapes(0)  # whole: every token's logits
    assert all(shape[-1] != 64 for shape in saved_shapes(16))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_changes_no_number(mode):
    assert_trains_as_the_plain_model(activation_checkpointing=mode)


def test_activation_checkpointing_recomputes_what_it_did_not_keep():
    # Counted in backward: the forward's ops run again. Full recomputes the matmuls too; selective
    # keeps them (and attention) and recomputes only the cheap ops between.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    def in_backward(mode: str) -> tuple[int, int]:
        model = _small(activation_checkpointing=mode)
        loss = lm_loss(model, BATCH)
        with Count() as count:
            loss.backward()
        return count.ops.count(torch.ops.aten.mm.default), count.ops.count(torch.ops.aten.silu.default)

    (mm_none, silu_none), (mm_selective, silu_selective), (mm_full, silu_full) = map(
        in_backward, ("none", "selective", "full")
    )
    assert silu_none == 0 and silu_selective == silu_full == 2  # one per block, recomputed
    assert mm_selective == mm_none < mm_full


def test_a_model_built_on_the_meta_device_starts_bit_identical():
    direct = _small(seed=3)
    config = direct.config
    with torch.device("meta"):
        lazy = Transformer(config, vocab_size=64, max_seq_len=16)
    assert all(p.device.type == "meta" for p in lazy.parameters())
    lazy.materialize(torch.device("cpu"), 3)
    for (name, a), (_, b) in zip(direct.state_dict().items(), lazy.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(direct.rope_cos, lazy.rope_cos) and torch.equal(direct.rope_sin, lazy.rope_sin)
    assert not torch.equal(_small(seed=4).head.weight, direct.head.weight)


@pytest.mark.slow  # inductor compiles the block on this CPU: tens of seconds
@pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc")) is None, reason="inductor needs a C compiler (none found as $CC or cc)"
)
def test_compiled_blocks_train_as_eager_ones():
    from cocodc.train import build_model

    def train(compiled: bool) -> list[float]:
        shape = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "train.seq_len=16"]
        config = load_config(REPO / "configs" / "tiny.yaml", [*shape, f"train.compile={compiled}"])
        model = build_model(config, 64, torch.device("cpu"))  # as a run builds it: train.compile
        assert all((block._compiled_call_impl is not None) == compiled for block in model.blocks)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in range(3):
            loss = lm_loss(model, BATCH.roll(step, 0))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    assert train(True) == pytest.approx(train(False), abs=1e-4)


def test_an_inner_step_of_two_micro_batches_runs_the_model_on_each_half():
    from cocodc.trainer import forward_backward

    model, rows = _small(), []
    model.register_forward_pre_hook(lambda _module, args: rows.append(args[0].shape[0]))
    config = load_config(REPO / "configs" / "tiny.yaml", ["train.grad_accum=2"])
    batch = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    loss = forward_backward(model, batch, config, torch.device("cpu"))
    assert rows == [2, 2]
    grads = [p.grad.clone() for p in model.parameters()]
    whole = _small()
    whole_loss = lm_loss(whole, batch)
    whole_loss.backward()
    assert abs(loss - whole_loss) < 1e-6  # the mean of the halves' means: equal token counts
    for a, b in zip(grads, (p.grad for p in whole.parameters()), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
