"""TensorRT plugins of the ``tensorrt`` flavour, and the engine build.

:func:`register_plugins` defines, with TensorRT's Python plugin API (``tensorrt.plugin``,
"quickly deployable plugins", TensorRT >= 10.9 for ``aot_impl``), the three plugins that
:mod:`quota_compile.flavours.tensorrt.lower` puts in the graphs (schemas and semantics there):

- ``quota::QuotaW4A4Linear``, ``quota::QuotaKVQuantize``, ``quota::QuotaKVDecodeAttention``;
- for each, ``@trtp.register`` (output shapes and types from the input shape expressions and
  the attributes), ``@trtp.autotune`` (the supported type combinations; tile tactics for the
  GEMM), ``@trtp.impl`` (run through Python at inference: the Triton kernels on the
  TensorRT stream through PyTorch) and ``@trtp.aot_impl`` (one Triton kernel of
  :mod:`quota_compile.kernels.trt_aot` compiled to PTX for the build GPU and embedded in the
  engine, which then runs on the plain C++ runtime; the ONNX nodes carry ``aot = 1`` so that
  TensorRT's parser takes this implementation).

:func:`build_engines` builds the vision, prefill and decode engines from a bundle's
``tensorrt/*.onnx`` where ``tensorrt`` imports and a CUDA GPU is visible, writing
``tensorrt/<graph>.engine`` and ``tensorrt/build.log``; elsewhere it returns one line saying
why. :func:`compare_engines` then runs Polygraphy's ``--trt`` against ``--onnxrt`` on them.

What has and has not been executed. This module imports without ``tensorrt`` (every TensorRT
import is inside a function). TensorRT cannot be installed where this project is developed
(CPU only; its native libraries are not reachable), so neither TensorRT nor a GPU has run any
of this. What is checked there (``tests/test_trt_flavour.py``):

- :func:`register_plugins` against ``tests/trt_standin.py``, a stand-in for the parts of
  ``tensorrt.plugin`` used here, written from the Python layer of TensorRT 11.4.0.106 (the
  ``tensorrt-cu12-bindings`` wheel): the decorators' schema rules (argument order, required
  annotations; the aot_impl return annotation and ``constant_value()`` being a method were
  found this way), that every plugin node of the flavour's graphs has exactly the registered
  inputs, outputs and attributes, that the registered output shapes and types are the
  references' at every plugin call of a padded-batch decode, and that each aot_impl's kernel,
  launched as TensorRT launches it (grid, input pointers, extra int32 arguments, output
  pointers), computes the references (Triton's CPU interpreter);
- the aot_impls compile their kernels for sm_90, with the PTX parameters TensorRT passes
  (plus Triton's two scratch pointers, unused);
- the flavour's graphs match the portable graphs with the plugins executed by the
  references (:mod:`quota_compile.flavours.tensorrt.verify`).

Not checked anywhere: that TensorRT's ONNX parser accepts the graphs, the plugin registration
in TensorRT itself, the engine build and its shape profile, the impl functions, the engines'
outputs (:func:`compare_engines`), and whether TensorRT tolerates the scratch pointers.

Sources for the API as used here (decorator schemas, type strings, the AOT return value and
launch convention): https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/trt_plugin_register.html,
.../trt_plugin_impl.html, .../trt_plugin_aot_impl/index.html,
.../trt_plugin_autotune/AutoTuneCombination.html, and TensorRT's
samples/python/quickly_deployable_plugins (README.md, qdp_defs.py: ``circ_pad_plugin_aot_impl``).

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the decorated
functions' annotations as objects (``trtp.TensorDesc``, ``int``, ...), not as strings.
"""

import ast
from pathlib import Path

from quota_compile.flavours.tensorrt.lower import DECODE_ATTENTION, KV_QUANTIZE, PLUGIN_NAMESPACE, W4A4_LINEAR
from quota_compile.bundle.schema import GRAPHS, TRT_FOLDER

ENGINE_LOG = "build.log"
# GEMM tiles offered to TensorRT as AOT tactics (BLOCK_M, BLOCK_N, warps, stages): a thin one
# for decode-sized M, wider ones for the prefill; TensorRT times them at build time.
W4A4_TACTICS = {1: (16, 64, 4, 4), 2: (64, 128, 4, 4), 3: (128, 128, 8, 3)}
_REGISTERED_WITH = None  # the tensorrt.plugin module the plugins were registered with


