"""Bad input: a clear Python exception naming the problem, and running buffers untouched."""
import re

import pytest
import torch

import fastnorm
from fastnorm.functional import batch_norm


def buffers(C=3, dtype=torch.float32, device="cpu"):
    return torch.randn(C, dtype=dtype, device=device), torch.rand(C, dtype=dtype, device=device) + 0.5


def assert_raises_untouched(exc, match, fn, *tensors):
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=match):
        fn()
    for t, b in zip(tensors, before):
        assert torch.equal(t, b), "a failed call changed a buffer"


def test_module_wrong_ndim_is_value_error_like_torch():
    for ours, theirs, x in [
        (fastnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3), torch.randn(2, 3, 4)),
        (fastnorm.BatchNorm1d(3), torch.nn.BatchNorm1d(3), torch.randn(2, 3, 4, 4)),
        (fastnorm.BatchNorm3d(3), torch.nn.BatchNorm3d(3), torch.randn(2, 3, 4, 4)),
    ]:
        with pytest.raises(ValueError) as e_torch:
            theirs(x)
        assert_raises_untouched(ValueError, re.escape(str(e_torch.value)), lambda: ours(x), ours.running_mean, ours.running_var,
                                ours.num_batches_tracked)


def test_one_value_per_channel_in_training():
    bn = fastnorm.BatchNorm1d(3)
    assert_raises_untouched(ValueError, "more than 1 value per channel", lambda: bn(torch.randn(1, 3)),
                            bn.running_mean, bn.running_var, bn.num_batches_tracked)
    rm, rv = buffers()
    assert_raises_untouched(ValueError, "more than 1 value per channel",
                            lambda: batch_norm(torch.randn(1, 3, 1), rm, rv, training=True), rm, rv)
    bn.eval()
    bn(torch.randn(1, 3))  # fine in evaluation


def test_channel_count_mismatch():
    rm, rv = buffers(4)
    assert_raises_untouched(RuntimeError, r"expected running_mean of shape \[3\] \(the input's channel count.*got running_mean of shape \[4\]",
                            lambda: batch_norm(torch.randn(2, 3, 5), rm, rv, training=True), rm, rv)
    bn = fastnorm.BatchNorm2d(4)
    assert_raises_untouched(RuntimeError, r"expected weight of shape \[3\]", lambda: bn(torch.randn(2, 3, 4, 4)),
                            bn.running_mean, bn.running_var, bn.num_batches_tracked)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_input(dtype):
    bn = fastnorm.BatchNorm2d(3)
    x = torch.ones(2, 3, 4, 4, dtype=dtype)
    assert_raises_untouched(RuntimeError, "floating-point input.*" + str(dtype).replace(".", r"\."), lambda: bn(x),
                            bn.running_mean, bn.running_var, bn.num_batches_tracked)


def test_mismatched_parameter_dtypes():
    x = torch.randn(4, 3, dtype=torch.float64)
    rm, rv = buffers()
    assert_raises_untouched(RuntimeError, r"running_mean of dtype torch\.float64.*got running_mean of shape \[3\], "
                            r"dtype torch\.float32", lambda: batch_norm(x, rm, rv, training=True), rm, rv)
    # float16 input: parameters float16 or float32, but one dtype for all of them
    x = torch.randn(4, 3, dtype=torch.float16)
    w = torch.ones(3, dtype=torch.float16)
    assert_raises_untouched(RuntimeError, "must share one dtype",
                            lambda: batch_norm(x, rm, rv, w, None, training=True), rm, rv)


def test_mismatched_devices():
    x = torch.randn(4, 3)
    rm, rv = buffers()
    w = torch.ones(3, device="meta")
    assert_raises_untouched(RuntimeError, "weight on the input's device cpu",
                            lambda: batch_norm(x, rm, rv, w, None, training=True), rm, rv)


def test_residual_and_activation_checks():
    x = torch.randn(4, 3, 5)
    rm, rv = buffers()
    assert_raises_untouched(RuntimeError, r"residual with the input's shape.*got residual of shape \[4, 3, 6\]",
                            lambda: batch_norm(x, rm, rv, training=True, residual=torch.randn(4, 3, 6)), rm, rv)
    assert_raises_untouched(RuntimeError, "residual with the input's shape, dtype",
                            lambda: batch_norm(x, rm, rv, training=True, residual=x.double()), rm, rv)
    assert_raises_untouched(ValueError, "activation must be one of",
                            lambda: batch_norm(x, rm, rv, training=True, activation="tanh"), rm, rv)


def test_evaluation_needs_running_stats():
    with pytest.raises(ValueError, match="running_mean and running_var"):
        batch_norm(torch.randn(4, 3), None, None, training=False)


def test_too_few_dimensions():
    with pytest.raises(RuntimeError, match=r"at least 2 dimensions, got input of shape \[5\]"):
        torch.ops.fastnorm.batch_norm_stats(torch.randn(5))


def test_backward_op_checks_its_inputs():
    x = torch.randn(4, 3, 5)
    mean, var = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"grad_output with the input's shape"):
        torch.ops.fastnorm.batch_norm_backward(torch.randn(4, 3, 4), x, mean, var, None, None, None, None, 1e-5,
                                               True, 0, 0.0, True, False, False)
    with pytest.raises(RuntimeError, match="needs the forward output"):
        torch.ops.fastnorm.batch_norm_backward(torch.randn_like(x), x, mean, var, None, None, None, None, 1e-5,
                                               True, 1, 0.0, True, False, False)
