"""Configuration of an exported megaxatl model (written by `megaxatl export-hf`).

`megaxatl_model` holds megaxatl's model config section verbatim (pattern, widths, mixer
settings); the usual Hugging Face fields are derived from it so that generic tooling can read the
vocabulary size, width and depth without knowing megaxatl.
"""

from transformers import PretrainedConfig

# Hugging Face field -> megaxatl model config key
_DERIVED = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "max_position_embeddings": "max_seq_len",
}


class MegaxatlConfig(PretrainedConfig):
    model_type = "megaxatl"

    def __init__(self, megaxatl_model=None, mamba2_norm_eps=1e-5, tie_word_embeddings=False, **kwargs):
        self.megaxatl_model = dict(megaxatl_model or {})
        # the Mamba-2 gated norm's eps is not in megaxatl's config section: recorded at export
        self.mamba2_norm_eps = float(mamba2_norm_eps)
        m = self.megaxatl_model
        for hf_name, ours in _DERIVED.items():
            value = kwargs.pop(hf_name, None)
            setattr(self, hf_name, m.get(ours, value))
        super().__init__(tie_word_embeddings=bool(m.get("tie_embeddings", tie_word_embeddings)), **kwargs)
