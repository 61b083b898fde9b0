"""Views of one array as parts, with a VJP that concatenates the parts' cotangents once.

Plain slicing gives each part a zero-padded full-size cotangent, summed: per fused projection of
every block (`split_views`), and per trainable parameter of the flat parameter layout
(`flat_views`, mflux2.training.step.FlatParameters).

- fallback: plain slices, differentiated by autodiff;
- fast path (switches "split_views", "flat_views"): the same views from a custom function whose VJP
  concatenates.
"""

from __future__ import annotations

import mlx.core as mx

from mflux2.ops.switches import is_fast

_SPLITS = {}


class Transposed(tuple):
    """The shape of a matrix stored transposed in a flat array (its view is `reshape(shape[::-1]).T`).

    A LoRA factor's gradient comes out of its GEMM transposed (column-major): flattening it for the
    flat gradient would copy it (a layout copy per LoRA matrix: klein-4b's 120 copy_col_row kernels a
    step on CUDA). Stored transposed, the gradient flattens as a view; the values are the same."""


def flat_view(src: mx.array, offset: int, size: int, shape) -> mx.array:
    """The view of `size` elements at `offset` of a flat array as `shape` (a `Transposed` one too)."""
    piece = src[offset : offset + size]
    return piece.reshape(tuple(shape)[::-1]).T if isinstance(shape, Transposed) else piece.reshape(shape)


def flatten_as(a: mx.array, shape) -> mx.array:
    """`a` flattened in the storage order of a view of `shape` (inverse of `flat_view`)."""
    return (a.T if isinstance(shape, Transposed) else a).reshape(-1)


def split_views(y: mx.array, sizes: tuple[int, ...], axis: int = -1, fast: bool | None = None) -> list[mx.array]:
    """y split along `axis` (the last by default) into parts of `sizes` (views)."""
    sizes, axis = tuple(int(n) for n in sizes), axis % y.ndim
    edges = [0]
    for n in sizes:
        edges.append(edges[-1] + n)
    lead = (slice(None),) * axis

    def split(y):
        return tuple(y[lead + (slice(a, b),)] for a, b in zip(edges, edges[1:]))

    if not is_fast("split_views", fast):
        return list(split(y))
    if (sizes, axis) not in _SPLITS:
        fn = mx.custom_function(split)

        @fn.vjp
        def split_vjp(primals, cotangents, outputs):
            cots = [mx.zeros_like(o) if c is None else c for c, o in zip(cotangents, outputs)]
            return mx.concatenate(cots, axis=axis)

        _SPLITS[(sizes, axis)] = fn
    return list(_SPLITS[(sizes, axis)](y))


def flat_views(groups: dict, casts: dict | None = None, tap=None, fast: bool | None = None):
    """A function (flat arrays in `groups`' order) -> views, one per entry.

    groups: name -> [(index, offset, size, shape)], the views cut from that flat array (in offset
    order; `index` places the view in the output list; a `Transposed` shape is stored transposed).
    casts: name -> the dtype the views of that array read (the flat array is cast once, whole). The VJP concatenates each group's cotangents
    once and casts them to the flat array's dtype. tap(cotangents), if given, sees the views'
    cotangents (in output order) as the VJP runs: the fast path only."""
    names, casts = list(groups), casts or {}
    n_out = sum(len(e) for e in groups.values())

    def views(*arrays):
        out = [None] * n_out
        for name, src in zip(names, arrays):
            src = src.astype(casts[name]) if name in casts else src
            for i, off, size, shape in groups[name]:
                out[i] = flat_view(src, off, size, shape)
        return tuple(out)

    fn = mx.custom_function(views)

    @fn.vjp
    def views_vjp(primals, cotangents, outputs):
        cots = [mx.zeros_like(o) if c is None else c for c, o in zip(cotangents, outputs)]
        if tap is not None:
            tap(cots)
        return tuple(mx.concatenate([flatten_as(cots[i], shape) for i, _, _, shape in groups[name]]).astype(a.dtype)
                     for name, a in zip(names, primals))

    def call(*arrays):
        return list((fn if is_fast("flat_views", fast) else views)(*arrays))

    return call
