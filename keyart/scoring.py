"""Score feature rows with a bundle's ``model.onnx`` (onnxruntime only, no LightGBM).

Serving and offline evaluation of the champion share this: one session per process,
one intra-op thread (scale with processes, not threads), the whole page in one call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from keyart.bundle import INPUT_NAME, MODEL_FILE, OUTPUT_NAME


class OnnxScorer:
    """A loaded reward model: ``predict(X [n, F]) -> P(quality play) [n]``.

    Parameters
    ----------
    model : path to ``model.onnx``, a bundle directory holding it, or the model bytes.
    """

    def __init__(self, model: str | Path | bytes):
        if isinstance(model, str | Path):
            path = Path(model)
            model = path / MODEL_FILE if path.is_dir() else path
            model = str(model)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
            raise ValueError(f"model must have input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                             f"got {[i.name for i in inputs]} -> {[o.name for o in outputs]}")
        self.n_features = inputs[0].shape[1]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities [n, 2] (float32; column 1 = P(quality play))."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or (isinstance(self.n_features, int) and X.shape[1] != self.n_features):
            raise ValueError(f"X must be [n, {self.n_features}], got {X.shape}")
        if len(X) == 0:
            return np.zeros((0, 2), np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: X})[0]

    def predict(self, X: np.ndarray) -> np.ndarray:
        """P(quality play) [n]."""
        return self.predict_proba(X)[:, 1]
