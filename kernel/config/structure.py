"""Turns a raw config dict into attrs instances, strictly, reporting every problem at once.

cattrs is lenient by default ("false" would become True, 2.5 would become 2); the hooks
here accept only the right TOML types. Component tables are structured with the config
class their plugin registered (chosen by name through the registry, not by a cattrs
tagged union), also inside named tables (`model.hiddens.loss.<name>`, chosen by
`cls_name`). Errors are collected from cattrs' exception groups and rendered one per
line as `dotted.key: problem`.
"""
from __future__ import annotations

import functools
import typing
from typing import Any, List, Literal, Optional

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn

try:
    BaseExceptionGroup
except NameError:  # Python 3.10: the backport cattrs itself depends on
    from exceptiongroup import BaseExceptionGroup

from mega.config.schema import SLOTS, DataConfig, Duration, ExperimentConfig, InvalidValue, Precision, Slot
from mega.errors import ConfigError, MegaError, PluginError, did_you_mean


class _SlotNameError(ValueError):
    """An unknown component name; rendered at the path of the naming key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    return f"{kind.get(type(value), type(value).__name__)} ({value!r})"


def _strict(expected: str, ok):
    def hook(value, _type):
        if not ok(value):
            raise ValueError(f"expected {expected}, got {_describe(value)}")
        return float(value) if expected == "a number" else value

    return hook


def make_converter(plugins) -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(bool, _strict("a boolean (true/false)", lambda v: isinstance(v, bool)))
    conv.register_structure_hook(int, _strict("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)))
    conv.register_structure_hook(
        float, _strict("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    )
    conv.register_structure_hook(str, _strict("a string", lambda v: isinstance(v, str)))
    conv.register_structure_hook(Precision, lambda v, _t: Precision.parse(v))
    conv.register_structure_hook(Duration, lambda v, _t: Duration.parse(v))
    conv.register_structure_hook_func(lambda t: typing.get_origin(t) is Literal, _literal)
    _table_check(conv)
    _named_tables(conv)

    @functools.lru_cache(maxsize=None)
    def fn_for(cls):
        return make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True, _cattrs_detailed_validation=True)

    def dispatch(slot: Slot):
        def hook(value, _type):
            if not isinstance(value, dict):
                raise ValueError(f"expected a table, got {_describe(value)}")
            name = value.get(slot.key, _default(slot.base, slot.key))
            if name is attrs.NOTHING:
                known = ", ".join(plugins.registries[slot.kind].names()) or "none"
                raise _SlotNameError(slot.key, f"required key missing (available: {known})")
            if not isinstance(name, str):
                raise _SlotNameError(slot.key, f"expected a string, got {_describe(name)}")
            try:
                entry = plugins.registries[slot.kind].get(name)
            except ConfigError as exc:
                raise _SlotNameError(slot.key, str(exc)) from None
            cls = entry.config or slot.base
            if not (isinstance(cls, type) and issubclass(cls, slot.base)):
                raise PluginError(
                    f"plugin {entry.plugin!r}: the config class of {slot.kind} {name!r} must subclass "
                    f"mega.config.{slot.base.__name__}"
                )
            return fn_for(cls)(value, cls)

        return hook

    for slot in SLOTS:
        conv.register_structure_hook_func(lambda t, base=slot.base: t is base, dispatch(slot))
    return conv


def _literal(value, t):
    """A Literal accepts exactly its values (cattrs would take 1 for True)."""
    for allowed in typing.get_args(t):
        if type(value) is type(allowed) and value == allowed:
            return value
    raise ValueError(f"expected one of {', '.join(repr(a) for a in typing.get_args(t))}, got {_describe(value)}")


def named_base(t: Any) -> Optional[type]:
    """The slot base class B when `t` is `NamedTables[B]`, else None."""
    if typing.get_origin(t) is not typing.Union:
        return None
    args = typing.get_args(t)
    if len(args) != 2 or typing.get_origin(args[0]) is not dict or typing.get_args(args[1]) != (args[0],):
        return None
    key, base = typing.get_args(args[0])
    return base if key is str and any(base is s.base for s in SLOTS) else None


def _named_tables(conv: cattrs.Converter) -> None:
    """`NamedTables[B]`: a table {name: {cls_name, ...}} or an array of such tables; each
    entry is structured as B (so chosen through the registry by its name key), and errors
    carry the entry's name (and the array index) in their path."""

    def factory(t):
        base = named_base(t)

        def each(items, build, note, fail):
            """build(value) for every (key, value), every failure collected with its path note."""
            out, errors = [], []
            for key, value in items:
                try:
                    out.append((key, build(value)))
                except Exception as exc:
                    exc.__notes__ = [*getattr(exc, "__notes__", []), note(key)]
                    errors.append(exc)
            if errors:
                raise fail(errors)
            return out

        def entries(table):
            if not isinstance(table, dict):
                raise ValueError(f"expected a table of named tables, got {_describe(table)}")
            return dict(each(table.items(), lambda v: conv.structure(v, base),
                             lambda name: AttributeValidationNote(f"entry {name}", name, base),
                             lambda errs: ClassValidationError(f"While structuring named {base.__name__} tables", errs, base)))

        def hook(value, _t):
            if isinstance(value, dict):
                return entries(value)
            if not isinstance(value, list):
                raise ValueError(f"expected a table of named tables or an array of such tables, got {_describe(value)}")
            return [t for _, t in each(enumerate(value), entries, lambda i: IterableValidationNote(f"index {i}", i, dict),
                                       lambda errs: IterableValidationError(
                                           f"While structuring an array of named {base.__name__} tables", errs, list))]

        return hook

    conv.register_structure_hook_factory(lambda t: named_base(t) is not None, factory)


