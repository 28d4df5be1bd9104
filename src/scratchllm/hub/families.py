"""Architecture families: Hugging Face config.json ⇄ `ModelConfig`.

`hf_spec` reads a GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM or Qwen2ForCausalLM
config (and refuses what `GPTModel` cannot run); `export_spec` picks the class a `ModelConfig`
exports to (and refuses shapes none can hold); `hf_config_dict` writes that class's config.json.
The tensor names of each family are in `scratchllm.hub.names`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from scratchllm.config import ModelConfig
from scratchllm.errors import InputError

ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
}
MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}  # config "model_type"


@dataclass
class HFSpec:
    """How a Hugging Face model maps onto a `ModelConfig`, and which optional tensors the
    Hugging Face side has (ours follow from `config`)."""

    family: str  # gpt2 | llama | qwen3 | qwen2
    architecture: str
    config: ModelConfig
    tied: bool
    qkv_bias: bool = False  # the Hugging Face model has q/k/v biases
    o_bias: bool = False  # ... an attention output bias
    mlp_bias: bool = False  # ... feed-forward biases

    def has(self, feature: str | None) -> bool:
        """Whether the Hugging Face model holds the tensors a name-map row marks `feature`."""
        if feature is None:
            return True
        if feature == "qk_norm":  # Qwen3 in both directions
            return self.config.qk_norm
        if feature == "untied":
            return not self.tied
        if feature in ("qkv_bias", "o_bias", "mlp_bias"):
            return bool(getattr(self, feature))
        raise RuntimeError(f"internal error: unknown name-map feature {feature!r}")


def _need(hf: dict[str, Any], key: str, source: str, arch: str) -> Any:
    if key not in hf or hf[key] is None:
        raise InputError(f"{source}: field {key!r} is missing (needed for {arch})")
    return hf[key]


def _rope(hf: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and Llama 3 scaling from a v4 (`rope_theta`/`rope_scaling`) or v5
    (`rope_parameters`) config."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params or None
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    partial = (scaling or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise InputError(f"{source}: partial_rotary_factor {partial} is not supported")
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise InputError(
            f"{source}: rope scaling type {kind!r} is not supported (only 'llama3' and none)"
        )
    try:
        out = dict(
            rope_type="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings", 8192)
            ),
        )
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{source}: incomplete llama3 rope scaling {scaling!r}") from None
    return theta, out


def hf_spec(hf: dict[str, Any], source: str, name: str = "hf") -> HFSpec:
    """Parse a Hugging Face config.json (as a dict) into an `HFSpec`; refuse what we cannot run."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and not archs:
        arch = MODEL_TYPES.get(hf.get("model_type", ""))
    if arch is None:
        found = ", ".join(archs) or repr(hf.get("model_type"))
        raise InputError(
            f"{source}: unsupported architecture {found}; scratchllm imports "
            f"{', '.join(ARCHITECTURES)}"
        )
    family = ARCHITECTURES[arch]
    try:
        if family == "gpt2":
            return _gpt2_spec(hf, source, arch, name)
        return _llama_spec(hf, source, arch, family, name)
    except InputError:
        raise
    except (TypeError, ValueError) as exc:
        raise InputError(f"{source}: bad value in config for {arch} ({exc})") from None


