"""``TritonPythonModel`` for fastmvit: runs inside Triton's Python-backend stub process, and only there
(``triton_python_backend_utils`` exists nowhere else). ``fastmvit.serving.triton`` writes the repository
that loads it; its module docstring gives the inputs and outputs.

``initialize`` loads the model on the instance's device and warms up every batch size before Triton
marks the model ready. ``execute`` validates every request on its own (a bad one gets its own
INVALID_ARG error, HTTP 400), decodes encoded images on a thread pool, and runs every image of every good
request in one forward.

When the forward fails, each request gets its own error (fastmvit.serving.faults): out of memory splits the
batch and retries the halves, and an image that does not fit even alone gets UNAVAILABLE; a device fault
(illegal address, device-side assert ...) answers UNAVAILABLE, and since the instance's CUDA context is
then unusable and Triton (2.4x-2.6x) neither restarts a Python-backend stub nor turns its readiness false,
every later request is answered UNAVAILABLE at once, saying so, and ``python -m fastmvit.serving.probe``
(an inference, not a health call) reports the model not ready. Anything else: INTERNAL for that batch.

A segmentation model answers ``mask_png`` per image: ``execute`` groups the images of all its requests by
input shape (whole images, so the shape follows the aspect ratio), runs one forward per shape, and gives
each request its own masks, in its own order, each at its image's size.
"""
from __future__ import annotations

import json
import os
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from .common import Classifier, InputLimits, RequestError, Segmenter
from .faults import InjectedFaults, forward_with_retries, is_device_fault, refusal_for

__all__ = ["TritonPythonModel"]


def _check_numpy(params: dict) -> None:
    """Triton's Python-backend stubs built against NumPy 1.x (nvidia-pytriton 0.7's, and the NGC
    containers' of that time) mis-size NumPy 2 arrays: string outputs come back empty, string inputs crash
    the stub, with no error the model could see. Refuse to serve such wrong answers unless the config says
    the backend was built for NumPy 2."""
    if int(np.__version__.split(".")[0]) >= 2 and params.get("fastmvit_stub_numpy2", "").lower() != "yes":
        raise RuntimeError(
            f"the Python backend runs with NumPy {np.__version__}, but backend stubs built against NumPy 1.x "
            f"send empty string outputs (topk_labels) and crash on string inputs (image_bytes) with NumPy 2: "
            f"install numpy<2 in the stub's Python environment (the python3 first on the server's PATH), or, "
            f"if this backend was built for NumPy 2, add to config.pbtxt: parameters "
            f'{{ key: "fastmvit_stub_numpy2" value: {{ string_value: "yes" }} }}')


