"""Named model sizes, as pure data: the spec validates ``model.preset`` against these names
and ``bigopt.resolve`` merges them, so this module imports nothing (not even torch).

"gpt-1m" equals GPT's constructor defaults (a byte-level model for smoke tests); "gpt-10m" is
nanoGPT's shakespeare-char "baby GPT"; the gpt2-* entries are GPT-2 small and medium with the
vocabulary padded to 50304 (a multiple of 128, faster matmuls as in nanoGPT).
"""

GPT_PRESETS: dict[str, dict[str, int]] = {
    "gpt-1m": dict(vocab_size=256, context=256, n_layer=4, n_head=4, d_model=128),
    "gpt-10m": dict(vocab_size=256, context=256, n_layer=6, n_head=6, d_model=384),
    "gpt2-124m": dict(vocab_size=50304, context=1024, n_layer=12, n_head=12, d_model=768),
    "gpt2-350m": dict(vocab_size=50304, context=1024, n_layer=24, n_head=16, d_model=1024),
}
