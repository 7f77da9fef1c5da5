"""Framework integration without a GPU: torch.library custom ops (schemas, fake shapes, tracing
by make_fx and torch.compile(fullgraph=True)), out= / lse= argument checks, check_inputs
argument checks, and the framework-neutral flash_mla.ops (sizes, streams, NumPy arrays, no
torch import).

Runs everywhere: tracing uses fake tensors (no kernel runs), and every real call is expected to
stop at the CUDA-device check with a ValueError.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flash_mla
from flash_mla import flash_mla_with_kvcache, get_mla_metadata, ops

from conftest import PAGE_SIZES, cpu_decode_args  # noqa: E402  (tests/python is on sys.path)

D, DV, PAGE = 576, 512, 64
CUDA = r"(?i)cuda"
BF16 = torch.bfloat16


ORDER = ("q", "k_cache", "block_table", "cache_seqlens", "head_dim_v", "tile_scheduler_metadata", "num_splits")


def call(args, **kwargs):
    return flash_mla_with_kvcache(*(args[n] for n in ORDER), **kwargs)


# ----------------------------------------------------------------------------------------------
# custom ops: registration and schemas
# ----------------------------------------------------------------------------------------------


def test_custom_ops_registered():
    for name in ("get_mla_metadata", "mla_decode", "mla_decode_out"):
        assert hasattr(torch.ops.flash_mla, name), name


def _mutated_args(op):
    return {a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def test_custom_op_schemas_declare_mutation():
    assert _mutated_args(torch.ops.flash_mla.mla_decode_out) == {"out", "lse"}
    assert _mutated_args(torch.ops.flash_mla.mla_decode) == set()
    assert _mutated_args(torch.ops.flash_mla.get_mla_metadata) == set()


# ----------------------------------------------------------------------------------------------
# fake tensors: output shapes, dtypes, devices
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b, s_q, h_q, h_kv", [(3, 2, 16, 2), (1, 1, 128, 1), (0, 4, 8, 8), (5, 1, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fake_tensor_shapes(b, s_q, h_q, h_kv, dtype):
    with FakeTensorMode():
        q = torch.empty((b, s_q, h_q, D), dtype=dtype, device="cuda")
        k = torch.empty((7, PAGE, h_kv, D), dtype=dtype, device="cuda")
        bt = torch.empty((b, 3), dtype=torch.int32, device="cuda")
        sl = torch.empty((b,), dtype=torch.int32, device="cuda")
        meta, splits = get_mla_metadata(sl, s_q * h_q // h_kv, h_kv)
        assert meta.dim() == 2 and meta.shape[1] == 8 and meta.shape[0] >= 1
        assert tuple(splits.shape) == (b + 1,)
        assert meta.dtype == splits.dtype == torch.int32 and meta.device.type == "cuda"
        out, lse = flash_mla_with_kvcache(q, k, bt, sl, DV, meta, splits, causal=True)
        assert tuple(out.shape) == (b, s_q, h_q, DV) and out.dtype == dtype and out.device.type == "cuda"
        assert tuple(lse.shape) == (b, h_q, s_q) and lse.dtype == torch.float32
        assert out.is_contiguous() and lse.is_contiguous()
        # preallocated outputs are returned as given
        o2, l2 = torch.empty_like(out), torch.empty_like(lse)
        r_out, r_lse = flash_mla_with_kvcache(q, k, bt, sl, DV, meta, splits, out=o2, lse=l2)
        assert r_out is o2 and r_lse is l2
        # one of them preallocated
        r_out, r_lse = flash_mla_with_kvcache(q, k, bt, sl, DV, meta, splits, lse=l2)
        assert r_lse is l2 and tuple(r_out.shape) == (b, s_q, h_q, DV)
        # the later-FlashMLA scheduler object
        sched, _ = get_mla_metadata()
        out, lse = flash_mla_with_kvcache(q, k, bt, sl, DV, sched, None, causal=True)
        assert tuple(out.shape) == (b, s_q, h_q, DV) and sched.config is not None


@pytest.mark.parametrize("page", PAGE_SIZES, ids=[f"page{p}" for p in PAGE_SIZES])
def test_fake_tensor_shapes_page_sizes(page):
    """Caches of every page size trace under FakeTensorMode (the custom ops' fake path and the
    scheduler object's planning); the outputs do not depend on the page size."""
    with FakeTensorMode():
        b, s_q, h_q, h_kv = 3, 2, 16, 1
        q = torch.empty((b, s_q, h_q, D), dtype=BF16, device="cuda")
        k = torch.empty((9, page, h_kv, D), dtype=BF16, device="cuda")
        bt = torch.empty((b, 5), dtype=torch.int32, device="cuda")
        sl = torch.empty((b,), dtype=torch.int32, device="cuda")
        meta, splits = get_mla_metadata(sl, s_q * h_q // h_kv, h_kv)
        out, lse = flash_mla_with_kvcache(q, k, bt, sl, DV, meta, splits, causal=True)
        assert tuple(out.shape) == (b, s_q, h_q, DV) and tuple(lse.shape) == (b, h_q, s_q)
        sched, _ = get_mla_metadata()
        out, lse = flash_mla_with_kvcache(q, k, bt, sl, DV, sched, None, causal=True)
        assert tuple(out.shape) == (b, s_q, h_q, DV) and sched.config is not None


def test_meta_device_shapes():
    q = torch.empty((2, 1, 16, D), dtype=BF16, device="meta")
    k = torch.empty((4, PAGE, 1, D), dtype=BF16, device="meta")
    i32 = dict(dtype=torch.int32, device="meta")
    out, lse = torch.ops.flash_mla.mla_decode(q, k, torch.empty((2, 2), **i32), torch.empty((2,), **i32), DV,
                                              torch.empty((4, 8), **i32), torch.empty((3,), **i32), 0.1, True, 0)
    assert out.device.type == "meta" and tuple(out.shape) == (2, 1, 16, DV) and tuple(lse.shape) == (2, 16, 1)


def test_fake_rejects_mixed_devices():
    args = cpu_decode_args()
    args["q"] = args["q"].to("meta")
    with pytest.raises(ValueError, match="k_cache"):
        call(args)


# ----------------------------------------------------------------------------------------------
# tracing: make_fx and torch.compile(fullgraph=True) see the custom ops, not graph breaks
# ----------------------------------------------------------------------------------------------


def step(q, k, bt, sl, out, lse):
    """A decoding step as a model would write it: plan once, two layers, one into out=/lse=."""
    meta, splits = get_mla_metadata(sl, q.shape[1] * q.shape[2] // k.shape[2], k.shape[2])
    o1, l1 = flash_mla_with_kvcache(q, k, bt, sl, DV, meta, splits, causal=True)
    o2, l2 = flash_mla_with_kvcache(q, k, bt, sl, DV, meta, splits, causal=True, out=out, lse=lse)
    return o1 + o2, l1, l2


def step_inputs(b=2, s_q=2, h_q=16, h_kv=1):
    return (torch.zeros((b, s_q, h_q, D), dtype=BF16), torch.zeros((4, PAGE, h_kv, D), dtype=BF16),
            torch.zeros((b, 2), dtype=torch.int32), torch.full((b,), 70, dtype=torch.int32),
            torch.empty((b, s_q, h_q, DV), dtype=BF16), torch.empty((b, h_q, s_q), dtype=torch.float32))


def _op_targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "flash_mla" in str(n.target)]


def test_make_fx_traces_custom_ops():
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(step, tracing_mode="fake")(*step_inputs())
    assert _op_targets(gm) == ["flash_mla.get_mla_metadata.default", "flash_mla.mla_decode.default",
                               "flash_mla.mla_decode_out.default"]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_single_graph(dynamic):
    """fullgraph=True fails on any graph break; the recording backend shows the single graph
    holds the three custom ops. Running it then hits the real op with CPU tensors."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=dynamic)
    with pytest.raises(ValueError, match=CUDA):
        compiled(*step_inputs())
    assert len(graphs) == 1
    assert _op_targets(graphs[0]) == ["flash_mla.get_mla_metadata.default", "flash_mla.mla_decode.default",
                                      "flash_mla.mla_decode_out.default"]
    torch._dynamo.reset()


def test_compile_aot_eager_traces_mutating_op():
    """AOT autograd functionalises mla_decode_out (out/lse mutation) at compile time; the
    compiled function then runs the real op, which rejects the CPU tensors."""
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match=CUDA):
        compiled(*step_inputs())
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# out= / lse= checks (in the compiled module; shapes before devices)
# ----------------------------------------------------------------------------------------------


def _out(shape=(2, 1, 16, DV), dtype=BF16):
    return torch.empty(shape, dtype=dtype)


def _lse(shape=(2, 16, 1), dtype=torch.float32):
    return torch.empty(shape, dtype=dtype)


BAD_OUTPUTS = {
    "out_dtype_fp16": (dict(out=_out(dtype=torch.float16), lse=_lse()), TypeError, "out"),
    "out_dtype_f32": (dict(out=_out(dtype=torch.float32)), TypeError, "out"),
    "out_rank3": (dict(out=_out((2, 16, DV))), ValueError, "out"),
    "out_batch": (dict(out=_out((3, 1, 16, DV))), ValueError, "out"),
    "out_s_q": (dict(out=_out((2, 2, 16, DV))), ValueError, "out"),
    "out_h_q": (dict(out=_out((2, 1, 8, DV))), ValueError, "out"),
    "out_dv576": (dict(out=_out((2, 1, 16, D))), ValueError, "out"),
    "out_noncontiguous": (dict(out=torch.empty((16, 2, 1, DV), dtype=BF16).permute(1, 2, 0, 3)), ValueError,
                          "out"),
    "out_misaligned": (dict(out=torch.empty(2 * 16 * DV + 1, dtype=BF16)[1:].view(2, 1, 16, DV)), ValueError,
                       "out"),
    "out_not_tensor": (dict(out=np.zeros((2, 1, 16, DV), np.float16)), TypeError, "out"),
    "lse_dtype_bf16": (dict(lse=_lse(dtype=BF16)), TypeError, "lse"),
    "lse_shape_bsh": (dict(lse=_lse((2, 1, 16))), ValueError, "lse"),
    "lse_rank2": (dict(lse=_lse((2, 16))), ValueError, "lse"),
    "lse_noncontiguous": (dict(lse=torch.empty((16, 2, 1)).permute(1, 0, 2)), ValueError, "lse"),
    "lse_not_tensor": (dict(lse=[0.0]), TypeError, "lse"),
}


@pytest.mark.parametrize("outputs, exc, name", list(BAD_OUTPUTS.values()), ids=list(BAD_OUTPUTS))
def test_bad_preallocated_outputs(outputs, exc, name):
    with pytest.raises(exc, match=name) as info:
        call(cpu_decode_args(), **outputs)
    assert not re.search(CUDA, str(info.value)), str(info.value)


@pytest.mark.parametrize("which", ["both", "out", "lse"])
def test_good_preallocated_outputs_reach_device_check(which):
    outputs = {"both": dict(out=_out(), lse=_lse()), "out": dict(out=_out()), "lse": dict(lse=_lse())}[which]
    with pytest.raises(ValueError, match=CUDA):
        call(cpu_decode_args(), **outputs)


def test_out_with_q_of_wrong_rank():
    args = cpu_decode_args()
    args["q"] = torch.zeros((2, 16, D), dtype=BF16)
    with pytest.raises(ValueError, match="q"):
        call(args, lse=_lse())


# ----------------------------------------------------------------------------------------------
# check_inputs: argument checks first, then it needs the GPU
# ----------------------------------------------------------------------------------------------


def test_check_inputs_cpu_reaches_device_check():
    with pytest.raises(ValueError, match=CUDA):
        call(cpu_decode_args(), check_inputs=True)


def test_check_inputs_shape_errors_first():
    args = cpu_decode_args()
    args["block_table"] = torch.zeros((3, 2), dtype=torch.int32)
    with pytest.raises(ValueError, match="block_table") as info:
        call(args, check_inputs=True)
    assert not re.search(CUDA, str(info.value))


def test_non_tensor_inputs_point_to_ops():
    args = cpu_decode_args()
    args["q"] = np.zeros((2, 1, 16, D), np.float16)
    with pytest.raises(TypeError, match=r"q: .*flash_mla\.ops"):
        call(args)
    with pytest.raises(TypeError, match="cache_seqlens"):
        get_mla_metadata(np.zeros((2,), np.int32), 16, 1)


def test_huge_softmax_scale_is_value_error():
    with pytest.raises(ValueError, match="softmax_scale"):
        call(cpu_decode_args(), softmax_scale=10 ** 400)


# ----------------------------------------------------------------------------------------------
# flash_mla.ops
# ----------------------------------------------------------------------------------------------


def test_workspace_shapes():
    shapes = ops.workspace_shapes(4, 2, 128, 1, 66)
    assert shapes == {
        "tile_scheduler_metadata": (66, 8),
        "num_splits": (5,),
        "out": (4, 2, 128, DV),
        "lse": (4, 128, 2),
        "o_accum": (4 + 66, 256, DV),
        "lse_accum": (4 + 66, 256),
    }
    assert set(ops.DTYPES) >= set(shapes)
    assert ops.workspace_shapes(0, 1, 16, 1, 1)["num_splits"] == (1,)


@pytest.mark.parametrize("args, exc", [
    ((-1, 1, 16, 1, 4), ValueError), ((2, 0, 16, 1, 4), ValueError), ((2, 1, 0, 1, 4), ValueError),
    ((2, 1, 16, 3, 4), ValueError), ((2, 1, 16, 1, 0), ValueError), ((2, 1, 16, 1, 65536), ValueError),
    ((2.0, 1, 16, 1, 4), TypeError), ((2, True, 16, 1, 4), TypeError), ((2, 1, "16", 1, 4), TypeError),
    ((2, 1, 16, None, 4), TypeError), ((2 ** 40, 1, 16, 1, 4), ValueError),
], ids=["neg_batch", "s_q0", "h_q0", "h_q_not_multiple", "parts0", "parts_big", "float", "bool", "str", "none",
        "huge_batch"])
def test_workspace_shapes_rejects(args, exc):
    with pytest.raises(exc):
        ops.workspace_shapes(*args)


def test_num_sm_parts_matches_metadata_rows():
    # Same rule as the scheduler: num_sms // (h_kv * ceil(rows / 64)), at least 1.
    assert ops.num_sm_parts(1, 128, 1, num_sms=132) == 66
    assert ops.num_sm_parts(1, 16, 1, num_sms=132) == 132
    assert ops.num_sm_parts(2, 64, 8, num_sms=132) == 16
    assert ops.num_sm_parts(8, 128, 1, num_sms=132) == 132 // 16
    assert ops.num_sm_parts(8, 128, 1, num_sms=3) == 1
    with pytest.raises(ValueError):
        ops.num_sm_parts(1, 16, 3, num_sms=132)
    with pytest.raises(ValueError):
        ops.num_sm_parts(1, 16, 1, num_sms=0)


class _ProtoStream:
    def __init__(self, handle, callable_=True):
        self.handle, self.callable_ = handle, callable_

    def __cuda_stream__(self):
        return (0, self.handle)


class _PtrStream:
    ptr = 1234


class _TorchLikeStream:
    cuda_stream = 99


def test_stream_handles():
    assert ops.stream_handle(None) == 0
    assert ops.stream_handle(0) == 0
    assert ops.stream_handle(2 ** 63) == 2 ** 63
    assert ops.stream_handle(_ProtoStream(77)) == 77
    assert ops.stream_handle(_PtrStream()) == 1234
    assert ops.stream_handle(_TorchLikeStream()) == 99
    assert ops.stream_handle(np.int64(5)) == 5
    for bad, exc in ((-1, ValueError), (2 ** 64, ValueError), (True, TypeError), (1.5, TypeError),
                     ("0", TypeError), (object(), TypeError), (_ProtoStream(-3), ValueError),
                     (_ProtoStream("x"), TypeError)):
        with pytest.raises(exc):
            ops.stream_handle(bad)


def _ops_arrays(np_arrays=True):
    args = cpu_decode_args(dtype=torch.float16)
    shapes = ops.workspace_shapes(2, 1, 16, 1, 4)
    arrays = [args[n] for n in ("q", "k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata",
                                "num_splits")]
    outs = [torch.empty(shapes["out"], dtype=torch.float16), torch.empty(shapes["lse"]),
            torch.empty(shapes["o_accum"]), torch.empty(shapes["lse_accum"])]
    if np_arrays:
        arrays = [a.numpy() for a in arrays]
        outs = [o.numpy() for o in outs]
    return arrays + outs


@pytest.mark.parametrize("np_arrays", [True, False], ids=["numpy", "torch"])
def test_ops_decode_cpu_arrays_reach_device_check(np_arrays):
    with pytest.raises(ValueError, match=CUDA):
        ops.mla_decode(*_ops_arrays(np_arrays), causal=True, stream=0)


def test_ops_decode_read_only_output():
    arrays = _ops_arrays()
    arrays[6].flags.writeable = False
    with pytest.raises(TypeError, match="out: the array is read-only"):
        ops.mla_decode(*arrays)


def test_ops_decode_read_only_inputs_accepted():
    arrays = _ops_arrays()
    for a in arrays[:6]:
        a.flags.writeable = False
    with pytest.raises(ValueError, match=CUDA):
        ops.mla_decode(*arrays)


class _FakeJaxArray:
    """Stands in for a jax.Array: only its module name matters to the immutability check."""


_FakeJaxArray.__module__ = "jaxlib.xla_extension"


@pytest.mark.parametrize("index, name", [(6, "out"), (7, "lse"), (8, "o_accum"), (9, "lse_accum")])
def test_ops_decode_rejects_jax_outputs(index, name):
    arrays = _ops_arrays()
    arrays[index] = _FakeJaxArray()
    with pytest.raises(TypeError, match=f"{name}: JAX arrays are immutable"):
        ops.mla_decode(*arrays)


def test_ops_metadata_and_check_cpu():
    sl = np.zeros((3,), np.int32)
    with pytest.raises(ValueError, match=CUDA):
        ops.get_mla_metadata(sl, np.zeros((4, 8), np.int32), np.zeros((4,), np.int32))
    with pytest.raises(ValueError, match="num_splits"):
        ops.get_mla_metadata(sl, np.zeros((4, 8), np.int32), np.zeros((3,), np.int32))
    with pytest.raises(ValueError, match=CUDA):
        ops.check_paged_inputs(np.zeros((3, 2), np.int32), sl, 10, np.zeros((8,), np.int64))
    with pytest.raises(TypeError, match="result"):
        ops.check_paged_inputs(np.zeros((3, 2), np.int32), sl, 10, np.zeros((8,), np.int32))
    with pytest.raises(ValueError, match="result"):
        ops.check_paged_inputs(np.zeros((3, 2), np.int32), sl, 10, np.zeros((7,), np.int64))
    with pytest.raises(ValueError, match="num_blocks"):
        ops.check_paged_inputs(np.zeros((3, 2), np.int32), sl, -1, np.zeros((8,), np.int64))


def test_input_check_error_messages():
    assert ops.input_check_error([0] * 8) is None
    msg = ops.input_check_error([1, 3, -1, 5000, 1, 0, 0, 0], num_blocks=10, max_blocks_per_seq=4)
    assert "cache_seqlens[3] = 5000" in msg and "256" in msg
    msg = ops.input_check_error([2, 1, 2, -7, 4, 0, 0, 0], num_blocks=10, max_blocks_per_seq=4)
    assert "block_table[1, 2] = -7" in msg and "num_blocks = 10" in msg and "4 invalid" in msg


def test_ops_has_no_torch_dependency():
    """import flash_mla.ops (and the package) with torch made unimportable."""
    code = textwrap.dedent("""
        import sys
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked for this test")
                return None
        sys.meta_path.insert(0, _NoTorch())
        import flash_mla
        from flash_mla import ops
        assert "torch" not in sys.modules
        assert ops.workspace_shapes(2, 1, 16, 1, 4)["o_accum"] == (6, 16, 512)
        assert ops.num_sm_parts(1, 128, 1, num_sms=132) == 66
        import numpy as np
        try:
            ops.mla_decode(np.zeros((2, 1, 16, 576), np.float16), np.zeros((4, 64, 1, 576), np.float16),
                           np.zeros((2, 2), np.int32), np.zeros((2,), np.int32), np.zeros((4, 8), np.int32),
                           np.zeros((3,), np.int32), np.zeros((2, 1, 16, 512), np.float16),
                           np.zeros((2, 16, 1), np.float32), np.zeros((6, 16, 512), np.float32),
                           np.zeros((6, 16), np.float32))
        except ValueError as exc:
            assert "CUDA" in str(exc), exc
        else:
            raise AssertionError("expected the device check to fail")
        try:
            flash_mla.flash_mla_with_kvcache
        except ImportError:
            pass
        else:
            raise AssertionError("the torch API should need torch")
        assert "torch" not in sys.modules
        print("ok")
    """)
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout


def test_lazy_torch_api_attributes():
    assert callable(flash_mla.flash_mla_with_kvcache)
    assert flash_mla.ops is ops
    assert "flash_mla_with_kvcache" in dir(flash_mla)
    with pytest.raises(AttributeError):
        flash_mla.no_such_name  # noqa: B018


# ----------------------------------------------------------------------------------------------
# the custom ops end to end on the CPU, with the reference standing in for the kernels
# ----------------------------------------------------------------------------------------------


class _ReferenceKernels:
    """flash_mla._C as the torch layer sees it, with the launches replaced by CPU stand-ins
    (host plan, torch reference): lets opcheck, torch.compile and the direct eager path run for
    real without a GPU. Everything else (argument checks of the compiled module, sizes) is the
    real module's."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def _plan(self, cache_seqlens, meta, splits):
        rows, nsplits = self._real.host_plan([int(x) for x in cache_seqlens.tolist()], meta.shape[0])
        meta.copy_(torch.tensor(rows, dtype=torch.int32).reshape(meta.shape))
        splits.copy_(torch.tensor(nsplits, dtype=torch.int32))

    def torch_get_mla_metadata(self, cache_seqlens, rows, heads_kv, prepare):
        if type(cache_seqlens) is not torch.Tensor:
            return None
        assert cache_seqlens.dtype == torch.int32 and cache_seqlens.dim() == 1
        parts = self._real.num_sm_parts(132, rows, heads_kv)  # also the positivity checks
        meta, splits, stream = prepare(cache_seqlens, parts, cache_seqlens.shape[0], -1)
        assert stream == 0
        self._plan(cache_seqlens, meta, splits)
        return meta, splits

    def _reference(self, q, k_cache, block_table, cache_seqlens, head_dim_v, out, lse, scale, causal,
                   descale_q=None, descale_k=None):
        from flash_mla.reference import mla_decode_reference

        # FP8 inputs: the reference runs on their dequantized values.
        if descale_q is not None:
            q = q.to(torch.float32) * descale_q
        if descale_k is not None:
            k_cache = k_cache.to(torch.float32) * descale_k
        ref_out, ref_lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, scale, causal)
        out.copy_(ref_out.to(out.dtype))
        lse.copy_(ref_lse)

    def torch_decode(self, q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, out, lse, scale, causal,
                     kernel, prepare, descale_q=None, descale_k=None):
        """The real module's checks (all but the device's), then prepare() as the real entry
        calls it, then the reference in place of the kernels."""
        b, s_q, h_q, _, ws = self._real.torch_check_decode(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                                           meta, splits, scale, check_device=False,
                                                           descale_q=descale_q, descale_k=descale_k)
        given_out, given_lse = out, lse
        out, lse, workspace, stream = prepare(q, out, lse, b, s_q, h_q, ws, -1)
        assert stream == 0 and workspace.numel() == ws * s_q * h_q * (DV + 1)
        assert (given_out is None or out is given_out) and (given_lse is None or lse is given_lse)
        self._reference(q, k_cache, block_table, cache_seqlens, head_dim_v, out, lse, scale, causal, descale_q,
                        descale_k)
        return out, lse


@pytest.fixture
def reference_kernels(monkeypatch):
    from flash_mla import _torch_ops

    monkeypatch.setattr(_torch_ops, "_C", _ReferenceKernels(_torch_ops._C))
    monkeypatch.setattr(_torch_ops, "num_sms", lambda index: 132)
    monkeypatch.setattr(_torch_ops, "_fake_num_sms", lambda device: 132)
    monkeypatch.setattr(_torch_ops, "stream_of", lambda device: 0)
    monkeypatch.setattr(_torch_ops, "current_stream_handle", lambda index: 0)


def _cpu_case(b=3, s_q=2, h_q=16, h_kv=1, lengths=(70, 0, 130), seed=0, page=PAGE, k_layout="contiguous"):
    from conftest import build_paged_case

    return build_paged_case(b, s_q, h_q, h_kv, list(lengths), torch.bfloat16, seed=seed, device="cpu",
                            q_layout="head_pad", page=page, k_layout=k_layout)


def test_opcheck_with_reference_kernels(reference_kernels):
    case = _cpu_case()
    meta, splits = get_mla_metadata(case.cache_seqlens, case.rows_per_kv_head, case.h_kv)
    assert tuple(meta.shape) == (132, 8) and tuple(splits.shape) == (case.b + 1,)
    torch.library.opcheck(torch.ops.flash_mla.get_mla_metadata.default,
                          (case.cache_seqlens, case.rows_per_kv_head, case.h_kv))
    scale = 1.0 / math.sqrt(D)
    args = (case.q, case.k_cache, case.block_table, case.cache_seqlens, DV, meta, splits, scale, True, 0)
    torch.library.opcheck(torch.ops.flash_mla.mla_decode.default, args)
    out = torch.empty((case.b, case.s_q, case.h_q, DV), dtype=BF16)
    lse = torch.empty((case.b, case.h_q, case.s_q))
    args = (case.q, case.k_cache, case.block_table, case.cache_seqlens, DV, meta, splits, out, lse, scale, True, 0)
    torch.library.opcheck(torch.ops.flash_mla.mla_decode_out.default, args)


@pytest.mark.parametrize("backend, dynamic", [("eager", False), ("aot_eager", False), ("aot_eager", True)],
                         ids=["eager", "aot_eager", "aot_eager-dynamic"])
def test_compile_runs_with_reference_kernels(backend, dynamic, reference_kernels):
    """The compiled step computes what eager computes, and out= / lse= buffers get written
    (functionalised mutation copied back), across two batch sizes."""
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=dynamic)
    for b, lengths in ((3, (70, 0, 130)), (5, (1, 64, 65, 300, 2))):
        case = _cpu_case(b=b, lengths=lengths, seed=b)
        args = (case.q, case.k_cache, case.block_table, case.cache_seqlens)
        out_e, lse_e = (torch.full((b, 2, 16, DV), math.nan, dtype=BF16), torch.full((b, 16, 2), math.nan))
        out_c, lse_c = (torch.full((b, 2, 16, DV), math.nan, dtype=BF16), torch.full((b, 16, 2), math.nan))
        eager = step(*args, out_e, lse_e)
        got = compiled(*args, out_c, lse_c)
        assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e), "out= / lse= buffers"
        assert not torch.isnan(out_c.float()).any()
        for g, e in zip(got, eager):
            assert torch.equal(g, e)
    torch._dynamo.reset()


