"""The EMA of model weights: decay rule, update math against a float64 reference, checkpoints, swapping."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from distrain.tricks.ema import EMA, ema_decay


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The nets are tiny: intra-op threads only add contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    """One real update: moves the weights and, in train mode, BN running stats and num_batches_tracked."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g).to(next(model.parameters()).dtype)
    y = torch.randint(0, 3, (4,), generator=g)
    model.train()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {k: v.detach().clone() for k, v in tensors.items()}


def test_ema_decay_rule():
    assert ema_decay(0.999, 1, 0, False) == 0.999
    assert ema_decay(0.999, 1, 10**6, False) == 0.999
    assert ema_decay(0.99998, 32, 0, False) == pytest.approx(0.99998**32)
    # the horizon in optimizer updates is the same whatever `every` is
    assert ema_decay(0.99998, 32, 5, False) ** (3200 // 32) == pytest.approx(0.99998**3200)
    # warmup caps at (1 + n) / (10 + n) ...
    assert ema_decay(0.999, 1, 0, True) == pytest.approx(0.1)
    assert ema_decay(0.999, 1, 8, True) == pytest.approx(0.5)
    assert ema_decay(0.99998, 32, 90, True) == pytest.approx(91 / 100)
    # ... until it reaches the (every-adjusted) decay
    assert ema_decay(0.999, 1, 10**5, True) == 0.999
    assert ema_decay(0.99998, 32, 10**5, True) == pytest.approx(0.99998**32)
    seq = [ema_decay(0.9999, 4, n, True) for n in range(0, 50_000, 97)]
    assert seq == sorted(seq) and seq[-1] == pytest.approx(0.9999**4)


@pytest.mark.parametrize("warmup", [False, True])
def test_update_matches_float64_reference(warmup):
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    decay, every = 0.9, 3
    ema = EMA(model, decay=decay, every=every, warmup=warmup)
    ref = {k: v.double() if v.is_floating_point() else v.clone() for k, v in state(model).items()}
    n = 0
    for u in range(1, 11):
        train_step(model, opt, seed=u)
        ema.update(model, u)
        if u % every == 0:
            d = min(decay**every, (1 + n) / (10 + n)) if warmup else decay**every
            for k, v in state(model).items():
                ref[k] = d * ref[k] + (1 - d) * v.double() if v.is_floating_point() else v.clone()
            n += 1
        assert ema.n_updates == n
    assert n == 3
    live = state(model)
    for k, v in ema.state_dict()["shadow"].items():
        if v.is_floating_point():
            assert v.dtype == torch.float32
            torch.testing.assert_close(v.double(), ref[k], rtol=1e-6, atol=1e-6)
            assert not torch.allclose(v, live[k]), k  # it really is an average, not a copy
        else:
            assert v.dtype == torch.int64 and torch.equal(v, ref[k])
    # integer buffers are copied as of the last EMA update (u=9), not averaged
    assert ema.shadow["1.num_batches_tracked"].item() == 9
    assert live["1.num_batches_tracked"].item() == 10
    assert "1.running_mean" in ema.shadow and "1.running_var" in ema.shadow


def test_off_steps_do_nothing():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = EMA(model, decay=0.5, every=4)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    for u in (1, 2, 3, 5):
        train_step(model, opt, seed=u)
        ema.update(model, u)
    assert ema.n_updates == 0
    assert all(torch.equal(before[k], v) for k, v in ema.shadow.items())
    ema.update(model, 8)
    assert ema.n_updates == 1 and not torch.equal(before["0.weight"], ema.shadow["0.weight"])


def test_bf16_model_keeps_fp32_shadow():
    model = small_net().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    decay = 0.999
    ema = EMA(model, decay=decay)
    assert all(v.dtype == torch.float32 for k, v in ema.shadow.items() if "num_batches" not in k)
    assert ema.shadow["1.num_batches_tracked"].dtype == torch.int64
    ref = {k: v.double() for k, v in state(model).items() if v.is_floating_point()}
    for u in range(1, 4):
        train_step(model, opt, seed=u)
        ema.update(model, u)
        for k, v in state(model).items():
            if v.is_floating_point():
                ref[k] = decay * ref[k] + (1 - decay) * v.double()
    for k, r in ref.items():
        torch.testing.assert_close(ema.shadow[k].double(), r, rtol=1e-6, atol=1e-6)
    # the steps are far below bf16 resolution: a bf16 average could not have moved
    w = ema.shadow["6.weight"]
    assert not torch.equal(w, w.bfloat16().float())


def test_state_dict_round_trip_gives_identical_updates():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = EMA(model, decay=0.99, every=2, warmup=True)
    for u in range(1, 6):
        train_step(model, opt, seed=u)
        ema.update(model, u)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    restored = EMA(small_net(), decay=0.99, every=2, warmup=True)
    restored.load_state_dict(torch.load(buf))
    assert restored.n_updates == ema.n_updates == 2
    for u in range(6, 12):
        train_step(model, opt, seed=u)
        ema.update(model, u)
        restored.update(model, u)
    assert all(torch.equal(v, restored.shadow[k]) for k, v in ema.shadow.items())
    assert restored.n_updates == ema.n_updates


def test_load_state_dict_rejects_other_model():
    ema = EMA(small_net(), decay=0.9)
    other = EMA(nn.Linear(2, 2), decay=0.9)
    with pytest.raises(ValueError, match="does not match"):
        ema.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        ema.copy_to(nn.Linear(2, 2))


def test_swapped_evaluates_ema_and_restores_bitwise():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = EMA(model, decay=0.8)
    for u in range(1, 5):
        train_step(model, opt, seed=u)
        ema.update(model, u)
    x = torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(model)
    ema.copy_to(reference)
    before = state(model)
    model.eval()
    with torch.no_grad():
        live_out = model(x)
        with ema.swapped(model) as m:
            assert m is model
            swapped_out = model(x)
            model.train()
            model(x)  # train-mode BN touches running stats; the restore must undo that too
        restored_out = model.eval()(x)
        expected = reference.eval()(x)
    assert torch.equal(swapped_out, expected)
    assert not torch.allclose(swapped_out, live_out)
    assert torch.equal(restored_out, live_out)
    after = state(model)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k].view(-1), v.view(-1)), k

    with pytest.raises(RuntimeError, match="boom"), ema.swapped(model):
        raise RuntimeError("boom")
    assert all(torch.equal(v, after[k]) for k, v in state(model).items())


