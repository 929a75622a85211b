"""CUDA-only behaviour (the shared matrix in test_batch_norm.py also runs on CUDA): mixed
devices, unaligned and odd-sized tensors (the scalar paths), many channels, the kernels that
keep a channel on chip, CUDA graphs, concurrent streams, and tensors past 2^31 values."""
import pytest
import torch
import torch.nn.functional as F

import fastnorm
from conftest import FLOAT_DTYPES, assert_close_to_reference
from test_batch_norm import (EPILOGUES, check_epilogue_matches_torch, check_matches_torch,
                             check_module_steps_match_torch, make_input, make_params)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and fastnorm.backends()["cuda"]),
                                reason="needs a GPU and the CUDA kernels")


def compare_train(x, w, b, dtype=torch.float32, residual=None, activation=None):
    """fastnorm on CUDA against torch in float64 on the same values, forward and backward."""
    rm, rv = torch.zeros(x.shape[1], device=x.device), torch.ones(x.shape[1], device=x.device)
    xo = x.detach().clone().requires_grad_()
    out = fastnorm.functional.batch_norm(xo, rm, rv, w, b, training=True, residual=residual, activation=activation)
    g = torch.randn_like(out)
    out.backward(g)
    x64 = x.detach().double().requires_grad_()
    ref = F.batch_norm(x64, None, None, w.double(), b.double(), True)
    if residual is not None:
        ref = ref + residual.double()
    ref = fastnorm.reference.activate(ref, activation)
    ref.backward(g.double())
    assert_close_to_reference(out, ref, dtype, what="output")
    assert_close_to_reference(xo.grad, x64.grad, dtype, what="grad input")
    rv_ref = x.double().transpose(0, 1).reshape(x.shape[1], -1).var(dim=1, unbiased=True) * 0.1 + 0.9
    torch.testing.assert_close(rv.double(), rv_ref, rtol=1e-4, atol=1e-5)


def test_mixed_devices_raise():
    x = torch.randn(4, 3, 5, device="cuda")
    with pytest.raises(RuntimeError, match="weight on the input's device cuda"):
        fastnorm.functional.batch_norm(x, None, None, torch.ones(3), None, training=True)
    rm = torch.zeros(3)
    rv = torch.ones(3)
    with pytest.raises(RuntimeError, match="running_mean on the input's device"):
        fastnorm.functional.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3))