@pytest.mark.parametrize("page", PAGE_SIZES, ids=[f"page{p}" for p in PAGE_SIZES])
def test_page_sizes_with_reference_kernels(page, reference_kernels, monkeypatch):
    """A cache of `page`-token pages through the real argument checks of both paths (direct and
    custom op), the reference standing in for the kernels: the results are the reference's,
    out= / lse= written in place; with the scheduler object and under torch.compile too."""
    from flash_mla import _torch_ops
    from flash_mla.reference import mla_decode_reference

    lengths = (0, 1, page - 1, page + 1, 3 * page + 5, 200)
    case = _cpu_case(b=len(lengths), lengths=lengths, seed=page, page=page, k_layout="page_pad")
    assert case.k_cache.shape[1] == page
    ref_out, ref_lse = mla_decode_reference(case.q, case.k_cache, case.block_table, case.cache_seqlens, DV,
                                            None, True)
    ref_out = ref_out.to(BF16)
    meta, splits = get_mla_metadata(case.cache_seqlens, case.rows_per_kv_head, case.h_kv)
    args = (case.q, case.k_cache, case.block_table, case.cache_seqlens, DV, meta, splits)
    for direct in (True, False):
        monkeypatch.setattr(_torch_ops, "DIRECT_EAGER", direct)
        out, lse = flash_mla_with_kvcache(*args, causal=True)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse), f"direct={direct}"
        o2, l2 = torch.full_like(out, math.nan), torch.full_like(lse, math.nan)
        r_out, r_lse = flash_mla_with_kvcache(*args, causal=True, out=o2, lse=l2)
        assert r_out is o2 and r_lse is l2 and torch.equal(o2, ref_out) and torch.equal(l2, ref_lse)
        sched, _ = get_mla_metadata()
        out, lse = flash_mla_with_kvcache(*args[:5], sched, None, causal=True)
        assert torch.equal(out, ref_out) and sched.config is not None
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    o_buf = torch.full((case.b, case.s_q, case.h_q, DV), math.nan, dtype=BF16)
    l_buf = torch.full((case.b, case.h_q, case.s_q), math.nan)
    total, l1, l2 = compiled(case.q, case.k_cache, case.block_table, case.cache_seqlens, o_buf, l_buf)
    assert torch.equal(o_buf, ref_out) and torch.equal(l1, ref_lse) and torch.equal(l2, ref_lse)
    torch._dynamo.reset()


