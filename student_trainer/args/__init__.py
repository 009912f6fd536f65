"""Options of `distill` and `finetune`: dataclasses with Hugging Face ``TrainingArguments`` names."""
