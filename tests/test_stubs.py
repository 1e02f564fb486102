"""The type stubs of the Rust core (python/calibft/_core.pyi) cannot drift from the bindings.

The stub file is parsed with `ast` (never imported) and compared with the runtime module: the
same public names at top level and per class, properties where the runtime has getters and
methods where it has methods, the same parameter names, and return annotations that the values
returned by real calls satisfy (dtypes of arrays included).
"""

from __future__ import annotations

import ast
import inspect
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from calibft import _core

STUB = Path(_core.__file__).with_name("_core.pyi")
# Own attributes every class has that a stub never declares.
_IMPLICIT = {"__doc__", "__module__", "__weakref__", "__dict__", "__qualname__"}


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


@lru_cache(maxsize=1)
def stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text(), filename=str(STUB))


def stub_top_level() -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in stub_tree().body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node
    return out


def stub_class(name: str) -> ast.ClassDef:
    node = stub_top_level()[name]
    assert isinstance(node, ast.ClassDef)
    return node


def stub_members(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}


def is_property(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list)


def runtime_classes() -> list[str]:
    return [n for n in dir(_core) if isinstance(getattr(_core, n), type)]


def runtime_own_names(cls: type) -> set[str]:
    """Names `cls` adds to what its bases already expose."""
    inherited = set().union(*(dir(base) for base in cls.__bases__))
    return set(dir(cls)) - inherited


def stub_params(fn: ast.FunctionDef) -> list[str]:
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    names = [a.arg for a in args]
    return names[1:] if names and names[0] in ("self", "cls") else names


def runtime_params(obj) -> list[str]:
    return [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]


# ---- names -------------------------------------------------------------------------------------


def test_stub_file_is_shipped_next_to_the_extension():
    assert STUB.is_file()
    assert (STUB.parent / "py.typed").is_file()


def test_top_level_public_names_match():
    stub = {n for n in stub_top_level() if not _dunder(n)}
    runtime = {n for n in dir(_core) if not _dunder(n)}
    assert stub == runtime


def test_stub_all_matches_runtime_all():
    node = stub_top_level()["__all__"]
    assert isinstance(node, ast.Assign)
    assert ast.literal_eval(node.value) == list(_core.__all__)


def test_top_level_kinds_match():
    for name, node in stub_top_level().items():
        if _dunder(name):
            continue
        value = getattr(_core, name)
        if isinstance(node, ast.ClassDef):
            assert isinstance(value, type), name
        elif isinstance(node, ast.FunctionDef):
            assert callable(value) and not isinstance(value, type), name
        else:
            assert isinstance(value, int) and not callable(value), name


@pytest.mark.parametrize("name", runtime_classes())
def test_class_public_members_match(name):
    cls = getattr(_core, name)
    stub = {n for n in stub_members(stub_class(name)) if not _dunder(n)}
    runtime = {n for n in runtime_own_names(cls) if not _dunder(n)}
    assert stub == runtime


@pytest.mark.parametrize("name", runtime_classes())
def test_class_dunders_match(name):
    """`__len__`, `__new__`, ... declared in the stub exist at runtime and vice versa."""
    cls = getattr(_core, name)
    stub = {n for n in stub_members(stub_class(name)) if _dunder(n)}
    runtime = {n for n in vars(cls) if _dunder(n)} - _IMPLICIT
    assert stub == runtime


def test_class_bases_match():
    for name in runtime_classes():
        cls = getattr(_core, name)
        bases = [ast.unparse(b) for b in stub_class(name).bases]
        assert bases == [b.__name__ for b in cls.__bases__ if b is not object], name


@pytest.mark.parametrize("name", runtime_classes())
def test_properties_and_methods_are_told_apart(name):
    cls = getattr(_core, name)
    for member, fn in stub_members(stub_class(name)).items():
        if _dunder(member):
            continue
        runtime = inspect.getattr_static(cls, member)
        is_getter = inspect.isgetsetdescriptor(runtime) or isinstance(runtime, property)
        assert is_property(fn) == is_getter, f"{name}.{member}"


# ---- signatures --------------------------------------------------------------------------------