def _log(message: str, error: bool = False) -> None:
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        (logger.log_error if error else logger.log_info)(message)
    else:
        print(message, flush=True)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        _check_numpy(params)
        self.name = args.get("model_name", config.get("name", "fastmvit"))
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu"
        if params.get("fastmvit_cpu_threads"):
            torch.set_num_threads(int(params["fastmvit_cpu_threads"]))

        weights = params.get("fastmvit_weights") or None
        if weights is not None and not os.path.isabs(weights):
            weights = os.path.join(args["model_repository"], str(args["model_version"]), weights)
        pretrained = params.get("fastmvit_pretrained", "true")
        pretrained = {"true": True, "false": False}.get(pretrained, pretrained)
        max_batch_size = int(config.get("max_batch_size", 0)) or 1
        preferred = config.get("dynamic_batching", {}).get("preferred_batch_size", [])
        limits = InputLimits(int(params.get("fastmvit_max_image_bytes", InputLimits.max_bytes)),
                             int(params.get("fastmvit_max_pixels", InputLimits.max_pixels)),
                             int(params.get("fastmvit_min_side", InputLimits.min_side)))
        input_size = int(params["fastmvit_input_size"]) if params.get("fastmvit_input_size") else None
        self.classifier = Classifier.load(
            params.get("fastmvit_model", "s"), weights, pretrained=pretrained, device=device,
            dtype=params.get("fastmvit_dtype", "auto"), input_size=input_size, limits=limits,
            batch_sizes=sorted({1, max_batch_size, *map(int, preferred)}))
        self.top_k = int(params.get("fastmvit_top_k", 5))
        self.segmentation = isinstance(self.classifier, Segmenter)
        self._check_config(config)
        names = self.classifier.labels or [str(i) for i in range(self.classifier.num_classes)]
        self.label_bytes = np.array([n.encode("utf-8") for n in names], dtype=np.object_)
        # PIL decodes with the GIL released, so threads decode a batch's images side by side
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                       thread_name_prefix="fastmvit-decode")
        sizes = self.classifier.warmup()
        self.unusable: Optional[str] = None  # set by a device fault: this instance cannot serve any more
        self._forward = lambda images: self.classifier.forward(images)
        faults = InjectedFaults.from_env()
        if faults is not None:
            self._forward = faults.wrap(self._forward)
        self._init_metrics()
        _log(f"fastmvit: {self.name} ready on {device} ({self.classifier.dtype}), input "
             f"{list(self.classifier.image_shape)}, warmed up at batch sizes {list(sizes)}")

    def _check_config(self, config: dict) -> None:
        dims = {i["name"]: [int(d) for d in i["dims"]] for i in config.get("input", [])}
        outs = {o["name"]: [int(d) for d in o["dims"]] for o in config.get("output", [])}
        if self.segmentation:
            if dims.get("image") != [3, -1, -1] or outs != {"mask_png": [1]}:
                raise ValueError(f"config.pbtxt declares inputs {dims} and outputs {outs}, but a segmentation model "
                                 f"takes image [3, -1, -1] and answers mask_png [1]: rewrite the repository with "
                                 f"python -m fastmvit.serving.triton")
            return
        if dims.get("image") != list(self.classifier.image_shape):
            raise ValueError(f"config.pbtxt declares image dims {dims.get('image')} but the model takes "
                             f"{list(self.classifier.image_shape)}: rewrite the repository with "
                             f"python -m fastmvit.serving.triton")
        if outs.get("logits") != [self.classifier.num_classes] or outs.get("topk_indices") != [self.top_k]:
            raise ValueError(f"config.pbtxt outputs {outs} do not match the model ({self.classifier.num_classes} "
                             f"classes, top-{self.top_k})")

    def _init_metrics(self) -> None:
        """Custom metrics beside Triton's own, on its metrics port: images per forward and refused requests.
        Optional: a server started with metrics off still serves."""
        self._families, self._batch_metric, self._rejected_metric = [], None, None
        try:
            family = pb_utils.MetricFamily
            labels = {"model": self.name}
            if hasattr(family, "HISTOGRAM"):
                hist = family(name="fastmvit_forward_batch_size",
                              description="images in each forward of the model (before padding)",
                              kind=family.HISTOGRAM)
                self._batch_metric = hist.Metric(labels=labels, buckets=[float(b) for b in self.classifier.batch_sizes])
                self._families.append(hist)
            rejected = family(name="fastmvit_rejected_requests_total",
                              description="requests refused by fastmvit's validation", kind=family.COUNTER)
            self._rejected_metric = rejected.Metric(labels=labels)
            self._families.append(rejected)  # a family must outlive its metrics
        except Exception as e:  # noqa: BLE001 - metrics are optional
            _log(f"fastmvit: custom metrics disabled ({e})")

    # ---------------------------------------------------------------------------------------------
    def _read(self, request):
        """The request's images: a checked ``[N, 3, S, S]`` tensor, or a list of decode futures."""
        image = pb_utils.get_input_tensor_by_name(request, "image")
        encoded = pb_utils.get_input_tensor_by_name(request, "image_bytes")
        if (image is None) == (encoded is None):
            raise RequestError(400, "send exactly one of the inputs 'image' (FP32 [N, 3, S, S]) and "
                                    "'image_bytes' (BYTES [N, 1])")
        if image is not None:
            return self.classifier.decoder.check_images(torch.from_dlpack(image.to_dlpack()))
        if not encoded.is_cpu():
            raise RequestError(400, "'image_bytes' must be sent in CPU memory")
        items = encoded.as_numpy().reshape(-1)
        return [self.pool.submit(self.classifier.decoder.decode, item) for item in items]

    @staticmethod
    def _gather(futures) -> torch.Tensor:
        images = []
        for i, f in enumerate(futures):
            try:
                images.append(torch.from_numpy(f.result()))
            except RequestError as e:
                raise RequestError(e.status, e.message if len(futures) == 1 else f"image {i}: {e.message}") from None
        return torch.stack(images)

    def execute(self, requests) -> List:
        if self.unusable is not None:
            return [self._error(self.unusable, pb_utils.TritonError.UNAVAILABLE) for _ in requests]
        if self.segmentation:
            return self._execute_masks(requests)
        responses: List[Optional[object]] = [None] * len(requests)
        pending = []
        for i, request in enumerate(requests):
            try:
                pending.append((i, self._read(request)))
            except RequestError as e:
                responses[i] = self._refuse(e)
        good, batch = [], []
        for i, item in pending:
            try:
                images = item if isinstance(item, torch.Tensor) else self._gather(item)
            except RequestError as e:
                responses[i] = self._refuse(e)
                continue
            good.append((i, images.shape[0]))
            batch.append(images)
        if batch:
            try:
                device = self.classifier.device  # inputs may already be there (FORCE_CPU_ONLY_INPUT_TENSORS=no)
                responses = self._answer(responses, good, torch.cat([b.to(device) for b in batch]))
            except Exception:  # noqa: BLE001 - answer each request rather than fail the whole batch opaquely
                _log(f"fastmvit: answering the batch failed\n{traceback.format_exc()}", error=True)
                for i, _ in good:
                    responses[i] = self._error("fastmvit: the forward pass failed; see the server log",
                                               pb_utils.TritonError.INTERNAL)
        return responses

    @staticmethod
    def _error(message: str, code):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))

    def _release(self) -> None:
        if self.classifier.device.type == "cuda":
            torch.cuda.empty_cache()

    def _answer(self, responses, good, images: torch.Tensor):
        rows = self._run(images)
        failed = torch.zeros(self.classifier.num_classes)  # placeholder rows of failed images, never sent
        logits = torch.stack([r if isinstance(r, torch.Tensor) else failed for r in rows])
        scores, indices = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
        labels = self.label_bytes[indices.numpy()]
        start = 0
        for i, n in good:
            span = slice(start, start + n)
            start += n
            error = next((r for r in rows[span] if isinstance(r, BaseException)), None)
            if error is not None:  # one of its images failed: the request fails, alone
                responses[i] = self._failed(error)
                continue
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor.from_dlpack("logits", to_dlpack(logits[span].contiguous())),
                pb_utils.Tensor.from_dlpack("topk_indices", to_dlpack(indices[span].contiguous())),
                pb_utils.Tensor.from_dlpack("topk_scores", to_dlpack(scores[span].contiguous())),
                pb_utils.Tensor("topk_labels", labels[span]),
            ])
        return responses

    def _run(self, images: torch.Tensor) -> List:
        """``forward_with_retries`` on ``images``, with its failures logged and a device fault noted."""
        rows = forward_with_retries(self._forward, images, release=self._release)
        if self._batch_metric is not None:
            self._batch_metric.observe(float(images.shape[0]))
        for e in {id(r): r for r in rows if isinstance(r, BaseException)}.values():
            _log(f"fastmvit: forward failed for {sum(r is e for r in rows)} of {len(rows)} images\n"
                 f"{''.join(traceback.format_exception(type(e), e, e.__traceback__))}", error=True)
            if is_device_fault(e) and self.unusable is None:
                self.unusable = (f"fastmvit: model instance {self.name} hit a device error and cannot serve any "
                                 f"more; restart the server")
        return rows

    def _failed(self, error: BaseException):
        refusal = refusal_for(error)
        code = pb_utils.TritonError.UNAVAILABLE if refusal.retry else pb_utils.TritonError.INTERNAL
        return self._error(self.unusable if refusal.fatal else f"fastmvit: {refusal.message}", code)

    # --- segmentation ------------------------------------------------------------------------------
    def _whole_images(self, item) -> List:
        """A request's images as ``[(pixels [3, h, w], (H, W) of its mask)]``."""
        if isinstance(item, torch.Tensor):
            return [(x, (int(x.shape[-2]), int(x.shape[-1]))) for x in item]
        images = []
        for i, f in enumerate(item):
            try:
                pixels, size = f.result()
            except RequestError as e:
                raise RequestError(e.status, e.message if len(item) == 1 else f"image {i}: {e.message}") from None
            images.append((torch.from_numpy(pixels), size))
        return images

    def _execute_masks(self, requests) -> List:
        responses: List[Optional[object]] = [None] * len(requests)
        masks = {}  # request -> its masks, in its order
        groups = {}  # input shape -> [(request, position, pixels, size)]
        pending = []
        for i, request in enumerate(requests):  # every request's decoding starts before any is waited for
            try:
                pending.append((i, self._read(request)))
            except RequestError as e:
                responses[i] = self._refuse(e)
        for i, item in pending:
            try:
                images = self._whole_images(item)
            except RequestError as e:
                responses[i] = self._refuse(e)
                continue
            masks[i] = [None] * len(images)
            for j, (pixels, size) in enumerate(images):
                groups.setdefault(tuple(pixels.shape), []).append((i, j, pixels, size))
        try:
            device = self.classifier.device
            for members in groups.values():
                rows = self._run(torch.stack([pixels.to(device) for _, _, pixels, _ in members]))
                for (i, j, _, size), row in zip(members, rows):
                    if responses[i] is not None:
                        continue  # another of its images failed already
                    if isinstance(row, BaseException):  # the request fails, alone
                        responses[i] = self._failed(row)
                        continue
                    try:
                        masks[i][j] = self.classifier.answer(row, size)[0]
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory resizing one huge mask
                        _log(f"fastmvit: the mask of an image failed\n{traceback.format_exc()}", error=True)
                        responses[i] = self._failed(e)
        except Exception:  # noqa: BLE001 - answer each request rather than fail the whole batch opaquely
            _log(f"fastmvit: answering the batch failed\n{traceback.format_exc()}", error=True)
            for i in masks:
                responses[i] = responses[i] or self._error("fastmvit: the forward pass failed; see the server log",
                                                           pb_utils.TritonError.INTERNAL)
        for i, pngs in masks.items():
            if responses[i] is None:
                out = np.empty((len(pngs), 1), dtype=np.object_)
                out[:, 0] = pngs
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("mask_png", out)])
        return responses

    def _refuse(self, error: RequestError):
        if self._rejected_metric is not None:
            self._rejected_metric.increment(1.0)
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(error.message, pb_utils.TritonError.INVALID_ARG))

    def finalize(self) -> None:
        self.pool.shutdown(wait=False)
        self._batch_metric = self._rejected_metric = None
        self._families = []
