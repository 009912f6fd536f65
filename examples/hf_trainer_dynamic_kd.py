"""A Hugging Face `Trainer` script with dynamic KD: `DynamicKDTrainer` in place of `Trainer`, plus teachers.

    python examples/hf_trainer_dynamic_kd.py STUDENT_DIR TEACHER_SPEC TRAIN.tsv OUTPUT_DIR
TEACHER_SPEC: `local:PATH` (loaded in this process) or a `teacher-server` URL, e.g. `http://gpu:8000#large`.
"""

import sys

from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from student_trainer import DynamicKDTrainer, KDConfig
from student_trainer.data.loading import load_train_and_eval
from student_trainer.data.tokenized import TokenizedDataset

student_dir, teacher, train_file, output_dir = sys.argv[1:5]
data, _ = load_train_and_eval(train_file=train_file)
tokenizer = AutoTokenizer.from_pretrained(student_dir)
model = AutoModelForSequenceClassification.from_pretrained(student_dir, num_labels=len(data.label_names))
args = TrainingArguments(
    output_dir, max_steps=4, gradient_accumulation_steps=2, logging_steps=1, report_to="tensorboard"
)
trainer = DynamicKDTrainer(
    model=model,
    args=args,
    train_dataset=TokenizedDataset(data, tokenizer, max_seq_length=128),
    processing_class=tokenizer,
    teachers={"large": teacher},  # or several: {"small": URL, "large": URL} with KDConfig("soft", ...)
    kd=KDConfig(teacher_selection="large", data_selection="entropy", selection_ratio=0.5),  # uncertain half
)
trainer.train()
trainer.save_model()
trainer.end()
