"""python -m launch.train_tokenizer --input <files or globs> --vocab-size N --output DIR"""

import argparse

from llama_jax.data.tokenizer import Tokenizer, train_tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m launch.train_tokenizer", description=__doc__)
    p.add_argument(
        "--input", nargs="+", required=True, help=".txt/.jsonl[.gz]/.parquet files, dirs or globs"
    )
    p.add_argument(
        "--vocab-size", type=int, default=32000, help="pieces incl. specials and 256 bytes"
    )
    p.add_argument(
        "--output", required=True, help="directory for tokenizer.model / tokenizer.vocab"
    )
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column of the text")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled to train on")
    args = p.parse_args(argv)
    from llama_jax import cli

    try:
        execute(p, args)
    except cli.USER_ERRORS as e:  # bad input: one line `error: <Type>: <message>`, exit 2
        cli.fail(e)


def execute(p, args):
    path = train_tokenizer(
        args.input,
        args.vocab_size,
        args.output,
        text_field=args.text_field,
        max_sentences=args.max_sentences,
    )
    print(Tokenizer(path))


if __name__ == "__main__":
    main()
