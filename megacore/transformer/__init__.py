"""Transformer building blocks: config, module specs, attention, MLP, layer and block.

Optional Apex / Transformer Engine modules live in ``megacore.transformer.extensions``
(the one guarded import) and enter through specs.
"""

from megacore.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megacore.transformer.dot_product_attention import DotProductAttention
from megacore.transformer.enums import (
    AttnBackend,
    AttnMaskType,
    AttnType,
    LayerType,
    ModelType,
)
from megacore.transformer.inference_context import StaticInferenceContext
from megacore.transformer.initialization import (
    init_method_normal,
    init_rng_scope,
    scaled_init_method_normal,
)
from megacore.transformer.mlp import MLP, MLPSubmodules
from megacore.transformer.module import MegatronModule
from megacore.transformer.rotary_pos_embedding import (
    RotaryEmbedding,
    apply_rotary_pos_emb,
)
from megacore.transformer.spec_utils import (
    IdentityFuncOp,
    IdentityOp,
    ModuleSpec,
    build_module,
)
from megacore.transformer.torch_norm import LayerNorm, RMSNorm, WrappedTorchNorm
from megacore.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
    get_transformer_layer_offset,
)
from megacore.transformer.transformer_config import TransformerConfig
from megacore.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

__all__ = [
    "TransformerConfig",
    "ModuleSpec", "build_module", "IdentityOp", "IdentityFuncOp",
    "ModelType", "LayerType", "AttnType", "AttnMaskType", "AttnBackend",
    "MegatronModule",
    "SelfAttention", "SelfAttentionSubmodules", "DotProductAttention",
    "RotaryEmbedding", "apply_rotary_pos_emb",
    "MLP", "MLPSubmodules",
    "LayerNorm", "RMSNorm", "WrappedTorchNorm",
    "TransformerLayer", "TransformerLayerSubmodules",
    "TransformerBlock", "TransformerBlockSubmodules",
    "get_num_layers_to_build", "get_transformer_layer_offset",
    "StaticInferenceContext",
    "init_method_normal", "scaled_init_method_normal", "init_rng_scope",
]
