"""python -m launch.prepare_data --input <files/globs> --tokenizer <model> --output DIR
[--val-fraction 0.005] [--text-field text] [--workers N]

With no --input, builds the default corpus (the Python standard library's sources) instead.
--format instruction --template alpaca|llama2_chat --seq-len T: instruction rows (JSONL of
instruction/input/output or messages) rendered with the template, a loss mask on the responses,
packed into rows of T + 1 tokens (train with train.seq_len=T).
"""

import argparse

from llama_jax.data import default_corpus, prepare


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m launch.prepare_data", description=__doc__)
    p.add_argument("--input", nargs="+", help=".txt/.jsonl[.gz]/.parquet files, dirs or globs")
    p.add_argument("--tokenizer", help="sentencepiece .model (launch.train_tokenizer)")
    p.add_argument("--output", help="dataset directory to create")
    p.add_argument(
        "--val-fraction", type=float, default=0.005, help="fraction of documents held out"
    )
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column of the text")
    p.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all CPUs)"
    )
    p.add_argument(
        "--vocab-size", type=int, default=2048, help="default corpus only: tokenizer size"
    )
    p.add_argument("--format", choices=("text", "instruction"), default="text")
    p.add_argument("--template", default="alpaca", help="instruction only: a template name")
    p.add_argument("--seq-len", type=int, default=2048, help="instruction only: train.seq_len")
    args = p.parse_args(argv)
    from llama_jax import cli

    try:
        execute(p, args)
    except cli.USER_ERRORS as e:  # bad input: one line `error: <Type>: <message>`, exit 2
        cli.fail(e)


def execute(p, args):
    if not args.input:
        data, tok = default_corpus.ensure_default_dataset(args.vocab_size, args.output)
        print(f"default corpus: dataset {data}, tokenizer {tok}")
        return
    if not args.tokenizer or not args.output:
        p.error("--input needs --tokenizer and --output")
    if args.format == "instruction":
        from llama_jax.data import instruct

        if len(args.input) != 1:
            p.error("--format instruction reads one JSONL --input file")
        meta = instruct.prepare(args.input[0], args.tokenizer, args.output, args.template,
                                args.seq_len, args.val_fraction)  # fmt: skip
        print(instruct.summary_line(meta, args.output))
        return
    prepare.prepare(
        args.input, args.tokenizer, args.output, args.val_fraction, args.text_field, args.workers
    )


if __name__ == "__main__":
    main()
