"""python -m launch.eval --checkpoint DIR --tokenizer MODEL --task FILE [--task FILE ...]

A task is one of:
  a prepared dataset dir (launch.prepare_data)   perplexity and bits per byte of --split
  a .jsonl of {"text": ...}                       perplexity and bits per byte of each text
  a .jsonl of {"context", "choices", "label"}     multiple-choice accuracy, --num-fewshot k,
                                                  per --normalization (char is the paper's)
Prints one JSON object per task.
"""

import argparse
import json
import os

from llama_jax import cli


def run_task(scorer, tokenizer, path: str, args) -> dict:
    from llama_jax.inference import evaluate as ev

    if os.path.isdir(path):
        return ev.perplexity_dataset(scorer, path, args.split, tokenizer, args.max_tokens)
    examples = ev.load_jsonl(path)[: args.limit or None]
    if not examples:
        raise ValueError(f"{path}: no examples")
    if "choices" in examples[0]:
        return ev.multiple_choice(
            scorer,
            tokenizer,
            examples,
            num_fewshot=args.num_fewshot,
            normalizations=args.normalization,
            seed=args.seed,
        )
    if "text" in examples[0]:
        return ev.perplexity_texts(scorer, tokenizer, [e["text"] for e in examples])
    raise ValueError(f"{path}: expected JSONL rows with 'text' or 'context'/'choices'/'label'")


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m launch.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="params checkpoint directory")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="sentencepiece .model (default: a prepared dataset's tokenizer.model)",
    )
    p.add_argument("--task", action="append", required=True, help="repeatable")
    p.add_argument("--split", default="val", help="split of a prepared dataset")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on a split's tokens")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument(
        "--normalization",
        action="append",
        default=None,
        help="none | token | char | unconditional; repeatable (default: all but unconditional)",
    )
    p.add_argument("--limit", type=int, default=0, help="first N examples only; 0 = all")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default=None,
                   help="cast params and compute in it, e.g. bfloat16 (default: the checkpoint's)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="few-shot example draw")
    a = p.parse_args(argv)
    a.normalization = a.normalization or ["none", "token", "char"]
    try:
        from llama_jax.data.tokenizer import Tokenizer, check_vocab
        from llama_jax.inference.evaluate import Scorer
        from llama_jax.weights.params_io import load_for_inference

        tok_path = a.tokenizer or next(
            (
                os.path.join(t, "tokenizer.model")
                for t in a.task
                if os.path.isfile(os.path.join(t, "tokenizer.model"))
            ),
            None,
        )
        if tok_path is None:
            raise ValueError("--tokenizer is required (no prepared dataset task supplies one)")
        tokenizer = Tokenizer(tok_path)
        params, cfg, line = load_for_inference(a.checkpoint, dtype=a.dtype)
        cli.say(f"{a.checkpoint}: {line}")
        check_vocab(tokenizer, cfg.vocab_size)
        scorer = Scorer(params, cfg, batch_size=a.batch_size)
        for task in a.task:
            print(json.dumps({"task": task, **run_task(scorer, tokenizer, task, a)}), flush=True)
    except cli.USER_ERRORS as e:
        cli.fail(e)


if __name__ == "__main__":
    main()
