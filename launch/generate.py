"""python -m launch.generate --checkpoint DIR --tokenizer MODEL --prompt "..." [--prompt ...]
    [--max-new-tokens N --temperature T --top-p P --top-k K --seed S] [--tensor N]
    [--template alpaca|llama2_chat]

DIR is a params checkpoint (launch.export or launch.convert --to ours). One prompt streams its
tokens as they come; several are decoded as one batch and printed when done. --template wraps
each prompt as an instruction the way prepare_data --format instruction rendered training rows.
"""

import argparse
import sys

from llama_jax import cli


def continuation(tokenizer, prompt_ids, new_ids) -> str:
    """The text new_ids add after the prompt (decoded together: sentencepiece drops a leading
    space of a text's first piece, which a continuation's first word needs)."""
    return tokenizer.decode(prompt_ids + new_ids)[len(tokenizer.decode(prompt_ids)) :]


class _Streamer:
    """Prints one row's text as it grows; waits while the tail is a partial UTF-8 character."""

    def __init__(self, tokenizer, prompt_ids):
        self.tokenizer, self.prompt, self.ids, self.shown = tokenizer, prompt_ids, [], 0

    def __call__(self, row: int, token: int):
        self.ids.append(token)
        text = continuation(self.tokenizer, self.prompt, self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.shown :])
            sys.stdout.flush()
            self.shown = len(text)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m launch.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="params checkpoint directory")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling; 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None,
                   help="cast params and compute in it, e.g. bfloat16 (default: the checkpoint's)")  # fmt: skip
    p.add_argument("--tensor", type=int, default=1, help="devices to shard heads/cache over")
    p.add_argument("--template", default="", help="wrap prompts as instructions (alpaca, ...)")
    a = p.parse_args(argv)
    try:
        from llama_jax.inference.generate import Sampling, generate, load

        params, cfg, tok, mesh = load(a.checkpoint, a.tokenizer, a.dtype, a.tensor, cli.say)
        if a.template:
            from llama_jax.data.instruct import prompt

            prompts = [prompt(text, a.template, tok).tolist() for text in a.prompt]
        else:
            prompts = [tok.encode(text, bos=True) for text in a.prompt]
        sampling = Sampling(a.temperature, a.top_k, a.top_p)
        stream = _Streamer(tok, prompts[0]) if len(prompts) == 1 else None
        if stream and not a.template:  # with a template: the response alone
            sys.stdout.write(a.prompt[0])
        outs = generate(
            params,
            cfg,
            prompts,
            a.max_new_tokens,
            sampling=sampling,
            seed=a.seed,
            eos_id=tok.eos_id,
            on_token=stream,
            mesh=mesh,
        )
    except cli.USER_ERRORS as e:
        cli.fail(e)
    if stream:
        print()
        return
    for text, ids, new in zip(a.prompt, prompts, outs):
        print(f"--- {text!r}\n{'' if a.template else text}{continuation(tok, ids, new)}")


if __name__ == "__main__":
    main()
