"""flash_attn's Python API on foldops, for model code written against flash_attn.

- ``interface.py``: ``flash_attn_func``, ``flash_attn_qkvpacked_func``,
  ``flash_attn_kvpacked_func``, ``flash_attn_varlen_func``,
  ``flash_attn_varlen_qkvpacked_func``, ``flash_attn_varlen_kvpacked_func`` (flash_attn
  2.x signatures) on ``foldops.ops.varlen_attention``.
- ``fused_dense.py``: ``FusedDense``, ``FusedMLP``, ``fused_dense_func``, ``fused_mlp_func``.
- ``rotary.py``: ``apply_rotary_emb``, ``apply_rotary_emb_qkv_``, ``apply_rotary_emb_kv_``,
  ``RotaryEmbedding`` (interleaved and not).
- ``bert_padding.py``: ``unpad_input``, ``pad_input``, ``index_first_axis``,
  ``index_put_first_axis`` (flash_attn.bert_padding, 2.8's five-value ``unpad_input``).
- ``_install.py``: ``install()`` / ``uninstall()``: opt-in aliases so that unmodified
  ``import flash_attn ...`` lines resolve here when flash_attn is not installed; a real
  flash_attn is never shadowed.

Use either ``from foldops.compat.flash_attn import flash_attn_varlen_func`` or, to run code
you do not want to edit, ``import foldops.compat.flash_attn as fa; fa.install()`` before it
imports flash_attn.
"""

from foldops.compat.flash_attn._install import (
    API_VERSION,
    install,
    is_installed,
    real_flash_attn_available,
    uninstall,
)
from foldops.compat.flash_attn.bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input
from foldops.compat.flash_attn.fused_dense import FusedDense, FusedMLP, fused_dense_func, fused_mlp_func
from foldops.compat.flash_attn.interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from foldops.compat.flash_attn.rotary import (
    RotaryEmbedding,
    apply_rotary_emb,
    apply_rotary_emb_func,
    apply_rotary_emb_kv_,
    apply_rotary_emb_qkv_,
)

__version__ = API_VERSION  # the flash_attn API followed, as install()'s alias reports it

__all__ = [
    "FusedDense",
    "FusedMLP",
    "RotaryEmbedding",
    "apply_rotary_emb",
    "apply_rotary_emb_func",
    "apply_rotary_emb_kv_",
    "apply_rotary_emb_qkv_",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "fused_dense_func",
    "fused_mlp_func",
    "index_first_axis",
    "index_put_first_axis",
    "install",
    "is_installed",
    "pad_input",
    "real_flash_attn_available",
    "uninstall",
    "unpad_input",
]