def _table_check(conv: cattrs.Converter) -> None:
    """attrs classes get a readable error when given a non-table (cattrs would say
    'NoneType object is not subscriptable')."""

    def predicate(t):
        return attrs.has(t) and not any(t is s.base for s in SLOTS)

    def factory(t):
        inner = make_dict_structure_fn(t, conv, _cattrs_forbid_extra_keys=True, _cattrs_detailed_validation=True)

        shorthand = getattr(t, "__mega_shorthand__", None)  # a bare string stands for this key of the table

        def hook(value, _t):
            if shorthand is not None and isinstance(value, str):
                value = {shorthand: value}
            if not isinstance(value, dict):
                raise ValueError(f"expected a table, got {_describe(value)}")
            return inner(value, _t)

        return hook

    conv.register_structure_hook_factory(predicate, factory)


# Keys of other tools' configs that mega spells another way: the unknown-key error says which.
FOREIGN_KEYS = {
    "bucket_cap_mb": "; mega sizes gradient buckets in elements: model.grad_reduce_bucket_size (Megatron's --ddp-bucket-size)",
    "ddp_bucket_size": "; mega's key is model.grad_reduce_bucket_size (elements, Megatron's --ddp-bucket-size)",
}


def _default(cls: type, name: str) -> Any:
    for a in attrs.fields(cls):
        if a.name == name:
            if isinstance(a.default, attrs.Factory):
                return a.default.factory()
            return a.default
    return None


def _render(exc: BaseException, path: List[str], out: List[str]) -> None:
    here = ".".join(path) or "(top level)"
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(exc.cl)]
        for key in sorted(exc.extra_fields):
            hint = FOREIGN_KEYS.get(key) or did_you_mean(key, known)
            out.append(f"{'.'.join(path + [key])}: unknown key{hint}")
    elif isinstance(exc, (_SlotNameError, InvalidValue)):  # a component name, or a value out of range
        out.append(f"{'.'.join(path + [exc.key])}: {exc}")
    elif isinstance(exc, (ClassValidationError, IterableValidationError, BaseExceptionGroup)):
        for sub in exc.exceptions:
            sub_path = path
            for note in getattr(sub, "__notes__", []):
                if isinstance(note, AttributeValidationNote):
                    sub_path = path + [note.name]
                elif isinstance(note, IterableValidationNote):
                    sub_path = path + [f"[{note.index}]"]
            _render(sub, sub_path, out)
    elif isinstance(exc, KeyError):
        out.append(f"{here}: required key missing")
    elif isinstance(exc, MegaError):
        raise exc
    else:
        out.append(f"{here}: {exc}")


