"""`student-trainer augment`: TinyBERT-style masked-LM word replacement, written as a loadable TSV."""

from __future__ import annotations

import argparse

from shared.errors import UserError
from student_trainer.data.loading import split_columns
from student_trainer.data.readers import load_file, load_task
from student_trainer.data.tasks import TaskData
from student_trainer.train.distributed import resolve_device


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "augment",
        help="Augment a training set by masked-LM word replacement (TinyBERT).",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model_name_or_path", required=True, help="A fill-mask checkpoint (dir or hub id).")
    source = parser.add_argument_group("input: --task/--data_dir or --input")
    source.add_argument("--task", help="Registered task whose split is augmented.")
    source.add_argument("--data_dir", help="Folder with the task's files.")
    source.add_argument("--split", default="train", help="Split of --task to augment.")
    source.add_argument("--input", help="A .tsv/.csv/.jsonl file instead of --task.")
    source.add_argument(
        "--text_columns", default="sentence", help="Comma-separated text column(s) of --input."
    )
    source.add_argument("--label_column", default="label", help="Label column of --input ('' for none).")
    source.add_argument("--skip_bad_rows", action="store_true", help="Skip (and count) malformed rows.")
    parser.add_argument("--output", required=True, help="TSV to write (appended to when resuming).")
    parser.add_argument("--num_aug", type=int, default=20, help="N: augmented copies per sentence.")
    parser.add_argument("--top_m", type=int, default=15, help="M: masked-LM candidates per word.")
    parser.add_argument("--replace_prob", type=float, default=0.4, help="p: probability to replace a word.")
    parser.add_argument("--word_vectors", help="GloVe-format text file for words of several word pieces.")
    parser.add_argument(
        "--max_word_vectors", type=int, default=100_000, help="Read only the first N vectors."
    )
    parser.add_argument("--seed", type=int, default=42, help="Seed of the replacement choices.")
    parser.add_argument("--batch_size", type=int, default=32, help="Masked sentences per MLM forward pass.")
    parser.add_argument(
        "--max_seq_length", type=int, default=256, help="Token limit of 'masked [SEP] original'."
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto.")
    parser.add_argument("--disable_tqdm", action="store_true", help="Hide the progress bar.")
    parser.set_defaults(func=run)


def _load_input(args: argparse.Namespace) -> tuple[TaskData, str]:
    if bool(args.task) == bool(args.input):
        raise UserError("give either --task (with --data_dir) or --input")
    if args.task:
        if not args.data_dir:
            raise UserError("--task needs --data_dir")
        data = load_task(args.task, args.data_dir, args.split, skip_bad_rows=args.skip_bad_rows)
        return data, f"{args.task}/{args.split}/{args.data_dir}"
    data = load_file(
        args.input,
        text_columns=split_columns(args.text_columns),
        label_column=args.label_column or None,
        skip_bad_rows=args.skip_bad_rows,
    )
    return data, str(args.input)


def run(args: argparse.Namespace) -> int:
    from student_trainer.data.augment import (  # heavy: on use
        Augmenter,
        AugmentSettings,
        WordVectors,
        augment_task,
    )

    for name in ("num_aug", "top_m", "batch_size", "max_seq_length", "max_word_vectors"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.replace_prob <= 1.0:
        raise UserError(f"--replace_prob must be in [0, 1], got {args.replace_prob}")
    data, source = _load_input(args)
    settings = AugmentSettings(
        source=source,
        model_name_or_path=args.model_name_or_path,
        num_aug=args.num_aug,
        top_m=args.top_m,
        replace_prob=args.replace_prob,
        seed=args.seed,
        word_vectors=args.word_vectors,
    )
    vectors = WordVectors.load(args.word_vectors, args.max_word_vectors) if args.word_vectors else None
    augmenter = Augmenter.load(
        args.model_name_or_path,
        device=str(resolve_device(args.device)),
        top_m=args.top_m,
        word_vectors=vectors,
        batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
    )
    counts = augment_task(data, args.output, augmenter, settings, disable_tqdm=args.disable_tqdm)
    resumed = f" (resumed after {counts['resumed_from']} sentences)" if counts["resumed_from"] else ""
    labels = ", ".join(f"{i}={name}" for i, name in enumerate(data.label_names))
    rows = f"{counts['rows']} rows ({len(data)} sentences x {1 + args.num_aug})"
    print(f"wrote {rows} to {args.output}{resumed}; labels: {labels or 'none'}")
    return 0
