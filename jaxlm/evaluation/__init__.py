"""Evaluation: held-out loss and bits per byte, in training and for `jaxlm eval` (`evaluate`), and
lm-eval's tasks on a jaxlm model (`lm_eval_adapter`, the `eval` extra)."""
