"""HyLo hybrids: the teacher's decoder with each layer's mixer chosen by a plan.

Layer i keeps the teacher's MLP and both RMSNorms; its mixer is the teacher's attention (kept),
MLA, or the linear mixer (Gated DeltaNet or Mamba2). The plan is data (`HybridConfig`):
`mla_layers` and `attention_layers` name layers, every other layer is `linear`.

Mixer dimensions that must agree with the teacher (width, heads, head_dim, eps, dtypes) are
derived from it by `HybridConfig.resolve`; the rest (MLA ranks, GDN heads, chunk sizes, impl)
come from the config. Attention and MLA are stored as `self_attn`, linear mixers as
`linear_attn` (Qwen3-Next's names), so a plan with no replaced layer is the teacher itself.

Layers stay an unrolled Python list: at 28 layers of a 1-3B model XLA compiles the hybrid step
in well under a minute, and an unrolled list keeps Hugging Face-like names for heterogeneous
layers; grouping identical layers under `nnx.scan` is the lever if compile time ever grows.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
from flax import nnx

from hylo_jax.config import ModelConfig, RopeConfig, doc
from hylo_jax.config import replace as replace_config
from hylo_jax.errors import ConfigError
from hylo_jax.models.gated_deltanet import GatedDeltaNet, GDNConfig
from hylo_jax.models.gated_deltanet import check_mesh as check_gdn_mesh
from hylo_jax.models.mamba2 import Mamba2Config, Mamba2Mixer
from hylo_jax.models.mla import MLA, MLAConfig
from hylo_jax.models.transformer import Attention, CausalLM, MixerFactory, check_mesh
from hylo_jax.sharding import check_divides

LayerKind = Literal["attention", "mla", "gdn", "mamba2"]
LINEAR_KINDS = ("gdn", "mamba2")


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """Which mixer each layer gets, and the mixers' own hyper-parameters."""

    mla_layers: tuple[int, ...] = doc((), "Layers whose attention becomes MLA (0-based).")
    attention_layers: tuple[int, ...] = doc((), "Layers that keep the teacher's attention.")
    linear: Literal["gdn", "mamba2"] = doc("gdn", "Mixer of every other layer.")
    mla: MLAConfig = doc(MLAConfig, "MLA ranks (width, heads, eps, dtypes come from the teacher).",
                         factory=True)
    mla_rope: RopeConfig | None = doc(None, "RoPE of the MLA layers only (e.g. YaRN for long "
                                            "context); None = the teacher's.")
    mla_energy_ratio: float | None = doc(None, "Upcycling: choose q/kv latent ranks as the smallest "
                                               "keeping this share of sigma^2 in every MLA layer "
                                               "(X-EcoMLA), rounded up to a multiple of 8; None = "
                                               "the ranks in `mla`.")
    gdn: GDNConfig = doc(GDNConfig, "Gated DeltaNet heads and widths (width, eps from the teacher).",
                         factory=True)
    mamba2: Mamba2Config = doc(Mamba2Config, "Mamba2 chunking/init (HyLo's GQA shape is derived "
                                             "from the teacher: heads, head_dim = d_state, xb heads).",
                               factory=True)
    tie_word_embeddings: bool | None = doc(None, "Tie the student's LM head to its embedding; "
                                                 "None = as the teacher.")

    def layer_kinds(self, num_layers: int) -> list[LayerKind]:
        """Each layer's mixer; `ConfigError` for indices outside the teacher or named twice."""
        for name in ("mla_layers", "attention_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(f"hybrid.{name} {bad} outside the teacher's {num_layers} layers")
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                raise ConfigError(f"hybrid.{name} names a layer twice: {list(getattr(self, name))}")
        both = sorted(set(self.mla_layers) & set(self.attention_layers))
        if both:
            raise ConfigError(f"layers {both} are in both hybrid.mla_layers and hybrid.attention_layers")
        return ["mla" if i in self.mla_layers else "attention" if i in self.attention_layers
                else self.linear for i in range(num_layers)]

    def resolve(self, teacher: ModelConfig) -> tuple[ModelConfig, HybridConfig]:
        """(student ModelConfig, this plan with the teacher-derived mixer fields filled in)."""
        self.layer_kinds(teacher.num_layers)
        common = dict(dtype=teacher.dtype, param_dtype=teacher.param_dtype)
        mla = replace_config(
            self.mla, hidden_size=teacher.hidden_size, num_heads=teacher.num_heads,
            num_kv_heads=teacher.num_kv_heads, rms_norm_eps=teacher.rms_norm_eps,
            rope=self.mla_rope or teacher.rope, attention_impl=teacher.attention_impl,
            max_segments=teacher.max_segments, **common)
        gdn = replace_config(self.gdn, hidden_size=teacher.hidden_size, norm_eps=teacher.rms_norm_eps,
                             **common)
        mamba2 = replace_config(
            self.mamba2, hidden_size=teacher.hidden_size, num_heads=teacher.num_heads,
            head_dim=teacher.head_dim, d_state=teacher.head_dim, n_groups=teacher.num_heads,
            num_xb_heads=teacher.num_kv_heads, norm_eps=teacher.rms_norm_eps, **common)
        student = teacher if self.tie_word_embeddings is None else replace_config(
            teacher, tie_word_embeddings=self.tie_word_embeddings)
        return student, dataclasses.replace(self, mla=mla, gdn=gdn, mamba2=mamba2)


def mixer_factory(kind: LayerKind, cfg: ModelConfig, hybrid: HybridConfig) -> MixerFactory:
    """rngs -> (attribute name, mixer module) for one layer (hybrid already resolved)."""
    if kind == "attention":
        return lambda rngs: ("self_attn", Attention(cfg, rngs=rngs))
    if kind == "mla":
        return lambda rngs: ("self_attn", MLA(hybrid.mla, rngs=rngs))
    if kind == "gdn":
        return lambda rngs: ("linear_attn", GatedDeltaNet(hybrid.gdn, rngs=rngs))
    if kind == "mamba2":
        return lambda rngs: ("linear_attn", Mamba2Mixer(hybrid.mamba2, rngs=rngs))
    raise ConfigError(f"unknown layer kind {kind!r}")


def build_hybrid(cfg: ModelConfig, hybrid: HybridConfig, *, rngs: nnx.Rngs) -> CausalLM:
    """A student built from a resolved (cfg, hybrid) pair; freshly initialised."""
    kinds = hybrid.layer_kinds(cfg.num_layers)
    return CausalLM(cfg, rngs=rngs, mixers=[mixer_factory(k, cfg, hybrid) for k in kinds])


def check_hybrid_mesh(cfg: ModelConfig, hybrid: HybridConfig, mesh: jax.sharding.Mesh) -> None:
    """`MeshError` unless tensor parallelism splits whole heads of every mixer in the plan."""
    check_mesh(cfg, mesh)
    kinds = set(hybrid.layer_kinds(cfg.num_layers))
    if "gdn" in kinds:
        check_gdn_mesh(hybrid.gdn, mesh)
    if "mamba2" in kinds:
        check_divides(mesh, "mamba2.num_heads", hybrid.mamba2.num_heads, ("tensor",))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes a model's architecture: the (student) ModelConfig and, for a hybrid,
    its resolved plan. A teacher is a spec without a plan."""

    model: ModelConfig
    hybrid: HybridConfig | None = None

    @classmethod
    def create(cls, model: ModelConfig, hybrid: HybridConfig | None = None) -> ModelSpec:
        """A spec with the plan resolved against `model` (mixer fields derived from it)."""
        if hybrid is None:
            return cls(model)
        return cls(*hybrid.resolve(model))

    def with_overrides(self, **overrides) -> ModelSpec:
        """ModelConfig fields replaced (e.g. dtype, remat), the plan re-derived from them."""
        return ModelSpec.create(replace_config(self.model, **overrides), self.hybrid)

    def build(self, rngs: nnx.Rngs) -> CausalLM:
        if self.hybrid is None:
            return CausalLM(self.model, rngs=rngs)
        return build_hybrid(self.model, self.hybrid, rngs=rngs)

    def check_mesh(self, mesh: jax.sharding.Mesh) -> None:
        if self.hybrid is None:
            check_mesh(self.model, mesh)
        else:
            check_hybrid_mesh(self.model, self.hybrid, mesh)

    @property
    def conv_kernel(self) -> int:
        """Widest causal convolution of the linear mixers (1 without a plan): the history each
        context-parallel shard needs from the previous one."""
        if self.hybrid is None:
            return 1
        return max(self.hybrid.gdn.conv_kernel, self.hybrid.mamba2.conv_kernel)

    def layer_kinds(self) -> list[LayerKind]:
        if self.hybrid is None:
            return ["attention"] * self.model.num_layers
        return self.hybrid.layer_kinds(self.model.num_layers)
