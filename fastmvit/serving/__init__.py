"""Serving plug-ins (issue 5). Import the one you use; this package imports no server library itself.

- ``fastmvit.serving.litserve``: ``FastMViTAPI`` (a LitServe ``LitAPI``) and ``serve()``, behind
  ``python -m fastmvit serve --model s [--weights PATH]``.
- ``fastmvit.serving.triton``: ``write_model_repository()`` and ``python -m fastmvit.serving.triton`` (also
  ``python -m fastmvit serve triton``): a Triton Inference Server repository for the Python backend, whose
  ``model.py`` loads ``fastmvit.serving.triton_model.TritonPythonModel``.
- ``fastmvit.serving.common``: what both share (request checks with HTTP statuses, the model wrappers:
  ``Classifier``, and ``Segmenter`` for DeepLabV3 models, whose answer is a mask PNG per image).
- ``fastmvit.serving.launch``: run servers locally, including the tritonserver bundled in nvidia-pytriton.
"""
