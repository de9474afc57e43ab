"""Offline jobs: classify folders, globs and lists of image files in fixed-size batches (decoding in worker
processes), stream the results to JSON Lines or CSV, evaluate accuracy on labelled sets, and run the same
job on a Ray cluster.

    from fastmvit.offline import BatchPredictor, find_images
    predictor = BatchPredictor(fastmvit.load("s"), batch_size=64, num_workers=4)
    for paths, predictions in predictor(find_images(["photos/", "more/**/*.png"])):
        ...

Nothing here imports Ray unless the Ray path is used (``fastmvit.offline.ray_data``).
"""
from .evaluate import Evaluation, LabelledImages, evaluate, read_labelled
from .output import CsvWriter, FeatureFile, JsonlWriter, open_writer
from .predict import BatchPredictor, PredictionBatch, RunStats, default_num_workers, iter_predictions
from .sources import IMAGE_EXTENSIONS, find_images, read_list_file

__all__ = [
    "BatchPredictor", "PredictionBatch", "RunStats", "iter_predictions", "default_num_workers",
    "find_images", "read_list_file", "IMAGE_EXTENSIONS",
    "open_writer", "JsonlWriter", "CsvWriter", "FeatureFile",
    "read_labelled", "LabelledImages", "evaluate", "Evaluation",
]
