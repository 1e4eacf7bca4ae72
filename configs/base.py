"""The full config schema with defaults; every config file starts from base_config()."""

import ml_collections

# The paper's Table 1 sampling proportions (percent). The paths are placeholders for datasets
# prepared with launch.prepare_data, one per source, all with one tokenizer (README: "Data").
TABLE1 = {"commoncrawl": 67.0, "c4": 15.0, "github": 4.5, "wikipedia": 4.5, "books": 4.5,
          "arxiv": 2.5, "stackexchange": 2.0}  # fmt: skip


def llama_mixture(root: str = "data/llama") -> str:
    """data.mixture of Table 1 over root/<source> directories."""
    return ";".join(f"{name}={root}/{name}@{pct}" for name, pct in TABLE1.items())


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.dim = 4096  # model width D (reference ModelArgs.dim)
    m.n_layers = 32  # number of transformer blocks L
    m.n_heads = 32  # query heads N; head dim H = dim // n_heads
    m.n_kv_heads = -1  # key/value heads K for grouped-query attention; -1 = n_heads (LLaMA-1)
    m.vocab_size = 32000  # tokenizer vocabulary V
    # the LM head is the embedding table transposed, no separate output matrix (LLaMA-3.2-1B/3B)
    m.tie_word_embeddings = False
    m.multiple_of = 256  # SwiGLU hidden size is rounded up to a multiple of this
    m.ffn_dim_multiplier = -1.0  # extra SwiGLU width factor (LLaMA-2-70B: 1.3); -1 = none
    m.norm_eps = 1e-6  # epsilon of RMSNorm
    m.rope_theta = 10000.0  # rotary embedding base
    m.max_seq_len = 2048  # longest sequence the model is built for (learned positions, KV cache)
    m.dtype = "bfloat16"  # compute dtype of activations and matmuls
    m.param_dtype = "float32"  # dtype of the master weights
    # dtype of the residual stream x + attn(x) + mlp(...) across layers; float32 keeps bf16
    # rounding from piling up with depth (see BENCHMARKS.md); = dtype gives all-bf16 adds
    m.residual_dtype = "float32"
    m.init_std = 0.02  # stddev of the normal init of weight matrices
    m.attention_impl = "auto"  # reference | blockwise | cudnn | auto (cudnn on GPU when it fits)
    m.attn_block_q = 512  # query tile of blockwise attention
    m.attn_block_k = 512  # key tile of blockwise attention
    m.remat_policy = "save_linear"  # none | full | save_linear | save_qkv_attn | offload_linear
    m.norm = "rmsnorm"  # ablation switch: rmsnorm | layernorm
    m.norm_placement = "pre"  # ablation switch: pre | post
    m.mlp = "swiglu"  # ablation switch: swiglu | gelu (width matched to SwiGLU's parameters)
    m.position = "rope"  # ablation switch: rope | learned | none
    # LoRA: rank of the adapters (0 = off: full fine-tuning), their scale alpha (the update is
    # alpha/rank x A B) and the weights adapted, any of q,k,v,o,w1,w2,w3; the base stays frozen
    m.lora_rank = 0
    m.lora_alpha = 16.0
    m.lora_targets = "q,v"

    c.train = t = ml_collections.ConfigDict()
    t.steps = 250_000  # optimizer steps of the run
    t.batch_size = 2048  # global batch in sequences (2048 x 2048 = 4M tokens)
    t.seq_len = 2048  # tokens per training sequence
    t.seed = 0  # seed for init, data order and sampling
    t.data_seed = -1  # seed of the data order alone; -1 = train.seed (ablations fix it)
    t.lr = 3e-4  # peak learning rate
    t.warmup_steps = 2000  # linear warmup steps
    t.min_lr_ratio = 0.1  # cosine decays to this fraction of the peak
    t.b1 = 0.9  # AdamW beta1
    t.b2 = 0.95  # AdamW beta2
    t.eps = 1e-8  # AdamW epsilon
    t.weight_decay = 0.1  # decoupled weight decay (not on norms or biases)
    t.clip_norm = 1.0  # global gradient-norm clip
    t.grad_accum_steps = 1  # microbatches accumulated per optimizer step
    t.log_every = 10  # steps between metric logs
    t.eval_every = 500  # steps between validation-loss evaluations; 0 = never
    t.eval_batches = 8  # batches per validation evaluation
    t.skip_nonfinite = False  # skip (and count) steps with a non-finite loss instead of stopping
    t.profile_steps = ""  # "a,b": write a jax.profiler trace of steps a..b to the workdir
    t.samples = 3  # samples (validation prompts, temperature 0.8, top-k 40) printed at the end
    t.sample_tokens = 64  # length of each sample
    # step watchdog: exit (status 3, all threads' stacks printed) when no step completes for
    # max(this, 10 x the recent median step) seconds; 0 = off
    t.step_timeout_s = 0.0
    # start from released weights: "" (random init) | hf:DIR | meta:DIR | ours:DIR (an export);
    # the model's shape (and the tokenizer, if DIR has tokenizer.model) come from DIR
    t.init_from = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # data-parallel replicas; -1 = all devices left over
    c.mesh.fsdp = -1  # fully-sharded data parallel (params and optimizer state sharded)
    c.mesh.tensor = 1  # Megatron-style tensor parallel over heads, mlp and vocab
    c.mesh.context = 1  # context parallel: the sequence split over devices for the whole model
    # how attention sees keys on other context shards: all_gather (K/V gathered per layer) |
    # ring (K/V blocks passed around the ring; no device holds the whole sequence's K/V)
    c.mesh.context_strategy = "all_gather"
    # Korthikanti et al. sequence parallelism: norms and the residual stream split along the
    # sequence over tensor (needs tensor > 1); all-gather/reduce-scatter replace all-reduce
    c.mesh.sequence_parallel = False

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # prepared dataset dir (launch.prepare_data); "" = built-in default corpus
    c.data.tokenizer = ""  # sentencepiece .model; "" = the default corpus's tokenizer
    c.data.prefetch = 2  # batches prepared ahead by the loader thread
    # attention never crosses a document boundary in a packed sequence (segment ids from BOS),
    # positions restart at each document; instruction data (prepared packed) always does this
    c.data.document_masking = False
    # several prepared datasets sampled in proportion, "name=PATH@WEIGHT;name=PATH@WEIGHT;..."
    # (weights normalized; each source keeps its own epochs); "" = data.path alone
    c.data.mixture = ""
    # resume on data other than the checkpoint's (another tokenizer or re-prepared dataset)
    c.data.allow_dataset_change = False

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # steps between checkpoints; 0 = only at the end
    c.checkpoint.keep = 3  # most recent checkpoints kept
    c.checkpoint.keep_period = 0  # also keep every step divisible by this; 0 = none
    c.checkpoint.async_save = True  # write checkpoints in the background
    # start over in a workdir whose metrics survive but whose checkpoints/ is gone
    c.checkpoint.allow_restart = False
    # on resume, refuse any config change (beyond mesh/distributed); default: list them, go on
    c.checkpoint.strict_resume = False
    # a checkpoint that cannot be restored: fallback (move it to corrupt-<step>, resume from the
    # newest older one) | fail
    c.checkpoint.on_corrupt = "fallback"

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""  # host:port of process 0; "" = auto (SLURM) or single process
    c.distributed.num_processes = 0  # processes in the job; 0 = auto
    c.distributed.process_id = -1  # this process's index; -1 = auto
    # a process whose peer sent no heartbeat for this long names it and exits 3; 0 = off
    c.distributed.peer_timeout_s = 30.0
    return c


def steps_for_tokens(c: ml_collections.ConfigDict, tokens: float) -> int:
    """Optimizer steps that train `tokens` tokens at c's batch_size x seq_len (the nearest
    whole step: within half a step's tokens). Overriding batch_size or seq_len on the command
    line afterwards keeps these steps, so set train.steps too to keep the token count."""
    return round(tokens / (c.train.batch_size * c.train.seq_len))


def get_config() -> ml_collections.ConfigDict:
    """The schema's defaults as a config file of their own (launch.convert's overrides)."""
    return base_config()