def _trt_dtype(dtype) -> str:
    import tensorrt as trt

    return {trt.float32: "fp32", trt.float16: "fp16"}[dtype]


def _constant(expr, what: str) -> int:
    """The build-time value of a shape expression the kernels take as a compile-time constant."""
    if not expr.is_constant:
        raise ValueError(f"{what} must be static in the TensorRT graph")
    return int(expr.constant_value())


def register_plugins() -> None:
    """Register the three ``quota::`` plugins with TensorRT (once per process: once per
    ``tensorrt.plugin`` module, which a process imports once; a stand-in put in its place, as
    tests/trt_standin.py does, gets them registered afresh). Needs ``tensorrt`` >= 10.9,
    ``torch`` and ``triton``; the implementations need a CUDA GPU."""
    global _REGISTERED_WITH
    import tensorrt.plugin as trtp

    if _REGISTERED_WITH is trtp:
        return
    from typing import List, Tuple, Union

    import tensorrt as trt
    import torch
    import triton

    from quota_compile.kernels import trt_aot as K

    def as_torch(t):
        return torch.as_tensor(t, device="cuda")

    # what an aot_impl returns: kernel name, PTX, launch parameters, the int32 extra arguments
    # (tensorrt.plugin requires this annotation on every aot_impl)
    AotKernel = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]

    def aot_kernel(compiled, grid, extra) -> AotKernel:
        """An aot_impl's result: ``compiled``'s name and PTX, launched on ``grid`` programs of
        its warps with its shared memory, the ``extra`` expressions as int32 arguments."""
        launch = trtp.KernelLaunchParams()
        launch.grid_x = grid
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extra])
        return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), launch, extra

    # ---------------------------------------------------------------- QuotaW4A4Linear

    w4a4 = f"{PLUGIN_NAMESPACE}::{W4A4_LINEAR}"

    @trtp.register(w4a4)
    def _w4a4_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, scale: trtp.TensorDesc, bias: trtp.TensorDesc,
                   group_size: int, clip_ratio: float, act_bits: int) -> trtp.TensorDesc:
        if act_bits != 4:
            raise ValueError(f"{W4A4_LINEAR}: the Triton kernel quantizes activations to INT4, not INT{act_bits}")
        shape = tuple(x.shape_expr[i] for i in range(x.ndim - 1)) + (scale.shape_expr[1],)
        return trtp.from_shape_expr(shape, dtype=x.dtype)

    @trtp.autotune(w4a4)
    def _w4a4_tune(x: trtp.TensorDesc, weight: trtp.TensorDesc, scale: trtp.TensorDesc, bias: trtp.TensorDesc,
                   outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, UINT8, FP32, FP32, FP32|FP16", "LINEAR", list(W4A4_TACTICS))]

    @trtp.impl(w4a4)
    def _w4a4_impl(x: trtp.Tensor, weight: trtp.Tensor, scale: trtp.Tensor, bias: trtp.Tensor, group_size: int,
                   clip_ratio: float, act_bits: int, outputs: Tuple[trtp.Tensor], stream: int, tactic: int) -> None:
        from quota_compile.kernels.w4a4_linear import w4a4_linear

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = as_torch(outputs[0])
            y = w4a4_linear(as_torch(x), as_torch(weight), as_torch(scale), group_size, clip_ratio, as_torch(bias), out_dtype=out.dtype)
            out.copy_(y)

    @trtp.aot_impl(w4a4)
    def _w4a4_aot(x: trtp.TensorDesc, weight: trtp.TensorDesc, scale: trtp.TensorDesc, bias: trtp.TensorDesc,
                  group_size: int, clip_ratio: float, act_bits: int, outputs: Tuple[trtp.TensorDesc], tactic: int) -> AotKernel:
        block_m, block_n, warps, stages = W4A4_TACTICS[tactic]
        bk = K.block_k(group_size)
        compiled = K.compile_kernel(
            K.w4a4_linear_kernel, K.w4a4_linear_types(_trt_dtype(x.dtype)),
            {"GROUP_SIZE": group_size, "CLIP": float(clip_ratio), "TILE_GROUPS": bk == group_size, "BLOCK_M": block_m,
             "BLOCK_N": block_n, "BLOCK_K": bk, "GROUP_M": 8}, warps, stages,
        )
        m = x.shape_expr[0]
        for i in range(1, x.ndim - 1):
            m = m * x.shape_expr[i]
        n, k = scale.shape_expr[1], x.shape_expr[x.ndim - 1]
        return aot_kernel(compiled, trtp.cdiv(m, block_m) * trtp.cdiv(n, block_n), (m, n, k))

    # ---------------------------------------------------------------- QuotaKVQuantize

    kvq = f"{PLUGIN_NAMESPACE}::{KV_QUANTIZE}"

    @trtp.register(kvq)
    def _kvq_desc(x: trtp.TensorDesc, scale: trtp.TensorDesc, zero_point: trtp.TensorDesc, bits: int,
                  granularity: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        b, h, t, d = (x.shape_expr[i] for i in range(4))
        codes = trtp.from_shape_expr((b, h, t, d // 2 if bits == 4 else d), dtype=trt.uint8)
        if granularity == "per_token":
            stats = (trtp.from_shape_expr((b, h, t, 1), dtype=trt.float32), trtp.from_shape_expr((b, h, t, 1), dtype=trt.uint8))
        else:
            stats = (scale.like(), zero_point.like())
        return codes, *stats, x.like()

    @trtp.autotune(kvq)
    def _kvq_tune(x: trtp.TensorDesc, scale: trtp.TensorDesc, zero_point: trtp.TensorDesc,
                  outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, FP32, UINT8, UINT8, FP32, UINT8, FP32")]

    def _kvq_launch(x, bits, granularity):
        d = x.shape[3]
        return {"D": d, "BITS": bits, "PER_TOKEN": granularity == "per_token", "BLOCK_P": triton.next_power_of_2(d // 2)}

    @trtp.impl(kvq)
    def _kvq_impl(x: trtp.Tensor, scale: trtp.Tensor, zero_point: trtp.Tensor, bits: int, granularity: str,
                  outputs: Tuple[trtp.Tensor], stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            xt = as_torch(x)
            b, h, t, _ = xt.shape
            K.kv_quantize_kernel[(b * h * t,)](xt, as_torch(scale), as_torch(zero_point), t, h,
                                              *[as_torch(o) for o in outputs], **_kvq_launch(xt, bits, granularity))

    @trtp.aot_impl(kvq)
    def _kvq_aot(x: trtp.TensorDesc, scale: trtp.TensorDesc, zero_point: trtp.TensorDesc, bits: int, granularity: str,
                 outputs: Tuple[trtp.TensorDesc], tactic: int) -> AotKernel:
        d = _constant(x.shape_expr[3], "the head size")
        consts = {"D": d, "BITS": bits, "PER_TOKEN": granularity == "per_token", "BLOCK_P": triton.next_power_of_2(d // 2)}
        compiled = K.compile_kernel(K.kv_quantize_kernel, K.KV_QUANTIZE_TYPES, consts, num_warps=1)
        b, h, t = (x.shape_expr[i] for i in range(3))
        return aot_kernel(compiled, b * h * t, (t, h))

    # ---------------------------------------------------------------- QuotaKVDecodeAttention

    attn = f"{PLUGIN_NAMESPACE}::{DECODE_ATTENTION}"

    @trtp.register(attn)
    def _attn_desc(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, bias: trtp.TensorDesc,
                   past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, key_scale: trtp.TensorDesc,
                   value_scale: trtp.TensorDesc, key_zero_point: trtp.TensorDesc, value_zero_point: trtp.TensorDesc,
                   bits: int, granularity: str, num_heads: int, kv_num_heads: int, scale: float,
                   ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc,
                              trtp.TensorDesc, trtp.TensorDesc]:
        b, h, _, d = (key.shape_expr[i] for i in range(4))
        codes = trtp.from_shape_expr((b, h, 1, d // 2 if bits == 4 else d), dtype=trt.uint8)
        if granularity == "per_token":
            stats = [trtp.from_shape_expr((b, h, 1, 1), dtype=dt) for dt in (trt.float32, trt.float32, trt.uint8, trt.uint8)]
        else:
            stats = [key_scale.like(), value_scale.like(), key_zero_point.like(), value_zero_point.like()]
        return query.like(), codes, codes.like(), *stats

    @trtp.autotune(attn)
    def _attn_tune(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, bias: trtp.TensorDesc,
                   past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, key_scale: trtp.TensorDesc,
                   value_scale: trtp.TensorDesc, key_zero_point: trtp.TensorDesc, value_zero_point: trtp.TensorDesc,
                   outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, FP32, FP32, FP32, UINT8, UINT8, FP32, FP32, UINT8, UINT8, "
                                         "FP32, UINT8, UINT8, FP32, FP32, UINT8, UINT8")]

    def _attn_consts(d: int, bits: int, granularity: str, scale: float) -> dict:
        return {"SM_SCALE": float(scale), "D": d, "BITS": bits, "PER_TOKEN": granularity == "per_token", "BLOCK_T": 64,
                "BLOCK_D": triton.next_power_of_2(d)}

    @trtp.impl(attn)
    def _attn_impl(query: trtp.Tensor, key: trtp.Tensor, value: trtp.Tensor, bias: trtp.Tensor, past_key: trtp.Tensor,
                   past_value: trtp.Tensor, key_scale: trtp.Tensor, value_scale: trtp.Tensor,
                   key_zero_point: trtp.Tensor, value_zero_point: trtp.Tensor, bits: int, granularity: str,
                   num_heads: int, kv_num_heads: int, scale: float, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            ins = [as_torch(t) for t in (query, key, value, bias, past_key, past_value, key_scale, value_scale,
                                         key_zero_point, value_zero_point)]
            b, h, _, d = ins[0].shape
            K.decode_attention_kernel[(b * h,)](*ins, h, ins[4].shape[1], ins[4].shape[2], *[as_torch(o) for o in outputs],
                                               **_attn_consts(d, bits, granularity, scale))

    @trtp.aot_impl(attn)
    def _attn_aot(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, bias: trtp.TensorDesc,
                  past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, key_scale: trtp.TensorDesc,
                  value_scale: trtp.TensorDesc, key_zero_point: trtp.TensorDesc, value_zero_point: trtp.TensorDesc,
                  bits: int, granularity: str, num_heads: int, kv_num_heads: int, scale: float,
                  outputs: Tuple[trtp.TensorDesc], tactic: int) -> AotKernel:
        d = _constant(query.shape_expr[3], "the head size")
        compiled = K.compile_kernel(K.decode_attention_kernel, K.DECODE_ATTENTION_TYPES, _attn_consts(d, bits, granularity, scale))
        b, h = query.shape_expr[0], query.shape_expr[1]
        return aot_kernel(compiled, b * h, (h, past_key.shape_expr[1], past_key.shape_expr[2]))

    _REGISTERED_WITH = trtp


# --------------------------------------------------------------------------------------------
# Engines


def engines_unavailable() -> str | None:
    """One line saying why no engine can be built here, or None when TensorRT and a GPU are."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt: engines not built: the tensorrt package is not installed (pip install 'quota-compile[tensorrt]' on a machine with an NVIDIA GPU); tensorrt/*.onnx are written and verified"
    import torch

    if not torch.cuda.is_available():
        return "tensorrt: engines not built: no CUDA GPU is visible; tensorrt/*.onnx are written and verified"
    return None


def _dim_value(dim: str, sizes: dict[str, int]) -> int:
    """The value of a symbolic ONNX dimension (``batch``, ``past_1 + 33``) given its symbols'."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return sizes[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        raise ValueError(f"unsupported dimension expression {dim!r}")

    return ev(ast.parse(dim, mode="eval"))


def shape_profiles(model, min_length: int, max_batch: int = 8, max_length: int = 4096) -> dict[str, tuple[tuple, tuple, tuple]]:
    """``input -> (min, opt, max)`` shapes for one TensorRT optimization profile of an ONNX graph:
    ``batch`` in ``[1, max_batch]`` (opt 1); every other symbol (text or cache lengths) in
    ``[min_length, max_length]`` (opt ``min_length + 64``); dimensions derived from the
    symbols (``past_1 + 33``) follow them. ``min_length``: the shortest prompt the graphs
    accept (the image tokens' span and one text token)."""
    names = set()
    for i in model.graph.input:
        for d in i.type.tensor_type.shape.dim:
            if d.dim_param:
                names |= {n.id for n in ast.walk(ast.parse(d.dim_param, mode="eval")) if isinstance(n, ast.Name)}
    points = []
    for which in range(3):
        sizes = {}
        for n in names:
            lo, hi = (1, max_batch) if n == "batch" else (min_length, max_length)
            sizes[n] = (lo, 1 if n == "batch" else min(lo + 64, hi), hi)[which]
        points.append(sizes)
    out = {}
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        out[i.name] = tuple(tuple(d.dim_value if not d.dim_param else _dim_value(d.dim_param, p) for d in dims) for p in points)
    return out


def build_engines(bundle: Path, min_length: int | None = None, max_batch: int = 8, max_length: int = 4096) -> dict | str:
    """Build ``tensorrt/<graph>.engine`` for vision, prefill and decode from the bundle's
    TensorRT-flavour graphs, with the ``quota::`` plugins (their AOT kernels) and one dynamic
    shape profile per engine (:func:`shape_profiles`; ``min_length`` defaults to the image
    span's end + 1 from the bundle's manifest); TensorRT's log goes to ``tensorrt/build.log``.
    Returns what was built, or one line saying why nothing was (no ``tensorrt``, no GPU, or a
    graph TensorRT refused: see the log)."""
    import onnx

    why = engines_unavailable()
    if why:
        return why
    import tensorrt as trt
    import torch

    register_plugins()
    folder = Path(bundle) / TRT_FOLDER
    if min_length is None:
        from quota_compile.bundle.format import read_manifest

        model = read_manifest(Path(bundle)).model
        min_length = model.visual_start + model.visual_tokens + 1
    log_path = folder / ENGINE_LOG

    class FileLogger(trt.ILogger):
        def __init__(self, path: Path):
            trt.ILogger.__init__(self)
            self.file = open(path, "a", encoding="utf-8")

        def log(self, severity, msg):
            self.file.write(f"[{severity.name}] {msg}\n")
            self.file.flush()

    logger = FileLogger(log_path)
    built = {}
    try:
        for g in GRAPHS:
            model = onnx.load(folder / f"{g}.onnx", load_external_data=False)
            builder = trt.Builder(logger)
            network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(folder / f"{g}.onnx")):
                for i in range(parser.num_errors):
                    logger.log(trt.ILogger.Severity.ERROR, str(parser.get_error(i)))
                return f"tensorrt: engines not built: TensorRT could not parse tensorrt/{g}.onnx (see tensorrt/{ENGINE_LOG})"
            config = builder.create_builder_config()
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shape_profiles(model, min_length, max_batch, max_length).items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
            engine = builder.build_serialized_network(network, config)
            if engine is None:
                return f"tensorrt: engines not built: TensorRT failed to build {g} (see tensorrt/{ENGINE_LOG})"
            (folder / f"{g}.engine").write_bytes(bytes(engine))
            built[g] = f"{TRT_FOLDER}/{g}.engine"
    finally:
        logger.file.close()
    return {"built": True, "engines": built, "log": f"{TRT_FOLDER}/{ENGINE_LOG}", "tensorrt": trt.__version__,
            "device": torch.cuda.get_device_name(), "profile": {"max_batch": max_batch, "max_length": max_length}}


def compare_engines(bundle: Path, models: dict, sample) -> dict:
    """Polygraphy's ``--trt`` against ``--onnxrt``, graph by graph, on one verification sample:
    each engine of :func:`build_engines` (``TrtRunner``, the plugins' AOT kernels) against the
    same TensorRT-flavour graph in onnxruntime with the plugins run by their references
    (:func:`quota_compile.flavours.tensorrt.verify.session`), fed what the portable graphs produce for the
    sample (:func:`~quota_compile.flavours.tensorrt.verify.feeds_of`) and judged as the flavour is judged
    against the portable graphs (:func:`~quota_compile.flavours.tensorrt.verify.compare_runners`).
    Needs ``tensorrt``, ``polygraphy`` and a CUDA GPU; never executed where this project is
    developed (no TensorRT there)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from quota_compile.flavours.tensorrt.verify import compare_runners, feeds_of, session

    register_plugins()
    folder = Path(bundle) / TRT_FOLDER
    out = {}
    for graph, values in feeds_of(Path(bundle), sample).items():
        sess = session(models[graph])
        onnxrt = OnnxrtRunner(sess, name=f"onnxrt-{graph}")
        engine = TrtRunner(EngineFromBytes((folder / f"{graph}.engine").read_bytes()), name=f"trt-{graph}")
        out[graph] = compare_runners(onnxrt, engine, [i.name for i in sess.get_inputs()],
                                     [o.name for o in sess.get_outputs()], values)
    return out