def test_sched_object_with_reference_kernels(reference_kernels):
    case = _cpu_case()
    sched, _ = get_mla_metadata()
    out1, lse1 = flash_mla_with_kvcache(case.q, case.k_cache, case.block_table, case.cache_seqlens, DV, sched,
                                        None, causal=True)
    meta = sched.tile_scheduler_metadata
    out2, lse2 = flash_mla_with_kvcache(case.q, case.k_cache, case.block_table, case.cache_seqlens, DV, sched,
                                        None, causal=True)
    assert sched.tile_scheduler_metadata is meta
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


def test_compiled_module_before_torch_imports_cleanly():
    """Importing flash_mla._C before torch once crashed torch's import (the module exported the
    symbols of its static libstdc++/cudart): both orders must import and exit cleanly."""
    import subprocess
    import sys

    for code in ("import flash_mla._C; import torch; print('ok')",
                 "import flash_mla.ops; import torch; import flash_mla; flash_mla.get_mla_metadata(); print('ok')"):
        proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (code, proc.returncode, proc.stdout[-2000:])


# ----------------------------------------------------------------------------------------------
# which path a call takes: direct into the compiled module when eager, custom ops when traced
# ----------------------------------------------------------------------------------------------


class _CustomOpCalled(Exception):
    pass


