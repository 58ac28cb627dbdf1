"""Self-supervised building blocks: NT-Xent by hand and over 2 gloo ranks (against one process), BYOL, kNN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import torchrun_script

from distrain.tricks.ssl import byol_loss, cosine_ema_momentum, gather_with_grad, knn_predict, knn_scores, nt_xent


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors are tiny: intra-op threads only add contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hand_nt_xent(z1: list[list[float]], z2: list[list[float]], temperature: float) -> float:
    """NT-Xent written out anchor by anchor, in Python floats."""
    z = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in z1 + z2]
    n = len(z1)
    total = 0.0
    for a in range(2 * n):
        sims = [sum(x * y for x, y in zip(z[a], z[b])) / temperature for b in range(2 * n)]
        positive = (a + n) % (2 * n)
        denominator = sum(math.exp(s) for b, s in enumerate(sims) if b != a)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.5, 0.1])
@pytest.mark.parametrize("n", [3, 4])
def test_nt_xent_matches_a_hand_computation(n, temperature):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
    loss = nt_xent(z1, z2, temperature)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(hand_nt_xent(z1.tolist(), z2.tolist(), temperature), rel=1e-6)
    # Not initialised: gathering changes nothing.
    assert torch.equal(nt_xent(z1, z2, temperature, gather=False), loss)


def test_nt_xent_rejects_mismatched_views_and_bad_temperature():
    with pytest.raises(ValueError, match="shape"):
        nt_xent(torch.randn(3, 4), torch.randn(2, 4), 0.5)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(3, 4), torch.randn(3, 4), 0.0)


def test_nt_xent_stays_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = nt_xent(z1, z2, 0.1)
    # Bit-identical: a bf16 matmul of the similarities would be off in the third digit.
    assert inside.dtype == torch.float32 and torch.equal(inside, nt_xent(z1, z2, 0.1))
    assert nt_xent(z1.bfloat16(), z2.bfloat16(), 0.1).dtype == torch.float32


def test_nt_xent_is_finite_with_a_tiny_temperature_and_identical_embeddings():
    z = torch.ones(4, 3, requires_grad=True)
    loss = nt_xent(z, z, 1e-3)
    loss.backward()
    # Every key is equally similar: the positive is one of 2n - 1 equal candidates.
    assert loss.item() == pytest.approx(math.log(7), rel=1e-6)
    assert torch.isfinite(z.grad).all()


def test_gather_without_a_process_group_returns_its_input():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


DIST_SCRIPT = """
import copy
import json

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import distrain.tricks.ssl as ssl
from distrain.tricks.ssl import gather_with_grad, nt_xent

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
N, n = 8, 8 // world  # global and local batch
torch.manual_seed(0)  # the same data and layer on every rank
x1, x2 = torch.randn(N, 5), torch.randn(N, 5)
layer = torch.nn.Linear(5, 4)
own = slice(rank * n, (rank + 1) * n)


def max_diff(a, b):
    return (a - b).abs().max().item()


def naive_gather(x):
    # What a plain all_gather does: other ranks' rows come back without a graph; the usual
    # fix-up puts this rank's own rows (with their graph) back in place.
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


def run(temperature, gather):
    ssl.gather_with_grad = gather
    ref = copy.deepcopy(layer)
    z_ref = ref(torch.cat([x1, x2]))  # one process, the whole global batch
    z_ref.retain_grad()
    loss_ref = nt_xent(*z_ref.chunk(2), temperature, gather=False)
    loss_ref.backward()

    model = DistributedDataParallel(copy.deepcopy(layer))
    z = model(torch.cat([x1[own], x2[own]]))  # one forward per backward, as DDP expects
    z.retain_grad()
    loss = nt_xent(*z.chunk(2), temperature)
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    own_ref = torch.cat([z_ref.grad[:N][own], z_ref.grad[N:][own]])
    grad = torch.cat([model.module.weight.grad.flatten(), model.module.bias.grad])
    grad_ref = torch.cat([ref.weight.grad.flatten(), ref.bias.grad])
    return {
        "loss": max_diff(torch.stack(losses).mean(), loss_ref.detach()),
        "grad": max_diff(grad, grad_ref),  # DDP's mean all-reduce
        "grad_times_world": max_diff(grad * world, grad_ref),
        "grad_scale": grad_ref.abs().max().item(),
        "embedding": max_diff(z.grad, world * own_ref),
    }


