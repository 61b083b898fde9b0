"""Reading a training config: YAML (with line numbers for errors), the values checked and coerced
against the schema in config.py, unknown keys with the closest valid one, `--set` overrides, and the
Swift trainer's repairs and per-model defaults filled in (`_finalize`). Every problem is a
ConfigError of one line naming the file (and line), the key path and the bad value; keys the Swift
trainer reads but mflux2 does not honour are accepted with one ConfigWarning each."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import warnings
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from mflux2.training.config import (  # the schema
    BASE_OF,
    ConfigError,
    DatasetConfig,
    ConfigWarning,
    OPTIMIZER_DEFAULTS,
    SECTIONS,
    TrainConfig,
    ValidationPrompt,
    _hints,
    _leaf_paths,
    _schema_fields,
    check_reference_count,
)

# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class _Ctx:
    """Where we are: the source name and a map from key paths to YAML line numbers."""

    def __init__(self, source: str, lines: dict[tuple, int] | None = None):
        self.source = source
        self.lines = lines or {}
        self.overridden: set[tuple] = set()
        self.given: set[tuple] = set()  # key paths (canonical names) the file or an override set
        self._warned: set[tuple] = set()

    def where(self, path: tuple) -> str:
        for n in range(len(path), 0, -1):  # the nearest enclosing key that has a line
            if path[:n] in self.overridden:
                return f"{self.source} (override)"
            if path[:n] in self.lines:
                return f"{self.source}:{self.lines[path[:n]]}"
        return self.source

    def error(self, path: tuple, msg: str) -> ConfigError:
        p = _path_str(path)
        return ConfigError(f"{self.where(path)}: {p + ': ' if p else ''}{msg}")

    def warn(self, path: tuple, msg: str) -> None:
        """One warning line per key: the same key in several list items (prompts[0], prompts[1], ...)
        warns once, at the first."""
        key = tuple(p for p in path if not isinstance(p, int))
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(f"{self.where(path)}: {_path_str(path)}: {msg}", ConfigWarning, stacklevel=4)

    def source_of(self, path: tuple) -> str | None:
        if any(path[:n] in self.overridden for n in range(1, len(path) + 1)):
            return "override"
        return "file" if path in self.given else None


def _path_str(path: tuple) -> str:
    out = ""
    for p in path:
        p = p if isinstance(p, int) or str(p).isprintable() else repr(str(p))  # an error stays one line
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _show(v: Any) -> str:
    s = repr(v)
    s = s.replace("\n", "\\n")
    return s if len(s) <= 60 else s[:57] + "..."


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "empty"}.get(type(v), type(v).__name__)


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce_scalar(v: Any, typ: type, ctx: _Ctx, path: tuple) -> Any:
    if typ is bool:
        if isinstance(v, bool):
            return v
        raise ctx.error(path, f"must be true or false, got {_type_name(v)} {_show(v)}")
    if typ is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            return int(v)
        raise ctx.error(path, f"must be an integer, got {_type_name(v)} {_show(v)}")
    if typ is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string; the Swift trainer's users write it that way.
        if isinstance(v, str) and _FLOAT_RE.match(v.strip()):
            v = float(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                f = float(v)
            except OverflowError:  # an int with hundreds of digits
                f = math.inf
            if not math.isfinite(f):
                raise ctx.error(path, f"must be a finite number, got {_show(v)}")
            return f
        raise ctx.error(path, f"must be a number, got {_type_name(v)} {_show(v)}")
    if typ is str:
        if isinstance(v, str):
            return v
        raise ctx.error(path, f"must be a string, got {_type_name(v)} {_show(v)} (quote it in YAML)")
    raise AssertionError(typ)


def _edits(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap two neighbours) from a to b."""
    d = [[i + j if not i * j else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def _check_meta(v: Any, meta: dict, ctx: _Ctx, path: tuple) -> Any:
    if "choices" in meta and isinstance(v, str):
        key = v.strip().lower()
        aliases = meta.get("aliases", {})
        if key in aliases:
            if key in meta.get("warn_aliases", ()):
                ctx.warn(path, f"{v!r} is treated as {aliases[key]!r}")
            elif key in meta.get("alias_notes", {}):
                ctx.warn(path, meta["alias_notes"][key])
            key = aliases[key]
        if key not in meta["choices"]:
            near = difflib.get_close_matches(key, list(meta["choices"]) + list(aliases), n=1, cutoff=0.5)
            hint = f" (did you mean {aliases.get(near[0], near[0])!r}?)" if near else ""
            typo = [c for c in list(meta["choices"]) + list(aliases) if _edits(key, c) <= 2]
            if "fallback" in meta and typo:  # a typo must not quietly change the training
                raise ctx.error(path, f"invalid value {_show(v)}: did you mean {aliases.get(typo[0], typo[0])!r}? "
                                      f"(one of {', '.join(meta['choices'])})")
            if "fallback" in meta:  # a name the Swift trainer runs as its fallback: so do we, and say so
                ctx.warn(path, f"unknown value {_show(v)} (expected one of {', '.join(meta['choices'])}){hint}: "
                               f"trained as {meta['fallback']!r}, as the Swift trainer does")
                return meta["fallback"]
            raise ctx.error(path, f"invalid value {_show(v)}: expected one of {', '.join(meta['choices'])}{hint}")
        v = key
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        for op, test, word in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                               ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
            if op in meta and not test(v, meta[op]):
                raise ctx.error(path, f"must be {word} {meta[op]}, got {_show(v)}")
    if "check" in meta:
        msg = meta["check"](v)
        if msg:
            raise ctx.error(path, msg)
    return v


def _coerce(v: Any, hint: Any, meta: dict, ctx: _Ctx, path: tuple) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build_section(hint, v, ctx, path)
    if origin in (Union, types.UnionType):  # Optional[X], X | None or Union[bool, int]
        non_none = [a for a in args if a is not type(None)]
        if non_none == [bool, int] or set(non_none) == {bool, int}:
            if isinstance(v, bool):
                return v
            return _check_meta(_coerce_scalar(v, int, ctx, path), meta, ctx, path)
        assert len(non_none) == 1
        return _coerce(v, non_none[0], meta, ctx, path)
    if origin is list:
        (item,) = args
        if item is int and isinstance(v, int) and not isinstance(v, bool):
            v = [v]  # `resolutions: 512` means [512]
        if item is str and isinstance(v, str):
            v = [v]  # one string is a one-item list (`control_path: ctrl`, the Swift trainer's form)
        if not isinstance(v, list):
            raise ctx.error(path, f"must be a list, got {_type_name(v)} {_show(v)}")
        if not v and item in (int, str) and not meta.get("empty_ok"):
            raise ctx.error(path, "must not be empty")
        out = []
        for i, x in enumerate(v):
            if item is ValidationPrompt and isinstance(x, str):
                x = {"prompt": x}  # a plain string is a prompt with the defaults
            if x is None:
                raise ctx.error(path + (i,), "empty list item")
            y = _coerce(x, item, {}, ctx, path + (i,))
            if "item_check" in meta:
                msg = meta["item_check"](y)
                if msg:
                    raise ctx.error(path + (i,), msg)
            out.append(y)
        if item is int:
            out = sorted(set(out))
        if item is str and len(set(out)) < len(out):
            dup = next(x for x in out if out.count(x) > 1)
            raise ctx.error(path, f"{dup!r} is given twice")
        return out
    return _check_meta(_coerce_scalar(v, hint, ctx, path), meta, ctx, path)


def _all_keys() -> dict[str, list[str]]:
    """key name -> the section paths that own it (for 'did you mean dataset.trigger_word?')."""
    owners: dict[str, list[str]] = {}

    def walk(cls, prefix):
        for name in _schema_fields(cls):
            owners.setdefault(name, []).append(prefix)
            if dataclasses.is_dataclass(_hints(cls)[name]):
                walk(_hints(cls)[name], f"{prefix}.{name}")

    for name, cls in SECTIONS.items():
        walk(cls, name)
    return owners


def _unknown_key(cls, key: Any, ctx: _Ctx, path: tuple) -> ConfigError:
    valid = list(_schema_fields(cls)) + list(getattr(cls, "IGNORED", {})) + list(getattr(cls, "KEY_ALIASES", {}))
    k = str(key)
    near = difflib.get_close_matches(k.lower(), valid, n=1, cutoff=0.6)
    if near:
        hint = f" (did you mean {near[0]!r}?)"
    elif k in _KEY_OWNERS:
        hint = f" (it belongs in {' or '.join(o + '.' + k for o in _KEY_OWNERS[k])})"
    else:
        hint = f" (valid keys: {', '.join(valid)})"
    what = "unknown section" if cls is TrainConfig else "unknown key"
    return ctx.error(path, f"{what} {k!r}{hint}")


def _build_section(cls, data: Any, ctx: _Ctx, path: tuple):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        if path:
            raise ctx.error(path, f"must be a mapping of keys, got {_type_name(data)} {_show(data)}")
        raise ctx.error(path, f"the config must be a mapping of sections ({', '.join(SECTIONS)}), got {_type_name(data)}")
    hints = _hints(cls)
    fmap = _schema_fields(cls)
    ignored = getattr(cls, "IGNORED", {})
    aliases = getattr(cls, "KEY_ALIASES", {})
    values: dict[str, Any] = {}
    for key, v in data.items():
        kpath = path + (key,)
        if not isinstance(key, str) or key not in fmap:
            if isinstance(key, str) and key in ignored:
                ctx.warn(kpath, f"accepted but ignored: {ignored[key]}")
                continue
            if isinstance(key, str) and key in aliases:
                target = aliases[key]
                if target in data:
                    raise ctx.error(kpath, f"give either {key!r} or {target!r}, not both")
                key, kpath = target, path + (key,)
            else:
                raise _unknown_key(cls, key, ctx, kpath)
        if v is None:  # `key:` with no value keeps the default (as the Swift trainer's optional fields)
            continue
        values[key] = _coerce(v, hints[key], fmap[key].metadata, ctx, kpath)
        ctx.given.add(path + (key,))
        if "ignored_value" in fmap[key].metadata and values[key] == fmap[key].metadata["ignored_value"]:
            ctx.warn(kpath, f"{str(v).lower()} is ignored: mflux2 always caches latents and text embeddings and releases "
                            f"the text encoder once they are cached (so does the Swift trainer, whatever this says)")
    for name, f in fmap.items():
        if f.metadata.get("required") and name not in values:
            raise ctx.error(path + (name,), "is required")
    return cls(**values)


def _line_map(node: yaml.Node) -> tuple[dict[tuple, int], tuple[tuple, int] | None]:
    """Key path -> 1-based line, from the composed YAML node tree, and the first duplicated key
    (PyYAML would silently keep the last one)."""
    lines: dict[tuple, int] = {}
    dup = None
    seen_nodes: set[int] = set()  # YAML aliases share nodes (and may be recursive): visit each once
    stack: list[tuple[yaml.Node, tuple]] = [(node, ())]
    while stack:
        n, p = stack.pop()
        if id(n) in seen_nodes:
            continue
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            seen = set()
            for k, v in n.value:
                if not isinstance(k, yaml.ScalarNode):
                    continue
                if k.value in seen and dup is None:
                    dup = (p + (k.value,), k.start_mark.line + 1)
                seen.add(k.value)
                lines[p + (k.value,)] = k.start_mark.line + 1
                stack.append((v, p + (k.value,)))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[p + (i,)] = v.start_mark.line + 1
                stack.append((v, p + (i,)))
    return lines, dup


def _read_yaml(path: str | Path) -> tuple[Any, _Ctx]:
    p = Path(path).expanduser()
    src = str(path)
    if not p.exists():
        raise ConfigError(f"{src}: config file not found")
    if p.is_dir():
        raise ConfigError(f"{src}: is a folder, expected a YAML config file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{src}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{src}: not a UTF-8 text file (bad byte at offset {e.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(e.problem or e.context or "syntax error").split())
        raise ConfigError(f"{src}{line}: invalid YAML: {problem}") from None
    except Exception as e:  # noqa: BLE001 - e.g. ValueError from an impossible timestamp, RecursionError
        raise ConfigError(f"{src}: invalid YAML: {' '.join(str(e).split()) or type(e).__name__}") from None
    lines, dup = _line_map(node) if node is not None else ({}, None)
    if dup is not None:
        raise ConfigError(f"{src}:{dup[1]}: {_path_str(dup[0])}: key given twice")
    return raw, _Ctx(src, lines)


def _override_path(key: str, source: str) -> tuple[tuple[str, ...], type]:
    """Check a dotted override key against the schema; return its parts and the owning section
    class. The error names the override."""
    parts = tuple(key.split("."))
    cls: Any = TrainConfig
    for i, part in enumerate(parts):
        if cls is None:
            raise ConfigError(f"{source}: override {key!r}: {_path_str(parts[:i])} is a value, not a section")
        aliases = getattr(cls, "KEY_ALIASES", {})
        fmap = _schema_fields(cls)
        if part not in fmap and part not in aliases:
            err = _unknown_key(cls, part, _Ctx(source), parts[: i + 1])
            raise ConfigError(f"{source}: override {key!r}: {str(err).split(': ', 2)[-1]}")
        owner = cls
        hint = _hints(cls)[aliases.get(part, part)]
        cls = hint if dataclasses.is_dataclass(hint) else None
    if cls is not None:
        raise ConfigError(f"{source}: override {key!r} names a whole section; name a key inside it")
    return parts, owner


def _apply_raw_overrides(raw: Any, overrides: dict[str, Any] | None, ctx: _Ctx) -> Any:
    if not overrides:
        return raw
    if not isinstance(raw, dict):
        return raw  # the section check reports it
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{ctx.source}: override key must be a dotted string like 'training.max_steps', got {_show(key)}")
        parts, owner = _override_path(key, ctx.source)
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        aliases = getattr(owner, "KEY_ALIASES", {})
        canonical = aliases.get(parts[-1], parts[-1])
        for spelling in [canonical, *(a for a, t in aliases.items() if t == canonical)]:  # the override's spelling wins
            node.pop(spelling, None)
        node[parts[-1]] = value
        ctx.overridden.add(parts)
    return raw


def _finalize(cfg: TrainConfig, ctx: _Ctx) -> TrainConfig:
    """Derived defaults and the rules that span several keys. Where the Swift trainer silently
    repairs a config (DOP without a class word or a trigger word), the same file runs here, with one
    warning line that says what was assumed."""
    prov = cfg.provenance
    for path in _leaf_paths(cfg.to_dict()):
        src = ctx.source_of(tuple(path.split(".")))
        if src:
            prov[path] = src
            cfg.locations[path] = ctx.where(tuple(path.split(".")))

    def derived(path: str, note: str | None) -> None:  # a value filled here: record why
        if path not in prov:
            prov[path] = note

    if cfg.model.name is None and cfg.model.path is None:
        cfg.model.name = "klein-4b"
    if cfg.model.name is None:
        derived("model.name", "none: the architecture is read from model.path")
    if cfg.model.path is not None and not Path(cfg.model.path).expanduser().exists():
        from mflux2.hub import missing_path_note

        raise ctx.error(("model", "path"), f"no such file or folder: {cfg.model.path}{missing_path_note(cfg.model.path)}")
    name = cfg.model.name
    if not cfg.model.use_base:
        if name in BASE_OF:
            ctx.warn(("model", "use_base"), f"false: trains the distilled {name} weights; the Swift trainer would "
                                            f"train {BASE_OF[name]} (it always trains the undistilled base)")
        elif name is not None:
            ctx.warn(("model", "use_base"), f"false has no effect on {name} (it has no distilled/base pair)")
    if cfg.lora.alpha is None:
        cfg.lora.alpha = float(cfg.lora.rank)
    opt = OPTIMIZER_DEFAULTS[cfg.training.optimizer]
    if cfg.training.learning_rate is None:
        cfg.training.learning_rate = opt["learning_rate"]
    if cfg.training.weight_decay is None:
        cfg.training.weight_decay = opt["weight_decay"]
        if cfg.training.optimizer == "adamw":
            derived("training.weight_decay", "the seed guide's 1e-4 (Swift: 0.01)")
    if cfg.training.max_steps is None:  # the Swift trainer: epochs x 100 steps, whatever the dataset size
        cfg.training.max_steps = cfg.training.epochs * 100
        derived("training.max_steps", "swift: epochs x 100")
        if prov.get("training.epochs") in ("file", "override"):
            ctx.warn(("training", "epochs"), f"{cfg.training.epochs} without max_steps trains {cfg.training.max_steps} steps "
                                             f"(epochs x 100, as the Swift trainer does; not passes over the data)")
    if cfg.datasets:
        _finalize_datasets(cfg, ctx)
    elif cfg.dataset.path is None:
        raise ctx.error(("dataset", "path"), "is required (a folder of images or a Hugging Face dataset id)")
    elif cfg.dataset.name is None:
        cfg.dataset.name = _folder_name(cfg.dataset.path)
    if cfg.checkpoints.output is None:
        stem = Path(ctx.source).stem if ctx.source and not ctx.source.startswith("<") else "run"
        cfg.checkpoints.output = f"output/{stem}"
    if cfg.memory.bucketing.resolutions is None:  # the seed guide's [512], or the size the user asked for
        cfg.memory.bucketing.resolutions = [cfg.dataset.image_size]
    if cfg.validation.every_n_steps is None:
        cfg.validation.every_n_steps = cfg.checkpoints.save_every
        if prov.get("checkpoints.save_every") in ("file", "override"):
            derived("validation.every_n_steps", "= checkpoints.save_every: every checkpoint gets its images (Swift: 500)")
    if cfg.loss.diff_output_preservation:
        if not any(d.trigger_word for d in cfg.dataset_list if not d.is_regularization):  # TrainLoRACommand.swift:753: DOP only with a trigger word
            ctx.warn(("loss", "diff_output_preservation"),
                     "true but dataset.trigger_word is not set: DOP is turned off (it replaces the trigger word by the "
                     "class word), as the Swift trainer does; set a trigger word to use DOP")
            cfg.loss.diff_output_preservation = False
            prov["loss.diff_output_preservation"] = "from file (true), turned off as the Swift trainer does: no dataset.trigger_word"
        elif not cfg.loss.diff_output_preservation_class:  # TrainLoRACommand.swift:756: class "object"
            ctx.warn(("loss", "diff_output_preservation"),
                     "true but loss.diff_output_preservation_class is not set: the class word 'object' is assumed, "
                     "as the Swift trainer does; set it (e.g. \"cat\", \"person\") to say what the subject is")
            cfg.loss.diff_output_preservation_class = "object"
            derived("loss.diff_output_preservation_class", "swift: assumed, DOP is on without a class word")
    _check_preservation_prompts(cfg, ctx)
    for at, ds in _dataset_keys(cfg):
        _check_dataset(cfg, ds, at, ctx)
    if cfg.validation.prompts and not cfg.dataset.trigger_word and any(p.apply_trigger for p in cfg.validation.prompts):
        ctx.warn(("validation", "prompts"), "apply_trigger is true but dataset.trigger_word is not set: the prompts are used as written")
    if cfg.validation.vlm_scoring.enabled and not cfg.validation.prompts:
        ctx.warn(("validation", "vlm_scoring", "enabled"), "true but there are no validation prompts: nothing to score")
    for i, p in enumerate(cfg.validation.prompts):
        if not (p.is_512 or p.is_1024):
            ctx.warn(("validation", "prompts", i), "is_512 and is_1024 are both false: this prompt makes no image")
        for j, ref in enumerate(p.reference_image or []):  # read from the current folder, as dataset.path
            if not Path(ref).expanduser().is_file():
                key = ("validation", "prompts", i, "reference_image") + ((j,) if len(p.reference_image) > 1 else ())
                raise ctx.error(key, f"no such file: {ref} (relative paths are read from the current folder {Path.cwd()})")
    if cfg.validation_variant is not None:
        cfg.resolve_model_defaults(cfg.validation_variant)
    return cfg


def _folder_name(spec: str) -> str:
    """A dataset's default name: its folder's name (a hub id's repository name)."""
    return Path(spec.rstrip("/\\")).name or spec


# `dataset`'s keys that are never defaults of the `datasets` entries: what names one dataset.
_NOT_INHERITED = ("path", "name")


def _dataset_keys(cfg: TrainConfig) -> list[tuple[tuple, "DatasetConfig"]]:
    """(key path, dataset) of every dataset that trains: ("dataset",) or ("datasets", i)."""
    if not cfg.datasets:
        return [(("dataset",), cfg.dataset)]
    return [(("datasets", i), d) for i, d in enumerate(cfg.datasets)]


def _finalize_datasets(cfg: TrainConfig, ctx: _Ctx) -> None:
    """`datasets:` given: the keys given in `dataset` are the entries' defaults; every entry needs a
    path; two entries may not be the same folder; names are derived from the folders and unique."""
    if cfg.dataset.path is not None:
        raise ctx.error(("dataset", "path"), "give either dataset.path (one dataset) or datasets (a list of them), not both; "
                                             "with datasets, the dataset section holds the keys every entry shares")
    shared = [f.name for f in dataclasses.fields(cfg.dataset)
              if f.name not in _NOT_INHERITED and ("dataset", f.name) in ctx.given]
    seen_paths: dict[str, int] = {}
    names: dict[str, int] = {}
    for i, d in enumerate(cfg.datasets):
        for k in shared:
            if ("datasets", i, k) not in ctx.given:
                setattr(d, k, copy.deepcopy(getattr(cfg.dataset, k)))
        if d.is_regularization and ("datasets", i, "trigger_word") not in ctx.given:
            d.trigger_word = None  # a reg set trains without one: the shared (or derived) trigger word is not its
        if d.path is None:
            raise ctx.error(("datasets", i, "path"), "is required (a folder of images or a Hugging Face dataset id)")
        p = Path(d.path).expanduser()
        where = str(p.resolve()) if p.exists() else d.path
        if where in seen_paths:
            raise ctx.error(("datasets", i, "path"), f"{d.path!r} is the same folder as datasets[{seen_paths[where]}].path; "
                                                     f"give each folder once (use repeats to draw it more often)")
        seen_paths[where] = i
        if d.name is None:
            base = _folder_name(d.path)
            d.name = base if base not in names else f"{base}_{i}"
        if d.name in names:
            raise ctx.error(("datasets", i, "name"), f"{d.name!r} is also datasets[{names[d.name]}]'s name; names must differ")
        names[d.name] = i
    if cfg.dataset.trigger_word is None:  # the run's trigger word (validation prompts, the LoRA's metadata)
        words = {d.trigger_word for d in cfg.datasets if not d.is_regularization}
        if len(words) == 1 and None not in words:
            cfg.dataset.trigger_word = words.pop()
        elif len(words - {None}) > 1 and cfg.validation.prompts:
            ctx.warn(("datasets",), f"the datasets have different trigger words ({', '.join(sorted(words - {None}))}): "
                                    f"validation prompts get dataset.trigger_word's (none is set); write the trigger "
                                    f"word into those prompts")


def _check_dataset(cfg: TrainConfig, ds, at: tuple, ctx: _Ctx) -> None:
    """The rules within one dataset (`at`: its key path)."""
    name = _path_str(at)
    if ds.validation_control_path and not ds.control_path:
        raise ctx.error(at + ("validation_control_path",), f"is set but {name}.control_path is not (edit training "
                                                            f"needs both; remove it for text-to-image training)")
    if ds.validation_control_path and not ds.validation_path:
        raise ctx.error(at + ("validation_control_path",), f"is set but {name}.validation_path is not: set the "
                                                            f"validation images it pairs with")
    if ds.control_dropout and not ds.control_path:
        ctx.warn(at + ("control_dropout",), f"{ds.control_dropout} has no effect without {name}.control_path "
                                            f"(text-to-image training)")
    if ds.control_path and cfg.training_variant is not None:
        one = copy.copy(cfg)
        one.dataset = ds
        try:
            check_reference_count(one, cfg.training_variant)
        except ConfigError as e:
            raise ctx.error(at + ("control_path",), str(e).split("dataset.control_path: ", 1)[-1]) from None
    if ds.auto_caption:
        if ds.caption_format != "txt":
            raise ctx.error(at + ("auto_caption",), f"writes .txt captions beside the images: set {name}.caption_format: txt")
        if ds.caption_style == "edit" and not ds.control_path:
            raise ctx.error(at + ("caption_style",), f"edit captions describe the change from each control image to its "
                                                     f"target: set {name}.control_path")
    if ds.mask_path and ds.alpha_mask:
        raise ctx.error(at + ("alpha_mask",), f"true and {name}.mask_path is set: take the mask from one of them")
    if ds.keep_tokens and not ds.shuffle_tokens:
        ctx.warn(at + ("keep_tokens",), f"{ds.keep_tokens} has no effect without {name}.shuffle_tokens: true")
    if ds.mask_path is None and not ds.alpha_mask and ds.mask_min and (*at, "mask_min") in ctx.given:
        ctx.warn(at + ("mask_min",), f"{ds.mask_min} has no effect without {name}.mask_path or {name}.alpha_mask")
    if ds.caption_ext.strip().lstrip(".").lower() != "txt" and ds.caption_format == "jsonl":
        ctx.warn(at + ("caption_ext",), f"{ds.caption_ext!r} has no effect with {name}.caption_format: jsonl")
    ds.caption_ext = ds.caption_ext.strip().lstrip(".")
    if ds.is_regularization and (*at, "trigger_word") in ctx.given and ds.trigger_word != cfg.dataset.trigger_word:
        ctx.warn(at + ("trigger_word",), "is ignored: a regularisation set trains with its own captions and no trigger word")


def _check_preservation_prompts(cfg: TrainConfig, ctx: _Ctx) -> None:
    """loss.diff_output_preservation_prompts: used only with DOP on (else one warning), never the
    trigger word (they are held to the base model); repeats are refused where lists are read (the rotation
    would weight them)."""
    from mflux2.training.data import names_trigger

    prompts, key = cfg.loss.diff_output_preservation_prompts, ("loss", "diff_output_preservation_prompts")
    if not prompts:
        return
    if not cfg.loss.diff_output_preservation:
        ctx.warn(key, "ignored: loss.diff_output_preservation is off (these prompts take turns with the class "
                      "prompt in DOP's preservation pass); set it to true to use them")
    for i, p in enumerate(prompts):
        if any(names_trigger(p, d.trigger_word) for d in (cfg.dataset, *cfg.datasets)):
            raise ctx.error(key + (i,), f"{_show(p)} names the trigger word {cfg.dataset.trigger_word!r}: these prompts "
                                        f"are held to the base model, so they must not name the subject")


def _legacy_validation_prompt(raw: Any, ctx: _Ctx) -> Any:
    """The Swift trainer's legacy `validation.prompt: "..."` becomes one prompt at 512 and 1024."""
    if not isinstance(raw, dict) or not isinstance(raw.get("validation"), dict) or "prompt" not in raw["validation"]:
        return raw
    raw = copy.copy(raw)
    val = dict(raw["validation"])
    legacy = val.pop("prompt")
    if val.get("prompts"):
        ctx.warn(("validation", "prompt"), "ignored because validation.prompts is given (as in the Swift trainer)")
    elif legacy is not None:
        if not isinstance(legacy, str):
            raise ctx.error(("validation", "prompt"), f"must be a string, got {_type_name(legacy)} {_show(legacy)}")
        val["prompts"] = [{"prompt": legacy, "is_512": True, "is_1024": True, "apply_trigger": True}]
    raw["validation"] = val
    return raw


def _build(raw: Any, ctx: _Ctx, overrides: dict[str, Any] | None) -> TrainConfig:
    raw = _apply_raw_overrides(raw, overrides, ctx)
    raw_for_rebuild = copy.deepcopy(raw) if isinstance(raw, dict) else {}
    raw = _legacy_validation_prompt(raw, ctx)
    cfg = _build_section(TrainConfig, raw, ctx, ())
    cfg.source, cfg.raw = ctx.source, raw_for_rebuild
    return _finalize(cfg, ctx)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read, validate and resolve a YAML training config. `overrides` maps dotted key paths to
    values (`{"training.max_steps": 10}`) and is applied before validation."""
    raw, ctx = _read_yaml(path)
    return _build(raw, ctx, overrides)


def config_from_dict(data: Any, source: str = "<config>", overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Validate a config given as a mapping (as YAML would load it)."""
    return _build(copy.deepcopy(data), _Ctx(source), overrides)


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A new config: `cfg`'s source mapping with dotted-key overrides, validated like the file.
    (The file's warnings were given when it was loaded; they are not repeated.)"""
    raw = cfg.raw if cfg.raw else cfg.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return config_from_dict(raw, source=cfg.source, overrides=overrides)



_KEY_OWNERS = _all_keys()
