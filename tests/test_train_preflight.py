"""Every input of a training run is checked before anything large is built: a wrong data path,
seq_len, tokenizer, init folder or output folder is one error, raised while the model exists
only on the meta device (no parameter storage has been allocated)."""

from __future__ import annotations


import pytest

from megaxatl.checkpoint import CheckpointError
from megaxatl.config import ConfigError, config_from_dict
from megaxatl.data import DataError
from megaxatl.models import lm as lm_module
from megaxatl.train import run
from test_train_common import make_init_dir, tiny_config, train_shards  # noqa: F401 (fixture)


def forbid_real_models(monkeypatch):
    """From here on, fail the test if an LM is built anywhere but on the meta device."""
    real_init = lm_module.LM.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if any(p.device.type != "meta" for p in self.parameters()):
            raise AssertionError("a model with real storage was built before the inputs were checked")

    monkeypatch.setattr(lm_module.LM, "__init__", init)


@pytest.fixture
def no_real_model(monkeypatch):
    forbid_real_models(monkeypatch)


def test_missing_train_shards_fail_before_the_model(tmp_path, train_shards, no_real_model):
    data = tiny_config(tmp_path / "run", train_shards, data__train_shards=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="nope.*does not exist"):
        run(config_from_dict(data))


def test_bad_val_shards_and_seq_len_fail_before_the_model(tmp_path, train_shards, no_real_model):
    data = tiny_config(tmp_path / "run", train_shards, data__val_shards=str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: has no manifest.json"):
        run(config_from_dict(data))
    data = tiny_config(tmp_path / "run", train_shards, data__seq_len=16, model__max_seq_len=64)
    with pytest.raises(DataError, match="seq_len 32, data.seq_len is 16"):
        run(config_from_dict(data))


def test_init_from_that_does_not_fit_fails_before_the_model(tmp_path, train_shards, monkeypatch):
    other = tiny_config(tmp_path / "x", train_shards, model__d_mlp=48)
    make_init_dir(other, tmp_path / "init")
    data = tiny_config(tmp_path / "run", train_shards, train__init_from=str(tmp_path / "init"))
    forbid_real_models(monkeypatch)
    with pytest.raises(CheckpointError, match=r"mlp.* in the folder, \(64, 32\) in this model"):
        run(config_from_dict(data))
    # and a folder that is no model folder at all names itself
    (tmp_path / "junk").mkdir()
    data["train"]["init_from"] = str(tmp_path / "junk")
    with pytest.raises(CheckpointError, match="junk: not a model folder"):
        run(config_from_dict(data))


def test_tokenizer_mismatch_fails_before_the_model(tmp_path, train_shards, monkeypatch):
    from fixtures_donors import write_tiny_tokenizer

    data = tiny_config(tmp_path / "x", train_shards)
    make_init_dir(data, tmp_path / "init")
    write_tiny_tokenizer(tmp_path / "init" / "tokenizer", 300)  # not the shards' SentencePiece model
    data = tiny_config(tmp_path / "run", train_shards, train__init_from=str(tmp_path / "init"))
    forbid_real_models(monkeypatch)
    with pytest.raises(DataError, match="shards were tokenized with tokenizer .* but the model's tokenizer"):
        run(config_from_dict(data))


def test_output_that_is_a_file_fails_first(tmp_path, train_shards, no_real_model):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(ConfigError, match="train.out_dir.*exists and is not a folder"):
        run(config_from_dict(tiny_config(tmp_path / "out", train_shards)))
    assert (tmp_path / "out").read_text() == "not a folder"
