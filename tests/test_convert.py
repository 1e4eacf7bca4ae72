"""Conversions against the real thing: transformers' LlamaForCausalLM, Meta's shard layout."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llama_jax.config import ModelConfig
from llama_jax.model.llama import Llama
from llama_jax.weights import convert, hf
from llama_jax.weights.params_io import load_params, save_params

F32 = {"dtype": "float32", "attention_impl": "reference"}
KV_HEADS = {"mha": 4, "gqa": 2}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def hf_model(n_kv_heads: int, seed: int = 0, tie: bool = False):
    """A tiny random LlamaForCausalLM, with weights large enough that attention is far from
    uniform (so a wrong RoPE permutation shows) and norm scales that are not all ones; tie: the
    LM head is the embedding table (tests/test_tied.py)."""
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        tie_word_embeddings=tie,
        initializer_range=0.15,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model


def tokens(batch=2, length=24, vocab=96, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.from_numpy(toks)).logits.numpy()


def our_logits(params, cfg: ModelConfig, toks):
    return np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(toks)))


@pytest.mark.parametrize("attn", ["mha", "gqa"])
def test_hf_to_ours_logits(tmp_path, attn):
    model = hf_model(KV_HEADS[attn])
    # the GQA case also exercises a sharded safetensors checkpoint with an index
    model.save_pretrained(tmp_path / "hf", max_shard_size="50KB" if attn == "gqa" else "1GB")
    if attn == "gqa":
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    cfg = convert.convert("hf", "ours", str(tmp_path / "hf"), str(tmp_path / "ours"), overrides=F32)
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (64, 4, KV_HEADS[attn], 176)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.vocab_size, cfg.max_seq_len) == (500.0, 1e-5, 96, 64)
    params, loaded_cfg = load_params(str(tmp_path / "ours"))
    assert loaded_cfg == cfg
    toks = tokens()
    err = rel_err(our_logits(params, cfg, toks), hf_logits(model, toks))
    print(f"hf->ours {attn}: max rel err {err:.2e}")
    assert err < 1e-4


def test_hf_permutation_matters(tmp_path, monkeypatch):
    """The negative control: skipping the q/k permutation must break the logits comparison."""
    model = hf_model(2)
    model.save_pretrained(tmp_path / "hf")
    monkeypatch.setattr(hf, "hf_to_meta_rows", lambda w, n: w)
    tree, cfg = hf.read_hf(str(tmp_path / "hf"), overrides=F32)
    toks = tokens()
    err = rel_err(our_logits(tree, cfg, toks), hf_logits(model, toks))
    print(f"hf->ours without the permutation: max rel err {err:.2e}")
    assert err > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["mha", "gqa"])
def test_ours_to_hf_logits(tmp_path, attn):
    cfg = ModelConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=KV_HEADS[attn],
        vocab_size=96,
        multiple_of=16,
        max_seq_len=64,
        rope_theta=500.0,
        init_std=0.15,
        **F32,
    )
    toks = tokens()
    variables = Llama(cfg).init(jax.random.PRNGKey(3), jnp.asarray(toks))
    # non-trivial norm scales, so that swapping the two per-layer norms would show
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 1.3 if "attention_norm" in jax.tree_util.keystr(p) else x, variables
    )
    save_params(str(tmp_path / "ours"), variables, cfg)  # boxed, with the "params" wrapper
    params = nn.unbox(variables)["params"]
    convert.convert("ours", "hf", str(tmp_path / "ours"), str(tmp_path / "hf"))
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert model.config.intermediate_size == cfg.hidden_dim
    err = rel_err(hf_logits(model, toks), our_logits(params, cfg, toks))
    print(f"ours->hf {attn}: max rel err {err:.2e}")
    assert err < 1e-4


# --- Meta ---------------------------------------------------------------------------------------


def meta_state_dict(model) -> dict:
    """Meta's unsharded state dict from an HF model, written independently of llama_jax.weights.meta:
    the inverse of permute() in transformers' convert_llama_weights_to_hf.py."""
    c = model.config
    H = c.hidden_size // c.num_attention_heads

    def unpermute(w, n):
        return w.view(n, 2, H // 2, c.hidden_size).transpose(1, 2).reshape(n * H, c.hidden_size)

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            f"layers.{i}.attention.wq.weight": unpermute(
                sd[p + "self_attn.q_proj.weight"], c.num_attention_heads
            ),
            f"layers.{i}.attention.wk.weight": unpermute(
                sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads
            ),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        }
    return out


# Meta's llama/model.py: ColumnParallelLinear splits the output dim (weight rows),
# RowParallelLinear the input dim (weight columns), ParallelEmbedding the embedding dim.
META_SPLIT = {
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "output": 0,
    "wo": 1,
    "w2": 1,
    "tok_embeddings": 1,
}


def write_meta_checkpoint(path, sd: dict, params: dict, shards: int):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
    parts = [{} for _ in range(shards)]
    for key, w in sd.items():
        kind = key.split(".")[-2] if key.endswith(".weight") else key
        axis = META_SPLIT.get(kind)
        pieces = [w] * shards if axis is None else torch.chunk(w, shards, dim=axis)
        for part, piece in zip(parts, pieces):
            part[key] = piece.clone()
    for n, part in enumerate(parts):
        torch.save(part, os.path.join(path, f"consolidated.{n:02d}.pth"))


