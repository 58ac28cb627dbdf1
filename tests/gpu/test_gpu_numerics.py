"""bf16 autocast and channels_last on a real GPU, against the fp32 contiguous reference.

Tolerances (relative L2 errors against fp32 with TF32 off, ResNet-50 at 224 px, batch 16):
- bf16 autocast, eval mode (running statistics): logits within 2%, the whole gradient within 15%;
- bf16 autocast, train mode (batch statistics): the loss within 3%. At random initialisation the
  batch statistics of near-constant channels amplify bf16 rounding, so train-mode logits and
  gradients are not compared element-wise (on a CPU they differed by 17% and 130%, eval mode by
  0.5% and 4%);
- channels_last against contiguous, fp32, eval mode: logits and gradients within 0.1%.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import NEEDS_GPU

from distrain.config import from_dict
from distrain.engine.build import build_model
from distrain.parallel.setup import has_native_bf16

pytestmark = NEEDS_GPU


@pytest.fixture(autouse=True)
def exact_fp32():
    """The fp32 reference in true fp32: cuDNN would otherwise use TF32 on Ampere and newer."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def resnet50(channels_last: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = from_dict({"model": {"name": "resnet50", "channels_last": channels_last}})
    return build_model(cfg, 100).cuda()  # as the loop builds it


def forward_backward(model: torch.nn.Module, images, labels, train: bool, bf16: bool):
    model = copy.deepcopy(model).train(train)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        logits = model(images)
    if bf16:
        assert logits.dtype == torch.bfloat16  # autocast really ran the model in bf16
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    return logits.float(), loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def data():
    g = torch.Generator(device="cuda").manual_seed(1)
    images = torch.randn(16, 3, 224, 224, device="cuda", generator=g)
    labels = torch.randint(0, 100, (16,), device="cuda", generator=g)
    return images, labels


@pytest.mark.skipif(torch.cuda.is_available() and not has_native_bf16(torch.device("cuda")),
                    reason="this GPU has no native bf16 (precision auto picks fp16 here)")
def test_bf16_autocast_matches_fp32_within_tolerance():
    model, (images, labels) = resnet50(), data()
    ref_logits, _, ref_grad = forward_backward(model, images, labels, train=False, bf16=False)
    logits, _, grad = forward_backward(model, images, labels, train=False, bf16=True)
    _, ref_loss, _ = forward_backward(model, images, labels, train=True, bf16=False)
    _, loss, _ = forward_backward(model, images, labels, train=True, bf16=True)
    figures = {"eval logits": rel(logits, ref_logits), "eval gradient": rel(grad, ref_grad),
               "train loss": abs(loss - ref_loss) / ref_loss}
    print("\nbf16 vs fp32, relative error: " + ", ".join(f"{k} {v:.2%}" for k, v in figures.items()))
    assert figures["eval logits"] < 0.02 and figures["eval gradient"] < 0.15 and figures["train loss"] < 0.03


def test_channels_last_matches_contiguous():
    nhwc, nchw = resnet50(channels_last=True), resnet50()
    convs = [m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    images, labels = data()
    # Eval mode: the kernels' numerics, without the amplification of train-mode batch statistics.
    logits, _, grad = forward_backward(nhwc, images.contiguous(memory_format=torch.channels_last), labels, False, False)
    ref_logits, _, ref_grad = forward_backward(nchw, images, labels, False, False)
    print(f"\nchannels_last vs contiguous, relative error: logits {rel(logits, ref_logits):.2e}, "
          f"gradient {rel(grad, ref_grad):.2e}")
    assert rel(logits, ref_logits) < 1e-3 and rel(grad, ref_grad) < 1e-3