def test_function_parameter_names_match():
    for name, node in stub_top_level().items():
        if isinstance(node, ast.FunctionDef):
            assert stub_params(node) == runtime_params(getattr(_core, name)), name


@pytest.mark.parametrize("name", runtime_classes())
def test_method_parameter_names_match(name):
    cls = getattr(_core, name)
    for member, fn in stub_members(stub_class(name)).items():
        if is_property(fn):
            continue
        runtime = cls if member == "__new__" else getattr(cls, member)
        assert stub_params(fn) == runtime_params(runtime), f"{name}.{member}"


def test_every_stub_has_a_docstring():
    for name, node in stub_top_level().items():
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            assert ast.get_docstring(node), name
        if isinstance(node, ast.ClassDef):
            for member, fn in stub_members(node).items():
                if not _dunder(member):
                    assert ast.get_docstring(fn), f"{name}.{member}"


# ---- return annotations against real values ----------------------------------------------------

_DTYPES = {"np.float64": np.float64, "np.int64": np.int64, "np.int32": np.int32}
_SCALARS = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def satisfies(value, annotation: ast.expr) -> bool:
    """Whether `value` fits the stub annotation (the subset of typing the stubs use)."""
    if isinstance(annotation, ast.Constant) and annotation.value is None:
        return value is None
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return satisfies(value, annotation.left) or satisfies(value, annotation.right)
    if isinstance(annotation, ast.Name):
        if annotation.id in _SCALARS:
            kind = _SCALARS[annotation.id]
            # float annotations accept ints (PEP 484), never bools.
            ok = (int, float) if kind is float else kind
            return isinstance(value, ok) and not isinstance(value, bool)
        return isinstance(value, getattr(_core, annotation.id))
    if isinstance(annotation, ast.Subscript):
        head = ast.unparse(annotation.value)
        args = (
            annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        )
        if head == "NDArray":
            (dtype,) = args
            return (
                isinstance(value, np.ndarray)
                and value.ndim == 1
                and value.dtype == _DTYPES[ast.unparse(dtype)]
            )
        if head == "tuple":
            return (
                isinstance(value, tuple)
                and len(value) == len(args)
                and all(satisfies(v, a) for v, a in zip(value, args))
            )
        if head == "list":
            (item,) = args
            return isinstance(value, list) and all(satisfies(v, item) for v in value)
    raise AssertionError(f"annotation not understood by the test: {ast.unparse(annotation)}")


def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate("0123456789.-")} | {"</s>": 12}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    return tok.to_str()


@lru_cache(maxsize=1)
def sample_objects() -> dict[str, object]:
    space = _core.space_from_parts(["0", "1", "12"], np.array([0.5, 0.25, 0.25]))
    trie = _core.build_trie_from_ids(
        np.array([0, 2, 4, 7], dtype=np.int64),
        np.array([1, 9, 2, 9, 2, 3, 9], dtype=np.int32),
        np.array([0.5, 0.25, 0.25]),
    )
    tokenizer = _core.CompletionTokenizer(_tiny_tokenizer_json(), 12)
    return {"OutputSpace": space, "Trie": trie, "CompletionTokenizer": tokenizer}


def function_calls() -> dict[str, object]:
    objs = sample_objects()
    space, tokenizer = objs["OutputSpace"], objs["CompletionTokenizer"]
    edges = _core.continuous_edges(-1.0, 1.0, 1, 5)
    cdf = np.linspace(0.0, 1.0, edges.size)
    return {
        "continuous_edges": lambda: _core.continuous_edges(-1.0, 1.0, 1, 5),
        "continuous_space": lambda: _core.continuous_space(-1.0, 1.0, 1, 5, cdf),
        "integer_values": lambda: _core.integer_values(0.0, 4.0, 10),
        "integer_space": lambda: _core.integer_space(
            np.arange(3, dtype=np.int64), np.array([0.2, 0.3, 0.4]), 0.1
        ),
        "space_from_parts": lambda: _core.space_from_parts(["1", "2"], np.array([1.0, 3.0])),
        "build_trie": lambda: _core.build_trie(space, tokenizer, ""),
        "build_tries": lambda: _core.build_tries([space, space], tokenizer, ["", ""]),
        "build_trie_from_ids": lambda: _core.build_trie_from_ids(
            np.array([0, 1], dtype=np.int64), np.array([4], dtype=np.int32), np.array([1.0])
        ),
        "sample_w1": lambda: _core.sample_w1(np.array([1.0, 2.0]), np.array([0.5, 1.5])),
        "sample_w1_batch": lambda: _core.sample_w1_batch(
            np.array([0, 1, 2], dtype=np.int64), np.array([1.0, 2.0]), np.array([0.5, 1.5])
        ),
        "discrete_w1": lambda: _core.discrete_w1(
            np.array([0.0, 1.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0])
        ),
    }


