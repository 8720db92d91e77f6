"""The federated server strategies against Flower 1.41.0's own, round by round, plus FedProx's term
and the weighted mean by hand."""

import inspect
import io

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi

from cocodc.federated.strategies import (
    FLOWER_DEFAULTS,
    STRATEGIES,
    build_strategy,
    proximal_term,
    weighted_mean,
)

FLOWER = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
FLOWER_NAMES = {"lr": "eta", "beta1": "beta_1", "beta2": "beta_2", "tau": "tau"}
SHAPES = [(3, 4), (5,), (2, 1, 3)]


class NoClient(ClientProxy):
    """A ClientProxy that only names a client: aggregate_fit never calls it."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def flat(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.cat([torch.from_numpy(np.asarray(a, dtype=np.float32)).reshape(-1) for a in arrays])


def fit_res(arrays: list[np.ndarray], examples: int) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), examples, {})


@pytest.mark.parametrize(
    "name, options",
    [
        ("fedavg", {}),
        ("fedprox", {}),
        ("fedadam", {}),
        ("fedyogi", {}),
        ("fedadagrad", {}),
        ("fedadam", {"lr": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-4}),
        ("fedyogi", {"lr": 0.03, "beta1": 0.5, "beta2": 0.9, "tau": 1e-2}),
        ("fedadagrad", {"lr": 0.2, "tau": 1e-3}),
    ],
)
def test_matches_flower_over_rounds(name: str, options: dict[str, float]) -> None:
    rng = np.random.default_rng(0)
    initial = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]
    kwargs = {FLOWER_NAMES[k]: v for k, v in options.items()}
    kwargs["fit_metrics_aggregation_fn"] = lambda metrics: {}
    if name == "fedprox":
        kwargs["proximal_mu"] = 0.1
    flower = FLOWER[name](initial_parameters=ndarrays_to_parameters(initial), **kwargs)
    ours = build_strategy(name, **options)
    flower_current, current = initial, flat(initial)
    for server_round in range(1, 5):
        examples = [int(n) for n in rng.integers(1, 100, size=3)]
        # Each client trains from the global value it was sent: Flower's, which ours must track.
        base = [np.asarray(w, dtype=np.float32) for w in flower_current]
        clients = [[(w + 0.1 * rng.standard_normal(w.shape)).astype(np.float32) for w in base] for _ in examples]
        results = [(NoClient(str(i)), fit_res(w, n)) for i, (w, n) in enumerate(zip(clients, examples, strict=True))]
        parameters, _ = flower.aggregate_fit(server_round, results, failures=[])
        flower_current = parameters_to_ndarrays(parameters)

        mean_update = weighted_mean([flat(w) - current for w in clients], examples)
        current = ours.step(current, mean_update, server_round)
        assert current.dtype == torch.float32
        torch.testing.assert_close(current, flat(flower_current), rtol=1e-6, atol=1e-6, msg=f"round {server_round}")


def test_flower_defaults() -> None:
    assert set(FLOWER_DEFAULTS) == set(STRATEGIES)
    for name, defaults in FLOWER_DEFAULTS.items():
        parameters = inspect.signature(FLOWER[name].__init__).parameters
        for key, value in defaults.items():
            assert parameters[FLOWER_NAMES[key]].default == value, (name, key)
        strategy = build_strategy(name)
        assert strategy.name == name
        for key, value in defaults.items():
            assert getattr(strategy, key) == value


def test_fedadam_first_round_by_hand() -> None:
    # One element, delta = 2: m = 0.2, v = 0.04, eta = 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2).
    new = build_strategy("fedadam").step(torch.zeros(1), torch.full((1,), 2.0), server_round=1)
    expected = 0.1 * (1 - 0.99**2) ** 0.5 / (1 - 0.9**2) * 0.2 / (0.2 + 1e-9)
    assert new.item() == pytest.approx(expected, rel=1e-6)


def test_proximal_term_by_hand() -> None:
    w = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    anchor = [torch.zeros(2, requires_grad=True), torch.tensor([[1.0]], requires_grad=True)]
    term = proximal_term(w, anchor, mu=0.5)
    assert term.item() == 0.25 * (1 + 4 + 4)
    term.backward()
    assert torch.equal(w[0].grad, torch.tensor([0.5, 1.0]))
    assert torch.equal(w[1].grad, torch.tensor([[1.0]]))
    assert anchor[0].grad is None and anchor[1].grad is None
    with pytest.raises(ValueError):
        proximal_term(w, anchor[:1], mu=0.5)


def test_weighted_mean_by_hand() -> None:
    mean = weighted_mean([torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0])], [1, 3])
    assert torch.equal(mean, torch.tensor([13.0 / 4, 26.0 / 4]))
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="zero"):
        weighted_mean([torch.ones(2), torch.ones(2)], [0, 0])


@pytest.mark.parametrize("name", STRATEGIES)
def test_state_dict_resumes_bit_identically(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    updates = [torch.randn(10, generator=gen) * 0.1 for _ in range(3)]
    first = build_strategy(name)
    current = torch.randn(10, generator=gen)
    for server_round in (1, 2):
        current = first.step(current, updates[server_round - 1], server_round)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_strategy(name)
    resumed.load_state_dict(torch.load(buffer))
    assert torch.equal(first.step(current, updates[2], 3), resumed.step(current, updates[2], 3))


def test_step_leaves_its_inputs_alone() -> None:
    current, update = torch.ones(4), torch.full((4,), 0.5)
    for name in STRATEGIES:
        build_strategy(name).step(current, update, 1)
    assert torch.equal(current, torch.ones(4)) and torch.equal(update, torch.full((4,), 0.5))


def test_build_strategy_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match="fedsgd"):
        build_strategy("fedsgd")
    with pytest.raises(ValueError, match="beta1"):
        build_strategy("fedadagrad", beta1=0.9)
    with pytest.raises(ValueError, match="lr"):
        build_strategy("fedavg", lr=1.0)
    with pytest.raises(ValueError, match="fedadam"):
        build_strategy("fedyogi").load_state_dict(build_strategy("fedadam").state_dict())
    adam = build_strategy("fedadam")
    adam.step(torch.zeros(3), torch.ones(3), 1)
    with pytest.raises(ValueError, match="shape"):
        adam.step(torch.zeros(4), torch.ones(4), 2)
