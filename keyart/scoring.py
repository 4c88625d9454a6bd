"""Score feature rows with a bundle's ``model.onnx`` (onnxruntime only, no LightGBM).

:class:`OnnxScorer` is the only way keyart opens and runs the reward model. Export's parity
check, offline evaluation of the champion and serving all use it, so the parity figures
describe the very session (options, provider) and the very call serving runs.

The session is single-threaded and sequential on the CPU provider, without spinning:
serving scales with processes, not threads, and a thread pool per request would only add
hand-off latency. The other session options (graph optimisation level, memory arena and
pattern) were measured on a 40 x 8 page and change the model call by under 3%
(docs/benchmarks.md, serving), so they stay at onnxruntime's defaults.

The graph's shape did matter: onnxruntime's binary TreeEnsembleClassifier runs the same
trees 20-60% slower than a TreeEnsembleRegressor summing the margin followed by Sigmoid and
``[1 - p, p]``. :func:`regressor_graph` rewrites the converter's classifier into that form
(export does, before its parity check; so does the benchmark's synthetic bundle); a bundle
of either form serves, the contract (``features`` float32 [N, N_FEATURES] ->
``probabilities`` float32 [N, 2]) is the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from keyart.bundle import INPUT_NAME, MODEL_FILE, OUTPUT_NAME, BundleError
from keyart.feature_spec import N_FEATURES

PROVIDERS = ("CPUExecutionProvider",)


def session_options() -> ort.SessionOptions:
    """The options of every keyart session (see the module docstring for why)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # no thread pool to keep warm: a spinning worker would burn the core between requests
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


_TREE_ATTRS = ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes",
               "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true",
               "nodes_hitrates")
_WEIGHT_ATTRS = ("treeids", "nodeids", "weights")


