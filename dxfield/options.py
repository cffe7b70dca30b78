"""The options of the public functions, documented once and placed into their docstrings.

Many options mean the same in :func:`dxfield.drift_field`,
:meth:`dxfield.ProjectedField.field`, :meth:`dxfield.ProjectedField.build` and
:func:`dxfield.kernel_matvec`; their numpydoc texts live here, and
:func:`documented` puts the ones a function takes where its docstring says
``{options}``.  ``help()`` and the rendered docs show the full text.
"""

from __future__ import annotations

OPTIONS = {
    "temperatures": """temperatures : float or sequence of float, default (0.02, 0.05, 0.2)
    One field per temperature (in units of the feature scale); with
    ``drift_norm`` each is normalised, then they are summed.""",
    "normalization": """normalization : {"bidirectional", "row"}
    ``"bidirectional"``: Algorithm 2 of the drifting paper (row and column
    softmax).  ``"row"``: mean shift ``b+(x) - b-(x)``.""",
    "kernel": """kernel : {"laplace", "gaussian"}
    ``exp(-d / tau)`` (default) or ``exp(-d^2 / (2 tau^2))``.""",
    "feature_scale": """feature_scale : "auto", float or None
    ``"auto"``: divide features by ``S = mean distance / sqrt(D)`` and use
    ``tau * sqrt(D)`` (logits ``-(d / mean d) / tau``).  A float: that ``S``.
    None: raw features and raw ``tau``.  The field is returned in the
    scaled units (``V_raw / S``).""",
    "drift_norm": """drift_norm : bool, default True
    Per temperature, ``V <- V / sqrt(mean_i ||V_i||^2 / D)`` before summing.""",
    "neg_weight": """neg_weight : float or array (M,), optional
    Weights of the explicit negatives (classifier-free guidance); a weight
    ``w`` counts a negative as ``w`` copies.  Needs ``neg``.""",
    "include_self": """include_self : bool, optional
    Also use the queries as negatives (self pairs masked).  Default: True
    when ``neg`` is None, else False; with ``neg`` and ``neg_weight`` this is
    the guidance setting (generated batch plus weighted real negatives).""",
    "return_scale": """return_scale : bool
    Also return the feature scale ``S`` used (None when unscaled).""",
    "memory_budget": """memory_budget : int or str, optional
    Extra bytes this call may use (default ``$DXFIELD_MEMORY_BUDGET``, else
    64 MiB; :func:`dxfield.drift_field` takes 512 MiB on a GPU).""",
    "block_size": """block_size : (int, int), optional
    Force the tile shape (query rows, target rows); for tests and tuning.""",
    "backend": """backend : {"auto", "numpy", "cupy"}, optional
    Where to compute (default ``$DXFIELD_BACKEND`` or ``"auto"``: follow the input).""",
    "check_finite": """check_finite : bool, default True
    Reject NaN/Inf inputs (one pass over the inputs).""",
    "field.check_finite": """check_finite : bool, default True
    True: reject NaN/Inf inputs with an error saying where (a min and a max
    per array).  False: a row holding NaN/Inf is left out of every sum, as
    if it had not been passed (the other rows get the field computed
    without it), and a query row left out gets NaN in the output; the same
    scan finds such rows, and the finite rows are then copied.""",
    "labels": """labels, pos_labels, neg_labels : int arrays (N,), (P,), (M,), optional
    Class-conditional field in one call: a query interacts only with
    targets of its own class (positives, other queries, and explicit
    negatives with ``neg_labels``; explicit negatives without labels
    interact with every query, e.g. guidance's unconditional negatives).
    Not the same as one call per class: ``feature_scale="auto"`` takes one
    mean over all same-class pairs, and ``drift_norm`` normalises each
    temperature's field over the whole batch, not per class (with
    ``drift_norm=False`` and a fixed ``feature_scale`` the rows equal the
    per-class calls').  Needs ``pos_labels``.""",
    "engine": """engine : {"auto", "composed", "fused"}, optional
    How the sweeps run (default ``$DXFIELD_ENGINE`` or ``"auto"``).
    ``"composed"``: array operations (NumPy or CuPy), the reference.
    ``"fused"``: CUDA RawKernels around cuBLAS products (GPU, float32;
    see :mod:`dxfield.fused`); for the projected field also the
    query-landmark kernel block, fused with its distances.  ``"auto"``:
    fused on a GPU for float32 inputs, composed otherwise.""",
    "precision": """precision : {"float32", "tf32x3", "tf32"}, default "float32"
    Precision of the fused engine's matrix products (GPU only).
    ``"tf32x3"``: TF32 tensor cores with each operand split in two TF32
    parts (float32-level accuracy); ``"tf32"``: plain TF32 (about 1e-3
    relative error in the products).""",
    "projected.precision": """precision : {"float32", "tf32", "bf16"}, default "float32"
    Precision of the fused engine's matrix products (GPU only): ``"tf32"``
    and ``"bf16"`` use the tensor cores with float32 accumulation.  The
    exact repulsion uses TF32 when ``"bf16"`` is asked.""",
    "projected.normalization": """normalization : {"row", "bidirectional"}, default "row"
    ``"row"``: ``V = b+ - b-``, what the summaries give directly.
    ``"bidirectional"``: Algorithm 2 with the WHOLE summarised data as
    positives, their column sums over the queries taken at the landmarks
    (docs/design.md section 2.6), the negatives' exactly: data modes that no
    query is near keep their pull, so the generator does not settle on the
    heaviest modes.""",
    "projected.repulsion": """repulsion : {"exact", "nystrom"}
    ``"exact"``: the blockwise exact sweep over the negatives.
    ``"nystrom"`` (negatives = the queries): the batch's own summaries on the
    same landmarks, self terms removed, so attraction and repulsion go through
    one kernel and the field vanishes where generated and real samples agree
    (docs/design.md section 2.8); rows whose Nystrom sums fail use the exact
    negatives.""",
    "projected.pos_sample": """pos_sample, pos_sample_labels : array (B, D) and its classes, optional
    A uniform random sample of the summarised data (e.g. a fresh real
    mini-batch) that corrects the bidirectional field's Nystrom sums by its
    residual: an unbiased estimate of Algorithm 2's sums over ALL the data,
    exact when the sample is all the data (docs/design.md section 2.7).
    Class-conditional caches need the sample's classes; each class is
    corrected by its own rows.  Costs an N x B block and O(m^2 B + N m B).
pos_sample_maps : array (B, T, m), optional
    The :meth:`sample_maps` of ``pos_sample``'s rows, where the caller keeps
    them for the data it samples from: the call then skips the sample's
    landmark distances and m x m products (docs/design.md section 8.18).""",
    "projected.pos_mass": """pos_mass : float > 0 or "balanced", optional
    The positives' mass in the bidirectional field's row sums: the field of
    Algorithm 2 against ``pos_mass`` positives drawn from the summarised data
    (per class with labels), each data point weighing ``pos_mass / n`` of its
    class's ``n``.  Standard drifting with P positives estimates this field
    with ``pos_mass = P`` (docs/design.md section 8.24).  ``"balanced"``:
    measured per class and call, one mass for every temperature, at which
    the median query's row normaliser weighs its positives about as much as
    its negatives (the geometric mean over temperatures), at most ``n``
    (section 8.28); the mass chosen is left in ``last_stats``.  Default:
    every data point weighs 1 (Algorithm 2 against all the data).  The
    row-normalised field does not depend on it.""",
    "nystrom.regularisation": """ridge, eig_clamp : float
    Nystrom regularisation (see :class:`dxfield.Nystrom`).""",
}


def documented(*names: str):
    """Decorator: replace the docstring line ``{options}`` by the texts of ``names``, at its indent."""

    def decorate(fn):
        lines = (fn.__doc__ or "").split("\n")
        marks = [i for i, line in enumerate(lines) if line.strip() == "{options}"]
        if len(marks) != 1:
            raise ValueError(f"{fn.__qualname__}: its docstring needs one '{{options}}' line")
        indent = lines[marks[0]][: len(lines[marks[0]]) - len(lines[marks[0]].lstrip())]
        texts = [indent + line for name in names for line in OPTIONS[name].split("\n")]
        fn.__doc__ = "\n".join(lines[: marks[0]] + texts + lines[marks[0] + 1:])
        return fn

    return decorate
