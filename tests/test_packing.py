"""The packed pass's matrix products: what ``nn.Linear`` answers, counted as the products they are."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers.activations import ACT2FN

from teacher_engine import packing
from teacher_engine.packing import Product, fused_activation, linear


def counted(call):
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        result = call()
    return result, counter.get_total_flops()


@pytest.mark.parametrize("bias", [True, False])
def test_the_packed_layers_linear_is_the_modules_and_counted_as_one(bias):
    """The packed pass's matrix kernel answers what ``nn.Linear`` does, within float32 rounding,
    and torch's FLOP counter counts it as the same matrix product."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(48, 80, bias=bias), torch.randn(7, 48)
    got, flops = counted(lambda: linear(layer, x))
    torch.testing.assert_close(got, layer(x).detach(), rtol=1e-5, atol=1e-5)
    assert flops == 2 * 7 * 48 * 80


@pytest.mark.parametrize("biases", [(True, True, True), (False, False, False), (True, False, True)])
def test_a_product_of_linears_side_by_side_is_theirs_and_counted_as_one(biases):
    """Q, K and V as one prepared product: each one's columns are what its module answers."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(48, width, bias=bias) for width, bias in zip((32, 16, 24), biases, strict=True)]
    x = torch.randn(9, 48)
    product = Product.of(*layers)
    got, flops = counted(lambda: product(x))
    for part, layer in zip(got.split(product.sizes, dim=-1), layers, strict=True):
        torch.testing.assert_close(part, layer(x).detach(), rtol=1e-5, atol=1e-5)
    assert product.sizes == (32, 16, 24) and flops == 2 * 9 * 48 * 72


@pytest.mark.parametrize("name", ["gelu", "gelu_new", "relu"])
def test_a_products_activation_and_residual_sum_are_the_layers(name):
    """The activation a product takes (fused into it where oneDNN has it, after it elsewhere) and
    the residual sum fused into a product answer what the layer's modules do; the sum costs no
    counted FLOPs."""
    torch.manual_seed(0)
    layer, x, residual = torch.nn.Linear(48, 64), torch.randn(5, 48), torch.randn(5, 64)
    activation = ACT2FN[name]
    with torch.inference_mode():
        want = activation(layer(x))
    got, flops = counted(lambda: Product.of(layer, activation=activation)(x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    summed, sum_flops = counted(lambda: Product.of(layer).plus(x, residual))
    torch.testing.assert_close(summed, layer(x).detach() + residual, rtol=1e-5, atol=1e-5)
    assert flops == sum_flops == 2 * 5 * 48 * 64


def test_only_the_exact_gelu_is_fused():
    """oneDNN's GELU post-op is the erf one: the tanh approximation must run as itself."""
    assert fused_activation(ACT2FN["gelu"]) == fused_activation(torch.nn.GELU()) == "gelu"
    assert fused_activation(ACT2FN["gelu_new"]) is None
    assert fused_activation(torch.nn.GELU(approximate="tanh")) is None
    assert fused_activation(ACT2FN["relu"]) is None


def test_an_fp32_cpu_product_fuses_its_gelu_and_holds_the_weight_in_onednns_layout():
    """The prepared kernel, where this torch has it: the weight reordered once, the GELU fused
    (no activation left to apply after the product)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("this torch has no oneDNN linear")
    product = Product.of(torch.nn.Linear(8, 8), activation=ACT2FN["gelu"])
    assert product.onednn and product.weight.is_mkldnn
    assert product.fused == "gelu" and product.activation is None


@pytest.mark.parametrize(("rows", "length", "products"), [(3, 9, True), (64, 40, False)])
def test_attention_is_two_products_and_a_softmax_only_where_its_scores_are_small(rows, length, products):
    """Small scores run as matrix products the counter sees; large ones in SDPA, which it does not;
    either way the answer is SDPA's, padded keys given no weight."""
    torch.manual_seed(0)
    heads, size = 4, 8
    q, k, v = (torch.randn(rows, heads, length, size) for _ in range(3))
    bias = torch.zeros(rows, 1, 1, length)
    bias[0, ..., length // 2 :] = torch.finfo(torch.float32).min
    got, flops = counted(lambda: packing.attention(q, k, v, bias))
    torch.testing.assert_close(
        got, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), rtol=1e-5, atol=1e-5
    )
    assert flops == (4 * rows * heads * length * length * size if products else 0)
