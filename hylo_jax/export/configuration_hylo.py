"""transformers config of a HyLo hybrid exported by hylo_jax (`hylo export`).

Copied beside the weights; needs only transformers. The teacher's fields (Llama / Qwen2 / Qwen3,
`base_model_type`) plus the plan: `mixer_types[i]` is layer i's mixer ("attention", "mla", "gdn",
"mamba2") and `mla`, `gdn`, `mamba2` hold the hyper-parameters of the kinds in use (the field
names of hylo_jax's MLAConfig, GDNConfig, Mamba2Config; MLA's RoPE as `rope_parameters`).
"""

from transformers import PreTrainedConfig


class HyloConfig(PreTrainedConfig):
    model_type = "hylo_hybrid"
    keys_to_ignore_at_inference = ["past_key_values"]

    base_model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    rope_parameters: dict | None = None
    attention_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    use_cache: bool = True
    mixer_types: list | None = None
    mla: dict | None = None
    gdn: dict | None = None
    mamba2: dict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None


__all__ = ["HyloConfig"]