def structure(raw: dict, plugins, source: str = "") -> ExperimentConfig:
    """Structure `raw` into an ExperimentConfig or raise one ConfigError listing every
    problem, each at its dotted key."""
    cfg = structure_table(_with_tables(raw, ExperimentConfig, plugins), ExperimentConfig, plugins, source=source)
    _validate_data_prefix(cfg.model.data, source)
    _validate_distributed_optimizer(cfg, plugins, source)
    return cfg


def _validate_distributed_optimizer(cfg: ExperimentConfig, plugins, source: str) -> None:
    """`model.optim.use_distributed_optimizer` on an optimizer whose plugin declares no
    `sharding`, or the overlap switches in a combination Megatron-LM refuses: ConfigErrors
    naming the keys, before any worker starts (mega.runtime.distrib_optimizer)."""
    from mega.runtime.distrib_optimizer import SHARDABLE

    oc = cfg.model.optim
    where = f"{source}: " if source else ""
    if oc.overlap_param_sync and not oc.use_distributed_optimizer:
        raise ConfigError(f"{where}model.optim.overlap_param_sync = true needs model.optim.use_distributed_optimizer = true"
                          " (the parameter all-gather it overlaps exists only then)")
    if not oc.use_distributed_optimizer:
        return
    if type(oc).sharding not in SHARDABLE:
        able = [e.name for e in plugins.optimizers.entries() if getattr(e.config, "sharding", None) in SHARDABLE]
        raise ConfigError(f"{where}model.optim.use_distributed_optimizer = true: model.optim.name = {oc.name!r} cannot be"
                          f" sharded over data-parallel ranks (its plugin declares no `sharding`); optimizers that"
                          f" can: {', '.join(able) or 'none'}")
    if oc.overlap_param_sync and not oc.overlap_grad_sync:
        raise ConfigError(f"{where}model.optim.overlap_param_sync = true needs model.optim.overlap_grad_sync = true"
                          " (as Megatron-LM's --overlap-param-gather needs --overlap-grad-reduce)")


def structure_table(raw: Any, cls: type, plugins, path: str = "", source: str = "") -> Any:
    """Structure one table `raw` (found at the dotted `path`) into the attrs class `cls`
    with the same strict rules, or raise one ConfigError listing every problem."""
    conv = make_converter(plugins)
    prefix = path.split(".") if path else []
    try:
        return conv.structure(raw, cls)
    except (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError, ValueError) as exc:
        lines: List[str] = []
        _render(exc, prefix, lines)
        lines = [ln.replace(".[", "[") for ln in lines]
        where = f"{source}: " if source else ""
        if len(lines) == 1:
            raise ConfigError(f"{where}{lines[0]}") from None
        raise ConfigError(f"{where}{len(lines)} problems:\n  " + "\n  ".join(lines)) from None


def _with_tables(raw: Any, cls: type, plugins) -> Any:
    """A copy of `raw` with an empty table for every missing nested config table, so that
    defaults also go through the registry (a missing `[model]` still becomes the
    registered model's config class, not the base class)."""
    if not isinstance(raw, dict):
        return raw
    cls = _chosen_class(cls, raw, plugins)
    out = dict(raw)
    hints = typing.get_type_hints(cls)
    for a in attrs.fields(cls):
        t = hints.get(a.name, a.type)
        if attrs.has(t):
            out[a.name] = _with_tables(out[a.name] if a.name in out else _default_table(a, t), t, plugins)
    return out