@pytest.fixture
def custom_ops_refuse(monkeypatch):
    """The custom ops as seen by flash_mla.interface, replaced by functions that raise."""
    from flash_mla import _torch_ops

    def refuse(*args, **kwargs):
        raise _CustomOpCalled()

    for name in ("mla_decode", "mla_decode_out", "get_mla_metadata"):
        monkeypatch.setattr(_torch_ops, name, refuse)


@pytest.mark.parametrize("outputs", ["none", "out", "lse", "both"])
def test_eager_calls_bypass_custom_ops(custom_ops_refuse, outputs):
    """Plain eager calls go straight to the compiled module (which rejects the CPU tensors after
    every other check); the custom ops are not called."""
    kwargs = {"none": {}, "out": dict(out=_out()), "lse": dict(lse=_lse()),
              "both": dict(out=_out(), lse=_lse())}[outputs]
    with pytest.raises(ValueError, match=CUDA):
        call(cpu_decode_args(), **kwargs)
    with pytest.raises(ValueError, match=CUDA):
        get_mla_metadata(torch.zeros((2,), dtype=torch.int32), 16, 1)


def test_sched_object_eager_bypasses_custom_ops(custom_ops_refuse):
    args = cpu_decode_args()
    args["tile_scheduler_metadata"], args["num_splits"] = get_mla_metadata()
    with pytest.raises(ValueError, match=CUDA):
        call(args)


