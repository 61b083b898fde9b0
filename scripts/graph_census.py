"""A census of one training step's graph, by primitive kind, without evaluating it (issue 33).

`scripts/kernel_profile.py census` builds the real `TrainStep` (forward, backward and the AdamW update,
compiled as the trainer compiles it) at a preset's widths with few blocks, calls it once — which only
traces and compiles — and walks the lazy graph of its outputs. Each node of that graph is what
mx.compile left: fused elementwise kernels (`Compiled…`), GEMMs, reductions, copies, the fast
kernels, and views (no kernel). Counts come per block type by differencing: (3 double, 2 single)
minus (2, 2) is one double block, (2, 3) minus (2, 2) one single block, the rest is (2, 2) minus two
of each.

What MLX does not show as nodes, and how the census handles it:
- Python cannot see an array's inputs and `mx.export_function` cannot serialise custom functions
  (our fast paths are custom VJPs), so a small C++ helper (scripts/graph_walk.cpp, built with the
  installed MLX headers on first use) walks the graph behind the mx.array objects.
- On the CPU, mx.fast.rms_norm / layer_norm / scaled_dot_product_attention are decomposed into plain
  ops; a GPU keeps them as one kernel each way. While tracing, the census replaces them by stand-ins
  with the same inputs and outputs (one marker node forward, one backward), so the graph has the
  GPU's structure. RoPE stays the elementwise formula Metal runs (CUDA runs a custom kernel).
- Implicit copies (a non-contiguous array fed to an op that needs a dense layout) are not nodes: the
  census follows each array's strides through the views (Transpose, Slice, Reshape, Broadcast, ...)
  and elementwise outputs (which keep a dense input's strides, as MLX allocates them), and counts a
  copy where MLX's rules make one: a reshape the strides cannot express, a GEMM operand whose last two
  axes are neither row- nor column-major, a norm input whose rows are not dense. SDPA's output is taken
  as [B, H, N, d] row-major (Metal; on CUDA MLX writes it in q's layout, so the merge of heads after it
  is free there: reported apart).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent

GEMM = {"Matmul", "AddMM", "GatherMM", "BlockMaskedMM", "QuantizedMatmul", "GatherQMM", "SegmentedMM"}
VIEWS = {"Reshape", "Transpose", "Slice", "Broadcast", "BroadcastAxes", "ExpandDims", "Squeeze", "Flatten",
         "Unflatten", "Split", "AsStrided", "StopGradient", "CustomTransforms", "Depends", "NumberOfElements"}
EXPLICIT_COPIES = {"Concatenate", "Copy", "Contiguous", "SliceUpdate", "Pad", "Scatter", "ScatterAxis", "DynamicSliceUpdate"}
REDUCTIONS = {"Sum", "Max", "Min", "Prod", "Reduce", "ArgReduce", "Softmax", "LogSumExp", "Scan", "Or", "And"}
# stand-in marker -> the fast kernel it stands for (rare unary ops nothing in the step uses)
MARKERS = {"ArcCosh": "RMSNorm", "ArcSinh": "RMSNorm VJP", "ArcTanh": "LayerNorm", "Cosh": "LayerNorm VJP",
           "ArcCos": "SDPA", "ArcSin": "SDPA VJP"}
NEEDS_DENSE_ROWS = {"RMSNorm", "RMSNorm VJP", "LayerNorm", "LayerNorm VJP"}


# ---- the C++ walker -----------------------------------------------------------------------------


def _walker():
    mlx_dir = Path(mx.__file__).resolve().parent  # (the package holding core*.so, include/ and lib/)
    src = HERE / "graph_walk.cpp"
    tag = hashlib.sha1(src.read_bytes() + mx.__version__.encode()).hexdigest()[:12]
    so = Path(tempfile.gettempdir()) / f"mflux2_graph_walk_{tag}.so"
    if not so.exists():
        tmp = so.with_suffix(f".{os.getpid()}.so")
        subprocess.run(["c++", "-std=c++20", "-O1", "-fPIC", "-shared", f"-I{mlx_dir / 'include'}", str(src), "-o", str(tmp),
                        f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}"], check=True)
        tmp.replace(so)
    lib = ctypes.CDLL(str(so))
    lib.graph_walk.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_char_p]
    lib.graph_walk.restype = ctypes.c_int
    lib.array_size.argtypes = [ctypes.c_void_p]
    lib.array_size.restype = ctypes.c_longlong
    return lib


def _cpp_pointer(a: mx.array) -> int:
    """The mlx::core::array behind a Python mx.array (a nanobind instance: PyObject header, then an
    int32 offset to the C++ object and flags whose bit 2 says whether it is stored inline)."""
    addr = id(a)
    off = ctypes.c_int32.from_address(addr + 16).value
    flags = ctypes.c_uint32.from_address(addr + 20).value
    p = addr + off
    return p if (flags >> 2) & 1 else ctypes.c_void_p.from_address(p).value


def walk(outputs: list) -> list[dict]:
    """The nodes of the lazy graph of `outputs` (nothing evaluated)."""
    lib = _walker()
    arrs = [a for a in outputs if isinstance(a, mx.array)]
    ptrs = (ctypes.c_void_p * len(arrs))(*[_cpp_pointer(a) for a in arrs])
    if any(lib.array_size(p) != a.size for p, a in zip(ptrs, arrs)):
        raise RuntimeError(f"graph_walk: MLX {mx.__version__}'s Python arrays are not laid out as _cpp_pointer reads them "
                           f"(written for MLX 0.32.4 / nanobind 2-3); update _cpp_pointer")
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        path = f.name
    try:
        n = lib.graph_walk(ptrs, len(arrs), path.encode())
        if n < 0:
            raise RuntimeError("graph_walk could not write its output")
        lines = Path(path).read_text().splitlines()
    finally:
        os.unlink(path)
    return [json.loads(l) for l in lines[1:]]


# ---- stand-ins for the fast kernels -------------------------------------------------------------


@contextmanager
def gpu_fast_kernels():
    """mx.fast.rms_norm / layer_norm / scaled_dot_product_attention as one marker node each way
    (their inputs kept as inputs), for tracing only: the values are meaningless."""
    saved = {n: getattr(mx.fast, n) for n in ("rms_norm", "layer_norm", "scaled_dot_product_attention")}

    def stand_in(fwd_marker, vjp_marker):
        @mx.custom_function
        def fn(*xs):
            return mx.depends([fwd_marker(xs[0])], list(xs[1:]))[0] if len(xs) > 1 else fwd_marker(xs[0])

        @fn.vjp
        def fn_vjp(primals, cot, out):
            cot = cot[0] if isinstance(cot, (list, tuple)) else cot
            single = isinstance(primals, mx.array)  # (one input, a weightless norm: MLX passes it bare, not in a tuple)
            primals = [primals] if single else list(primals)
            # (the cotangent behind a Depends, not an elementwise node: mx.compile would fuse the marker,
            # a unary op, into the elementwise kernel making the cotangent — the modulation's VJP before
            # a LayerNorm's — and the norm's VJP would be counted as elementwise, not as its kernel)
            cot = mx.depends([cot], primals[:1])[0]
            grads = [vjp_marker(cot) if p.shape == cot.shape else mx.zeros_like(p) for p in primals]
            grads = mx.depends(grads, primals)
            return grads[0] if single else tuple(grads)

        return fn

    norm = stand_in(mx.arccosh, mx.arcsinh)
    lnorm = stand_in(mx.arctanh, mx.cosh)
    sdpa = stand_in(mx.arccos, mx.arcsin)

    def rms_norm(x, weight, eps, **kw):
        return norm(x) if weight is None else norm(x, weight)

    def layer_norm(x, weight, bias, eps, **kw):
        return lnorm(*[a for a in (x, weight, bias) if a is not None])

    def scaled_dot_product_attention(q, k, v, scale, mask=None, **kw):
        return sdpa(q, k, v)

    for n, f in (("rms_norm", rms_norm), ("layer_norm", layer_norm), ("scaled_dot_product_attention", scaled_dot_product_attention)):
        setattr(mx.fast, n, f)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(mx.fast, n, f)


# ---- layouts: strides through views, and the copies MLX makes -----------------------------------


def _row_major(shape):
    st, acc = [], 1
    for n in reversed(shape):
        st.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(st))


def _dense(shape, strides) -> bool:
    """Whether the array covers a gap-free block of memory in some axis order (MLX's `contiguous`)."""
    dims = sorted((s, n) for n, s in zip(shape, strides) if n != 1)
    if any(s == 0 for s, _ in dims):
        return False
    acc = 1
    for s, n in dims:
        if s != acc:
            return False
        acc *= n
    return True


def _reshape_strides(shape, strides, new_shape):
    """numpy's no-copy reshape (_attempt_nocopy_reshape): the new strides, or None where MLX copies."""
    old = [(n, s) for n, s in zip(shape, strides) if n != 1]
    new = list(new_shape)
    if not old:
        return _row_major(new)
    out = [0] * len(new)
    oi, oj, ni, nj = 0, 1, 0, 1
    while ni < len(new) and oi < len(old):
        np_, op = new[ni], old[oi][0]
        while np_ != op:
            if np_ < op:
                np_ *= new[nj]
                nj += 1
            else:
                op *= old[oj][0]
                oj += 1
        for k in range(oi, oj - 1):
            if old[k][1] != old[k + 1][0] * old[k + 1][1]:
                return None
        out[nj - 1] = old[oj - 1][1]
        for k in range(nj - 1, ni, -1):
            out[k - 1] = out[k] * new[k]
        ni, nj, oi, oj = nj, nj + 1, oj, oj + 1
    for k in range(ni, len(new)):
        out[k] = 1
    return tuple(out)


def _gemm_ok(shape, strides) -> bool:
    if len(shape) < 2:
        return True
    sx, sy = strides[-2], strides[-1]
    r, c = shape[-2], shape[-1]
    return (sy == 1 and (sx >= c or r == 1)) or (sx == 1 and (sy >= r or c == 1))


def _norm_ok(shape, strides) -> bool:
    return strides[-1] == 1 and (len(shape) < 2 or shape[-2] == 1 or strides[-2] == shape[-1]) and _dense(shape, strides)


def analyse(nodes: list[dict]) -> dict:
    """Kinds of nodes, implicit copies and where the copies come from."""
    prod, shape, strides = {}, {}, {}
    for n in nodes:
        if "leaf" in n:
            shape[n["id"]] = tuple(n["shape"])
            strides[n["id"]] = tuple(n["strides"]) if "strides" in n else _row_major(n["shape"])
        else:
            for oid, sh, _ in n["outputs"]:
                prod[oid] = n
                shape[oid] = tuple(sh)
    # topological order: inputs before outputs
    order, state = [], {}
    for start in [n for n in nodes if "leaf" not in n]:
        stack = [(start, False)]
        while stack:
            node, done = stack.pop()
            key = node["outputs"][0][0]
            if done:
                if state.get(key) != 2:
                    state[key] = 2
                    order.append(node)
                continue
            if key in state:
                continue
            state[key] = 1
            stack.append((node, True))
            for i in node["inputs"]:
                if i in prod and prod[i]["outputs"][0][0] not in state:
                    stack.append((prod[i], False))

    kinds = Counter()
    copies = []  # (what, shape, chain)

    def chain(aid, depth=4):
        out = []
        while aid in prod and len(out) < depth:
            nm = prod[aid]["name"]
            out.append(MARKERS.get(nm, nm))
            if not prod[aid]["inputs"]:
                break
            aid = prod[aid]["inputs"][0]
        return " <- ".join(out)

    for n in order:
        name = n["name"]
        ins = [i for i in n["inputs"]]
        outs = n["outputs"]
        ish = [shape[i] for i in ins]
        ist = [strides.get(i, _row_major(shape[i])) for i in ins]
        label = MARKERS.get(name)
        if label:
            kinds["fast kernels: " + label] += 1
        elif name in GEMM:
            kinds["GEMMs"] += 1
        elif name in EXPLICIT_COPIES:
            kinds["copies: " + name] += 1
            copies.append((name, outs[0][1], chain(ins[0]) if ins else ""))
        elif name in VIEWS:
            kinds["views (no kernel)"] += 1
        elif name in REDUCTIONS:
            kinds["reductions"] += 1
        elif name.startswith("Compiled"):
            kinds["elementwise (fused)"] += 1
        elif name in ("Full", "RandomBits", "Arange"):
            kinds["fills / random"] += 1
        else:
            kinds["elementwise (single)"] += 1
        # implicit copies of inputs
        if name in GEMM:
            for k, (sh, st) in enumerate(zip(ish, ist)):
                if not _gemm_ok(sh, st):
                    kinds["copies: implicit (GEMM operand)"] += 1
                    copies.append(("implicit: GEMM operand", list(sh), chain(ins[k])))
        if label in NEEDS_DENSE_ROWS and ish and not _norm_ok(ish[0], ist[0]):
            kinds["copies: implicit (norm input)"] += 1
            copies.append((f"implicit: {label} input", list(ish[0]), chain(ins[0])))
        if name == "Depends" and ins and ins[0] in prod and MARKERS.get(prod[ins[0]]["name"]) in NEEDS_DENSE_ROWS:
            # a norm VJP stand-in: the kernel reads the forward input x too (a primal of the same shape)
            vjp = MARKERS[prod[ins[0]]["name"]]
            marked = {o[0] for i in ins if i in prod and prod[i]["name"] in MARKERS for o in prod[i]["outputs"]}
            for i, sh, st in zip(ins, ish, ist):
                if sh == ish[0] and i not in marked and not _norm_ok(sh, st):
                    kinds["copies: implicit (norm input)"] += 1
                    copies.append((f"implicit: {vjp} input x", list(sh), chain(i)))
        # output strides
        for oid, sh, _ in outs:
            sh = tuple(sh)
            st = _row_major(sh)
            if name == "Transpose":
                axes = n["axes"]
                st = tuple(ist[0][a] for a in axes)
            elif name == "Slice":
                st = tuple(s * p for s, p in zip(ist[0], n["step"]))
            elif name in ("Broadcast", "BroadcastAxes"):
                src, sst = ish[0], ist[0]
                pad = len(sh) - len(src)
                st = tuple(0 if k < pad or src[k - pad] != sh[k] else sst[k - pad] for k in range(len(sh)))
            elif name in ("Reshape", "Flatten", "Unflatten", "ExpandDims", "Squeeze"):
                new = _reshape_strides(ish[0], ist[0], sh)
                if new is None:
                    kinds["copies: implicit (reshape)"] += 1
                    copies.append(("implicit: reshape", list(ish[0]) + ["->"] + list(sh), chain(ins[0])))
                else:
                    st = new
            elif name == "Split":
                st = ist[0]
            elif name in ("StopGradient", "CustomTransforms", "Depends"):
                src = next((i for i in ins if shape[i] == sh), None)
                st = strides.get(src, st) if src is not None else st
            elif (name.startswith("Compiled") or name not in GEMM | EXPLICIT_COPIES | REDUCTIONS | VIEWS) and not label:
                dense = [(a, b) for a, b in zip(ish, ist) if a == sh and _dense(a, b)]
                full = [(a, b) for a, b in zip(ish, ist) if a == sh]
                if full and len(dense) == len(full) and len({b for _, b in dense}) == 1:
                    st = dense[0][1]  # MLX keeps a dense input's layout for elementwise outputs
            strides[oid] = st
    return {"kinds": dict(kinds), "copies": copies}


def kernel_total(kinds: dict) -> int:
    return sum(v for k, v in kinds.items() if not k.startswith("views"))


# ---- the step -----------------------------------------------------------------------------------


def step_graph(cfg, resolution: int = 512, text_len: int = 512, rank: int = 32, targets: str = "attention",
               alpha: float | None = None) -> list[dict]:
    """The nodes of one compiled training step (plain loss, batch 1) of a model of `cfg` with zero
    weights, traced with the GPU's fast-kernel structure; nothing is evaluated but the inputs."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map

    from mflux2.lora import apply_lora
    from mflux2.models.transformer import Flux2Transformer
    from mflux2.models.vae import image_ids
    from mflux2.training.step import Batch, StepConfig, TrainStep

    dtype = mx.bfloat16
    model = Flux2Transformer(cfg)
    model.update(tree_map(lambda a: mx.zeros(a.shape, dtype), model.parameters()))
    mx.eval(model.parameters())
    apply_lora(model, rank=rank, alpha=float(alpha or rank), targets=targets)  # alpha = rank: the default
    step = TrainStep(model, optim.AdamW(learning_rate=1e-4, weight_decay=1e-4),
                     StepConfig(compile=True, pipeline_ahead=None, memory_limit=None))
    mx.eval(model.parameters(), step.state_arrays())
    side = resolution // 16
    txt_ids = mx.concatenate([mx.zeros((text_len, 3)), mx.arange(text_len, dtype=mx.float32)[:, None]], axis=1)
    batch = Batch(latents=mx.zeros((1, side * side, cfg.in_channels), dtype), prompt_embeds=mx.zeros((1, text_len, cfg.joint_attention_dim), dtype),
                  img_ids=image_ids(resolution, resolution), txt_ids=txt_ids)
    key = mx.random.key(0)
    mx.eval(batch.latents, batch.prompt_embeds, batch.img_ids, batch.txt_ids, key)
    step.params.remember()  # a step after the first: the model's arrays are the flat parameters' views
    with gpu_fast_kernels():
        out = step(batch, key)
    outputs = [v for v in out.values() if isinstance(v, mx.array)] + [a for _, a in tree_flatten(step.state_arrays())]
    return walk(outputs)


def census(model: str = "klein-4b", resolution: int = 512, text_len: int = 512, rank: int = 32, targets: str = "attention",
           cfg=None, alpha: float | None = None) -> dict:
    """Counts per node kind for one double block, one single block and the rest (by differencing
    steps of (2, 2), (3, 2) and (2, 3) blocks), and the copies of each with their shapes and chains."""
    from dataclasses import replace

    from mflux2.models.transformer import preset

    base = cfg or preset(model)
    # Two blocks of each kind at least: with one, mx.compile fuses a node the blocks share (each
    # modulation's 1 + scale) into its only consumer; with two it is one kernel for all of them.
    runs = {}
    for nd, ns in ((2, 2), (3, 2), (2, 3)):
        runs[(nd, ns)] = analyse(step_graph(replace(base, num_layers=nd, num_single_layers=ns), resolution, text_len, rank, targets, alpha))

    def diff(a, b):
        keys = set(a) | set(b)
        return {k: a.get(k, 0) - b.get(k, 0) for k in sorted(keys) if a.get(k, 0) - b.get(k, 0)}

    k11, k21, k12 = (runs[k]["kinds"] for k in ((2, 2), (3, 2), (2, 3)))
    double, single = diff(k21, k11), diff(k12, k11)
    rest = diff(diff(diff(diff(k11, double), double), single), single)
    # a 1-D copy (the flat parameters' gradient) grows with the block count: matched without its size
    # matched on the first two ops of the chain (further back it may leave the block: the first
    # block's input comes from the embedding, a later one's from the block before)
    sig = lambda run: Counter((w, tuple(s) if len(s) > 1 else ("flat",), " <- ".join(c.split(" <- ")[:2])) for w, s, c in run["copies"])  # noqa: E731
    c11, c21, c12 = (sig(runs[k]) for k in ((2, 2), (3, 2), (2, 3)))
    cd, cs = c21 - c11, c12 - c11
    cr = c11 - cd - cd - cs - cs
    longer = {}  # signature -> a longer chain to show (from the last run that has it)
    for run in runs.values():
        for w, s, c in run["copies"]:
            longer[(w, tuple(s) if len(s) > 1 else ("flat",), " <- ".join(c.split(" <- ")[:2]))] = c
    rows = lambda c: [{"what": k[0], "shape": list(k[1]), "chain": longer.get(k, k[2]), "count": n}  # noqa: E731
                      for k, n in sorted(c.items(), key=lambda kv: -kv[1])]
    return {"per_block": {"double": double, "single": single, "rest": rest},
            "totals": {"double": kernel_total(double), "single": kernel_total(single), "rest": kernel_total(rest)},
            "copies": {"double": rows(cd), "single": rows(cs), "rest": rows(cr)}}


def copy_count(kinds: dict) -> int:
    return sum(v for k, v in kinds.items() if k.startswith("copies"))


def markdown(res: dict) -> str:
    """Node kinds per block type (kernels; views apart), then the copies of each block type."""
    kinds = sorted({k for v in res["per_block"].values() for k in v})
    rows = ["| nodes | double block | single block | rest |", "| --- | ---: | ---: | ---: |"]
    for k in kinds:
        rows.append(f"| {k} | " + " | ".join(str(res["per_block"][b].get(k, 0)) for b in ("double", "single", "rest")) + " |")
    rows.append("| kernels (all but views) | " + " | ".join(str(res["totals"][b]) for b in ("double", "single", "rest")) + " |")
    rows.append("| copies (explicit + implicit) | " + " | ".join(str(copy_count(res["per_block"][b])) for b in ("double", "single", "rest")) + " |")
    for b in ("double", "single", "rest"):
        rows += ["", f"{b}: copies", "", "| copy | shape | from (producer chain) | count |", "| --- | --- | --- | ---: |"]
        rows += [f"| {r['what']} | {r['shape']} | {r['chain']} | {r['count']} |" for r in res["copies"][b]]
    return "\n".join(rows)