def _gpt2_spec(hf: dict[str, Any], source: str, arch: str, name: str) -> HFSpec:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise InputError(
            f"{source}: activation_function {act!r} is not supported (scratchllm's GELU is the "
            "tanh approximation, 'gelu_new')"
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise InputError(f"{source}: non-standard GPT-2 attention scaling is not supported")
    if hf.get("add_cross_attention"):
        raise InputError(f"{source}: GPT-2 with cross-attention is not supported")
    emb = int(_need(hf, "n_embd", source, arch))
    inner = hf.get("n_inner")
    config = ModelConfig(
        vocab_size=int(_need(hf, "vocab_size", source, arch)),
        context_length=int(hf.get("n_positions") or _need(hf, "n_ctx", source, arch)),
        emb_dim=emb,
        n_heads=int(_need(hf, "n_head", source, arch)),
        n_layers=int(_need(hf, "n_layer", source, arch)),
        drop_rate=float(hf.get("resid_pdrop") or 0.0),
        qkv_bias=True,
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        hidden_dim=None if inner in (None, 4 * emb) else int(inner),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        name=name,
    )
    return HFSpec("gpt2", arch, config, config.tie_embeddings, True, True, True)


def _llama_spec(hf: dict[str, Any], source: str, arch: str, family: str, name: str) -> HFSpec:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise InputError(f"{source}: hidden_act {act!r} is not supported (only silu/SwiGLU)")
    if hf.get("use_sliding_window"):
        raise InputError(f"{source}: sliding-window attention is not supported")
    emb = int(_need(hf, "hidden_size", source, arch))
    heads = int(_need(hf, "num_attention_heads", source, arch))
    head_dim = int(hf.get("head_dim") or emb // heads)
    theta, scaling = _rope(hf, source)
    if family == "qwen2":
        qkv_b, o_b, mlp_b = True, False, False
    elif family == "qwen3":
        qkv_b = o_b = bool(hf.get("attention_bias", False))
        mlp_b = False
    else:
        qkv_b = o_b = bool(hf.get("attention_bias", False))
        mlp_b = bool(hf.get("mlp_bias", False))
    default_ctx = {"llama": 2048, "qwen3": 32768, "qwen2": 32768}[family]
    config = ModelConfig(
        vocab_size=int(_need(hf, "vocab_size", source, arch)),
        context_length=int(hf.get("max_position_embeddings") or default_ctx),
        emb_dim=emb,
        n_heads=heads,
        n_layers=int(_need(hf, "num_hidden_layers", source, arch)),
        drop_rate=0.0,
        qkv_bias=qkv_b,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=None if head_dim * heads == emb else head_dim,
        hidden_dim=int(_need(hf, "intermediate_size", source, arch)),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        pos_embedding="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        ffn="swiglu",
        bias=o_b or mlp_b,
        qk_norm=family == "qwen3",
        name=name,
    )
    return HFSpec(family, arch, config, config.tie_embeddings, qkv_b, o_b, mlp_b)


def export_spec(config: ModelConfig, source: str) -> HFSpec:
    """The Hugging Face architecture a `ModelConfig` exports to; refuse shapes none can hold."""
    c = config
    modern = [  # scratchllm's modern options change the forward pass; no HF family has them
        name
        for name, used in (
            ("ffn=relu2", c.ffn == "relu2"),
            ("norm=rmsnorm_noparam", c.norm == "rmsnorm_noparam"),
            ("logit_softcap", c.logit_softcap is not None),
            ("smear", c.smear),
            ("attn_gate", c.attn_gate),
        )
        if used
    ]
    if modern:
        raise InputError(
            f"{source}: no Hugging Face architecture holds {', '.join(modern)}; "
            "keep this model as a scratchllm checkpoint"
        )
    if c.pos_embedding == "learned" and c.norm == "layernorm" and c.ffn == "gelu":
        problems = []
        if c.kv_heads != c.n_heads:
            problems.append("grouped-query attention (n_kv_heads)")
        if c.head_size * c.n_heads != c.emb_dim:
            problems.append("head_dim other than emb_dim / n_heads")
        if c.qk_norm:
            problems.append("qk_norm")
        if problems:
            raise InputError(f"{source}: GPT-2 export cannot hold {', '.join(problems)}")
        return HFSpec("gpt2", "GPT2LMHeadModel", c, c.tie_embeddings, True, True, True)
    if c.pos_embedding == "rope" and c.norm == "rmsnorm" and c.ffn == "swiglu":
        if c.qk_norm:
            if c.bias:
                raise InputError(
                    f"{source}: Qwen3 has no feed-forward biases; this model has bias=True"
                )
            attn_bias = c.qkv_bias
            return HFSpec("qwen3", "Qwen3ForCausalLM", c, c.tie_embeddings, attn_bias, attn_bias)
        attn_bias = c.qkv_bias or c.bias
        return HFSpec(
            "llama", "LlamaForCausalLM", c, c.tie_embeddings, attn_bias, attn_bias, c.bias
        )
    raise InputError(
        f"{source}: no Hugging Face architecture for pos_embedding={c.pos_embedding}, "
        f"norm={c.norm}, ffn={c.ffn}; export supports learned+layernorm+gelu (GPT-2) and "
        "rope+rmsnorm+swiglu (Llama, Qwen3 with qk_norm)"
    )


def hf_config_dict(spec: HFSpec, dtype: torch.dtype, eos_id: int | None, bos_id: int | None):
    """config.json for `spec` (v4 key names, which transformers 4.x and 5.x both read)."""
    c = spec.config
    dtype_name = str(dtype).removeprefix("torch.")
    if spec.family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_positions": c.context_length,
            "n_ctx": c.context_length,
            "n_embd": c.emb_dim,
            "n_layer": c.n_layers,
            "n_head": c.n_heads,
            "n_inner": None if c.ffn_dim == 4 * c.emb_dim else c.ffn_dim,
            "activation_function": "gelu_new",
            "resid_pdrop": c.drop_rate,
            "embd_pdrop": c.drop_rate,
            "attn_pdrop": c.drop_rate,
            "layer_norm_epsilon": c.norm_eps,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": c.tie_embeddings,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "torch_dtype": dtype_name,
            "use_cache": True,
        }
    out = {
        "architectures": [spec.architecture],
        "model_type": spec.family,
        "vocab_size": c.vocab_size,
        "hidden_size": c.emb_dim,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "attention_bias": spec.qkv_bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype_name,
        "use_cache": True,
    }
    if spec.family == "llama":
        out["mlp_bias"] = spec.mlp_bias
        out["pretraining_tp"] = 1
    else:
        out["use_sliding_window"] = False
        out["sliding_window"] = None
    return out