def test_copy_to_casts_to_model_dtypes():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = EMA(model, decay=0.7)
    for u in range(1, 4):
        train_step(model, opt, seed=u)
        ema.update(model, u)
    target = small_net().to(torch.bfloat16)
    ema.copy_to(target)
    for k, v in state(target).items():
        shadow = ema.shadow[k]
        if shadow.is_floating_point():
            assert v.dtype == torch.bfloat16 and torch.equal(v, shadow.bfloat16()), k
        else:
            assert v.dtype == torch.int64 and torch.equal(v, shadow), k
    assert not any(t.requires_grad for t in ema.shadow.values())


def test_buffers_are_the_shadow_of_the_model_buffers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = EMA(model, 0.9)
    assert [t.data_ptr() for t in ema.buffers()] == [ema.shadow[n].data_ptr() for n, _ in model.named_buffers()]
    assert len(ema.buffers()) == 3  # running_mean, running_var, num_batches_tracked


def test_ema_of_bf16_weight_copies_stays_within_bf16_rounding_of_the_fp32_ema():
    """Under DeepSpeed bf16 the EMA averages the module's bf16 weight copies, not the fp32 masters
    (averaging the masters would need a collective per update under ZeRO-1/2). Measured here on a
    real SGD trajectory: the error is the order of one bf16 rounding (2**-9 relative), not more,
    because the fp32 shadow does not accumulate rounding. The README quotes this figure."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rounded = copy.deepcopy(model)
    exact, approx = EMA(model, 0.99, warmup=True), EMA(rounded, 0.99, warmup=True)
    x, y = torch.randn(512, 32), torch.randint(0, 10, (512,))
    for step in range(1, 301):
        idx = torch.randint(0, 512, (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        with torch.no_grad():
            for p, q in zip(model.parameters(), rounded.parameters()):
                q.copy_(p.bfloat16().float())  # what the bf16 module copy holds
        exact.update(model, step)
        approx.update(rounded, step)
    num = sum(float((approx.shadow[k] - exact.shadow[k]).square().sum()) for k in exact.shadow)
    den = sum(float(exact.shadow[k].square().sum()) for k in exact.shadow)
    rel = (num / den) ** 0.5
    print(f"EMA of bf16 copies vs fp32 EMA: relative error {rel:.2e} (bf16 unit roundoff {2**-9:.2e})")
    assert 0 < rel < 2**-9