def test_custom_op_switch(custom_ops_refuse, monkeypatch):
    from flash_mla import _torch_ops

    monkeypatch.setattr(_torch_ops, "DIRECT_EAGER", False)
    with pytest.raises(_CustomOpCalled):
        call(cpu_decode_args())
    with pytest.raises(_CustomOpCalled):
        call(cpu_decode_args(), out=_out(), lse=_lse())
    with pytest.raises(_CustomOpCalled):
        get_mla_metadata(torch.zeros((2,), dtype=torch.int32), 16, 1)


def test_custom_op_switch_environment():
    code = ("import torch, flash_mla\n"
            "from flash_mla import _torch_ops\n"
            "flash_mla.get_mla_metadata()\n"
            "print(_torch_ops.DIRECT_EAGER)\n")
    for value, expected in (("1", "False"), ("0", "True"), ("", "True")):
        env = dict(os.environ, FLASH_MLA_CUSTOM_OP_ONLY=value)
        proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0 and proc.stdout.strip().endswith(expected), (value, proc.stdout[-2000:])


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("name", ["q", "k_cache", "block_table", "num_splits"])
def test_tensor_subclasses_take_custom_op_path(custom_ops_refuse, name):
    """A tensor subclass may define __torch_function__ / __torch_dispatch__: the compiled module
    hands such calls back to the custom ops (which dispatch through the subclass)."""
    args = cpu_decode_args()
    args[name] = args[name].as_subclass(_Subclass)
    with pytest.raises(_CustomOpCalled):
        call(args)