def method_calls(obj) -> dict[str, object]:
    if isinstance(obj, _core.Trie):
        return {
            "parents": lambda: obj.parents(),
            "depths": lambda: obj.depths(),
            "layout": lambda: obj.layout(),
            "value_paths": lambda: obj.value_paths(),
            "sample_paths": lambda: obj.sample_paths(5, 0),
            "targets_along": lambda: obj.targets_along(np.array([2, 3, 9], dtype=np.int32)),
        }
    if isinstance(obj, _core.CompletionTokenizer):
        return {"encode_values": lambda: obj.encode_values("", ["-1.5", "7"])}
    return {"__len__": lambda: len(obj)}


def test_function_returns_match_annotations():
    calls = function_calls()
    stubbed = {n: f for n, f in stub_top_level().items() if isinstance(f, ast.FunctionDef)}
    assert set(calls) == set(stubbed)  # a new function needs a sample call here
    for name, fn in stubbed.items():
        value = calls[name]()
        assert satisfies(value, fn.returns), f"{name} returned {value!r}"


@pytest.mark.parametrize("name", runtime_classes())
def test_member_returns_match_annotations(name):
    if name == "CalibftError":
        with pytest.raises(ValueError):
            _core.space_from_parts([], np.zeros(0))
        assert issubclass(_core.CalibftError, ValueError)
        return
    obj = sample_objects()[name]
    calls = method_calls(obj)
    for member, fn in stub_members(stub_class(name)).items():
        if member == "__new__":
            assert satisfies(obj, fn.returns)
            continue
        if is_property(fn):
            value = getattr(obj, member)
        else:
            assert member in calls, f"{name}.{member} needs a sample call in the test"
            value = calls[member]()
        assert satisfies(value, fn.returns), f"{name}.{member} returned {value!r}"


def test_output_space_kinds_match_their_annotations():
    """A string space (the sample objects' kind) has no bounds and no numeric view; a numeric
    space fills the same optional annotations with values."""
    stub = stub_members(stub_class("OutputSpace"))
    strings = sample_objects()["OutputSpace"]
    numeric = _core.integer_space(np.arange(3, dtype=np.int64), np.array([0.2, 0.3, 0.4]), 0.1)
    assert (strings.lower, strings.upper, strings.numeric, strings.decimals) == (None,) * 4
    assert (numeric.lower, numeric.upper) == (0, 2)
    np.testing.assert_array_equal(numeric.numeric, [0.0, 1.0, 2.0])
    for space in (strings, numeric):
        for member in ("lower", "upper", "numeric", "decimals"):
            assert satisfies(getattr(space, member), stub[member].returns), member


def test_constants_match_annotations_and_core_limits():
    for name in ("MAX_DECIMALS", "MAX_BINS_LIMIT"):
        node = stub_top_level()[name]
        assert isinstance(node, ast.AnnAssign)
        assert ast.unparse(node.annotation) == "Final[int]"
        assert isinstance(getattr(_core, name), int)
    # The limits are the ones the core enforces.
    _core.continuous_edges(0.0, 1.0, _core.MAX_DECIMALS, 3)
    with pytest.raises(ValueError, match="decimals"):
        _core.continuous_edges(0.0, 1.0, _core.MAX_DECIMALS + 1, 3)
    with pytest.raises(ValueError, match="max_bins"):
        _core.continuous_edges(0.0, 1.0, 2, _core.MAX_BINS_LIMIT + 1)
