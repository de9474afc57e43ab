"""``predict --ray`` on a real local Ray cluster (ray.init with this machine's CPUs) writes the file the
single-process job writes."""
import json

import pytest

from fastmvit.offline.cli import predict_main

from ..serving.helpers import INPUT_SIZE, MODEL

ray = pytest.importorskip("ray", reason="the Ray path needs the `ray` extra (CI installs it)")


def test_ray_writes_the_single_process_file(checkpoint, folder, tmp_path, capsys):
    common = ["--model", MODEL, "--weights", checkpoint, "--input-size", str(INPUT_SIZE), "--batch-size", "4",
              "--top", "3", "--progress", "off"]
    single, on_ray = tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    assert predict_main([str(folder), "-o", str(single), "--workers", "0", *common]) == 1
    assert not ray.is_initialized()
    assert predict_main([str(folder), "-o", str(on_ray), "--ray", *common]) == 1
    assert not ray.is_initialized()  # the local cluster it started is shut down
    err = capsys.readouterr().err
    assert "4 skipped" in err
    a = [json.loads(line) for line in single.read_text().splitlines()]
    b = [json.loads(line) for line in on_ray.read_text().splitlines()]
    assert [r["path"] for r in b] == [r["path"] for r in a]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        if "error" in x:
            assert x == y
        else:
            # other batch compositions than the single-process run: the same classes, scores to float error
            assert (x["labels"], x["indices"]) == (y["labels"], y["indices"])
            assert y["scores"] == pytest.approx(x["scores"], rel=1e-4)