out = {}
for temperature in (0.5, 0.1):
    out[f"with_grad_{temperature}"] = run(temperature, gather_with_grad)
    out[f"naive_{temperature}"] = run(temperature, naive_gather)

# The gather alone: sum(c * gathered) gives each rank c's rows of its own slice, times the world
# size (every rank's copy of the loss depends on them).
x = torch.arange(3.0 * rank, 3.0 * rank + 3).requires_grad_()
gathered = gather_with_grad(x)
c = torch.arange(1.0, 3.0 * world + 1)
(c * gathered).sum().backward()
out["gather_forward"] = gathered.tolist()
out["gather_backward"] = x.grad.tolist()
with open(f"ssl-{rank}.json", "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


@pytest.mark.dist
@pytest.mark.slow
def test_nt_xent_over_two_ranks_trains_like_one_process_over_the_global_batch(tmp_path: Path):
    torchrun_script(tmp_path, "ssl_dist.py", DIST_SCRIPT)
    for rank in (0, 1):
        out = json.loads((tmp_path / f"ssl-{rank}.json").read_text())
        assert out["gather_forward"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        assert out["gather_backward"] == [2.0 * c for c in range(3 * rank + 1, 3 * rank + 4)]
        for temperature in (0.5, 0.1):
            good, naive = out[f"with_grad_{temperature}"], out[f"naive_{temperature}"]
            # The mean of the per-rank losses is the global loss, and DDP's mean of the per-rank
            # gradients is the global loss's gradient; each rank's embeddings get W x theirs.
            assert good["loss"] < 1e-6, good
            assert good["grad"] < 1e-6 * max(1.0, good["grad_scale"]), good
            assert good["embedding"] < 1e-6, good
            # A plain all_gather: the same loss value, a wrong gradient, and not merely off by W.
            assert naive["loss"] < 1e-6, naive
            assert naive["grad"] > 1e-3 * good["grad_scale"], naive
            assert naive["grad_times_world"] > 1e-3 * good["grad_scale"], naive


def test_byol_loss_by_hand_and_no_gradient_to_the_target():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]], requires_grad=True)
    z = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0]], requires_grad=True)
    loss = byol_loss(p, z)
    # cosines 0, 1, -1: per-sample losses 2, 0, 4.
    assert loss.item() == pytest.approx(2.0, abs=1e-6)
    loss.backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert byol_loss(p, z).dtype == torch.float32


