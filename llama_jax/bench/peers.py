"""Our training step next to transformers' LLaMA training steps, same shape, same device.

python -m launch.benchmark peers [--config FILE] [--config.model.dim=512 ...]
    [--peers NAMES] [--peers-repeats 7]

Peers (each where its packages import; otherwise a row saying why not):
  pytorch  transformers' LlamaForCausalLM (sdpa attention), torch.optim.AdamW, clip_grad_norm_
  flax     transformers' FlaxLlamaForCausalLM (transformers < 5) with optax clip + adamw
Every step is a whole training step (forward, loss, backward, clip, AdamW with the config's
b1/b2/eps/weight decay) on the config's shape, batch and dtype (float32; bfloat16 as autocast
for PyTorch and dtype=bfloat16 for Flax), random tokens. After two warm-up steps each, the
timed steps are interleaved (ours, pytorch, flax, ours, ...) so that a machine's drift hits
every peer alike, with a pause before each (PAUSE_S) so that one library's idle-spinning
threads do not slow the next; each row reports the median, min and max, and "ours_vs" is our tokens/s
over that peer's. Ours runs with the config's remat policy and attention. "params" counts
each model's parameters: equal counts say the shapes match.
"""

from __future__ import annotations

import gc
import importlib
import statistics
import time

import jax
import numpy as np

from llama_jax.bench.common import load_config
from llama_jax.config import RunConfig
from llama_jax.parallel import sharding as shd
from llama_jax.train import step as ts
from llama_jax.train.optim import make_optimizer

PEERS = ("pytorch", "flax")
# Between timed steps: the previous library's worker threads keep spinning for a while after
# their last parallel region (OpenMP's default wait policy, XLA's pools), and would otherwise
# take the cores from whichever peer runs next.
PAUSE_S = 0.5


def add_args(parser):
    parser.add_argument("--peers", default=",".join(PEERS), help="peers to run next to ours")
    parser.add_argument("--peers-repeats", type=int, default=7, help="interleaved timed steps")


def _tokens(cfg: RunConfig) -> np.ndarray:
    B, T = cfg.train.batch_size, cfg.train.seq_len
    return np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T + 1), dtype=np.int32)


def _hf_config(cfg: RunConfig, transformers):
    m = cfg.model
    return transformers.LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.dim,
        intermediate_size=m.mlp_dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.kv_heads,
        max_position_embeddings=cfg.train.seq_len,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        tie_word_embeddings=False,
    )


def ours(cfg: RunConfig):
    """A step() of our compiled training step (the state is donated and carried)."""
    mesh = shd.make_mesh(*cfg.mesh.sizes)
    compiled = ts.compile_train_step(cfg, mesh)
    state, _ = ts.create_train_state(cfg, mesh)
    toks = _tokens(cfg)
    batch = jax.device_put(
        {"inputs": toks[:, :-1], "targets": toks[:, 1:]}, shd.batch_sharding(mesh)
    )
    frozen = ts.random_frozen(cfg, mesh)  # the step's frozen input: {}, or a LoRA base
    holder = [state]

    def step():
        holder[0], metrics = compiled(holder[0], batch, frozen)
        jax.block_until_ready(metrics)

    detail = f"remat {cfg.model.remat_policy}, attention {cfg.model.attention_impl}"
    return step, detail, sum(x.size for x in jax.tree.leaves(holder[0].params))


def pytorch(cfg: RunConfig):
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    hf = _hf_config(cfg, transformers)
    hf._attn_implementation = "sdpa"
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"  # the device ours runs on
    if device == "cuda" and not torch.cuda.is_available():
        raise ImportError(f"torch {torch.__version__} has no CUDA")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf).to(device).train()
    t = cfg.train
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(t.b1, t.b2), eps=t.eps, weight_decay=t.weight_decay
    )
    toks = torch.from_numpy(_tokens(cfg)[:, :-1].astype(np.int64)).to(device)
    bf16 = cfg.model.dtype == "bfloat16"

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=toks, labels=toks).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    detail = f"torch {torch.__version__}, transformers {transformers.__version__}, sdpa"
    return step, detail, sum(p.numel() for p in model.parameters())


def flax(cfg: RunConfig):
    transformers = importlib.import_module("transformers")
    if not hasattr(transformers, "FlaxLlamaForCausalLM"):
        raise ImportError(
            f"transformers {transformers.__version__} has no FlaxLlamaForCausalLM "
            "(removed in transformers 5)"
        )
    import optax

    dtype = jax.numpy.bfloat16 if cfg.model.dtype == "bfloat16" else jax.numpy.float32
    model = transformers.FlaxLlamaForCausalLM(_hf_config(cfg, transformers), seed=0, dtype=dtype)
    tx = make_optimizer(cfg.train)
    params = model.params
    opt_state = tx.init(params)
    toks = jax.numpy.asarray(_tokens(cfg))

    def loss_fn(p):
        logits = model(toks[:, :-1], params=p, train=True).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    @jax.jit
    def train(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    holder = [params, opt_state]

    def step():
        holder[0], holder[1], loss = train(*holder)
        jax.block_until_ready(loss)

    n_params = sum(x.size for x in jax.tree.leaves(params))
    return step, f"transformers {transformers.__version__}, optax", n_params


def _time_interleaved(steps: dict, repeats: int) -> dict[str, list[float]]:
    for step in steps.values():
        for _ in range(2):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def measure(args) -> list[dict]:
    cfg = load_config(args).replace({"train.grad_accum_steps": 1})
    names = [n for n in str(getattr(args, "peers", ",".join(PEERS))).split(",") if n]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; valid: {list(PEERS)}")
    B, T = cfg.train.batch_size, cfg.train.seq_len
    steps, rows = {}, {}
    for name, make in [("ours", ours), *[(n, globals()[n]) for n in names]]:
        try:
            steps[name], detail, n_params = make(cfg)
            rows[name] = {"peer": name, "detail": detail, "params": n_params}
        except ImportError as e:  # a missing package is a row, not a failure
            rows[name] = {"peer": name, "detail": f"n/a: {e}"}
    times = _time_interleaved(steps, int(getattr(args, "peers_repeats", 7)))
    for name, ts_ in times.items():
        med = statistics.median(ts_)
        rows[name].update(
            {"batch": B, "seq": T, "dtype": cfg.model.dtype, "step_s": med}
            | {"step_s_min": min(ts_), "step_s_max": max(ts_), "tokens/s": B * T / med}
        )
    for row in rows.values():
        if "tokens/s" in row:
            row["ours_vs"] = rows["ours"]["tokens/s"] / row["tokens/s"]
    steps.clear()
    gc.collect()
    return list(rows.values())
