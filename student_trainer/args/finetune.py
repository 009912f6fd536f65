"""`student-trainer finetune` options: the model and data options of `distill` and Hugging Face's
``TrainingArguments`` with BERT's fine-tuning recipe as defaults (no KD)."""

from __future__ import annotations

from student_trainer.args.common import DataArguments, ModelArguments, check_output_dir
from student_trainer.args.parser import CommandArguments
from student_trainer.args.training import FinetuneTrainingArguments


class FinetuneArguments(CommandArguments):
    """Every `finetune` option (see :class:`~student_trainer.args.parser.CommandArguments`)."""

    PARTS = (ModelArguments, DataArguments, FinetuneTrainingArguments)

    def validate(self) -> FinetuneArguments:
        self.part(ModelArguments).validate()
        check_output_dir(self.training.given_output_dir)
        self.part(DataArguments).validate()
        return self

    @property
    def training(self) -> FinetuneTrainingArguments:
        return self.part(FinetuneTrainingArguments)