def _default_table(a: attrs.Attribute, t: type) -> dict:
    """The table a missing component table stands for: the component its field's default
    names (a fine-tuning task's `model.data` defaults to its own data source, not the base
    class's), else empty."""
    slot = next((s for s in SLOTS if s.base is t), None)
    if slot is None or not isinstance(a.default, attrs.Factory) or a.default.takes_self:
        return {}
    return {slot.key: getattr(a.default.factory(), slot.key)}


def _validate_data_prefix(data: DataConfig, source: str) -> None:
    """Normalise `data_prefix` to [weight, path, ...]; accept a path or a list of paths."""
    prefix = data.data_prefix
    where = f"{source}: " if source else ""
    if isinstance(prefix, str):
        prefix = [prefix]
    if prefix and all(isinstance(p, str) for p in prefix):
        prefix = [x for p in prefix for x in (1.0, p)]
    ok = len(prefix) % 2 == 0 and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 and isinstance(p, str)
        for w, p in zip(prefix[::2], prefix[1::2])
    )
    if not ok:
        raise ConfigError(
            f"{where}model.data.data_prefix: expected [weight, path, weight, path, ...] with positive weights,"
            f" a list of paths, or one path; got {data.data_prefix!r}"
        )
    data.data_prefix = [float(x) if i % 2 == 0 else x for i, x in enumerate(prefix)]


_FREE, _LEAF = "free-form table", "value"


@attrs.frozen
class _Named:
    base: type


def _chosen_class(cls: type, node: Any, plugins) -> type:
    """For a component table, the config class its plugin registered; else `cls`."""
    slot = next((s for s in SLOTS if s.base is cls), None)
    if slot is None:
        return cls
    name = node.get(slot.key, _default(cls, slot.key)) if isinstance(node, dict) else _default(cls, slot.key)
    if isinstance(name, str) and name in plugins.registries[slot.kind]:
        return plugins.registries[slot.kind].get(name).config or cls
    return cls


def _child_kind(t: Any) -> Any:
    """What a field of type `t` holds: an attrs class, a free-form table, or a value."""
    if named_base(t) is not None:
        return _Named(named_base(t))
    for candidate in (t, *typing.get_args(t)) if typing.get_origin(t) is typing.Union else (t,):
        if attrs.has(candidate):
            return candidate
        if candidate is dict or typing.get_origin(candidate) is dict:
            return _FREE
    return _LEAF


def _walk(raw: dict, path: List[str], plugins):
    """(kind, raw node) that `path` reaches in the schema, given the component names in
    `raw`; None when it leaves the schema."""
    node: Any = raw
    kind: Any = ExperimentConfig
    for part in path:
        if kind is _FREE:
            return kind, None
        if kind is _LEAF:
            return None
        if isinstance(kind, _Named):  # `part` names an entry: it exists if written (table form)
            if not isinstance(node, dict) or not isinstance(node.get(part), dict):
                return None
            kind, node = kind.base, node[part]
            continue
        cls = _chosen_class(kind, node, plugins)
        hints = typing.get_type_hints(cls)
        if part not in {a.name for a in attrs.fields(cls)}:
            return None
        kind = _child_kind(hints[part])
        node = node.get(part) if isinstance(node, dict) else None
    return kind, node


def schema_has(raw: dict, path: List[str], plugins) -> bool:
    """Whether `path` names a key of the schema, given the component names in `raw`."""
    return _walk(raw, path, plugins) is not None


def schema_keys(raw: dict, path: List[str], plugins) -> List[str]:
    """The keys the table at `path` may hold (for did-you-mean suggestions)."""
    reached = _walk(raw, path, plugins)
    if reached is None:
        return []
    kind, node = reached
    if kind is _FREE or kind is _LEAF or isinstance(kind, _Named):
        return list(node) if isinstance(node, dict) else []
    return [a.name for a in attrs.fields(_chosen_class(kind, node, plugins))]
