import dataclasses

import pytest
import torch

from cocodc.config import load_config
from cocodc.model import Transformer
from cocodc.throughput import Throughput, flops_per_token, peak_memory_bytes, peak_of

from conftest import TINY


def test_flops_per_token_of_the_demo_model_by_hand():
    config = load_config(TINY)
    model = Transformer(config.model, vocab_size=256, max_seq_len=config.train.seq_len)
    # d 128, 4 layers, SwiGLU hidden 384 (8/3 x 128 rounded up to 64), vocab 256, 128 tokens.
    block = 3 * 128 * 128 + 128 * 128 + 3 * 128 * 384 + 2 * 128  # qkv, out, gate/up/down, 2 norms
    multiplying = 4 * block + 128 + 256 * 128  # the blocks, the final norm, the head (not the embedding)
    assert multiplying == 885_888
    assert flops_per_token(model, 128) == 6 * 885_888 + 12 * 4 * 128 * 128 == 6_101_760
    # Tied, the embedding is the head: one matrix fewer, the same multiplications.
    tied = Transformer(dataclasses.replace(config.model, tie_embeddings=True), 256, 128)
    assert sum(p.numel() for p in tied.parameters()) == 885_888 and flops_per_token(tied, 128) == 6_101_760


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", None),  # not an L4
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_a_device_s_peak_is_known_by_its_name(name, peak):
    assert peak_of(name) == peak


def test_throughput_on_the_cpu_has_tflops_and_no_mfu():
    config = load_config(TINY)
    model = Transformer(config.model, vocab_size=256, max_seq_len=128)
    speed = Throughput(model, 128, torch.device("cpu"), bf16=False, ranks=2).at(tokens_per_s=10_000)
    assert speed["tflops"] == pytest.approx(6_101_760 * 10_000 / 2 / 1e12)
    assert speed["mfu"] is None
    assert speed["peak_memory_bytes"] == peak_memory_bytes(torch.device("cpu")) > 100 * 2**20  # torch alone