def test_meta_shards_match_unsharded_and_hf(tmp_path):
    model = hf_model(2, seed=5)
    sd = meta_state_dict(model)
    # as Meta writes it: vocab_size -1 (the tokenizer's), no max_seq_len
    params_json = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "multiple_of": 16,
        "norm_eps": 1e-5,
        "rope_theta": 500.0,
        "vocab_size": -1,
    }
    write_meta_checkpoint(tmp_path / "m1", sd, params_json, shards=1)
    write_meta_checkpoint(tmp_path / "m2", sd, params_json, shards=2)
    assert torch.load(tmp_path / "m2" / "consolidated.01.pth")[
        "layers.0.attention.wo.weight"
    ].shape == (64, 32)
    c1 = convert.convert("meta", "ours", str(tmp_path / "m1"), str(tmp_path / "o1"), overrides=F32)
    c2 = convert.convert("meta", "ours", str(tmp_path / "m2"), str(tmp_path / "o2"), overrides=F32)
    assert c1 == c2 and (c2.vocab_size, c2.hidden_dim, c2.n_kv_heads) == (96, 176, 2)
    p1, _ = load_params(str(tmp_path / "o1"))
    p2, _ = load_params(str(tmp_path / "o2"))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    toks = tokens()
    err = rel_err(our_logits(p2, c2, toks), hf_logits(model, toks))
    print(f"meta(2 shards)->ours: max rel err {err:.2e}")
    assert err < 1e-4

    # the command line, Meta -> HF directly: transformers loads it and agrees
    from launch.convert import main

    main(
        [
            "--from",
            "meta",
            "--to",
            "hf",
            "--input",
            str(tmp_path / "m2"),
            "--output",
            str(tmp_path / "hf"),
            "--config.model.max_seq_len=64",
        ]
    )
    back = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert back.config.max_position_embeddings == 64
    assert rel_err(hf_logits(back, toks), hf_logits(model, toks)) < 1e-5

    # ours -> meta (2 shards) -> ours is the identity
    convert.convert("ours", "meta", str(tmp_path / "o2"), str(tmp_path / "m3"), num_shards=2)
    back = torch.load(tmp_path / "m3" / "consolidated.01.pth")
    want = torch.load(tmp_path / "m2" / "consolidated.01.pth")
    for key in want:
        torch.testing.assert_close(back[key], want[key], rtol=0, atol=0)


def test_bf16_stays_bf16(tmp_path):
    model = hf_model(2).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    convert.convert("hf", "ours", str(tmp_path / "hf"), str(tmp_path / "ours"))
    params, cfg = load_params(str(tmp_path / "ours"))
    assert cfg.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    convert.convert("ours", "hf", str(tmp_path / "ours"), str(tmp_path / "hf2"))
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.bfloat16)
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    "dim,hidden,ref",
    [
        (4096, 11008, (256, -1.0)),  # LLaMA-7B
        (5120, 13824, (256, -1.0)),  # LLaMA-13B
        (8192, 28672, None),  # LLaMA-2-70B (Meta: multiple_of 4096, ffn_dim_multiplier 1.3)
        (4096, 14336, None),  # LLaMA-3-8B
        (64, 99, None),  # an odd width
    ],
)
def test_ffn_rule(dim, hidden, ref):
    rule = hf.ffn_rule(dim, hidden)
    if ref:
        assert rule == ref
    cfg = ModelConfig(dim=dim, n_heads=1, multiple_of=rule[0], ffn_dim_multiplier=rule[1])
    assert cfg.hidden_dim == hidden


def test_hf_config_errors():
    base = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 176,
        "vocab_size": 96,
    }
    assert hf.config_from_hf({**base, "tie_word_embeddings": True}).tie_word_embeddings
    with pytest.raises(NotImplementedError, match="llama3"):
        hf.config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    assert hf.config_from_hf(base).n_kv_heads == 4


def test_params_io_roundtrip(tmp_path):
    """dtype cast and a sharding applied on load; the {"params": tree} wrapper is accepted."""
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64)
    rng = np.random.default_rng(0)
    tree = {
        "layers": {"attention": {"wq": rng.normal(size=(2, 32, 4, 8)).astype(np.float32)}},
        "output": rng.normal(size=(32, 64)).astype(np.float32),
    }
    save_params(str(tmp_path / "p"), {"params": tree}, cfg)
    params, cfg2 = load_params(str(tmp_path / "p"))
    assert cfg2 == cfg
    assert jax.tree.structure(params) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(a, b)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
    params, cfg3 = load_params(str(tmp_path / "p"), dtype="bfloat16", sharding=sharding)
    assert cfg3.param_dtype == "bfloat16"
    assert params["layers"]["attention"]["wq"].dtype == jnp.bfloat16
    assert params["output"].sharding == sharding
    np.testing.assert_array_equal(params["output"], tree["output"].astype(jnp.bfloat16))


def test_truncated_inputs_are_one_line_errors(tmp_path, capsys):
    """A truncated model.safetensors ends launch.convert with one `error:` line and exit 2, not a
    SafetensorError traceback; a params checkpoint with an array file emptied raises one
    CorruptParamsError naming it (which launch.generate and launch.eval print as one line),
    not a 141-line orbax trace ending in a bare Exception."""
    from launch.convert import main as convert_main

    hf_model(2).save_pretrained(tmp_path / "hf")
    convert.convert("hf", "ours", str(tmp_path / "hf"), str(tmp_path / "ours"), overrides=F32)
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()  # transformers' progress bars so far
    argv = ["--from", "hf", "--to", "ours", "--input", str(tmp_path / "hf"), "--output",
            str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        convert_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "model.safetensors" in err, err

    files = [p for p in (tmp_path / "ours" / "params").rglob("*") if p.is_file()]
    max(files, key=lambda p: p.stat().st_size).write_bytes(b"")
    from llama_jax import cli
    from llama_jax.weights.params_io import CorruptParamsError

    with pytest.raises(CorruptParamsError, match="cannot read the params checkpoint") as e:
        load_params(str(tmp_path / "ours"))
    assert isinstance(e.value, cli.USER_ERRORS)  # generate/eval print it as one line, exit 2
