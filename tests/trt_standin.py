"""A stand-in for the parts of ``tensorrt`` / ``tensorrt.plugin`` that
:func:`quota_compile.flavours.tensorrt.engines.register_plugins` uses, so its plugin definitions can be
called on a machine without TensorRT.

It is not TensorRT, and nothing here shows that TensorRT accepts the plugins. It checks our
side of the contract, as written down from the Python layer of TensorRT 11.4.0.106
(``tensorrt_bindings/plugin/_validate.py``, ``_lib.py``, ``_tensor.py``, ``_autotune.py`` and
``_plugin_class.py`` of the ``tensorrt-cu12-bindings`` wheel; the wheel's native library needs
``libnvinfer``, which this machine cannot install):

- the decorators' schemas (:func:`_check_schema`): the registration takes its input tensors
  first, then attributes, every argument annotated, a return annotation of ``TensorDesc`` or a
  tuple of them; ``impl`` is ``(inputs, attributes in registration order, outputs, stream[,
  tactic])``; ``aot_impl`` is ``(inputs, attributes, outputs, tactic)`` and must be annotated
  to return ``(str | bytes, str | bytes, KernelLaunchParams, SymIntExprs)``; ``autotune`` is
  ``(inputs, attributes, outputs)``; ``outputs``, ``stream`` and ``tactic`` are not attribute
  names;
- shape expressions: ``is_constant`` is a property, ``constant_value()`` a method that refuses
  a non-constant expression; ``+ - * //`` with ints; ``cdiv``;
- what TensorRT does with an aot_impl's result: the launch parameters become int32
  expressions, every extra argument must be a ``SymInt32``, and the kernel is launched with
  the input pointers, then the extra arguments, then the output pointers.

Shape expressions here carry their value (the build-time profile point a test picks), so an
aot_impl's launch parameters can be evaluated and compared with the grid the kernels are
tested with.
"""

from __future__ import annotations

import enum
import importlib.machinery
import inspect
import sys
import types
import typing

# ---------------------------------------------------------------------------- tensorrt


class DataType(enum.Enum):
    FLOAT = "FP32"
    HALF = "FP16"
    UINT8 = "UINT8"
    INT8 = "INT8"
    INT32 = "INT32"


# ---------------------------------------------------------------------------- shape expressions


class SymIntExpr:
    """An int32 expression with its value at the chosen profile point; ``constant`` says
    whether TensorRT would know it at build time (a static dimension)."""

    def __init__(self, value: "int | SymIntExpr" = 0, constant: bool | None = None):
        if isinstance(value, SymIntExpr):
            value, constant = value.value, value.constant if constant is None else constant
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"a shape expression takes an int or an expression, not {type(value).__name__}")
        self.value = value
        self.constant = True if constant is None else constant

    def _op(self, other, fn):
        if not isinstance(other, (int, SymIntExpr)) or isinstance(other, bool):
            raise TypeError(f"shape expressions combine with ints and expressions, not {type(other).__name__}")
        o = other if isinstance(other, SymIntExpr) else SymIntExpr(other)
        return type(self)(fn(self.value, o.value), self.constant and o.constant)

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._op(other, lambda a, b: a - b)

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b)

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b)

    __radd__ = __add__
    __rmul__ = __mul__

    @property
    def is_constant(self) -> bool:
        return self.constant

    def constant_value(self) -> int:
        if not self.constant:
            raise RuntimeError("Not accessible for non-constant integer expressions")
        return self.value

    def __call__(self) -> int:  # what TensorRT reads when it evaluates the expression
        return self.value

    def __repr__(self):
        return f"{type(self).__name__}({self.value}{'' if self.constant else ', dynamic'})"


class SymInt32(SymIntExpr):
    pass


class ShapeExpr(SymInt32):
    pass


def dim(value: int, constant: bool = True) -> ShapeExpr:
    return ShapeExpr(value, constant)


class SymExprs:
    def __init__(self, length: int):
        self._exprs = [None] * length

    def __getitem__(self, i):
        return self._exprs[i]

    def __iter__(self):
        return iter(self._exprs)

    def __len__(self):
        return len(self._exprs)

    item = SymIntExpr  # what from_tuple wraps a plain int in (an expression is kept as it is)

    @classmethod
    def from_tuple(cls, exprs):
        inst = cls(len(exprs))
        inst._exprs = [e if isinstance(e, cls.item) else cls.item(e) for e in exprs]
        return inst


class SymIntExprs(SymExprs):
    item = SymIntExpr


class ShapeExprs(SymExprs):
    item = ShapeExpr


class TensorDesc:
    def __init__(self, shape_expr, dtype: DataType):
        self.shape_expr = shape_expr if isinstance(shape_expr, ShapeExprs) else ShapeExprs.from_tuple(tuple(shape_expr))
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape_expr)

    def like(self) -> "TensorDesc":
        return TensorDesc(ShapeExprs.from_tuple(tuple(self.shape_expr)), self.dtype)

    @property
    def values(self) -> tuple[int, ...]:
        return tuple(e.value for e in self.shape_expr)


