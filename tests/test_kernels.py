"""The Triton kernels against their torch references.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest
before anything imports triton): the kernels' own code, executed in numpy on CPU tensors. With a
GPU they are compiled and run on CUDA tensors. The references always run on the CPU, where
torch's fp32 division is correctly rounded.

Exact: the codecs (encode, decode and the weighted mean of payloads), the replace merge. Within
a stated tolerance: the outer step and the lerp / compensated merges (torch's CPU kernels fuse a
multiply-add in their vector bodies but not in every tail, the kernel always fuses), and the
square sums (another summation order).
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1"  # conftest sets it before triton is imported
pytest.importorskip("triton", reason="the kernels need triton (pip install 'cocodc[kernels]')")

from cocodc import kernels  # noqa: E402
from cocodc.comm.codec import get_codec  # noqa: E402
from cocodc.kernels import reference, triton_ops  # noqa: E402

QUANTIZED = ["bf16", "fp8", "int8", "e3m0"]
SIZES = [1, 127, 128, 130, 2085]  # a partial block, one block, a block and two, several tiles


def sample(numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * torch.logspace(-3, 1, numel).roll(seed)
    x[::17] = 0.0
    return x


def edge_block() -> torch.Tensor:
    """One block at the codecs' rounding edges: absmax 127 makes int8's scale 1, so x.5 values are
    ties (to even); the 0.75 * 2^j midpoints and 2^-7 are e3m0's ties; and a signed zero."""
    x = torch.zeros(128)
    x[0] = 127.0
    x[1:9] = torch.tensor([2.5, -3.5, 0.5, -0.5, 126.5, -1.5, 4.5, -0.0])
    x[9:17] = 127.0 * 0.75 * 2.0 ** torch.arange(-6.0, 2.0).clamp(max=0)
    x[17] = 127.0 * 2.0**-7
    x[18] = -127.0 * 2.0**-7 * 0.999
    return x


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("numel", SIZES)
def test_encode_is_bit_exact(name, numel):
    codec = get_codec(name)
    values, minus = sample(numel, 1), sample(numel, 2)
    expected = codec.encode(values - minus)
    got = triton_ops.encode(codec, values.to(DEVICE), minus.to(DEVICE)).cpu()
    assert torch.equal(got, expected)
    assert torch.equal(triton_ops.encode(codec, values.to(DEVICE)).cpu(), codec.encode(values))


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter casting NaN
def test_a_non_finite_block_decodes_as_the_reference_does(name, bad):
    codec = get_codec(name)
    x = sample(300, 4)
    x[130] = bad
    got = codec.decode(triton_ops.encode(codec, x.to(DEVICE)).cpu(), 300)
    expected = codec.decode(codec.encode(x), 300)
    assert torch.equal(got.isfinite(), expected.isfinite()) and not got[130].isfinite()
    assert torch.equal(got[expected.isfinite()], expected[expected.isfinite()])