def regressor_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``'s binary logistic TreeEnsembleClassifier as a TreeEnsembleRegressor of the
    same trees (the margin, summed) followed by ``Sigmoid`` and ``Concat(1 - p, p)``.

    ``model`` must map ``features`` to ``probabilities`` through one TreeEnsembleClassifier
    with class labels [0, 1], every leaf weight on class 0 and ``post_transform`` LOGISTIC
    (what onnxmltools makes of a LightGBM binary booster), optionally followed by Identity
    and multiplications by the constant 1; anything else raises :class:`ValueError`.
    Probabilities agree with the classifier's to float32 rounding (the sigmoid's last bit).
    """
    graph = model.graph
    trees = [n for n in graph.node if n.op_type == "TreeEnsembleClassifier"]
    if len(trees) != 1 or [i.name for i in graph.input] != [INPUT_NAME] or list(trees[0].input) != [INPUT_NAME]:
        raise ValueError("need one TreeEnsembleClassifier reading the input "
                         f"{INPUT_NAME!r}, got nodes {[n.op_type for n in graph.node]}")
    clf = trees[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in clf.attribute}
    if list(attrs.get("classlabels_int64s", [])) != [0, 1] or set(attrs.get("class_ids", [])) != {0} \
            or attrs.get("post_transform") != b"LOGISTIC":
        raise ValueError("need a binary classifier with every leaf weight on class 0 and post_transform "
                         f"LOGISTIC, got labels {attrs.get('classlabels_int64s')}, class ids "
                         f"{sorted(set(attrs.get('class_ids', [])))}, {attrs.get('post_transform')!r}")
    unknown = set(attrs) - {*_TREE_ATTRS, *(f"class_{a}" for a in _WEIGHT_ATTRS), "class_ids",
                            "classlabels_int64s", "post_transform"}
    if unknown:
        raise ValueError(f"classifier attributes not carried over: {sorted(unknown)}")
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    probs = clf.output[1]
    for node in graph.node:  # the converter's tail: Identity, then * 1
        if node is clf:
            continue
        if node.op_type == "Identity" and list(node.input) == [probs]:
            probs = node.output[0]
        elif node.op_type == "Mul" and probs in node.input and len(node.input) == 2 \
                and np.all(consts.get(next(i for i in node.input if i != probs), np.nan) == 1.0):
            probs = node.output[0]
        else:
            raise ValueError(f"node {node.op_type} {list(node.input)} -> {list(node.output)} is not "
                             "the classifier's Identity / * 1 tail")
    if [o.name for o in graph.output] != [OUTPUT_NAME] or probs != OUTPUT_NAME:
        raise ValueError(f"the classifier's probabilities must be the only output {OUTPUT_NAME!r}")
    regressor = helper.make_node(
        "TreeEnsembleRegressor", [INPUT_NAME], ["margin"], domain="ai.onnx.ml", n_targets=1,
        aggregate_function="SUM", post_transform="NONE",
        **{k: attrs[k] for k in _TREE_ATTRS if k in attrs},
        **{f"target_{a}": attrs[f"class_{a}"] for a in _WEIGHT_ATTRS}, target_ids=attrs["class_ids"])
    nodes = [regressor, helper.make_node("Sigmoid", ["margin"], ["p1"]),
             helper.make_node("Sub", ["one", "p1"], ["p0"]),
             helper.make_node("Concat", ["p0", "p1"], [OUTPUT_NAME], axis=1)]
    out = helper.make_model(
        helper.make_graph(nodes, graph.name, list(graph.input), list(graph.output),
                          initializer=[helper.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0])]),
        # sorted: the converter lists the opsets in set order, which varies between processes
        opset_imports=sorted(model.opset_import, key=lambda o: o.domain), ir_version=model.ir_version,
        producer_name=model.producer_name, producer_version=model.producer_version)
    onnx.checker.check_model(out)
    return out


def make_session(model: str | Path | bytes) -> ort.InferenceSession:
    """A session on ``model``: the path of ``model.onnx``, a bundle folder holding it, or the bytes."""
    if not isinstance(model, bytes):
        path = Path(model)
        model = str(path / MODEL_FILE if path.is_dir() else path)
    return ort.InferenceSession(model, sess_options=session_options(), providers=list(PROVIDERS))


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) else None


class OnnxScorer:
    """A loaded reward model: ``score``/``predict(X [n, N_FEATURES]) -> P(quality play) [n]``.

    The model's input and output names and widths are checked once here, so :meth:`score`,
    serving's per-request call, runs the session and nothing else.

    Parameters
    ----------
    model : path to ``model.onnx``, a bundle directory holding it, or the model bytes.
    """

    def __init__(self, model: str | Path | bytes):
        self.session = make_session(model)
        inputs = self.session.get_inputs()
        outputs = {o.name: o for o in self.session.get_outputs()}
        if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise BundleError(f"model inputs {[i.name for i in inputs]} / outputs {list(outputs)}: "
                              f"need input {INPUT_NAME!r} and output {OUTPUT_NAME!r}")
        shape_in, shape_out = inputs[0].shape, outputs[OUTPUT_NAME].shape
        if len(shape_in) != 2 or _static(shape_in[1]) not in (None, N_FEATURES):
            raise BundleError(f"model input {INPUT_NAME!r} is {shape_in}, need [N, {N_FEATURES}]")
        if len(shape_out) != 2 or _static(shape_out[1]) not in (None, 2):
            raise BundleError(f"model output {OUTPUT_NAME!r} is {shape_out}, need [N, 2]")
        self.n_features = N_FEATURES
        self._run = self.session.run
        self._outputs = [OUTPUT_NAME]

    def score(self, x: np.ndarray) -> np.ndarray:
        """P(quality play) [R] of ``x``, which must already be float32, C-contiguous and
        [R >= 1, N_FEATURES]: the per-request path, without checks or copies."""
        return self._run(self._outputs, {INPUT_NAME: x})[0][:, 1]

    def _checked(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must be [n, {self.n_features}], got {X.shape}")
        return X

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities [n, 2] (float32; column 1 = P(quality play)) of any array-like."""
        X = self._checked(X)
        if len(X) == 0:
            return np.zeros((0, 2), np.float32)
        return self._run(self._outputs, {INPUT_NAME: X})[0]

    def predict(self, X: np.ndarray) -> np.ndarray:
        """P(quality play) [n] (float32) of any array-like: converted and checked, then :meth:`score`."""
        X = self._checked(X)
        if len(X) == 0:
            return np.zeros(0, np.float32)
        return self.score(X)