class Tensor:
    """Annotation only: the impl functions run on CUDA tensors, never here."""


def from_shape_expr(shape_expr, dtype: DataType) -> TensorDesc:
    return TensorDesc(shape_expr, dtype)


def cdiv(first, second) -> ShapeExpr:
    if isinstance(first, int) and isinstance(second, int):
        raise ValueError("Both arguments cannot be 'int's")
    a, b = ShapeExpr(first), ShapeExpr(second)
    return ShapeExpr(-(-a.value // b.value), a.constant and b.constant)


class KernelLaunchParams:
    _FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

    def __init__(self):
        for f in self._FIELDS:
            self.__dict__[f] = SymInt32(0 if f == "shared_mem" else 1)

    def __setattr__(self, name, value):
        if name not in self._FIELDS:
            raise AttributeError(f"KernelLaunchParams object has no attribute '{name}'")
        self.__dict__[name] = SymInt32(value)


class AutoTuneCombination:
    def __init__(self, io_types: str | None = None, layouts: str | None = None, tactics=None):
        self.io_types = [t.strip() for t in io_types.split(",")] if io_types else []
        lay = [t.strip() for t in (layouts or "LINEAR").split(",")]
        if len(lay) > 1 and len(lay) != len(self.io_types):
            raise ValueError("one layout, or one per input and output")
        self.layouts = lay * len(self.io_types) if len(lay) == 1 else lay
        self.tactics = list(tactics) if tactics is not None else None
        for t in self.io_types:
            for alt in t.replace("*", "|").split("|"):
                if alt not in {d.value for d in DataType}:
                    raise ValueError(f"Unknown data type string '{alt}'")
        if self.tactics is not None and any(not isinstance(t, int) or t <= 0 for t in self.tactics):
            raise ValueError("custom tactics must be positive integers")


# ---------------------------------------------------------------------------- decorators


class PluginDef:
    def __init__(self, register_func):
        self.register_func = register_func
        sig = inspect.signature(register_func)
        self.inputs, self.attrs = [], {}
        for i, (name, p) in enumerate(sig.parameters.items()):
            if p.annotation is inspect.Parameter.empty:
                raise ValueError(f"register: argument {name} has no type annotation")
            if p.default is not inspect.Parameter.empty:
                raise ValueError(f"register: argument {name} has a default value")
            if inspect.isclass(p.annotation) and issubclass(p.annotation, TensorDesc):
                if self.attrs:
                    raise ValueError("register: tensors and attributes cannot be interspersed")
                self.inputs.append(name)
            else:
                if i == 0:
                    raise ValueError("register: input tensors come first")
                if name in ("outputs", "stream", "tactic"):
                    raise ValueError(f"register: '{name}' is not allowed as a plugin attribute name")
                if p.annotation not in (int, float, bytes, bool, str):
                    raise ValueError(f"register: attribute {name} of type {p.annotation} is not serializable")
                self.attrs[name] = p.annotation
        ret = sig.return_annotation
        if ret is inspect.Parameter.empty:
            raise ValueError("register: no return annotation")
        if typing.get_origin(ret) is tuple:
            if not all(issubclass(a, TensorDesc) for a in typing.get_args(ret)):
                raise ValueError("register: returns TensorDesc or Tuple[TensorDesc]")
            self.num_outputs = len(typing.get_args(ret))
        elif inspect.isclass(ret) and issubclass(ret, TensorDesc):
            self.num_outputs = 1
        else:
            raise ValueError("register: returns TensorDesc or Tuple[TensorDesc]")
        self.impl = self.aot_impl = self.autotune = None


REGISTRY: dict[str, PluginDef] = {}


def _check_schema(func, plugin: PluginDef, tail: tuple[str, ...], optional_tactic: bool, what: str) -> None:
    names = list(inspect.signature(func).parameters)
    params = inspect.signature(func).parameters
    attrs = [n for n in names if n in plugin.attrs]
    expected = plugin.inputs + [a for a in plugin.attrs if a in attrs] + list(tail)
    got = names if not (optional_tactic and names[-1:] == ["tactic"]) else names[:-1]
    if got != expected:
        raise ValueError(f"{what}: signature {names} does not match the schema {expected}")
    for n in attrs:
        ann = params[n].annotation
        if ann is not inspect.Parameter.empty and ann is not plugin.attrs[n]:
            raise ValueError(f"{what}: attribute {n} annotated {ann}, registered as {plugin.attrs[n]}")


def register(plugin_id: str):
    ns, _, name = plugin_id.partition("::")
    if not ns or not name or "." in ns or "." in name or ns in ("trt", "tensorrt", "std"):
        raise ValueError(f"bad plugin id {plugin_id!r}")

    def deco(fn):
        if plugin_id in REGISTRY:
            raise ValueError(f"{plugin_id} is registered twice")
        REGISTRY[plugin_id] = PluginDef(fn)
        return fn

    return deco


def _plugin(plugin_id: str) -> PluginDef:
    if plugin_id not in REGISTRY:
        raise ValueError(f"Plugin {plugin_id} is not registered")
    return REGISTRY[plugin_id]


def _impl_return(fn) -> None:
    ret = inspect.signature(fn).return_annotation
    if ret is not inspect.Parameter.empty and ret is not None:
        raise ValueError("impl: the return annotation must be None")


def _aot_return(fn) -> None:
    ret = inspect.signature(fn).return_annotation
    if ret is inspect.Parameter.empty:
        raise ValueError("aot_impl: no return annotation")
    args = typing.get_args(ret) if typing.get_origin(ret) is tuple else ()
    if len(args) != 4:
        raise ValueError(f"aot_impl: returns a 4-tuple, annotated {ret}")
    for a in args[:2]:
        alts = typing.get_args(a) if typing.get_origin(a) in (typing.Union, types.UnionType) else (a,)
        if any(x not in (str, bytes) for x in alts):
            raise ValueError(f"aot_impl: kernel name and PTX are str or bytes, annotated {a}")
    if not (issubclass(args[2], KernelLaunchParams) and issubclass(args[3], SymExprs)):
        raise ValueError(f"aot_impl: annotated {ret}")


def _decorator(what: str, tail: tuple[str, ...], optional_tactic: bool, check_return=None):
    """``tensorrt.plugin.<what>``: checks the function against the registered plugin's schema
    (then its return annotation) and records it on the plugin."""
    def decorator(plugin_id: str):
        def deco(fn):
            plugin = _plugin(plugin_id)
            _check_schema(fn, plugin, tail, optional_tactic, what)
            if check_return is not None:
                check_return(fn)
            setattr(plugin, what, fn)
            return fn

        return deco

    return decorator


impl = _decorator("impl", ("outputs", "stream"), True, _impl_return)
aot_impl = _decorator("aot_impl", ("outputs", "tactic"), False, _aot_return)
autotune = _decorator("autotune", ("outputs",), False)


def run_aot(plugin_id: str, inputs: list[TensorDesc], attrs: dict, outputs: list[TensorDesc], tactic: int = 0):
    """Call a plugin's aot_impl as TensorRT does (every attribute, in registration order) and
    check its result as TensorRT does; returns ``(name, ptx, launch values, extra values)``."""
    plugin = _plugin(plugin_id)
    name, ptx, launch, extra = plugin.aot_impl(*inputs, *(attrs[a] for a in plugin.attrs), tuple(outputs), tactic)
    if not isinstance(name, (str, bytes)) or not isinstance(ptx, (str, bytes)):
        raise TypeError("kernel name and PTX must be str or bytes")
    if not isinstance(launch, KernelLaunchParams) or not isinstance(extra, SymIntExprs):
        raise TypeError("launch parameters / extra arguments of the wrong type")
    if not all(isinstance(e, SymInt32) for e in extra):
        raise TypeError("Extra args must be a 'tensorrt.plugin.SymInt32'")
    values = {f: getattr(launch, f)() for f in KernelLaunchParams._FIELDS}
    as_str = (lambda b: b.decode() if isinstance(b, bytes) else b)
    return as_str(name), as_str(ptx), values, [e() for e in extra]


# ---------------------------------------------------------------------------- installing


def install(monkeypatch=None) -> None:
    """Put the stand-in in ``sys.modules`` as ``tensorrt`` and ``tensorrt.plugin`` (through
    ``monkeypatch`` when given, so a test restores the real state afterwards)."""
    REGISTRY.clear()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "stand-in (tests/trt_standin.py)"
    trt.DataType = DataType
    trt.float32, trt.float16, trt.uint8, trt.int8, trt.int32 = (
        DataType.FLOAT, DataType.HALF, DataType.UINT8, DataType.INT8, DataType.INT32)
    plugin = types.ModuleType("tensorrt.plugin")
    for name in ("TensorDesc", "Tensor", "ShapeExpr", "SymIntExpr", "SymInt32", "SymExprs", "SymIntExprs", "ShapeExprs",
                 "KernelLaunchParams", "AutoTuneCombination", "from_shape_expr", "cdiv", "register", "impl",
                 "aot_impl", "autotune"):
        setattr(plugin, name, globals()[name])
    trt.plugin = plugin
    for mod in (trt, plugin):  # importlib.util.find_spec (torch._dynamo asks for "tensorrt") needs one
        mod.__spec__ = importlib.machinery.ModuleSpec(mod.__name__, None)
    for key, mod in (("tensorrt", trt), ("tensorrt.plugin", plugin)):
        if monkeypatch is not None:
            monkeypatch.setitem(sys.modules, key, mod)
        else:
            sys.modules[key] = mod
