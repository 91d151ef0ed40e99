"""A peer check of ``convert``: bonsai's NNX Qwen3 out to Hugging Face safetensors, and back
in with bonsai's own loader, bit for bit.

bonsai (github.com/jax-ml/bonsai) loads Hub checkpoints of Qwen3 with
``create_model_from_safe_tensors``, through a table of HF name -> NNX name and a
permute/reshape per kind of weight (``_get_key_and_transform_mapping``). The tables below are
that table inverted, written as a user would write them for ``convert``: HF names
(``model.layers.N.self_attn.q_proj.weight``) and PyTorch's ``[out, in]`` layouts. A wrong shape
makes bonsai's loader raise; a name it does not know is skipped with a logged warning (checked
here), and one it never sees leaves an abstract leaf; a wrong layout of the right shape, or a
wrong byte, gives other values: each fails the comparison. The loader and the model are
vendored in ``tests/vendor/bonsai`` (see its README.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors import safe_open

import nnx_ckpt_widgets as ncw

# bonsai's modules import each other as ``bonsai.…``: its folder goes on the path as it is.
sys.path.insert(0, str(Path(__file__).parent / "vendor"))
from bonsai.models.qwen3 import modeling as qwen3
from bonsai.models.qwen3.params import (
    _get_key_and_transform_mapping,
    create_model_from_safe_tensors,
)
from bonsai.utils.params import map_to_bonsai_key

# NNX name -> HF name: bonsai's table read right to left (applied in order to keys a/b/c).
TO_HF = {
    r"^embedder/embedding$": "model/embed_tokens/weight",
    r"^layers/(\d+)/attn/([qkvo])_proj/kernel$": r"model/layers/\1/self_attn/\2_proj/weight",
    r"^layers/(\d+)/attn/([qk])_norm/scale$": r"model/layers/\1/self_attn/\2_norm/weight",
    r"^layers/(\d+)/mlp/(gate|up|down)_proj/kernel$": r"model/layers/\1/mlp/\2_proj/weight",
    r"^layers/(\d+)/(\w+_layernorm)/scale$": r"model/layers/\1/\2/weight",
    r"^final_norm/scale$": "model/norm/weight",
    r"^lm_head/kernel$": "lm_head/weight",
}
# Each of bonsai's Transforms undone, on the HF names. bonsai's ATTN_Q/ATTN_KV reshape the HF
# (N*H, D) weight to (N, H, D), then permute (2, 0, 1) to the kernel's (D, N, H); ATTN_OUT
# permutes the HF (D, N*H) weight to (N*H, D), then reshapes it to (N, H, D); LINEAR is a
# transpose; EMBED and SCALE are kept as they are.
FROM_NNX = {
    r"/self_attn/[qkv]_proj/weight$": lambda w: w.transpose(1, 2, 0).reshape(-1, w.shape[0]),
    r"/self_attn/o_proj/weight$": lambda w: w.reshape(-1, w.shape[-1]).T,
    r"(/mlp/\w+_proj|^lm_head)/weight$": lambda w: w.T,
}


def config(tied: bool) -> qwen3.ModelConfig:
    """A tiny Qwen3: two layers, every dimension different, so a wrong axis cannot pass."""
    return qwen3.ModelConfig(
        num_layers=2,
        vocab_size=56,
        emb_dim=24,
        mlp_dim=40,
        num_heads=4,
        head_dim=8,
        num_kv_heads=2,
        rope_theta=1_000_000,
        rope_scaling_factor=1,
        local_rope_theta=1e4,
        norm_eps=1e-6,
        tie_word_embeddings=tied,
    )


def perturbed_model(cfg: qwen3.ModelConfig, *, bf16_exact: bool) -> qwen3.Qwen3:
    """bonsai's Qwen3 with every parameter moved off its initialiser (RMSNorm scales start at
    ones). With ``bf16_exact`` every value is one bfloat16 holds, so a bf16 export loses
    nothing; with tied embeddings ``lm_head`` is ``embedding.T``, as bonsai's loader makes it."""
    model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(params=0))
    rng = np.random.default_rng(26)
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        value = np.asarray(variable.get_value())
        value = value + rng.standard_normal(value.shape).astype(value.dtype) * 0.5
        if bf16_exact:
            value = value.astype(ml_dtypes.bfloat16).astype(value.dtype)
        variable.set_value(jnp.asarray(value))
    if cfg.tie_word_embeddings:
        model.lm_head.kernel.set_value(model.embedder.embedding.get_value().T)
    return model


def flat_arrays(model: nnx.Module) -> dict[tuple, np.ndarray]:
    return {
        tuple(path): np.asarray(variable.get_value())
        for path, variable in nnx.to_flat_state(nnx.state(model))
    }