@pytest.mark.parametrize("shape", [(4, 3, 49), (3, 5, 7, 7), (2, 3, 1), (1025, 3), (2, 70000, 3), (5, 13, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_odd_sizes_and_many_channels(shape, layout):
    x = torch.randn(shape, device="cuda") * 3 + 1
    if layout == "channels_last":
        x = x.permute(0, *range(2, x.dim()), 1).contiguous().permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    w, b = torch.randn(shape[1], device="cuda"), torch.randn(shape[1], device="cuda")
    compare_train(x, w, b)


@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (16, 24, 30, 30)], ids=["64 channels", "24 channels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last_with_many_row_splits(shape, dtype):
    """channels_last with the rows in hundreds of splits: each tile's last block merges them."""
    x = (torch.randn(shape, device="cuda") * 2 + 3).to(dtype).to(memory_format=torch.channels_last)
    w, b = torch.rand(shape[1], device="cuda") + 0.5, torch.randn(shape[1], device="cuda")
    compare_train(x, w, b, dtype)


@pytest.mark.parametrize("shape,dtype", [((8, 72, 20, 20), torch.bfloat16), ((8, 40, 20, 20), torch.float32),
                                         ((8, 24, 20, 20), torch.float64), ((8, 40, 20, 20), torch.float16)], ids=str)
def test_channels_last_with_a_partly_filled_last_tile(shape, dtype):
    """Channel tiles read at most 128 bytes of a row: 72 bfloat16 channels are nine 16-byte
    packs, tiles of eight, so the last tile holds one; 40 float32 channels ten packs; float64
    packs of two values."""
    check_matches_torch("cuda", "channels_last", shape, dtype, training=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_tensors_take_the_scalar_path(dtype):
    base = torch.randn(4 * 8 * 33 + 1, device="cuda").to(dtype)
    x = base[1:].view(4, 8, 33)  # storage offset of one element: not 16-byte aligned
    w, b = torch.randn(8, device="cuda"), torch.randn(8, device="cuda")
    r = torch.randn(4 * 8 * 33 + 1, device="cuda").to(dtype)[1:].view(4, 8, 33)
    compare_train(x, w, b, dtype, residual=r, activation="relu")


# Planar shapes whose training forward and backward take the on-chip kernels
# (batch_norm_on_chip.cuh) on current GPUs: planes of at least 64 bytes, a channel's values
# within a block's shared memory, and enough channels for three blocks per multiprocessor.
# Plane sizes: odd (1-value packs), 50 (2-value packs for 16-bit types), 196 (4-value
# packs), 64 (16-byte packs).
ON_CHIP_SHAPES = [(16, 2048, 7, 7), (3, 2048, 5, 13), (8, 2048, 5, 10), (8, 2048, 14, 14), (4, 2048, 64)]


def kernels_launched(fn):
    """The names of the CUDA kernels that fn launches, joined."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.key for e in prof.key_averages())


def train_step(x, **kw):
    """A training forward and backward of fastnorm's batch norm on x (with weight, bias and
    running statistics)."""
    w, b, rm, rv = make_params(x.shape[1], x.dtype, "cuda")
    xr, wr = x.detach().clone().requires_grad_(), w.requires_grad_()
    out = fastnorm.functional.batch_norm(xr, rm, rv, wr, b, training=True, **kw)
    out.backward(torch.randn_like(out))


ON_CHIP_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # float64 takes the reduction


@pytest.mark.parametrize("shape", ON_CHIP_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_on_chip_kernels_are_taken(shape, dtype):
    """The shapes the on-chip tests use do run the on-chip kernels (and few channels, or
    float64, do not)."""
    x = make_input(shape, dtype, "contiguous", "cuda")
    names = kernels_launched(lambda: train_step(x))
    if dtype in ON_CHIP_DTYPES:
        assert "train_on_chip_kernel" in names and "backward_on_chip_kernel" in names, names
    else:
        assert "on_chip" not in names, names
    names = kernels_launched(lambda: train_step(x[:, :16].contiguous()))
    assert "on_chip" not in names and "reduce_planar_kernel" in names, names


@pytest.mark.parametrize("shape", ON_CHIP_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_on_chip_shapes_match_torch(shape, dtype, training):
    check_matches_torch("cuda", "contiguous", shape, dtype, training)


@pytest.mark.parametrize("dtype", ON_CHIP_DTYPES, ids=str)
@pytest.mark.parametrize("activation,slope", EPILOGUES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_on_chip_epilogues_match_torch(dtype, activation, slope, training):
    shape = (8, 2048, 14, 14)
    x = make_input(shape, dtype, "contiguous", "cuda")
    names = kernels_launched(lambda: train_step(x, residual=torch.randn_like(x), activation=activation,
                                                negative_slope=slope))
    assert "train_on_chip_kernel" in names and "backward_on_chip_kernel" in names, names
    check_epilogue_matches_torch("cuda", "contiguous", shape, dtype, activation, slope, training)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_on_chip_unaligned_tensors(dtype):
    """A storage offset of one value: 1-value packs, still on chip."""
    shape = (8, 2048, 8, 8)
    n = 8 * 2048 * 64
    x = (torch.randn(n + 1, device="cuda") * 2 + 0.5).to(dtype)[1:].view(shape)
    w, b = torch.randn(2048, device="cuda"), torch.randn(2048, device="cuda")
    r = torch.randn(n + 1, device="cuda").to(dtype)[1:].view(shape)
    names = kernels_launched(lambda: compare_train(x, w, b, dtype, residual=r, activation="relu"))
    assert "train_on_chip_kernel" in names and "backward_on_chip_kernel" in names, names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_on_chip_slabs_past_48_kib(dtype):
    """64 x 14 x 14 values per channel: 50 KiB in float32 (the opt-in shared memory)."""
    x = make_input((64, 2048, 14, 14), dtype, "contiguous", "cuda")
    names = kernels_launched(lambda: fastnorm.functional.batch_norm(x, None, None, training=True))
    assert "train_on_chip_kernel" in names, names
    check_matches_torch("cuda", "contiguous", (64, 2048, 14, 14), dtype, True)


def test_on_chip_batch_sizes_in_turn():
    """One kernel with different shared-memory sizes in turn (a smaller last batch, then
    the next epoch): each launch within the kernel's limit."""
    for n in (64, 50, 64, 40):
        check_matches_torch("cuda", "contiguous", (n, 2048, 14, 14), torch.float32, True)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_on_chip_module_steps_match_torch(momentum):
    """Running statistics and num_batches_tracked (the last block increments it)."""
    check_module_steps_match_torch("cuda", fastnorm.BatchNorm2d, torch.nn.BatchNorm2d, (4, 2048, 8, 8), momentum,
                                   True, True)


@pytest.mark.parametrize("channels", [16, 2048], ids=["reduce", "on_chip"])
def test_cuda_graph_capture(channels):
    bn = fastnorm.BatchNorm2d(channels, activation="silu").cuda()
    ref = fastnorm.BatchNorm2d(channels, activation="silu").cuda()
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(8, channels, 12, 12, device="cuda", requires_grad=True)
    g = torch.randn(8, channels, 12, 12, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as capture requires
        for _ in range(2):
            bn(x).backward(g)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(2):
        ref(x).backward(g)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        y = bn(x)
        y.backward(g)
    graph.replay()
    torch.cuda.synchronize()
    x_eager = x.detach().clone().requires_grad_()
    y_ref = ref(x_eager)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_eager.grad)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item()


def test_concurrent_streams():
    xs = [torch.randn(16, 32, 20, 20, device="cuda") * (i + 1) for i in range(4)]
    streams = [torch.cuda.Stream() for _ in xs]
    outs = [None] * len(xs)
    torch.cuda.synchronize()
    for i, (x, s) in enumerate(zip(xs, streams)):
        with torch.cuda.stream(s):
            outs[i] = fastnorm.functional.batch_norm(x, None, None, training=True)
    torch.cuda.synchronize()
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out, F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(3, 4, 2**28), (2**31 // 64 + 3, 64)], ids=["planar", "rows"])
def test_more_than_2_pow_31_values(shape):
    """int64 offsets and chunked 32-bit element-wise launches (about 16 GiB of GPU memory)."""
    if torch.cuda.mem_get_info()[0] < 20 * 2**30:
        pytest.skip("needs about 20 GiB of free GPU memory")
    x = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    assert x.numel() > 2**31
    out = fastnorm.functional.batch_norm(x, None, None, training=True)
    for c in range(shape[1]):
        v = out[:, c].float()
        assert abs(v.mean().item()) < 1e-2 and abs(v.var().item() - 1) < 2e-2, c
    assert torch.isfinite(out[-1].float()).all() and out[-1].float().abs().max().item() > 0