def test_parameters_take_direct_path(custom_ops_refuse):
    args = cpu_decode_args()
    args["k_cache"] = torch.nn.Parameter(args["k_cache"], requires_grad=False)
    with pytest.raises(ValueError, match=CUDA):
        call(args)


def test_eager_direct_conditions():
    from torch.fx.experimental.proxy_tensor import make_fx

    from flash_mla._torch_ops import eager_direct

    t = torch.zeros(3)
    assert eager_direct(t)
    assert not eager_direct(torch.zeros(3, device="meta"))
    assert not eager_direct(t.as_subclass(_Subclass))
    assert not eager_direct(np.zeros(3))
    with FakeTensorMode() as mode:
        assert not eager_direct(torch.zeros(3))
        assert not eager_direct(mode.from_tensor(t))
    seen = []
    make_fx(lambda x: seen.append(eager_direct(x)) or x + 1)(t)
    torch.vmap(lambda x: seen.append(eager_direct(x)) or x)(torch.zeros(2, 3))
    assert seen == [False, False]

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x + 1 if eager_direct(x) else x - 1, backend="eager", fullgraph=True)
    assert torch.equal(compiled(t), t - 1)
    torch._dynamo.reset()


def test_direct_path_with_reference_kernels_matches_custom_ops(reference_kernels, monkeypatch):
    """The same call on both paths gives the same result (reference kernels on the CPU), with and
    without preallocated outputs; out= / lse= are written in place and returned as given."""
    from flash_mla import _torch_ops

    case = _cpu_case()
    meta, splits = get_mla_metadata(case.cache_seqlens, case.rows_per_kv_head, case.h_kv)
    args = (case.q, case.k_cache, case.block_table, case.cache_seqlens, DV, meta, splits)
    results = {}
    for direct in (True, False):
        monkeypatch.setattr(_torch_ops, "DIRECT_EAGER", direct)
        out, lse = flash_mla_with_kvcache(*args, causal=True)
        o2 = torch.full_like(out, math.nan)
        l2 = torch.full_like(lse, math.nan)
        r_out, r_lse = flash_mla_with_kvcache(*args, causal=True, out=o2, lse=l2)
        assert r_out is o2 and r_lse is l2
        only_lse = torch.full_like(lse, math.nan)
        r_out3, r_lse3 = flash_mla_with_kvcache(*args, causal=True, lse=only_lse)
        assert r_lse3 is only_lse
        for got in ((r_out, r_lse), (r_out3, r_lse3)):
            assert torch.equal(got[0], out) and torch.equal(got[1], lse)
        results[direct] = (out, lse)
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][1], results[False][1])


def test_sched_object_planned_checks(reference_kernels):
    """After planning: another configuration raises ValueError naming what changed; arguments of
    the wrong rank reach the decode's own checks (which name them)."""
    case = _cpu_case()
    sched, _ = get_mla_metadata()
    args = (case.q, case.k_cache, case.block_table, case.cache_seqlens, DV, sched, None)
    flash_mla_with_kvcache(*args, causal=True)
    with pytest.raises(ValueError, match="causal: True -> False"):
        flash_mla_with_kvcache(*args, causal=False)
    with pytest.raises(ValueError, match="h_q: 16 -> 8"):
        flash_mla_with_kvcache(case.q[:, :, :8], *args[1:], causal=True)
    with pytest.raises(ValueError, match=r"q: expected 4 dims"):
        flash_mla_with_kvcache(case.q[0], *args[1:], causal=True)
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        flash_mla_with_kvcache(case.q.float().numpy(), *args[1:], causal=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_host_overhead_benchmark_skips_without_gpu():
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks", "host_overhead.py")
    proc = subprocess.run([sys.executable, script, "--calls", "10"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "no CUDA GPU" in proc.stdout, proc.stdout[-2000:]
