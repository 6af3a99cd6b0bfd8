"""What a run reports (`moeut.train.monitor.Reporter`): metrics.jsonl always from rank 0, nothing from
the others, and a missing optional logger named once rather than failing the run."""

import json
import sys

from moeut.train.config import TrainConfig
from moeut.train.monitor import Reporter


def test_rank_0_writes_metrics_and_says_when_tensorboard_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import raises ImportError
    said = []
    reporter = Reporter(TrainConfig(), tmp_path, 0, said.append)
    reporter.log({"step": 1, "loss": 2.5, "sample": "text"})
    reporter.log({"step": 2, "val_ppl": 9.0})
    reporter.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": 2.5, "sample": "text"},
        {"step": 2, "val_ppl": 9.0},
    ]
    assert len(said) == 1 and "TensorBoard is not installed" in said[0]


def test_other_ranks_write_nothing(tmp_path):
    reporter = Reporter(TrainConfig(), tmp_path, 1, print)
    reporter.log({"step": 1, "loss": 2.5})
    reporter.close()
    assert list(tmp_path.iterdir()) == []