@pytest.mark.parametrize("name", QUANTIZED)
def test_encode_at_the_rounding_edges(name):
    codec = get_codec(name)
    x = edge_block()
    assert torch.equal(triton_ops.encode(codec, x.to(DEVICE)).cpu(), codec.encode(x))
    if name == "int8":  # ties to even, by hand
        assert codec.decode(codec.encode(x), 128)[1:6].tolist() == [2.0, -4.0, 0.0, -0.0, 126.0]


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("numel", [130, 2085])
@pytest.mark.parametrize("mean", [True, False])
def test_weighted_mean_of_payloads_is_bit_exact(name, numel, mean):
    codec = get_codec(name)
    width = -(-codec.encoded_bytes(numel) // 4) * 4 + 12  # word rows carrying more after the payload, as the engine's
    rows = torch.zeros(3, width, dtype=torch.uint8)
    for m in range(3):
        rows[m, : codec.encoded_bytes(numel)] = codec.encode(sample(numel, 10 + m))
    rows[1] = 0xFF  # weight 0: never read (0xFF bytes decode to NaN in several codecs)
    weights = [1.0, 0.0, 2.5]
    expected = kernels.decode_sum(codec, rows, numel, weights, mean)  # CPU: the reference runs
    total = sum(weights) if mean else None
    got = triton_ops.decode_sum(codec, rows.to(DEVICE), numel, torch.tensor(weights, device=DEVICE), total)
    assert torch.equal(got.cpu(), expected)
    assert not expected.isnan().any()


@pytest.mark.parametrize("name", QUANTIZED)
def test_decode_is_bit_exact(name):
    codec = get_codec(name)
    payload = codec.encode(sample(2085, 3))
    got = triton_ops.decode_sum(codec, payload.to(DEVICE).view(1, -1), 2085, None, None)
    assert torch.equal(got.cpu(), codec.decode(payload, 2085))


def test_square_sums():
    pairs = [(sample(n, n), sample(n, n + 1)) for n in (5, 1024, 3000)]
    expected = torch.stack([(a - b).double().square().sum() for a, b in pairs]).float()
    got = triton_ops.square_sums([(a.to(DEVICE), b.to(DEVICE)) for a, b in pairs]).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def fragment_state(numel: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    return {
        "grad": torch.randn(numel, generator=g) * 0.01,
        "global_": base.clone(),
        "momentum": torch.randn(numel, generator=g) * 0.01,
        "live": base + torch.randn(numel, generator=g) * 0.02,
        "sent": base + torch.randn(numel, generator=g) * 0.01,
        "normaliser": torch.rand(numel, generator=g) * 1e-4,
        "curvature": torch.rand(numel, generator=g) * 0.4,
    }


VARIANTS = {
    "diloco-replace": {"merge": "replace", "nesterov": True},
    "streaming-lerp": {"merge": "lerp", "alpha": 0.3, "nesterov": True},
    "lerp-upper-form": {"merge": "lerp", "alpha": 0.7, "nesterov": False},
    "first-step": {"merge": "lerp", "alpha": 0.0, "nesterov": True, "first": True},
    "no-momentum": {"merge": "lerp", "alpha": 0.5, "nesterov": False, "mu": 0.0},
    "compensate-constant": {"merge": "compensate", "alpha": 0.5, "dc_lambda": 0.5},
    "compensate-running": {"merge": "compensate", "alpha": 0.5, "dc_lambda": 0.5, "normaliser": True, "beta": 0.9},
    "compensate-running-first": {"merge": "compensate", "dc_lambda": 2.0, "normaliser": True, "beta": 0.0},
    "compensate-per-tensor": {"merge": "compensate", "alpha": 0.5, "dc_lambda": 0.5, "per_tensor": [700, 1, 1385]},
    "compensate-adam": {"merge": "compensate", "alpha": 0.5, "dc_lambda": 3.0, "curvature": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_outer_step_and_merge(variant):
    options = {"lr": 0.7, "mu": 0.9, "nesterov": True, "first": False, **VARIANTS[variant]}
    tensors = fragment_state(2086, 7)
    if options["mu"] == 0.0:
        tensors["momentum"] = None
    for optional in ("normaliser", "curvature"):
        if not options.pop(optional, False):
            tensors[optional] = None
    if options["merge"] != "compensate":
        tensors["sent"] = None
    ref = {k: v.clone() if v is not None else None for k, v in tensors.items()}
    got = {k: v.clone().to(DEVICE) if v is not None else None for k, v in tensors.items()}
    ref_stats = reference.outer_apply(**ref, **options)
    kernels.set_backend("triton")
    try:
        stats = kernels.outer_apply(**got, **options)
    finally:
        kernels.set_backend("auto")
    for name in ("global_", "momentum", "live", "normaliser"):
        if ref[name] is not None:
            torch.testing.assert_close(got[name].cpu(), ref[name], rtol=2e-6, atol=1e-6, msg=f"{variant}: {name}")
    torch.testing.assert_close(torch.tensor(stats), torch.tensor(ref_stats), rtol=1e-5, atol=1e-7)
    if options["merge"] == "replace":
        assert torch.equal(got["live"], got["global_"])
    if options["merge"] == "compensate":
        assert stats[0] > 0  # the compensation did act


def test_backend_switch():
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        kernels.set_backend("fast")
    codec, x = get_codec("e3m0"), sample(300, 4)
    kernels.set_backend("torch")
    try:
        assert kernels._kernels_for(x.to(DEVICE)) is None
    finally:
        kernels.set_backend("auto")
    assert (kernels._kernels_for(x.to(DEVICE)) is triton_ops) == CUDA  # auto: the kernels on CUDA only
    kernels.set_backend("triton")  # forced: on a CPU tensor, the kernels in Triton's interpreter
    try:
        assert kernels._kernels_for(x) is triton_ops
        assert torch.equal(kernels.encode(codec, x.to(DEVICE)).cpu(), codec.encode(x))
    finally:
        kernels.set_backend("auto")


def _two_regions_worker(rank: int, store: str, backend: str, results) -> None:
    from cocodc.config import ModelConfig, SyncConfig
    from cocodc.model import Transformer
    from cocodc.sync import OuterSync

    from conftest import gloo_group

    kernels.set_backend(backend)
    with gloo_group(rank, store):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=2), vocab_size=16, max_seq_len=8).to(DEVICE)
        config = SyncConfig(
            method="cocodc",
            sync_every=4,
            fragments=2,
            delay=1,
            schedule="adaptive",
            quantize="e3m0",
            dc_normaliser="running",
        )
        outer = OuterSync(model, config, group=torch.distributed.group.WORLD)
        for step in range(1, 13):
            with torch.no_grad():
                for i, p in enumerate(model.parameters()):
                    p.add_(torch.full_like(p, 0.01 * ((step + i + rank) % 5 - 2)))
            outer.step()
        outer.finish()
        results[backend, rank] = (
            [p.detach().cpu() for p in model.parameters()],
            [r.get("w_mean") for r in outer.pop_records() if r["kind"] == "sync"],
            kernels._triton_ops is not None,  # the kernel module was loaded: the kernels ran
        )


def test_two_regions_train_alike_with_kernels_and_reference(tmp_path):
    # The whole outer sync through the kernels: the engine's fused pseudo-gradient + e3m0 encode
    # and weighted mean of the payloads, the drift telemetry, the compensated merge with the
    # running normaliser; against the same run on the torch reference, over a real gloo group.
    import torch.multiprocessing as mp

    # On a GPU, "auto": gloo carries CPU tensors, which go to the reference codecs there.
    kernel_backend = "auto" if CUDA else "triton"
    results = mp.Manager().dict()
    for backend in ("torch", kernel_backend):
        mp.spawn(_two_regions_worker, args=(str(tmp_path / backend), backend, results), nprocs=2)
    for rank in (0, 1):
        (reference_params, reference_w, loaded), (kernel_params, kernel_w, used) = (
            results["torch", rank],
            results[kernel_backend, rank],
        )
        assert used and not loaded
        assert len(kernel_w) == 6 and all(w is not None and w > 0 for w in kernel_w)
        torch.testing.assert_close(kernel_w, reference_w, rtol=1e-4, atol=1e-6)
        for mine, ref in zip(kernel_params, reference_params, strict=True):
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