def hf_shapes(cfg: qwen3.ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shapes transformers' ``Qwen3ForCausalLM`` has: every Linear ``[out, in]``."""
    d, f, q, kv = cfg.emb_dim, cfg.mlp_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads
    kv *= cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    for n in range(cfg.num_layers):
        layer = f"model.layers.{n}."
        shapes |= {
            layer + "self_attn.q_proj.weight": (q, d),
            layer + "self_attn.k_proj.weight": (kv, d),
            layer + "self_attn.v_proj.weight": (kv, d),
            layer + "self_attn.o_proj.weight": (d, q),
            layer + "self_attn.q_norm.weight": (cfg.head_dim,),
            layer + "self_attn.k_norm.weight": (cfg.head_dim,),
            layer + "mlp.gate_proj.weight": (f, d),
            layer + "mlp.up_proj.weight": (f, d),
            layer + "mlp.down_proj.weight": (d, f),
            layer + "input_layernorm.weight": (d,),
            layer + "post_attention_layernorm.weight": (d,),
        }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


@pytest.mark.parametrize(
    ("tied", "cast", "shard_size", "via_orbax"),
    [
        (False, None, "5GB", False),  # one model.safetensors
        (False, "bfloat16", 4000, False),  # shards (bonsai globs *.safetensors) in bf16
        (True, None, 4000, True),  # Qwen3-0.6B's tied head, from an Orbax checkpoint
        (True, "bfloat16", "5GB", False),
    ],
    ids=["untied-f32-one-file", "untied-bf16-shards", "tied-f32-shards-orbax", "tied-bf16"],
)
def test_bonsai_loads_the_export_bit_for_bit(tmp_path, caplog, tied, cast, shard_size, via_orbax):
    cfg = config(tied)
    model = perturbed_model(cfg, bf16_exact=cast is not None)
    before = flat_arrays(model)
    src: object = model
    if via_orbax:  # the usual way: a fine-tuning run's checkpoint, then the export
        src = tmp_path / "ckpt"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(src, nnx.state(model))
    dst = tmp_path / "hf"
    options = dict(
        to="safetensors",
        rename=TO_HF,
        transform=FROM_NNX,
        cast=cast,
        max_shard_size=shard_size,
        # A tied model's Hub files have no lm_head (bonsai's loader sets it to embedding.T).
        select=r"^(?!lm_head/)" if tied else None,
        progress=False,
    )
    dry = ncw.convert(src, dst, dry_run=True, **options)
    assert not dst.exists()
    plan = ncw.convert(src, dst, **options)
    assert plan == dataclasses.replace(dry, written=True)  # the dry run said what was written

    # The plan is the Hub's layout: HF names, PyTorch shapes, the dtype asked for.
    dtype = "bfloat16" if cast else "float32"
    assert {k.key: k.shape for k in plan.keys} == hf_shapes(cfg)
    assert {k.dtype for k in plan.keys} == {dtype}
    assert plan.skipped == (1 if tied else 0)
    # Every exported name maps to exactly one NNX key in bonsai's own table.
    table = _get_key_and_transform_mapping(cfg)
    mapped = {map_to_bonsai_key(table, k.key)[0] for k in plan.keys}
    expected = {".".join(str(p) for p in path) for path in before}
    assert mapped == expected - ({"lm_head.kernel"} if tied else set())

    # The safetensors library reads every file, and it holds what the plan says.
    files = sorted(p.name for p in dst.glob("*.safetensors"))
    assert files == sorted(plan.files)
    if shard_size == "5GB":
        assert files == ["model.safetensors"]
        assert not (dst / "model.safetensors.index.json").exists()
    else:
        assert len(files) > 2, "small shards: several files"
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == {k.key: k.file for k in plan.keys}
        assert index["metadata"]["total_size"] == plan.total_size
    st_dtype = {"bfloat16": "BF16", "float32": "F32"}[dtype]
    for file in files:
        with safe_open(str(dst / file), framework="numpy") as opened:
            assert opened.metadata() == {"format": "pt"}
            assert sorted(opened.keys()) == sorted(plan.files[file])
            for key in plan.keys:
                if key.file != file:
                    continue
                part = opened.get_slice(key.key)
                assert (tuple(part.get_shape()), part.get_dtype()) == (key.shape, st_dtype)
                assert opened.get_tensor(key.key).nbytes == key.nbytes
    written = sum((dst / f).stat().st_size for f in files)
    assert plan.total_size < written < plan.total_size + 8192 * len(files)  # data + headers

    # bonsai's own loader gives the model that was exported, bit for bit.
    with caplog.at_level(logging.WARNING):
        loaded = create_model_from_safe_tensors(str(dst), cfg)
    assert not [r for r in caplog.records if "No mapping" in r.getMessage()]
    after = flat_arrays(loaded)
    assert after.keys() == before.keys()
    assert len(after) == 1 + 1 + 11 * cfg.num_layers + 1  # embedder, norm, layers, lm_head
    for path, value in before.items():
        assert after[path].dtype == value.dtype == np.float32, path
        np.testing.assert_array_equal(after[path], value, err_msg=str(path), strict=True)
        assert after[path].tobytes() == value.tobytes(), path  # bits: -0.0 and NaN count too
    # Nothing was written into the model on the way out.
    assert all(v.tobytes() == before[p].tobytes() for p, v in flat_arrays(model).items())