def test_cosine_ema_momentum_rises_from_base_to_one():
    assert cosine_ema_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_ema_momentum(0.996, 50, 100) == pytest.approx(0.998)
    assert cosine_ema_momentum(0.996, 25, 100) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_ema_momentum(0.996, 100, 100) == pytest.approx(1.0)
    assert cosine_ema_momentum(0.996, 150, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cosine_ema_momentum(0.996, 0, 0)


def brute_knn(features, bank, labels, num_classes, k, temperature):
    """Scores and predictions from the full similarity matrix, neighbour by neighbour, in float64."""
    sims = (torch.nn.functional.normalize(features.double(), dim=1)
            @ torch.nn.functional.normalize(bank.double(), dim=1).T).tolist()
    all_scores, preds = [], []
    for row in sims:
        # sorted is stable: among equal similarities the lower bank index comes first.
        neighbours = sorted(range(len(row)), key=lambda j: -row[j])[:k]
        scores = [0.0] * num_classes
        for j in neighbours:
            scores[int(labels[j])] += math.exp(row[j] / temperature)
        all_scores.append(scores)
        preds.append(max(range(num_classes), key=scores.__getitem__))  # the first best class
    return torch.tensor(all_scores), torch.tensor(preds)


@pytest.mark.parametrize("k, chunk", [(10, 8), (1, 37), (10, 1000), (1000, 8)])
def test_knn_matches_brute_force_on_random_data(k, chunk):
    g = torch.Generator().manual_seed(k + chunk)
    features, bank = torch.randn(37, 8, generator=g), 3 * torch.randn(101, 8, generator=g)
    labels = torch.randint(0, 5, (101,), generator=g)
    # k = 1000 > 101 bank rows: clamped, every row votes.
    scores_ref, preds_ref = brute_knn(features, bank, labels, 5, min(k, 101), 0.07)
    scores = knn_scores(features, bank, labels, 5, k=k, temperature=0.07, chunk=chunk)
    assert scores.dtype == torch.float32 and scores.shape == (37, 5)
    torch.testing.assert_close(scores, scores_ref.float(), rtol=1e-5, atol=0)
    assert torch.equal(knn_predict(features, bank, labels, 5, k=k, temperature=0.07, chunk=chunk), preds_ref)


def test_knn_breaks_ties_by_bank_index_then_by_class():
    # Cosines are exact here (one-hot rows): 30 copies of e0 tie for the nearest place, with labels
    # that make topk's unspecified pick show; the lower bank index must win.
    labels = torch.tensor([(7 * i) % 4 for i in range(30)] + [0, 1, 2, 3])
    bank = torch.cat([torch.eye(4)[:1].repeat(30, 1), torch.eye(4)])
    bank[::2] *= 2.5  # scale changes nothing: cosines
    features = torch.tensor([[1.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 1.0, 1.0]])
    for k in (1, 2, 3, 5, 7, 30, 31, 40):
        for chunk in (1, 2, 3):
            scores_ref, preds_ref = brute_knn(features, bank, labels, 4, min(k, 34), 0.1)
            torch.testing.assert_close(knn_scores(features, bank, labels, 4, k, 0.1, chunk), scores_ref.float(),
                                       rtol=1e-6, atol=0)
            assert torch.equal(knn_predict(features, bank, labels, 4, k, 0.1, chunk), preds_ref), (k, chunk)
    # By hand: k = 2 takes bank rows 0 and 1 (labels 0 and 3) for e0: a tie between classes 0 and
    # 3, won by class 0; k = 3 adds row 2 (label 2), still a three-way tie, class 0.
    assert knn_predict(features[:1], bank, labels, 4, 2, 0.1).item() == 0
    assert knn_scores(features[:1], bank, labels, 4, 2, 0.1)[0].tolist() == pytest.approx(
        [math.exp(10), 0, 0, math.exp(10)])
    # k = 4 adds row 3 (label 1)... and row 4's label 0 at k = 5 breaks the tie.
    assert knn_scores(features[:1], bank, labels, 4, 5, 0.1)[0].tolist() == pytest.approx(
        [2 * math.exp(10), math.exp(10), math.exp(10), math.exp(10)])


def test_knn_rejects_bad_arguments():
    bank, labels = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError):
        knn_predict(torch.randn(2, 3), bank, labels, 2, k=0)
    with pytest.raises(ValueError):
        knn_predict(torch.randn(2, 3), bank, labels[:3], 2)


def test_knn_of_no_query_is_empty():
    """A rank whose share of the eval set is all padding (an eval set smaller than the world, or a
    rank whose samples are all bad) has no query: an empty result, not an error that leaves the
    other ranks waiting in the all-reduce that follows."""
    bank, labels = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    none = torch.zeros(0, 3)
    assert knn_predict(none, bank, labels, 2).shape == (0,) and knn_predict(none, bank, labels, 2).dtype == torch.long
    assert knn_scores(none, bank, labels, 2).shape == (0, 2)
