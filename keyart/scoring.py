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
``[1 - p, p]``, the form export ships (:func:`keyart.models.export.regressor_graph`); a
bundle of either form serves, the contract (``features`` float32 [N, N_FEATURES] ->
``probabilities`` float32 [N, 2]) is the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

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
